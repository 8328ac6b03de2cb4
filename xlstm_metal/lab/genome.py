"""Genomes: architectures as integer vectors (STAR-style, Thomas et al. 2024), with mutation
and crossover that always give valid wirings.

A genome is a list of block genes, one per block. A gene is five integers::

    (operator, heads, kv_sharing, qk_sharing, expansion)

- operator: index into :data:`OPERATORS` (the block spec: an LIV with its featurizer and
  token-mixing structure, or a channel mixer);
- heads: index into :data:`HEADS` (the number of heads of the featurizer);
- kv_sharing: index into :data:`KV_GROUPS`: how many query heads share one key/value head (the
  STAR/GQA featurizer sharing; 1 = none);
- qk_sharing: 1 = keys reuse the query projection (one parameter array), 0 = separate;
- expansion: index into :data:`EXPANSIONS` (the SwiGLU width factor).

Genes a block does not use (heads of a SwiGLU) are normalised to 0, so
``genome_of(spec_of(g)) == normalise(g)``. Every gene value is drawn from its range and the head
counts are chosen to divide the width, so any genome - mutated, crossed or random - decodes to an
architecture that builds.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

OPERATORS = ("mlstm", "attention", "linear_attention", "gated_conv", "linear_recurrence", "slstm", "swiglu")
HEADS = (1, 2, 4)
KV_GROUPS = (1, 2)
EXPANSIONS = (2.0, 2.667, 4.0)
GENE_SIZES = (len(OPERATORS), len(HEADS), len(KV_GROUPS), 2, len(EXPANSIONS))
_HEADED = {"mlstm", "attention", "linear_attention", "slstm"}
_KV = {"mlstm", "attention", "linear_attention"}

Gene = tuple[int, int, int, int, int]
Genome = list[Gene]


def normalise(genome: Genome) -> Genome:
    """Zero the genes a block's operator does not use; kv sharing only where heads allow it."""
    out = []
    for gene in genome:
        op, heads, kv, qk, exp = (int(v) for v in gene)
        name = OPERATORS[op]
        if name not in _HEADED:
            heads = 0
        if name not in _KV:
            kv, qk = 0, 0
        elif HEADS[heads] % KV_GROUPS[kv]:
            kv = 0
        if name != "swiglu":
            exp = 0
        out.append((op, heads, kv, qk, exp))
    return out


def validate_genome(genome: Genome) -> None:
    if not genome:
        raise ValueError("a genome needs at least one block")
    for index, gene in enumerate(genome):
        if len(gene) != len(GENE_SIZES) or any(not 0 <= int(v) < n for v, n in zip(gene, GENE_SIZES)):
            raise ValueError(f"gene {index} {tuple(gene)} is outside the ranges {GENE_SIZES}")


def spec_of(genome: Genome, name: str = "genome") -> dict[str, Any]:
    """The architecture dict (``{name, blocks, genome}``) a genome encodes."""
    validate_genome(genome)
    genome = normalise(genome)
    blocks = []
    for op, heads, kv, qk, exp in genome:
        op_name = OPERATORS[op]
        if op_name == "slstm":
            blocks.append({"spec": "slstm_2024_block",
                           "params": {"feedforward": False, "num_heads": HEADS[heads]}})
            continue
        params: dict[str, Any] = {}
        if op_name in _HEADED:
            params["num_heads"] = HEADS[heads]
        if op_name in _KV:
            params["kv_heads"] = HEADS[heads] // KV_GROUPS[kv]
            params["share_qk"] = bool(qk)
        if op_name == "swiglu":
            params["ffn_proj_factor"] = EXPANSIONS[exp]
        blocks.append({"spec": op_name, "params": params})
    return {"name": name, "blocks": blocks, "genome": [list(g) for g in genome]}


def genome_of(arch: dict[str, Any]) -> Genome:
    """The genome of an architecture dict made by :func:`spec_of` (from its block specs and
    parameters; the stored ``genome`` field is not trusted)."""
    from .library import load_spec

    genome = []
    for index, entry in enumerate(arch["blocks"]):
        spec = load_spec(entry["spec"])
        # The block's parameters as it is built: its own over the spec's defaults.
        params = spec.resolve(entry.get("params") or {}).params
        op_name = "slstm" if spec.name == "slstm_2024_block" else spec.name
        if op_name not in OPERATORS:
            raise ValueError(f"block {index}: {spec.name!r} is not an operator of the genome ({', '.join(OPERATORS)})")
        shipped = load_spec("slstm_2024_block" if op_name == "slstm" else op_name)
        if spec.to_dict() != shipped.to_dict():  # (a KeyError on its parameters, or read as the shipped block)
            raise ValueError(f"block {index}: its spec is named {spec.name!r} but is not the shipped {shipped.name!r} "
                             "wiring the genome's operator builds")
        heads = _gene(HEADS, params["num_heads"], "num_heads", index) if op_name in _HEADED else 0
        kv = _gene(KV_GROUPS, params["num_heads"] // params["kv_heads"], "num_heads / kv_heads", index) \
            if op_name in _KV else 0
        qk = int(bool(params.get("share_qk"))) if op_name in _KV else 0
        exp = _gene(EXPANSIONS, params["ffn_proj_factor"], "ffn_proj_factor", index) if op_name == "swiglu" else 0
        gene = normalise([(OPERATORS.index(op_name), heads, kv, qk, exp)])[0]
        _same_as_decoded(gene, spec, params, index)
        genome.append(gene)
    return normalise(genome)


def _same_as_decoded(gene: Gene, spec, params: dict[str, Any], index: int) -> None:
    """ValueError unless ``gene`` decodes to the block ``spec`` with ``params`` (resolved): a
    parameter no gene holds (mlstm's conv_kernel_size, an sLSTM block with its feed-forward)
    became the decoded block's silently."""
    from .library import load_spec

    block = spec_of([gene])["blocks"][0]
    want = load_spec(block["spec"]).resolve(block["params"]).params
    differ = [f"{k} {params.get(k)!r} (the genome's block has {want.get(k)!r})" for k in sorted(set(want) | set(params))
              if params.get(k) != want.get(k)]
    if differ:
        raise ValueError(f"block {index} ({spec.name}): {', '.join(differ)}: no gene holds it, so the search would "
                         "score another block")


def _gene(values: tuple, value: Any, what: str, index: int) -> int:
    """The index of ``value`` among a gene's ``values``; ValueError naming the block otherwise."""
    if value not in values:
        raise ValueError(f"block {index}: {what} {value!r} is not one of the genome's ({', '.join(map(str, values))})")
    return values.index(value)


def random_genome(rng: np.random.Generator, num_blocks: int) -> Genome:
    return normalise([tuple(int(rng.integers(n)) for n in GENE_SIZES) for _ in range(num_blocks)])


def mutate(genome: Genome, rng: np.random.Generator, rate: float = 0.3, *, min_blocks: int = 1,
           max_blocks: int = 8) -> Genome:
    """Each gene value is redrawn with probability ``rate`` (the decoded wiring always changes); now and then
    a block is inserted or removed within [min_blocks, max_blocks]."""
    out = [list(g) for g in genome]
    changed = False
    for gene in out:
        for j, n in enumerate(GENE_SIZES):
            if rng.random() < rate:
                gene[j] = int(rng.integers(n))
                changed = True
    if not changed or normalise([tuple(g) for g in out]) == normalise(genome):
        # Nothing that matters changed (e.g. the heads of a SwiGLU): change an operator.
        gene = out[int(rng.integers(len(out)))]
        gene[0] = (gene[0] + 1 + int(rng.integers(GENE_SIZES[0] - 1))) % GENE_SIZES[0]
    roll = rng.random()
    if roll < 0.1 and len(out) < max_blocks:
        out.insert(int(rng.integers(len(out) + 1)), [int(rng.integers(n)) for n in GENE_SIZES])
    elif roll < 0.2 and len(out) > min_blocks:
        out.pop(int(rng.integers(len(out))))
    return normalise([tuple(g) for g in out])


def crossover(a: Genome, b: Genome, rng: np.random.Generator, *, max_blocks: int = 8) -> Genome:
    """One-point crossover of the block lists (a's head, b's tail), at least one block."""
    cut_a = int(rng.integers(1, len(a) + 1))
    cut_b = int(rng.integers(0, len(b) + 1))
    child = list(a[:cut_a]) + list(b[cut_b:])
    return normalise(copy.deepcopy(child[:max_blocks]))


__all__ = ["OPERATORS", "HEADS", "KV_GROUPS", "EXPANSIONS", "Genome", "spec_of", "genome_of", "random_genome",
           "mutate", "crossover", "normalise", "validate_genome"]
