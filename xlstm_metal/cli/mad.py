"""`xlstm-metal mad`: train and score an architecture on the MAD synthetic tasks.

Examples::

    xlstm-metal mad --arch mlstm --tasks in_context_recall --preset tiny
    xlstm-metal mad --arch my_block.yaml --preset tiny --seed 1 --json
    xlstm-metal mad --arch hybrid --show-wiring hybrid.png        # text + graph, no training

``--arch`` takes a shipped architecture (mlstm, slstm, attention, hybrid, swiglu-only, ...), a
shipped block spec name (a two-block model of it), or a YAML/JSON file: an architecture
(``blocks: [...]``) or a block wiring spec (``cells``/``connections``). Results go to
``--out`` (results.json and accuracy.png; an existing one is replaced only with --overwrite).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..monitor import current_job
from ..training.data import atomic_write_text
from . import UsageError, check_output_path, seed_value


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..lab.library import arch_names

    p = subparsers.add_parser(
        "mad", help="train and score an architecture on the MAD synthetic tasks",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", required=True, help=f"architecture name ({', '.join(arch_names())}), block spec "
                   "name, or a YAML/JSON architecture / wiring spec file")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: all six): in_context_recall, "
                   "fuzzy_in_context_recall, noisy_in_context_recall, selective_copying, compression, memorization")
    p.add_argument("--preset", choices=("tiny", "paper"), default="tiny",
                   help="tiny: minutes per task on a 2-core CPU; paper: MAD-Lab's settings (default: tiny)")
    # None: not given (--show-wiring refuses it); scoring takes 0.
    p.add_argument("--seed", type=seed_value, default=None, help="seed of the data and the initialisation (default: 0)")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON (a list: one object per task with task, accuracy, ...)")
    p.add_argument("--out", default=None, help="directory for results.json and accuracy.png "
                   "(default: mad-runs/ARCH-PRESET-seedN)")
    p.add_argument("--plot-format", choices=("png", "svg"), default=None, help="plot file type (default: png)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--show-wiring", nargs="?", const="-", default=None, metavar="FILE",
                   help="print the model's wiring and exit; with FILE (.png/.svg) also draw each distinct block")
    p.set_defaults(func=run)
    return p


def _arch_label(arch: str) -> str:
    return Path(arch).stem if arch.endswith((".yaml", ".yml", ".json")) else arch


def run(args) -> int:
    from ..lab.library import load_arch
    from ..lab.mad import PRESETS, aggregate, plot_results, run_task, task_names
    from ..lab.model import LabConfig, LabModel
    from ..lab.spec import WiringError

    try:
        tasks = task_names(args.tasks)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.epochs is not None and args.epochs <= 0:
        raise UsageError(f"--epochs must be positive, got {args.epochs}")
    preset = PRESETS[args.preset]
    # Build the model once up front: a bad spec fails here, before any training.
    try:
        arch = load_arch(args.arch)
        config = LabConfig.from_arch(arch, vocab_size=16, embedding_dim=preset.dim,
                                     block_defaults={"num_heads": preset.num_heads})
        model = LabModel(config)
    except WiringError as err:
        raise UsageError(f"--arch {args.arch}: {err}") from None
    unused = [f"{key} {arch[key]}" for key in ("embedding_dim", "vocab_size") if key in arch]
    if unused:  # (`train --arch` takes them; MAD compares architectures at one width, on its tasks' vocabulary)
        print(f"warning: --arch {args.arch}: {' and '.join(unused)} not used: MAD models take the --preset's width "
              f"({preset.dim}) and each task's vocabulary", file=sys.stderr)

    if args.show_wiring is not None:
        # --overwrite replaces the drawing of --show-wiring FILE; without FILE nothing is written.
        scoring = [flag for flag, value in (("--tasks", args.tasks), ("--epochs", args.epochs), ("--out", args.out),
                                            ("--json", args.json), ("--plot-format", args.plot_format),
                                            ("--seed", args.seed),
                                            ("--overwrite", args.overwrite and args.show_wiring == "-"))
                   if value not in (None, False)]
        if scoring:
            raise UsageError(f"--show-wiring prints the wiring and exits without training; {', '.join(scoring)} "
                             "would be ignored: run without --show-wiring to score the architecture")
        targets = [] if args.show_wiring == "-" else _drawing_targets(model, Path(args.show_wiring), args.overwrite)
        print(model.wiring())  # after every check: an error leaves no half-done output
        if targets:
            from ..lab.render import render_wiring

            for index, block, target in targets:
                render_wiring(block, target, f"block {index}: {block.resolved.name}")
                print(f"wrote {target}", file=sys.stderr)
        return 0

    if args.seed is None:
        args.seed = 0
    label = _arch_label(args.arch)
    out = check_output_path(args.out or Path("mad-runs") / f"{label}-{args.preset}-seed{args.seed}", "--out",
                            directory=True)
    results_path, plot_path = out / "results.json", out / f"accuracy.{args.plot_format or 'png'}"
    for existing in (results_path, plot_path):
        if existing.is_dir():  # --overwrite failed on it only after the training
            raise UsageError(f"{existing} is a directory; mad writes a file there: give another --out")
        if existing.exists() and not args.overwrite:
            raise UsageError(f"{existing} exists; pass --overwrite to replace it")

    from tqdm import tqdm

    results = []
    job = current_job()  # `xlstm-metal top`; between tasks a memory-watchdog safe point
    for name in tqdm(tasks, desc=f"MAD {label}", unit="task", disable=args.json or not sys.stderr.isatty()):
        job.update(phase="mad", done=len(results), total=len(tasks), unit="tasks", message=f"task {name}")
        note = f"{len(results)} of {len(tasks)} tasks were scored; " + \
            (f"they are in {results_path}" if results else "nothing was written")
        job.check(note=note)
        results.append(run_task(args.arch, name, preset, seed=args.seed, progress=sys.stderr.isatty(),
                                epochs=args.epochs, safe_point=lambda: job.check(note=note)))
        r = results[-1]
        print(f"{r.task}: accuracy {r.accuracy:.3f} (chance {r.chance:.3f}, {r.steps} steps, {r.seconds:.0f}s)"
              f"{'' if math.isfinite(r.loss) else f'; the training diverged (loss {r.loss})'}",
              file=sys.stderr)
        payload = [{"arch": label, "preset": args.preset, "seed": args.seed, **r.to_dict()} for r in results]
        out.mkdir(parents=True, exist_ok=True)
        if len(results) == 1 and args.overwrite:  # the replaced run's plots go with its results
            for stale in (out / "accuracy.png", out / "accuracy.svg"):
                stale.is_file() and stale.unlink()
        # after each task (a stopped run kept no score)
        rest = {"unscored": tasks[len(results):]} if len(results) < len(tasks) else {}
        atomic_write_text(results_path, json.dumps({"arch": label, "preset": args.preset, "seed": args.seed,
                                                    "aggregate": aggregate(results), "tasks": payload, **rest},
                                                   indent=2))
    mean = aggregate(results)
    plot_results(results, plot_path, f"MAD {label} ({args.preset}, seed {args.seed})")
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        width = max(len(r.task) for r in results)
        print(f"{'task':<{width}}  accuracy  chance")
        for r in results:
            print(f"{r.task:<{width}}  {r.accuracy:8.3f}  {r.chance:6.3f}")
        print(f"{'aggregate':<{width}}  {mean:8.3f}")
    print(f"wrote {results_path} and {plot_path}", file=sys.stderr)
    return 0


def _drawing_targets(model, path: Path, overwrite: bool) -> list:
    """(block index, block, file) for each distinct block of ``model``: the first at ``path``,
    the others beside it (``NAME-blockI.EXT``); UsageError, before anything is printed or drawn,
    for a file type that cannot be drawn, a missing directory or a file there without --overwrite."""
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"--show-wiring {path}: give a .png, .svg or .pdf file")
    seen: dict[str, Path] = {}
    targets = []
    for index, block in enumerate(model.blocks):
        key = block.describe()
        if key in seen:
            continue
        target = path if not seen else path.with_name(f"{path.stem}-block{index}{path.suffix}")
        seen[key] = target
        targets.append((index, block, target))
    check_output_path(path, "--show-wiring", directory=False)  # missing folders are made, as for plot --out
    for _, _, target in targets:
        if target.is_dir():
            raise UsageError(f"--show-wiring: {target} is a directory")
        if target.exists() and not overwrite:
            raise UsageError(f"{target} exists; pass --overwrite to replace it")
    return targets
