"""`xlstm-metal evolve`: evolutionary architecture search (STAR-style genomes) scored on MAD tasks
under a parameter budget.

Example::

    xlstm-metal evolve --budget 200000 --population 6 --generations 3 --tasks in_context_recall \\
        --out runs/evolve
    xlstm-metal mad --arch runs/evolve/best-1.yaml --preset tiny      # score the winner on all tasks

Writes best-1.yaml ... (architectures `mad --arch` and `train --arch` read), history.jsonl (one
line per scored candidate: genome, blocks, parameters, scores), summary.json and evolution.png.
Parameters are counted at the preset's width with the task vocabulary. ``--engine optuna``
runs the search through the tuning machinery (Optuna's NSGA-II genetic sampler).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from ..monitor import current_job
from . import UsageError, any_text, check_output_path, large_int, seed_value


#: Architectures in the first population unless --start says otherwise.
DEFAULT_START = "mlstm,attention,hybrid"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evolve", help="evolutionary architecture search scored on MAD tasks",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=large_int, required=True, help="maximum trainable parameters of a candidate")
    p.add_argument("--population", type=int, default=6, help="candidates per generation (default: 6)")
    p.add_argument("--generations", type=int, default=3, help="generations (default: 3)")
    p.add_argument("--tasks", default="in_context_recall", help="comma-separated MAD tasks scored "
                   "(default: in_context_recall)")
    p.add_argument("--preset", choices=("tiny", "paper"), default="tiny", help="MAD preset (default: tiny)")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's training epochs per task")
    p.add_argument("--seed", type=seed_value, default=0,
                   help="seed of the search, data and initialisation (default: 0)")
    p.add_argument("--min-blocks", type=int, default=2, help="fewest blocks of a candidate (default: 2)")
    p.add_argument("--max-blocks", type=int, default=6, help="most blocks of a candidate (default: 6)")
    p.add_argument("--start", default=None, type=any_text,
                   help="architectures in the first population (default: mlstm,attention,hybrid; '' for none); "
                        "each must be one a genome holds (a block it cannot hold is refused)")
    p.add_argument("--engine", choices=("star", "optuna"), default="star",
                   help="star: STAR-style mutation and crossover of genomes (default); optuna: the tuning "
                   "machinery's NSGA-II genetic sampler over fixed-length genomes (needs optuna)")
    p.add_argument("--top", type=int, default=3, help="best architectures written (default: 3)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--resume", action="store_true",
                   help="continue the search in --out (interrupted, or with more --generations): the same "
                   "settings and seed replay it, taking the scores in its history.jsonl instead of training again")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..lab.evolve import evolve, evolve_optuna, mad_score_fn, planned_candidates, write_history, write_outputs
    from ..training.data import atomic_write_text
    from ..lab.genome import genome_of
    from ..lab.library import load_arch
    from ..lab.mad import PRESETS, task_names

    try:
        tasks = task_names(args.tasks)
    except ValueError as err:
        raise UsageError(str(err)) from None
    for name in ("budget", "population", "generations", "min_blocks", "max_blocks", "top"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.population < 2:
        raise UsageError("--population must be at least 2")
    if args.min_blocks > args.max_blocks:
        raise UsageError(f"--min-blocks {args.min_blocks} exceeds --max-blocks {args.max_blocks}")
    if args.epochs is not None and args.epochs <= 0:
        raise UsageError(f"--epochs must be positive, got {args.epochs}")
    out = check_output_path(args.out, "--out", directory=True)
    # Written at the first scored candidate or after the search: a directory of one of these names
    # (which --overwrite does not remove) failed there, after the training.
    # (those there: each N to --top filled the memory)
    for path in [out / name for name in ("search.json", "history.jsonl", "summary.json", "evolution.png")] + \
            [p for p in out.glob("best-*.yaml") if p.stem[5:].isdigit() and 0 < int(p.stem[5:]) <= args.top]:
        if path.is_dir():
            raise UsageError(f"{'--resume: ' if args.resume else ''}{path} is a directory; the search writes a file "
                             "there: give another --out")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the search in --out; --overwrite replaces it: give one")
    if not args.resume and not args.overwrite:
        # Every file a search writes (best-N.yaml beyond --top included: a new search removes those)
        # is replaced only with --overwrite.
        ours = [out / name for name in ("summary.json", "history.jsonl", "search.json", "evolution.png")] + \
            sorted(p for p in out.glob("best-*.yaml") if p.stem[len("best-"):].isdigit())
        found = [p.name for p in ours if p.exists()]
        if found:
            raise UsageError(f"{out} holds a search already ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}); "
                             "pass --resume to continue it or --overwrite to replace it")
    preset = PRESETS[args.preset]
    vocab = max(preset.task(t).settings["vocab_size"] for t in tasks)
    if args.start is not None and args.engine != "star":
        raise UsageError("--start seeds the first population of --engine star; --engine optuna samples its own")
    start = [s.strip() for s in (DEFAULT_START if args.start is None else args.start).split(",")]
    start = [] if start == [""] else start  # '' is none; "mlstm,,hybrid" lost one silently
    if "" in start or len(set(start)) < len(start):  # (a repeat was replaced by a random architecture)
        raise UsageError(f"--start {args.start!r} has an empty or repeated entry: name each architecture once")
    genomes = []
    for name in start:  # each one must load and be a genome (evolve would skip it silently)
        try:
            genomes.append(genome_of(load_arch(name)))
        except ValueError as err:  # WiringError included
            raise UsageError(f"--start {name}: {err}") from None
    settings = {"engine": args.engine, "tasks": tasks, "preset": args.preset, "epochs": args.epochs,
                "budget": args.budget, "seed": args.seed, "population": args.population,
                "min_blocks": args.min_blocks, "max_blocks": args.max_blocks, "start": start}
    known = _resume(out, settings, args.generations) if args.resume else {}
    # The search tried for minutes before saying this (a --start given is checked against --budget below).
    if not (args.start and genomes) and args.budget < (least := _smallest_candidate(args.min_blocks, vocab, preset)):
        raise UsageError(f"no architecture fits the parameter budget of {args.budget:,}: {args.min_blocks} blocks "
                         f"(--min-blocks) have at least {least:,} parameters at the {args.preset} preset's width")
    if args.engine == "star":
        _check_start(args, start, genomes, vocab, preset)
    history: list[dict] = []
    begun = [False]

    def begin() -> None:
        # The search's files are written from its first scored candidate on: a search that fails
        # or is stopped before one leaves --out as it was (the search an --overwrite would replace
        # included); from there on none of a replaced search's results stand beside this one's.
        if begun[0]:
            return
        begun[0] = True
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            for path in [out / name for name in ("summary.json", "evolution.png", "history.jsonl")] + \
                    [p for p in out.glob("best-*.yaml") if p.stem[len("best-"):].isdigit() and p.is_file()]:
                path.unlink(missing_ok=True)
        atomic_write_text(out / "search.json", json.dumps({**settings, "generations": args.generations}, indent=2))

    total = args.population * args.generations if args.engine == "optuna" else \
        planned_candidates(args.population, args.generations)
    job, scored = current_job(), [0]  # `xlstm-metal top`; after each candidate a memory-watchdog safe point

    def stop_note() -> str:
        """What a stop leaves: the candidates scored so far (none: nothing was written to resume)."""
        if scored[0] == 0:
            return f"no candidate was scored yet, so nothing was written to {out} (--resume has nothing to continue)"
        return f"{scored[0]} candidates were scored and are in {out / 'history.jsonl'} (--resume continues)"

    def report(cand) -> None:
        begin()
        history.append(cand.record())
        write_history(history, out / "history.jsonl")  # an interrupted search keeps what it scored
        print(f"gen {cand.generation} fitness {cand.fitness:.3f} params {cand.parameters:,}: "
              f"{' '.join(b['spec'] for b in cand.arch['blocks'])}", file=sys.stderr)
        scored[0] += 1
        job.update(phase="evolve", done=scored[0], total=total, unit="candidates",
                   message=f"generation {cand.generation}, last fitness {cand.fitness:.3f}")
        job.check(note=stop_note())

    common = dict(budget=args.budget, population=args.population, generations=args.generations, seed=args.seed,
                  min_blocks=args.min_blocks, max_blocks=args.max_blocks, dim=preset.dim, num_heads=preset.num_heads,
                  vocab_size=vocab, on_candidate=report, progress=sys.stderr.isatty(), known=known)
    # Between training steps too: a hard memory limit stops the search within a step.
    score = mad_score_fn(tasks, args.preset, seed=args.seed, epochs=args.epochs, safe_point=lambda: job.check(note=stop_note()))
    try:
        if args.engine == "optuna":
            if importlib.util.find_spec("optuna") is None:
                raise UsageError("--engine optuna needs optuna (pip install optuna)")
            result = evolve_optuna(score, **common)
        else:
            result = evolve(score, start=start, **common)
    except ValueError as err:  # e.g. no architecture fits the budget: nothing was written (see begin)
        raise UsageError(str(err)) from None
    written = write_outputs(result, out, top=args.top, meta={
        "tasks": tasks, "preset": args.preset, "epochs": args.epochs, "budget": args.budget, "seed": args.seed,
        "engine": args.engine})
    best = result.best[0]
    print(f"best fitness {best.fitness:.3f} with {best.parameters:,} parameters: "
          f"{' '.join(b['spec'] for b in best.arch['blocks'])}")
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def _check_start(args, start: list[str], genomes: list, vocab: int, preset) -> None:
    """The --start architectures as the search takes them unchanged: more than --population of
    them (the rest would never be scored), or one outside --min-blocks..--max-blocks or over
    --budget (the search would cut or fill it up into another architecture), is a UsageError
    naming it. The default start is documented, not asked for: a warning says the same instead
    (the search takes the first --population of it, cut to fit)."""
    from ..lab.evolve import count_parameters
    from ..lab.genome import spec_of

    given = args.start is not None
    source = "--start" if given else f"the default start ({DEFAULT_START})"

    def refuse(problem: str, remedy: str) -> None:
        if given:
            raise UsageError(f"{problem}; {remedy}")
        print(f"warning: {problem}; give --start to choose the first architectures", file=sys.stderr)

    if len(start) > args.population:
        refuse(f"{source} names {len(start)} architectures and --population {args.population} puts only the first "
               f"{args.population} in the first generation: {', '.join(start[args.population:])} would never be "
               "scored", f"give at most {args.population} or raise --population")
        start, genomes = start[:args.population], genomes[:args.population]
    for name, genome in zip(start, genomes):
        who = f"--start {name}" if given else f"the default start architecture {name}"
        if not args.min_blocks <= len(genome) <= args.max_blocks:
            change = "cut it" if len(genome) > args.max_blocks else "fill it up with random blocks"
            refuse(f"{who} has {len(genome)} blocks, outside --min-blocks {args.min_blocks} .. --max-blocks "
                   f"{args.max_blocks}: the search would {change} into another architecture",
                   "widen the range or leave it out")
            continue
        params = count_parameters(spec_of(genome), vocab, preset.dim, preset.num_heads)
        if params > args.budget:
            refuse(f"{who} has {params:,} parameters (at the {args.preset} preset's width), over --budget "
                   f"{args.budget:,}: the search would cut it into another architecture",
                   "raise --budget or leave it out")


def _smallest_candidate(min_blocks: int, vocab: int, preset) -> int:
    """Parameters of the smallest candidate: ``min_blocks`` of the smallest block (blocks add up;
    each of the few distinct genes is built once, about a second)."""
    import itertools

    from ..lab.evolve import count_parameters
    from ..lab.genome import GENE_SIZES, normalise, spec_of

    def size(genome) -> int:
        return count_parameters(spec_of(genome), vocab, preset.dim, preset.num_heads)

    genes = {normalise([gene])[0] for gene in itertools.product(*map(range, GENE_SIZES))}
    return size([min(genes, key=lambda gene: size([gene]))] * min_blocks)


def _resume(out: Path, settings: dict, generations: int) -> dict:
    """Scores by genome from the search in ``out``, which must have been run with ``settings``
    and at most ``generations`` generations."""
    from ..lab.evolve import known_scores

    try:
        before = json.loads((out / "search.json").read_text())
        lines = (out / "history.jsonl").read_text().splitlines() if (out / "history.jsonl").exists() else []
        history = [json.loads(line) for line in lines if line.strip()]
        known = known_scores(history)
    except FileNotFoundError:
        raise UsageError(f"--resume: {out} holds no search (no search.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:  # OSError: e.g. a directory named search.json
        raise UsageError(f"--resume: cannot read the search in {out}: {err}") from None
    if not isinstance(before, dict):  # (before.get below was an AttributeError traceback)
        raise UsageError(f"--resume: cannot read the search in {out}: search.json must hold a JSON object, not "
                         f"{type(before).__name__}")
    differ = [k for k in settings if before.get(k) != settings[k]]
    if differ:
        raise UsageError("--resume: the search in {} ran with {}; give the same".format(
            out, ", ".join(f"{k} {before.get(k)!r} (now {settings[k]!r})" for k in differ)))
    ran = before.get("generations")
    if isinstance(ran, int) and not isinstance(ran, bool) and generations < ran and known:
        # The replay stops early and history.jsonl is rewritten from it: the scored candidates of
        # the later generations were dropped from it.
        raise UsageError(f"--resume: the search in {out} ran with --generations {ran}; fewer ({generations}) would "
                         f"drop its scored candidates of later generations from history.jsonl: give --generations "
                         f"{ran} or more")
    print(f"resuming: {len(known)} scored candidates in {out / 'history.jsonl'}", file=sys.stderr)
    return known

