"""Prefill of short prompts (time to the first token), lengths new and seen, compiled blocks against eager.

    python benchmarks/short_prefill.py --shape 7b --lengths 512,512,640,640,576,1000,1000 --out $OUT/short_prefill.json

A short prompt's prefill waits for the host to build the graph of every block. On a GPU
``prefill`` runs short pieces eagerly; ``XLSTM_METAL_PREFILL_SHORT_COMPILED=1`` runs them through
the compiled blocks, one trace per new length shared by all alike blocks
(``xlstm_metal/models/block_compile.py``). One process times both (``--modes``, in that order, the setting switched
between them): for each length of ``--lengths`` in turn, one random prompt through
``model.prefill`` and the greedy first token, synchronised (``first``: the first prompt of that
length in this mode, so the compiled mode's trace is in it). A prefill of ``--warmup`` tokens first
builds the kernels. Then one prompt both ways: the largest difference of the last logits relative
to the largest (``compiled_vs_eager_rel``) and whether the greedy tokens agree. On a CPU both
modes run short pieces eagerly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import xlstm_metal  # noqa: E402,F401  (first: BLAS preload on Linux CPUs)
import mlx.core as mx  # noqa: E402

from xlstm_metal import benchmark as bm  # noqa: E402
from xlstm_metal.models import xlstm_large as xl  # noqa: E402

MODES = {"compiled": True, "eager": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="7b", help="a named shape or a config.json")
    p.add_argument("--dtype", default=None, help="weights (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--lengths", default="512,512,512,640,640,576,1000,1000")
    p.add_argument("--modes", default="compiled,eager", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--warmup", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="results JSON (written at the end, atomically)")
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes takes {', '.join(MODES)}")
    try:
        lengths = [int(n) for n in args.lengths.split(",") if n]
    except ValueError:
        p.error("--lengths takes comma-separated token counts")
    if not lengths or min(lengths) < 1:
        p.error("--lengths takes comma-separated token counts")
    if args.out.exists():
        p.error(f"--out {args.out} exists")
    model = bm.random_model(bm.shape_config(args.shape), dtype=args.dtype or bm.default_dtype())
    model.fuse_projections()
    vocab = model.config.vocab_size

    def prompt(length: int, seed: int) -> mx.array:
        return mx.random.randint(0, vocab, (args.batch, length), key=mx.random.key(seed)).astype(mx.int32)

    def prefill(length: int, seed: int) -> float:
        ids = prompt(length, seed)
        mx.eval(ids)
        mx.synchronize()
        t0 = time.perf_counter()
        logits, state = model.prefill(ids)
        mx.eval(mx.argmax(logits, axis=-1), state)
        return 1000 * (time.perf_counter() - t0)

    result = {"command": "python benchmarks/short_prefill.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "env": bm.environment(),
              "shape": str(args.shape), "batch": args.batch, "warmup_ms": round(prefill(args.warmup, 0), 2),
              "records": []}
    seed, short_compiled = 1, xl._SHORT_COMPILED
    for mode in modes:
        xl._SHORT_COMPILED = MODES[mode]
        seen: set[int] = set()
        for length in lengths:
            ms = prefill(length, seed)
            seed += 1
            record = {"mode": mode, "length": length, "first": length not in seen, "ms": round(ms, 3)}
            seen.add(length)
            result["records"].append(record)
            print(json.dumps(record), flush=True)
    if len(set(modes)) > 1:  # the same prompt both ways: the compiled blocks change no value beyond round-off
        ids = prompt(lengths[0], seed)
        logits = {}
        for mode in set(modes):
            xl._SHORT_COMPILED = MODES[mode]
            logits[mode] = model.prefill(ids)[0].astype(mx.float32)
        a, b = logits["compiled"], logits["eager"]
        result["compiled_vs_eager_rel"] = float(mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1e-30))
        result["compiled_vs_eager_same_argmax"] = bool(mx.array_equal(mx.argmax(a, -1), mx.argmax(b, -1)))
        print(json.dumps({k: result[k] for k in ("compiled_vs_eager_rel", "compiled_vs_eager_same_argmax")}))
    xl._SHORT_COMPILED = short_compiled
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
