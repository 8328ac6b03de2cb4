"""Evolutionary architecture search over genomes (STAR-style), scored on MAD tasks under a
parameter budget.

Loop: a population of genomes (seeded with shipped architectures and random ones) is scored;
each generation keeps the best (elitism), fills up with children of tournament-selected parents
(one-point crossover, then mutation), and scores the new ones. A candidate above the parameter
budget is repaired by mutation (dropping blocks first) until it fits; scores are cached by
genome. Fitness is the mean MAD accuracy over the chosen tasks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .genome import GENE_SIZES, OPERATORS, Genome, crossover, genome_of, mutate, normalise, random_genome, spec_of
from .library import load_arch
from .mad import run_task
from .model import LabConfig, LabModel
from ..training.data import atomic_write_text

ScoreFn = Callable[[dict[str, Any]], dict[str, float]]


@dataclass
class Candidate:
    genome: Genome
    arch: dict[str, Any]
    parameters: int
    scores: dict[str, float] = field(default_factory=dict)
    generation: int = 0

    @property
    def fitness(self) -> float:
        return float(np.mean(list(self.scores.values()))) if self.scores else -math.inf

    def record(self) -> dict[str, Any]:
        return {"generation": self.generation, "genome": [list(g) for g in self.genome],
                "blocks": [b["spec"] + (f"({_short(b['params'])})" if b["params"] else "") for b in self.arch["blocks"]],
                "parameters": self.parameters, "scores": self.scores, "fitness": self.fitness}


def _short(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


def count_parameters(arch: dict[str, Any], vocab_size: int, dim: int, num_heads: int) -> int:
    """Trainable parameters of ``arch`` at a width and vocabulary (built, not estimated)."""
    model = LabModel(LabConfig.from_arch(arch, vocab_size=vocab_size, embedding_dim=dim,
                                         block_defaults={"num_heads": num_heads}))
    return model.num_parameters()


def mad_score_fn(tasks: list[str], preset: str = "tiny", *, seed: int = 0, epochs: int | None = None,
                 progress: bool = False, safe_point: Callable[[], None] | None = None) -> ScoreFn:
    """Score = accuracy per MAD task of a freshly trained model (``safe_point``: see :func:`run_task`)."""
    def score(arch: dict[str, Any]) -> dict[str, float]:
        return {t: run_task(arch, t, preset, seed=seed, epochs=epochs, progress=progress,
                            safe_point=safe_point).accuracy for t in tasks}

    return score


#: Best candidates a generation keeps (scored already, so not scored again).
ELITE = 2


def planned_candidates(population: int, generations: int, elite: int = ELITE) -> int:
    """Candidates :func:`evolve` trains and scores: the first population, then in each later
    generation the children beside the elite (fewer where children repeat scored genomes)."""
    return population + (generations - 1) * (population - _kept(elite, population))


def _kept(elite: int, population: int) -> int:
    """Candidates a generation keeps: the elite, but at least one child is bred (a population
    of no more than the elite kept itself whole, so --generations past the first did nothing)."""
    return max(0, min(elite, population - 1))


@dataclass
class SearchResult:
    best: list[Candidate]
    history: list[dict[str, Any]]


def evolve(score: ScoreFn, *, budget: int, population: int = 6, generations: int = 3, seed: int = 0,
           min_blocks: int = 2, max_blocks: int = 6, elite: int = ELITE, dim: int = 64, num_heads: int = 4,
           vocab_size: int = 16, start: list[str] | None = None, on_candidate: Callable[[Candidate], None] | None = None,
           progress: bool = False, known: dict[tuple, dict[str, float]] | None = None) -> SearchResult:
    """Search; returns the candidates ranked by fitness and the history (one record per scored
    candidate). ``start``: architectures (names) put into the first population. ``known``: scores
    by genome (:func:`known_scores` of an interrupted run's history) used instead of training again;
    the search draws the same numbers either way, so a resumed run with the same settings and
    seed continues where the interrupted one stopped."""
    known = known or {}
    if population < 2:
        raise ValueError("population must be at least 2")
    if not 1 <= min_blocks <= max_blocks:
        raise ValueError(f"need 1 <= min_blocks <= max_blocks, got {min_blocks} and {max_blocks}")
    if budget <= 0:
        raise ValueError("the parameter budget must be positive")
    if generations < 1:  # 0 or less still trained and scored a first generation
        raise ValueError(f"generations must be at least 1, got {generations}")
    rng = np.random.default_rng(seed)
    cache: dict[tuple, Candidate] = {}
    history: list[dict[str, Any]] = []

    def fit(genome: Genome) -> tuple[Genome, int] | None:
        # Every candidate has min_blocks..max_blocks blocks: a start architecture or a crossover
        # child outside the range is cut to max_blocks or filled up with random blocks.
        genome = normalise(genome)[:max_blocks]
        if len(genome) < min_blocks:
            genome = genome + random_genome(rng, min_blocks - len(genome))
        for _ in range(50):
            params = count_parameters(spec_of(genome), vocab_size, dim, num_heads)
            if params <= budget:
                return genome, params
            if len(genome) > min_blocks:  # drop the largest contributor first: any block will do
                genome = genome[:-1]
            else:
                genome = mutate(genome, rng, min_blocks=min_blocks, max_blocks=max_blocks)
        return None

    def make(genome: Genome, generation: int) -> Candidate | None:
        fitted = fit(genome)
        if fitted is None:
            return None
        genome, params = fitted
        key = tuple(map(tuple, genome))
        if key in cache:
            return cache[key]
        cand = Candidate(genome, spec_of(genome, f"evolved-{len(cache)}"), params, generation=generation)
        cand.scores = dict(known[key]) if key in known else score(cand.arch)
        cache[key] = cand
        history.append(cand.record())
        if on_candidate is not None:
            on_candidate(cand)
        return cand

    first: list[Genome] = []
    for name in start or []:
        try:
            first.append(genome_of(load_arch(name)))
        except ValueError as err:  # was skipped: a misspelt start architecture never ran
            raise ValueError(f"start architecture {name!r}: {err}") from None
    while len(first) < population:
        first.append(random_genome(rng, int(rng.integers(min_blocks, max_blocks + 1))))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=planned_candidates(population, generations, elite), desc="evolve", unit="candidate")
    pop: list[Candidate] = []
    queue, tries = list(first[:population]), 0
    while len(pop) < population and tries < population * 10:
        # Distinct candidates: two start architectures cut to the same genome (budget, --max-blocks)
        # or a repeated random one would fill two slots with one candidate; a random genome replaces it.
        tries += 1
        g = queue.pop(0) if queue else random_genome(rng, int(rng.integers(min_blocks, max_blocks + 1)))
        cand = make(g, 0)
        if cand is not None and all(cand is not c for c in pop):
            pop.append(cand)
            if bar is not None:
                bar.update(1)
    if not pop:
        raise ValueError(f"no architecture fits the parameter budget of {budget:,}")
    for generation in range(1, generations):
        pop.sort(key=lambda c: c.fitness, reverse=True)
        nxt = pop[:_kept(elite, population)]
        tries = 0
        while len(nxt) < population and tries < population * 10:
            tries += 1
            a = max(rng.choice(len(pop), 2, replace=True), key=lambda i: pop[i].fitness)
            b = max(rng.choice(len(pop), 2, replace=True), key=lambda i: pop[i].fitness)
            child = crossover(pop[a].genome, pop[b].genome, rng, max_blocks=max_blocks) if rng.random() < 0.5 \
                else list(pop[a].genome)
            child = mutate(child, rng, min_blocks=min_blocks, max_blocks=max_blocks)
            cand = make(child, generation)
            if cand is not None and all(cand is not c for c in nxt):
                nxt.append(cand)
                if bar is not None:
                    bar.update(1)
        pop = nxt
    if bar is not None:
        bar.close()
    ranked = sorted(cache.values(), key=lambda c: c.fitness, reverse=True)
    return SearchResult(ranked, history)


# ------------------------------------------------------------------ the tuning machinery
def _genome_from_params(params: dict[str, Any], max_blocks: int) -> Genome:
    genome = []
    for i in range(max_blocks):
        op = params[f"op{i}"]
        if op == "none":
            continue
        genome.append((OPERATORS.index(op), params[f"heads{i}"], params[f"kv{i}"], params[f"qk{i}"], params[f"exp{i}"]))
    return normalise(genome)


def evolve_optuna(score: ScoreFn, *, budget: int, population: int = 6, generations: int = 3, seed: int = 0,
                  min_blocks: int = 2, max_blocks: int = 6, dim: int = 64, num_heads: int = 4,
                  vocab_size: int = 16, on_candidate: Callable[[Candidate], None] | None = None,
                  progress: bool = False, known: dict[tuple, dict[str, float]] | None = None) -> SearchResult:
    """The same search through ``xlstm_metal.tuning`` (Optuna's NSGA-II genetic sampler, seeded):
    a genome is ``max_blocks`` slots of (operator or "none", heads, kv, qk, expansion); a trial
    with fewer than ``min_blocks`` blocks or above the budget fails (Optuna then breeds from
    the others)."""
    from ..tuning import SweepSettings, search
    from ..tuning.objectives import COMPLETE, Objective

    if budget <= 0:
        raise ValueError("the parameter budget must be positive")
    known = known or {}
    cache: dict[tuple, Candidate] = {}
    history: list[dict[str, Any]] = []

    class ArchitectureObjective(Objective):
        name, direction, metric = "architecture", "maximize", "mad"

        def suggest(self, trial) -> dict[str, Any]:
            out = {}
            for i in range(max_blocks):
                choices = list(OPERATORS) + (["none"] if i >= min_blocks else [])
                out[f"op{i}"] = trial.suggest_categorical(f"op{i}", choices)
                for gene, n in zip(("heads", "kv", "qk", "exp"), GENE_SIZES[1:]):
                    out[f"{gene}{i}"] = trial.suggest_int(f"{gene}{i}", 0, n - 1)
            return out

        def evaluate(self, params, prompts=None, max_new_tokens=32) -> dict[str, Any]:
            genome = _genome_from_params(params, max_blocks)
            params_count = count_parameters(spec_of(genome), vocab_size, dim, num_heads)
            if params_count > budget:
                return {"status": "over_budget", "value": None, "parameters": params_count,
                        "reason": f"{params_count:,} parameters > budget {budget:,}"}
            key = tuple(map(tuple, genome))
            if key not in cache:
                cand = Candidate(genome, spec_of(genome, f"evolved-{len(cache)}"), params_count,
                                 generation=int(params.get("_trial", 0)) // population)
                cand.scores = dict(known[key]) if key in known else score(cand.arch)
                cache[key] = cand
                history.append(cand.record())
                if on_candidate is not None:
                    on_candidate(cand)
            cand = cache[key]
            return {"status": COMPLETE, "value": cand.fitness, "parameters": params_count, "scores": cand.scores}

    search(ArchitectureObjective(), SweepSettings(mode="ga", population=population, generations=generations,
                                                  seed=seed, progress=progress))
    if not cache:
        raise ValueError(f"no architecture fits the parameter budget of {budget:,}")
    return SearchResult(sorted(cache.values(), key=lambda c: c.fitness, reverse=True), history)


def known_scores(history: list[dict[str, Any]]) -> dict[tuple, dict[str, float]]:
    """Scores by genome from history records (``history.jsonl``), for ``evolve(known=...)``."""
    return {tuple(tuple(int(v) for v in gene) for gene in h["genome"]): dict(h["scores"]) for h in history}


def write_history(history: list[dict[str, Any]], path: Path) -> Path:
    """``history.jsonl`` (one record per scored candidate), replaced whole."""
    return _atomic(path, "".join(json.dumps(h) + "\n" for h in history))


def write_outputs(result: SearchResult, out: Path, *, top: int = 3, meta: dict[str, Any] | None = None) -> list[Path]:
    """best-N.yaml (architectures ``xlstm-metal mad --arch`` reads), history.jsonl,
    summary.json and evolution.png in ``out``."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, cand in enumerate(result.best[:top], start=1):
        arch = {"name": f"evolved-best-{rank}",
                "description": f"fitness {cand.fitness:.4f} ({_short(cand.scores)}), {cand.parameters:,} parameters",
                "blocks": cand.arch["blocks"], "genome": cand.arch["genome"]}
        written.append(_atomic(out / f"best-{rank}.yaml", yaml.safe_dump(arch, sort_keys=False)))
    # best-N.yaml of an earlier search in this directory (--overwrite, a larger --top) that this one
    # did not write: left, they would read as this search's results.
    for stale in out.glob("best-*.yaml"):
        rank = stale.stem[len("best-"):]
        if rank.isdigit() and int(rank) > len(written) and stale.is_file():
            stale.unlink()
    written.append(write_history(result.history, out / "history.jsonl"))
    summary = {**(meta or {}), "best": [c.record() for c in result.best[:top]], "evaluated": len(result.history)}
    written.append(_atomic(out / "summary.json", json.dumps(summary, indent=2)))
    written.append(plot_history(result.history, out / "evolution.png"))
    return written


def plot_history(history: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    gens = [h["generation"] for h in history]
    fits = [h["fitness"] for h in history]
    sizes = [h["parameters"] for h in history]
    sc = ax.scatter(range(len(history)), fits, c=gens, cmap="viridis", s=18 + 60 * np.asarray(sizes) / max(sizes))
    best = np.maximum.accumulate(fits)
    ax.plot(range(len(history)), best, color="#c0392b", lw=1.2, label="best so far")
    ax.set_xlabel("candidate (in order scored)")
    ax.set_ylabel("MAD fitness (mean accuracy)")
    fig.colorbar(sc, ax=ax, label="generation")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("evolutionary search (marker size ~ parameters)", fontsize=9)
    fig.tight_layout()
    from ..plotting import save_figure

    return save_figure(fig, path, overwrite=True)


def _atomic(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


__all__ = ["evolve", "planned_candidates", "evolve_optuna", "mad_score_fn", "write_outputs", "write_history", "known_scores", "count_parameters", "Candidate", "SearchResult"]
