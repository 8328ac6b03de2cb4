"""Decode and prefill with the fused decode kernels (xlstm_metal/kernels/fast/decode.py) on and
off, on the same model in one process (on an NVIDIA GPU; elsewhere both settings run the same ops).

    python benchmarks/fused_decode.py --shape 7b --batches 1,16,64 --prefill-lengths 512,2048,16384 \\
        [--q-bits 4 --q-batches 1] --deadline 60 --out $OUT/fused_decode.jsonl

For each measurement the settings alternate (over ``--rounds``), each with a freshly compiled
step / prefill trace: decode with the kernels on (MLX's matmul for the products, the default);
with the skinny product (xlstm_metal/kernels/fast/skinny.py, 2-64 rows; off by default) too
(``--no-skinny`` leaves it out); with each layout of the gated step kernel (``--step-kernels 2,1``);
and with all of them off (``--no-off`` leaves that out); prefill also with the GPU's
queued layers (``xlstm_large._queue_layers``) off, i.e. each layer evaluated before the next is built.
One JSON object per line: setting, kind, batch, length, tok_s, ms_per_step or ttft_s. ``--deadline`` (seconds from the start) skips what would begin
after it, so a time-limited run still returns what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import xlstm_metal  # noqa: E402,F401  (first: BLAS preload on Linux CPUs)
import mlx.core as mx  # noqa: E402

from xlstm_metal import benchmark as bm  # noqa: E402
from xlstm_metal.kernels.fast import decode, skinny  # noqa: E402
from xlstm_metal.models import xlstm_large as xlarge  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="7b")
    p.add_argument("--dtype", default=None, help="weights (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prefill-lengths", default="2048,16384")
    p.add_argument("--q-bits", default="", help="afterwards, the same model quantized to these bits "
                   "(comma-separated; group 64, gate projections in float): decode at --q-batches")
    p.add_argument("--q-batches", default="1")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--bf16-residual", action="store_true",
                   help="decode also with the residual stream in the weights' dtype (fuse_projections() sets float32)")
    p.add_argument("--step-kernels", default=None,
                   help="decode with the kernels on once per layout of the gated step kernel (e.g. '2,1'; "
                        "decode.set_step_kernel_version), in place of the default layout alone")
    p.add_argument("--no-skinny", action="store_true", help="leave out the skinny-product setting")
    p.add_argument("--no-off", action="store_true", help="leave out the decode setting with all fused kernels off")
    p.add_argument("--deadline", type=float, default=None, help="seconds from the start")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    start = time.perf_counter()
    dtype = args.dtype or bm.default_dtype()
    config = bm.shape_config(args.shape)
    model = bm.random_model(config, dtype=dtype)
    model.fuse_projections()
    q_bits = None
    out = open(args.out, "a") if args.out else None

    def late() -> bool:
        return args.deadline is not None and time.perf_counter() - start > args.deadline

    def emit(record: dict) -> None:
        line = json.dumps({"shape": args.shape, "dtype": dtype, "q_bits": q_bits, **record})
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    queue_layers = xlarge._queue_layers
    skinny_default = skinny.skinny_gemm_enabled()
    residual = model.residual_dtype  # what fuse_projections() set (float32 under bf16 weights)
    step_default = decode.step_kernel_version()
    # (name, fused decode kernels, prefill queues layers on a GPU, residual stream dtype, skinny
    # product, layout of the gated step kernel)
    if args.step_kernels:
        fused = [(f"fused decode kernels, step kernel {v}", True, True, residual, False, int(v))
                 for v in args.step_kernels.split(",")]
    else:
        fused = [("fused decode kernels", True, True, residual, False, step_default)]
    settings = {"decode": fused + ([] if args.no_skinny else
                                   [("fused decode kernels + skinny product", True, True, residual, True, step_default)])
                + ([] if args.no_off else [("off", False, True, residual, False, step_default)]),
                "prefill": [("fused kernels, layers queued", True, True, residual, False, step_default),
                            ("fused kernels, layer by layer", True, False, residual, False, step_default),
                            ("off", False, False, residual, False, step_default)]}
    if args.bf16_residual:
        settings["decode"].append(("fused decode kernels, residual in the weights' dtype", True, True, None, False,
                                   step_default))

    def run(kind: str, size: int) -> None:
        for _ in range(args.rounds):
            for name, on, queued, residual_dtype, skinny_on, step_version in settings[kind]:
                if late():
                    return
                decode.set_fused_decode(on)
                decode.set_step_kernel_version(step_version)
                skinny.set_skinny_gemm(skinny_on)
                model.residual_dtype = residual_dtype
                xlarge._queue_layers = queue_layers if queued else (lambda: False)
                model.__dict__.pop("_prefill_blocks", None)  # prefill traces are built again
                if kind == "decode":
                    r = bm.measure_decode(model, size, tokens=args.tokens)
                else:
                    r = bm.measure_prefill(model, size)
                emit({"setting": name, **r})
        xlarge._queue_layers = queue_layers
        model.residual_dtype = residual

    for batch in map(int, filter(None, args.batches.split(","))):
        run("decode", batch)
    for length in map(int, filter(None, args.prefill_lengths.split(","))):
        run("prefill", length)
    for bits in map(int, filter(None, args.q_bits.split(","))):
        if late():
            break
        from xlstm_metal.quantization import dequantize_model, quantize_model  # noqa: PLC0415

        dequantize_model(model)
        quantize_model(model, bits=bits, group_size=64)
        model.fuse_projections()
        residual = model.residual_dtype
        q_bits = bits
        for batch in map(int, filter(None, args.q_batches.split(","))):
            run("decode", batch)
    decode.set_fused_decode(True)
    decode.set_step_kernel_version(step_default)
    skinny.set_skinny_gemm(skinny_default)
    emit({"kind": "done", "seconds_total": time.perf_counter() - start, "device": str(mx.default_device())})


if __name__ == "__main__":
    main()
