"""Genomes: round trip wiring <-> genome, mutation and crossover always valid; the evolutionary
search respects the budget and improves a score."""

from __future__ import annotations

import json

import numpy as np
import pytest

import xlstm_metal  # noqa: F401
from xlstm_metal.lab import LabConfig, LabModel, load_arch
from xlstm_metal.lab.evolve import count_parameters, evolve, write_outputs
from xlstm_metal.lab.genome import OPERATORS, crossover, genome_of, mutate, normalise, random_genome, spec_of


def _builds(genome) -> int:
    model = LabModel(LabConfig.from_arch(spec_of(genome), vocab_size=16, embedding_dim=16,
                                         block_defaults={"num_heads": 4}))
    return model.num_parameters()


def test_genome_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(30):
        g = random_genome(rng, int(rng.integers(1, 6)))
        arch = load_arch(spec_of(g))  # through the spec loader, as a file would go
        assert genome_of(arch) == normalise(g)
    # A shipped architecture is a genome too.
    g = genome_of(load_arch("hybrid"))
    assert [OPERATORS[gene[0]] for gene in g] == ["mlstm", "swiglu", "attention", "swiglu"]
    assert genome_of(load_arch(spec_of(g))) == g
    with pytest.raises(ValueError, match="outside the ranges"):
        spec_of([(99, 0, 0, 0, 0)])


def test_mutation_and_crossover_always_give_valid_wirings():
    rng = np.random.default_rng(1)
    pool = [random_genome(rng, 3) for _ in range(4)]
    seen_ops = set()
    for i in range(40):
        a, b = pool[i % 4], pool[(i + 1) % 4]
        child = mutate(crossover(a, b, rng, max_blocks=5), rng, max_blocks=5)
        assert 1 <= len(child) <= 5
        assert _builds(child) > 0  # builds and validates
        seen_ops |= {gene[0] for gene in child}
        pool[i % 4] = child
    assert len(seen_ops) >= 4  # the operators do get explored
    # Mutation always changes something.
    g = random_genome(rng, 2)
    assert all(mutate(g, rng, rate=0.0) != g for _ in range(10))


def test_evolve_respects_the_budget_and_climbs_a_score(tmp_path):
    def score(arch):  # fraction of mLSTM blocks: a real function of the wiring, cheap to compute
        names = [b["spec"] if isinstance(b["spec"], str) else b["spec"]["name"] for b in arch["blocks"]]
        return {"mlstm_share": names.count("mlstm") / len(names)}

    budget = count_parameters(load_arch("hybrid"), 16, 16, 4)
    result = evolve(score, budget=budget, population=4, generations=4, seed=0, dim=16, vocab_size=16,
                    start=["swiglu-only"], min_blocks=2, max_blocks=4)
    assert all(h["parameters"] <= budget for h in result.history)
    first_gen = max(h["fitness"] for h in result.history if h["generation"] == 0)
    assert result.best[0].fitness == max(h["fitness"] for h in result.history) >= max(first_gen, 0.5)
    files = write_outputs(result, tmp_path, top=2, meta={"test": True})
    assert {p.name for p in files} == {"best-1.yaml", "best-2.yaml", "history.jsonl", "summary.json", "evolution.png"}
    best = load_arch(str(tmp_path / "best-1.yaml"))
    assert genome_of(best) == result.best[0].genome
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(lines) == len(result.history) and json.loads(lines[0])["scores"]


def test_evolve_through_the_tuning_machinery():
    from xlstm_metal.lab.evolve import evolve_optuna

    def score(arch):
        names = [b["spec"] for b in arch["blocks"]]
        return {"mlstm_share": names.count("mlstm") / len(names)}

    budget = count_parameters(load_arch("hybrid"), 16, 16, 4)
    result = evolve_optuna(score, budget=budget, population=4, generations=3, seed=0, dim=16, vocab_size=16,
                           min_blocks=2, max_blocks=3)
    assert result.history and all(h["parameters"] <= budget for h in result.history)
    assert result.best[0].fitness == max(h["fitness"] for h in result.history) > 0
    assert 2 <= len(result.best[0].genome) <= 3


@pytest.mark.parametrize("min_blocks, max_blocks", [(2, 2), (5, 6)])
def test_evolve_keeps_every_candidate_within_min_and_max_blocks(min_blocks, max_blocks):
    # The start architectures (4 blocks each) and crossover children went in unchecked: with
    # --max-blocks 2 the search scored 4- and 3-block candidates; with --min-blocks 5, 4-block ones.
    def score(arch):
        return {"blocks": len(arch["blocks"]) / 10}

    result = evolve(score, budget=10**9, population=4, generations=3, seed=0, dim=16, vocab_size=16,
                    start=["mlstm", "attention", "hybrid"], min_blocks=min_blocks, max_blocks=max_blocks)
    sizes = [len(h["blocks"]) for h in result.history]
    assert sizes and all(min_blocks <= n <= max_blocks for n in sizes), sizes
    assert all(min_blocks <= len(c.genome) <= max_blocks for c in result.best)
    with pytest.raises(ValueError, match="min_blocks"):
        evolve(score, budget=10**9, population=2, generations=1, min_blocks=3, max_blocks=2)


def test_write_outputs_removes_best_files_of_an_earlier_search(tmp_path):
    # `evolve --overwrite` (or a smaller --top) into a directory of an earlier search left its
    # best-2.yaml / best-3.yaml beside the new best-1.yaml, as if they were this search's.
    def score(arch):
        return {"blocks": len(arch["blocks"]) / 10}

    big = evolve(score, budget=10**9, population=4, generations=1, seed=0, dim=16, vocab_size=16, start=[])
    write_outputs(big, tmp_path, top=3)
    assert {p.name for p in tmp_path.glob("best-*.yaml")} == {"best-1.yaml", "best-2.yaml", "best-3.yaml"}
    (tmp_path / "best-notes.yaml").write_text("mine: true\n")  # not ours: kept
    small = evolve(score, budget=10**9, population=2, generations=1, seed=1, dim=16, vocab_size=16, start=[])
    write_outputs(small, tmp_path, top=1)
    assert {p.name for p in tmp_path.glob("best-*.yaml")} == {"best-1.yaml", "best-notes.yaml"}
    assert genome_of(load_arch(str(tmp_path / "best-1.yaml"))) == small.best[0].genome


def test_evolve_first_population_has_population_distinct_candidates():
    # mlstm and hybrid cut to 2 blocks are the same genome (mlstm, swiglu): the first generation
    # of --population 3 held that candidate twice and scored 2 architectures, not 3.
    def score(arch):
        return {"blocks": len(arch["blocks"]) / 10}

    result = evolve(score, budget=10**9, population=3, generations=1, seed=0, dim=16, vocab_size=16,
                    start=["mlstm", "hybrid", "attention"], min_blocks=2, max_blocks=2)
    genomes = [tuple(map(tuple, h["genome"])) for h in result.history]
    assert len(genomes) == 3 and len(set(genomes)) == 3
    assert genome_of(load_arch("mlstm"))[:2] == genome_of(load_arch("hybrid"))[:2]


def test_evolve_progress_total_counts_the_candidates_it_scores(monkeypatch):
    # The bar's total was population x generations (12 here) though the elite of each generation
    # is not scored again: a finished search stopped at 8/12.
    import tqdm as tqdm_module

    bars = []

    class Bar:
        def __init__(self, total=None, **_):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, k=1):
            self.n += k

        def close(self):
            pass

    monkeypatch.setattr(tqdm_module, "tqdm", Bar)

    def score(arch):
        return {"blocks": len(json.dumps(arch["blocks"])) % 101 / 100}

    result = evolve(score, budget=10**9, population=4, generations=3, seed=0, dim=16, vocab_size=16,
                    start=[], progress=True)
    assert len(bars) == 1 and bars[0].total == 8
    assert bars[0].n == len(result.history) == 8
