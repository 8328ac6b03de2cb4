"""Where one block's prefill time goes, at one prompt length (7B shape by default).

Times each part of one mLSTM block alone (median of --repeats after a warm-up), for each
chunkwise kernel and chunk size given, plus the bf16 GEMM rate of the block's projection
shapes, so the prefill figures in BENCHMARKS.md can say what limits them:

    python benchmarks/prefill_profile.py --shape 7b --length 16384 --out $OUT/prefill_profile.json

One JSON record per line on stdout and in --out (whole-model figures = per-block x blocks).

``--variants`` times the fused kernel's settings alone (``XLSTM_METAL_CHUNK_SEGMENTS``: segments
of the states kernel's two-level scan; ``XLSTM_METAL_CHUNK_SPLIT``: bf16 terms per float32
operand; any other ``XLSTM_METAL_*`` setting as ``/NAME=VALUE``), each with its kernels' GPU times
from a CUPTI trace (PyTorch's profiler, where installed). ``--model-lengths`` then builds the
whole model and times its prefill at those lengths for each variant (or those of
``--model-variants``), with the trace's time per kernel category:

    python benchmarks/prefill_profile.py --shape 7b --length 2048 --kernels chunkwise_fused \
        --chunk-sizes 64 --variants 1:3,4:3,4:2 --model-lengths 2048,16384 --out prefill.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import xlstm_metal  # noqa: E402,F401  (first: BLAS preload on Linux CPUs)
import mlx.core as mx  # noqa: E402

from xlstm_metal import benchmark as bm  # noqa: E402
from xlstm_metal.kernels import get_mlstm_kernel  # noqa: E402
from xlstm_metal.kernels.fast import chunkwise_fused as fused  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="7b")
    p.add_argument("--dtype", default=None)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--kernels", default="chunkwise_scan,chunkwise_fused,chunkwise")
    p.add_argument("--chunk-sizes", default="64,128,256")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--variants", default="",
                   help="SEGMENTS[:SPLIT[:COLS[:CHAIN[:ROWS]]]][/NAME=VALUE...],... settings of the fused kernel to "
                        "time alone (0: the default; SPLIT: bf16 terms per float32 operand in the outputs kernel; "
                        "COLS: columns of C per states block, 32 or 64; CHAIN 0: the model's prefill without chained "
                        "blocks; ROWS 0: the prompt's norms by the decode kernels, not norm_rows.py; NAME=VALUE: "
                        "XLSTM_METAL_NAME, e.g. STATES_CSPLIT=0, OUTPUTS_BLOCKS=0, PREFILL_SWIGLU=0)")
    p.add_argument("--model-lengths", default="", help="also time the whole model's prefill at these lengths")
    p.add_argument("--model-variants", default=None,
                   help="the --variants (same syntax) to time in the whole model (default: all of --variants)")
    p.add_argument("--skip-parts", action="store_true", help="leave out the per-part and per-kernel timings")
    p.add_argument("--trace-steps", type=int, default=3, help="calls traced per CUPTI summary (0: none)")
    args = p.parse_args()

    dtype = args.dtype or bm.default_dtype()
    config = bm.shape_config(args.shape, num_blocks=1)
    model = bm.random_model(config, dtype=dtype).fuse_projections()
    block = model.blocks[0]
    layer = block.mlstm_layer
    S, E = args.length, config.embedding_dim
    x = (mx.random.normal((1, S, E)) * 0.5).astype(getattr(mx, dtype))
    q, k, v, o, i, f = layer.project(block.norm_mlstm(x))
    mx.eval(x, q, k, v, o, i, f)
    out = open(args.out, "w") if args.out else None

    def emit(record: dict) -> None:
        record = {"shape": args.shape, "dtype": dtype, "length": S, **record, **bm.environment()}
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    variants = [_parse_variant(v) for v in args.variants.split(",") if v]
    if variants:
        chunk = int(args.chunk_sizes.split(",")[0])
        for variant in variants:
            with _settings(*variant):
                fn = lambda: fused.mlstm_chunkwise_fused(q, k, v, i, f, None, chunk_size=chunk)  # noqa: E731
                ms = 1000 * bm.median_seconds(fn, args.repeats)
                emit({"part": "fused kernel variant", **_describe(variant),
                      "chunk_size": chunk, "ms": ms, "gpu": _trace(fn, args.trace_steps)})
    if args.model_lengths:
        del q, k, v, o, i, f, x
        chosen = variants or [_parse_variant("0")]
        if args.model_variants is not None:
            chosen = [_parse_variant(v) for v in args.model_variants.split(",") if v]
        _model_prefill(args, chosen, emit)
        return

    h, _ = layer.parallel_kernel_cell(q, k, v, i, f)
    mx.eval(h)
    if args.skip_parts:
        return
    parts = {
        "block (all parts)": lambda: block(x),
        "rms norm": lambda: block.norm_mlstm(x),
        "q|k|v|o|i|f projection": lambda: layer.project(x),
        "output cell (norm, gate, out_proj)": lambda: layer.output(h, o),
        "ffn (gate|up, down)": lambda: block.ffn(x),
    }
    for name, fn in parts.items():
        emit({"part": name, "kernel": config.chunkwise_kernel, "chunk_size": config.chunk_size,
              "ms": 1000 * bm.median_seconds(fn, args.repeats)})

    for kernel_name in args.kernels.split(","):
        kernel = get_mlstm_kernel(kernel_name)
        for chunk in map(int, args.chunk_sizes.split(",")):
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            ms = 1000 * bm.median_seconds(lambda: kernel(q, k, v, i, f, None, chunk_size=chunk), args.repeats)
            emit({"part": "mLSTM kernel", "kernel": kernel_name, "chunk_size": chunk, "ms": ms,
                  "kernel_peak_gb": (mx.get_peak_memory() - base) / 2**30})
            if kernel_name == "chunkwise_fused" and fused.fused_chunkwise_supported(q, v, chunk):
                # Its three phases alone: gate prep (MLX ops), the states and outputs kernels.
                gates = fused.chunk_gates(i, f, chunk)
                states = fused.chunk_states(k, v, *gates, None)
                mx.eval(gates, states)
                phases = {
                    "fused: gate prep": lambda: fused.chunk_gates(i, f, chunk),
                    "fused: states kernel": lambda: fused.chunk_states(k, v, *gates, None),
                    "fused: outputs kernel": lambda: fused.chunk_outputs(
                        q, k, v, *gates, *states[:3], config.eps, q.dtype),
                }
                for name, fn in phases.items():
                    emit({"part": name, "kernel": kernel_name, "chunk_size": chunk,
                          "ms": 1000 * bm.median_seconds(fn, args.repeats)})

    # bf16 GEMM rate on the block's projection shapes: what the matmuls alone would allow.
    fused_w = layer["_fused_projection"][0]["weight"]
    ffn_w = block.ffn["_fused_gate_up"][0]["weight"]
    flops = 2 * S * E * (fused_w.shape[0] + ffn_w.shape[0]) + 2 * S * (layer.out_proj.weight.size
                                                                   + block.ffn.proj_down.weight.size)
    ms = 1000 * bm.median_seconds(lambda: [x @ fused_w.T, x @ ffn_w.T,
                                x[..., : layer.out_proj.weight.shape[1]] @ layer.out_proj.weight.T,
                                mx.zeros((1, S, block.ffn.proj_down.weight.shape[1]), x.dtype)
                                @ block.ffn.proj_down.weight.T], args.repeats)
    blocks = bm.shape_config(args.shape).num_blocks
    emit({"part": "all block matmuls", "ms": ms, "tflop_s": flops / (ms / 1000) / 1e12,
          "matmul_only_tok_s_bound": S / (ms / 1000 * blocks)})


def _parse_variant(text: str) -> tuple:
    """``SEGMENTS[:SPLIT[:COLS[:CHAIN[:ROWS]]]][/NAME=VALUE...]`` -> (segments, split, cols, chain, rows,
    extra): the positional settings (missing ones: the defaults) and further ``XLSTM_METAL_<NAME>``
    settings, e.g. ``0/STATES_CSPLIT=0/OUTPUTS_BLOCKS=0``."""
    head, *extra = text.split("/")
    fields = tuple(int(x) for x in head.split(":")) if head else (0,)
    for item in extra:
        if "=" not in item:
            raise SystemExit(f"--variants: expected NAME=VALUE after '/', got {item!r}")
    return fields + (0, 0, 1, 1)[len(fields) - 1:] + (tuple(sorted(extra)),)


class _settings:
    """The variant's XLSTM_METAL_* settings for the duration of a with-block (0: the default)."""

    def __init__(self, segments: int, split: int = 0, cols: int = 0, chain: int = 1, rows: int = 1,
                 extra: tuple = ()):
        self.env = {"XLSTM_METAL_CHUNK_SEGMENTS": str(segments) if segments else None,
                    "XLSTM_METAL_CHUNK_SPLIT": str(split) if split else None,
                    "XLSTM_METAL_STATES_COLS": str(cols) if cols else None, "XLSTM_METAL_PREFILL_CHAIN": str(chain),
                    "XLSTM_METAL_NORM_ROWS": str(rows)}
        for item in extra:
            name, value = item.split("=", 1)
            self.env["XLSTM_METAL_" + name] = value

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.env}
        _apply(self.env)

    def __exit__(self, *exc):
        _apply(self.saved)


def _describe(variant: tuple) -> dict:
    segments, split, cols, chain, rows, extra = variant
    return {"segments": segments or "default", "split_terms": split or "default", "states_cols": cols or "default",
            "chained_blocks": bool(chain), "norm_rows": bool(rows), "settings": list(extra)}


def _apply(env: dict) -> None:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _trace(fn, steps: int) -> dict | None:
    """GPU time per call by kernel (CUPTI through PyTorch's profiler), or None without it."""
    if steps <= 0:
        return None
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_side_by_side import trace_kernels

    def run():
        mx.eval(fn())
        bm._sync()

    summary = trace_kernels(run, steps)
    if "error" in summary:
        return summary
    return {"busy_ms": summary["gpu_busy_ms"], "kernels": summary["kernels_per_step"],
            "categories": {k: round(v["ms"], 4) for k, v in summary["categories"].items()},
            "top": [(t["name"][:90], round(t["ms"], 4), t["launches"]) for t in summary["top"][:12]]}


def _model_prefill(args, variants, emit) -> None:
    """The whole model's prefill at each length, per fused-kernel setting, with a CUPTI summary."""
    dtype = args.dtype or bm.default_dtype()
    model = bm.random_model(bm.shape_config(args.shape), dtype=dtype).fuse_projections()
    chunk = int(args.chunk_sizes.split(",")[0])
    for block in model.blocks:
        block.mlstm_layer.parallel_kernel_cell.chunk_size = chunk
    for length in map(int, args.model_lengths.split(",")):
        ids = mx.random.randint(0, model.config.vocab_size, (1, length)).astype(mx.int32)
        for variant in variants:
            with _settings(*variant):
                # The compiled blocks baked the previous settings into their trace: trace again.
                model.__dict__.pop("_prefill_blocks", None)
                r = bm.measure_prefill(model, length, repeats=3)
                fn = lambda: model.prefill(ids)  # noqa: E731
                emit({"part": "model prefill", "model_length": length, **_describe(variant), "chunk_size": chunk, "tok_s": r["tok_s"], "ms": 1000 * r["seconds"],
                      "peak_mem_gb": r["peak_mem_gb"], "gpu": _trace(fn, 1 if length > 4096 else 2)})


if __name__ == "__main__":
    main()
