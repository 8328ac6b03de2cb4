"""Decode and prefill with the fused decode kernels (xlstm_metal/kernels/fast/decode.py) on and
off, on the same model in one process (on an NVIDIA GPU; elsewhere both settings run the same ops).

    python benchmarks/fused_decode.py --shape 7b --batches 1,16,64 --prefill-lengths 512,2048,16384 \\
        [--q-bits 4 --q-batches 1] --deadline 60 --out $OUT/fused_decode.jsonl

For each measurement the settings alternate (over ``--rounds``), each with a freshly compiled
step / prefill trace: decode with the kernels on (MLX's matmul for the products, the default);
with the skinny product (xlstm_metal/kernels/fast/skinny.py, 2-64 rows; off by default) too
(``--no-skinny`` leaves it out; ``--skinny-kernels mma,wgmma``: each kernel, the second
skinny_wgmma.py's); with each layout of the gated step kernel (``--step-kernels 2,1``);
with the quantized decode chain (xlstm_metal/kernels/fast/decode_chain.py) off, and on with other
numbers of thread blocks per kernel, and with MLX's matmul for float (bf16) products
(``--chain``); and with all of them off (``--no-off`` leaves that out; ``--settings`` picks
settings by name); prefill also with the GPU's
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import xlstm_metal  # noqa: E402,F401  (first: BLAS preload on Linux CPUs)
import mlx.core as mx  # noqa: E402

from xlstm_metal import benchmark as bm  # noqa: E402
from xlstm_metal.kernels.fast import decode, decode_chain, quantized, skinny, step_deferred  # noqa: E402
from xlstm_metal.kernels.fast import skinny_wgmma as wg  # noqa: E402
from xlstm_metal.models import xlstm_large as xlarge  # noqa: E402


def trace_decode(model, batch: int, steps: int, step_s: float, top: int = 14) -> dict:
    """GPU time per compiled decode step by kernel (CUPTI through PyTorch's profiler: see
    benchmarks/train_side_by_side.py), with the step's measured time for the gaps."""
    from train_side_by_side import trace_kernels  # noqa: PLC0415  (benchmarks/, the script's own folder)

    step = bm.make_decode_step(model, compiled=True)
    tok, state = bm.start_decode(model, step, mx.zeros((batch, 1), dtype=mx.int32))
    carry = {"tok": tok, "state": state}

    def run():
        carry["tok"], carry["state"] = step(carry["tok"], carry["state"])
        mx.async_eval(carry["tok"], carry["state"])

    summary = trace_kernels(run, steps, step_s)
    mx.eval(carry["tok"], carry["state"])
    if "error" in summary:
        return summary
    return {"busy_ms": summary["gpu_busy_ms"], "span_ms": summary["span_ms"], "step_ms": summary.get("step_ms"),
            "kernels": summary["kernels_per_step"],
            "categories": {k: round(v["ms"], 4) for k, v in summary["categories"].items()},
            "top": [(t["name"][:80 if top <= 14 else 140], round(t["ms"], 4), t["launches"]) for t in summary["top"][:top]]}


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
                        "decode.set_step_kernel_version; '2@128': layout 2 with 128 threads along the value "
                        "columns, decode._V2_TX), in place of the default layout alone")
    p.add_argument("--no-skinny", action="store_true", help="leave out the skinny-product settings")
    p.add_argument("--skinny-kernels", default="mma",
                   help="one skinny-product setting per kernel, comma-separated: mma (skinny.py's mma.sync), "
                        "wgmma (skinny_wgmma.py's), decode (skinny.decode_matmul: quantized.py's decode kernel), stream (rows_mma.py's kernel, settings from XLSTM_METAL_ROWS_MMA), auto (the decode kernel where skinny.AUTO_ROWS says), off (MLX's products); "
                        "KERNEL@N: the wgmma product splitting k for about N blocks (skinny_wgmma.TARGET_BLOCKS); "
                        "KERNEL@sk[N]: the wgmma product's stream-K schedule (skinny_wgmma.SCHEDULE; N blocks, "
                        "skinny_wgmma.STREAMK_BLOCKS), KERNEL@hy: its hybrid schedule, KERNEL@split: the split one; "
                        "+f after any of them (e.g. auto@hy+f, auto@+f): SwiGLU inside proj_down's launch and the "
                        "output norm and gate inside out_proj's (skinny.SWIGLU_IN_PRODUCT, skinny.NORM_GATE_IN_PRODUCT); "
                        "+fit: split products in one wave (skinny_wgmma.SPLIT_FIT), e.g. auto@+f+fit; +nof, +nofit: "
                        "those off; +pN: the copies' L2 prefetch of N bytes (skinny_wgmma.L2_PREFETCH)")
    p.add_argument("--no-off", action="store_true", help="leave out the decode setting with all fused kernels off")
    p.add_argument("--chain", action="store_true",
                   help="decode also with the quantized decode chain off, and on without its shared-memory staging")
    p.add_argument("--settings", default="",
                   help="decode settings to run (names as in the output, separated by semicolons; default all)")
    p.add_argument("--q-settings", default="",
                   help="decode settings for the quantized models (default: those of --settings)")
    p.add_argument("--check-chain", action="store_true",
                   help="for each weight format, first decode a few greedy steps with the quantized decode "
                   "chain on and off (the same tokens) and report how far the logits differ")
    p.add_argument("--trace-steps", type=int, default=0,
                   help="after each decode measurement, trace this many more steps under CUPTI (PyTorch's "
                   "profiler): GPU busy time per step, the gaps, the costliest kernels")
    p.add_argument("--trace-top", type=int, default=14, help="the costliest kernels a trace lists")
    p.add_argument("--trace-rounds", type=int, default=None, help="trace in the first N rounds only")
    p.add_argument("--trace-settings", default="",
                   help="trace only after these settings (names separated by semicolons; default all)")
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
        # the deferral the measured decode ran with (it depends on the rows and the setting)
        defer = step_deferred.default_deferral(record["batch"]) if "batch" in record else None
        line = json.dumps({"shape": args.shape, "dtype": dtype, "q_bits": q_bits, "defer_terms": defer, **record})
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    queue_layers = xlarge._queue_layers
    skinny_default = skinny.skinny_gemm_kernel()
    wg_target, wg_schedule, wg_sk_blocks = wg.TARGET_BLOCKS, wg.SCHEDULE, wg.STREAMK_BLOCKS
    swiglu_in_product, norm_gate_in_product = skinny.SWIGLU_IN_PRODUCT, skinny.NORM_GATE_IN_PRODUCT
    split_fit, l2_prefetch = wg.SPLIT_FIT, wg.L2_PREFETCH
    residual = model.residual_dtype  # what fuse_projections() set (float32 under bf16 weights)
    step_default = decode.step_kernel_version()
    chain_blocks, chain_float = decode_chain.CHAIN_BLOCKS, decode_chain.CHAIN_FLOAT
    ring_depth, resident, split_k = dict(quantized.DEPTH), dict(quantized.RESIDENT), dict(decode_chain.SPLIT_K)
    int_weights = dict(quantized.INT_WEIGHTS)
    chain_merge, chain_paired, chain_stack = decode_chain.CHAIN_MERGE, decode_chain.CHAIN_PAIRED, decode_chain.CHAIN_STACK
    stage_schedule = {k: dict(v) for k, v in decode_chain.STAGE_SCHEDULE.items()}
    # (name, fused decode kernels, prefill queues layers on a GPU, residual stream dtype, skinny
    # product, layout of the gated step kernel, the decode chain: True, False, or a dict of its
    # settings: "blocks" (most thread blocks per kernel; 0: one per 16-feature tile), "float"
    # (False: float products by MLX's matmul, the chain only where the products are quantized),
    # "depth" / "resident" (the decode kernels' ring depth by bits and blocks per SM), "split" (the
    # shares of K of out_proj and proj_down by bits), "int" (quantized.INT_WEIGHTS: the chain's
    # quantized products with the weights as exact integers, by bits), "stage" (decode_chain.STAGE_SCHEDULE:
    # single stages' ring depth, blocks and integer weights, by bits), "merge" (decode_chain.CHAIN_MERGE, for
    # every width; the default by bits:
    # stages 4 and 5 in one launch; 2: with the proj_down blocks' first tile asked of L2; 3: in one
    # grid; 4: stages 3, 4 and 5 in one grid; 5: the whole block in one grid), "stack" (decode_chain.CHAIN_STACK: blocks per launch), "paired" (decode_chain.CHAIN_PAIRED: SwiGLU in the merged
    # kernels' gate|up epilogue))
    v2_tx = decode._V2_TX

    def step_setting(text: str):
        """'2' (a layout) or '2@128' (layout 2 with that many threads along the value columns)."""
        version, _, tx = text.partition("@")
        name = f"fused decode kernels, step kernel {version}" + (f", {tx} column threads" if tx else "")
        return name, (int(version), int(tx) if tx else v2_tx)

    if args.step_kernels:
        fused = [(name, True, True, residual, skinny_default, version, True)
                 for name, version in map(step_setting, args.step_kernels.split(","))]
    else:
        fused = [("fused decode kernels", True, True, residual, skinny_default, step_default, True)]
    if args.chain:
        fused += [("fused decode kernels, chain off", True, True, residual, skinny_default, step_default, False),
                  ("fused decode kernels, chain, 264 blocks", True, True, residual, skinny_default, step_default,
                   {"blocks": 264}),
                  ("fused decode kernels, chain, 132 blocks", True, True, residual, skinny_default, step_default, {"blocks": 132}),
                  ("fused decode kernels, chain, 528 blocks", True, True, residual, skinny_default, step_default, {"blocks": 528}),
                  ("fused decode kernels, chain, MLX's float products", True, True, residual, skinny_default, step_default,
                   {"float": False}),
                  # the decode kernels as S7R2 ran them (4 weight chunks in flight, 2 blocks per SM)
                  ("fused decode kernels, chain, depth 4, 2 blocks per SM", True, True, residual, skinny_default,
                   step_default, {"depth": {4: 4, 8: 4, 16: 8}, "resident": {4: 2, 8: 2, 16: 2},
                                  "blocks": 2 * quantized.SMS}),
                  # out_proj and proj_down with K unsplit (session 7's stages)
                  ("fused decode kernels, chain, K unsplit", True, True, residual, skinny_default, step_default,
                   {"split": {4: 1, 8: 1, 16: 1}})]
        # the chain's quantized products with the weights as exact integers where they can (and
        # the dequantize-first kernels explicitly: whichever the default is, both can be named)
        fused += [("fused decode kernels, chain, integer weights", True, True, residual, skinny_default, step_default,
                   {"int": {4: 1, 8: 1}}),
                  ("fused decode kernels, chain, dequantized weights", True, True, residual, skinny_default,
                   step_default, {"int": {4: 0, 8: 0}}),
                  ("fused decode kernels, chain, integer weights, depth 2", True, True, residual, skinny_default,
                   step_default, {"int": {4: 1, 8: 1}, "depth": {4: 4, 8: 2, 16: 1}}),
                  ("fused decode kernels, chain, integer weights 1024 + q", True, True, residual, skinny_default,
                   step_default, {"int": {4: 2, 8: 2}}),
                  # 8 and 16 bits: 2 weight chunks in flight, 3 blocks per SM, 396 blocks walking tiles,
                  # the weights as integers 1024 + q (4 bits keep their schedule)
                  ("fused decode kernels, chain, integer weights, depth 2, 396 blocks", True, True, residual,
                   skinny_default, step_default, {"int": {4: 2, 8: 2}, "depth": {4: 4, 8: 2, 16: 2},
                                                  "resident": {4: 2, 8: 3, 16: 3}, "blocks": 3 * quantized.SMS}),
                  # every stage as session 8 shipped it (8 bits: dequantize first, one chunk in flight, a block per tile)
                  ("fused decode kernels, chain, session 8's 8-bit schedule", True, True, residual, skinny_default,
                   step_default, {"stage": {"norm": {8: (1, 0, 0)}}}),
                  # the same for the two norm stages (q|k|v|o, gate|up) only, at 8 bits (S9R1, products alone)
                  ("fused decode kernels, chain, norm stages: integer weights, depth 2, 396 blocks", True, True,
                   residual, skinny_default, step_default, {"stage": {"norm": {8: (2, 3 * quantized.SMS, 2)}}})]
        # stages 4 and 5 (RMSNorm -> gate|up, SwiGLU -> proj_down) in one launch, and not
        fused += [("fused decode kernels, chain, merged FFN", True, True, residual, skinny_default, step_default,
                   {"merge": 1}),
                  ("fused decode kernels, chain, merged FFN, L2 prefetch", True, True, residual, skinny_default,
                   step_default, {"merge": 2}),
                  ("fused decode kernels, chain, merged FFN, one grid", True, True, residual, skinny_default,
                   step_default, {"merge": 3}),
                  ("fused decode kernels, chain, stages 3-5 in one grid", True, True, residual, skinny_default,
                   step_default, {"merge": 4}),
                  ("fused decode kernels, chain, merged FFN, paired", True, True, residual, skinny_default,
                   step_default, {"merge": 1, "paired": 1}),
                  ("fused decode kernels, chain, merged FFN, one grid, paired", True, True, residual, skinny_default,
                   step_default, {"merge": 3, "paired": 1}),
                  ("fused decode kernels, chain, stages 3-5 in one grid, paired", True, True, residual,
                   skinny_default, step_default, {"merge": 4, "paired": 1}),
                  ("fused decode kernels, chain, FFN unmerged", True, True, residual, skinny_default, step_default,
                   {"merge": 0}),
                  # stages 1-5 (the step between) in one launch per block, every width
                  ("fused decode kernels, chain, whole block in one launch", True, True, residual, skinny_default,
                   step_default, {"merge": 5, "paired": 1})]
        # several whole blocks per launch (decode_chain.CHAIN_STACK)
        fused += [(f"fused decode kernels, chain, {n} blocks per launch", True, True, residual, skinny_default,
                   step_default, {"merge": 5, "paired": 1, "stack": n}) for n in (2, 4, 8, 16, 32)]
        fused += [("fused decode kernels, chain, 32 blocks per launch, 2 blocks per SM", True, True, residual,
                   skinny_default, step_default, {"merge": 5, "paired": 1, "stack": 32,
                                                  "resident": {4: 2, 8: 2, 16: 2}})]
        fused += [(f"fused decode kernels, chain, K in {n} shares", True, True, residual, skinny_default, step_default,
                   {"split": {4: n, 8: n, 16: n}}) for n in (2, 4, 8)]
        # every width: 2 weight chunks in flight, 3 blocks per SM, 396 blocks walking tiles (S7R3
        # ran this with an L2 prefetch, since removed)
        fused += [("fused decode kernels, chain, depth 2, 3 blocks per SM, 396 blocks", True, True, residual,
                   skinny_default, step_default, {"depth": {4: 2, 8: 2, 16: 2}, "resident": {4: 3, 8: 3, 16: 3},
                                                  "blocks": 3 * quantized.SMS})]
    skinny_names = {"mma": "fused decode kernels + skinny product", "wgmma": "fused decode kernels + wgmma product",
                    "auto": "fused decode kernels + auto product", "off": "fused decode kernels, MLX's products",
                    "decode": "fused decode kernels + decode-kernel product",
                    "stream": "fused decode kernels + streaming mma product"}
    unknown = {k.partition("@")[0] for k in args.skinny_kernels.split(",")} - set(skinny_names)
    if unknown:
        p.error(f"unknown --skinny-kernels {sorted(unknown)}; known: {sorted(skinny_names)}")

    def skinny_name(spec: str) -> str:
        kernel, _, target = spec.partition("@")
        target, _, flags = target.partition("+")
        flags = flags.split("+")
        folds = ((", SwiGLU and norm-gate in the products" if "f" in flags else ", SwiGLU and norm-gate launched alone"
                  if "nof" in flags else "") + (", one wave" if "fit" in flags else ", split past one wave"
                                                if "nofit" in flags else "")
                 + "".join(f", L2 prefetch {f[1:]} B" for f in flags if f[:1] == "p" and f[1:].isdigit()))
        if target.startswith("sk"):
            return skinny_names[kernel] + ", stream-K" + (f" {target[2:]} blocks" if target[2:] else "") + folds
        if target in ("hy", "split"):
            return skinny_names[kernel] + (", hybrid schedule" if target == "hy" else ", split schedule") + folds
        return skinny_names[kernel] + (f", k split for {target} blocks" if target else "") + folds
    settings = {"decode": fused + ([] if args.no_skinny else
                                   [(skinny_name(k), True, True, residual, k, step_default, True)
                                    for k in args.skinny_kernels.split(",")])
                + ([] if args.no_off else [("off", False, True, residual, False, step_default, False)]),
                "prefill": [("fused kernels, layers queued", True, True, residual, skinny_default, step_default, True),
                            ("fused kernels, layer by layer", True, False, residual, skinny_default, step_default, True),
                            ("off", False, False, residual, False, step_default, True)]}
    if args.bf16_residual:
        settings["decode"].append(("fused decode kernels, residual in the weights' dtype", True, True, None, False,
                                   step_default, True))
    every = settings["decode"]

    def pick(names: str, flag: str) -> list:
        chosen = [name.strip() for name in names.split(";") if name.strip()]
        unknown = set(chosen) - {s[0] for s in every}
        if unknown:
            p.error(f"unknown {flag} {sorted(unknown)}; known: {[s[0] for s in every]}")
        return [s for s in every if s[0] in chosen] if chosen else every

    settings["decode"] = pick(args.settings, "--settings")
    q_settings = pick(args.q_settings, "--q-settings") if args.q_settings else settings["decode"]

    def run(kind: str, size: int) -> None:
        for round_ in range(args.rounds):
            for name, on, queued, residual_dtype, skinny_on, step_version, chain_on in settings[kind]:
                if late():
                    return
                decode.set_fused_decode(on)
                step_version, decode._V2_TX = step_version if isinstance(step_version, tuple) else (step_version, v2_tx)
                decode.set_step_kernel_version(step_version)
                kernel, _, target = skinny_on.partition("@") if isinstance(skinny_on, str) else (skinny_on, "", "")
                skinny.set_skinny_gemm(kernel)
                target, _, flags = target.partition("+")
                stream_k = target.startswith("sk")
                wg.TARGET_BLOCKS = int(target) if target.isdigit() else wg_target
                wg.SCHEDULE = ("streamk" if stream_k else "hybrid" if target == "hy" else "split" if target == "split"
                               else wg_schedule)
                wg.STREAMK_BLOCKS = int(target[2:]) if stream_k and target[2:] else wg_sk_blocks
                flags = flags.split("+")
                folds = True if "f" in flags else False if "nof" in flags else None
                skinny.SWIGLU_IN_PRODUCT = swiglu_in_product if folds is None else folds
                skinny.NORM_GATE_IN_PRODUCT = norm_gate_in_product if folds is None else folds
                wg.SPLIT_FIT = True if "fit" in flags else False if "nofit" in flags else split_fit
                wg.L2_PREFETCH = next((int(f[1:]) for f in flags if f[:1] == "p" and f[1:].isdigit()), l2_prefetch)
                decode_chain.set_decode_chain(bool(chain_on))
                options = chain_on if isinstance(chain_on, dict) else {}
                decode_chain.CHAIN_BLOCKS = options.get("blocks", chain_blocks)
                decode_chain.CHAIN_FLOAT = options.get("float", chain_float)
                decode_chain.CHAIN_MERGE = options.get("merge", chain_merge)
                decode_chain.CHAIN_PAIRED = options.get("paired", chain_paired)
                decode_chain.CHAIN_STACK = options.get("stack", chain_stack)
                quantized.DEPTH.update(options.get("depth", ring_depth))
                quantized.RESIDENT.update(options.get("resident", resident))
                decode_chain.SPLIT_K.update(options.get("split", split_k))
                quantized.INT_WEIGHTS.update(options.get("int", int_weights))
                for stage, per_bits in stage_schedule.items():
                    decode_chain.STAGE_SCHEDULE[stage] = dict(options.get("stage", {}).get(stage, per_bits))
                model.residual_dtype = residual_dtype
                xlarge._queue_layers = queue_layers if queued else (lambda: False)
                model.__dict__.pop("_prefill_blocks", None)  # prefill traces are built again
                if kind == "decode":
                    r = bm.measure_decode(model, size, tokens=args.tokens)
                else:
                    r = bm.measure_prefill(model, size)
                emit({"setting": name, **r})
                traced = ((not args.trace_settings or name in args.trace_settings.split(";"))
                          and (args.trace_rounds is None or round_ < args.trace_rounds))
                if kind == "decode" and args.trace_steps > 0 and traced and not late():
                    emit({"setting": name, "kind": "decode_trace", "batch": size,
                          **trace_decode(model, size, args.trace_steps, r["ms_per_step"] / 1000, args.trace_top)})
        xlarge._queue_layers = queue_layers
        model.residual_dtype = residual
        decode._V2_TX = v2_tx
        decode.set_fused_decode(True)
        decode_chain.set_decode_chain(True)
        decode_chain.CHAIN_BLOCKS, decode_chain.CHAIN_FLOAT = chain_blocks, chain_float
        decode_chain.CHAIN_MERGE, decode_chain.CHAIN_PAIRED = chain_merge, chain_paired
        decode_chain.CHAIN_STACK = chain_stack
        quantized.DEPTH.update(ring_depth)
        quantized.RESIDENT.update(resident)
        quantized.INT_WEIGHTS.update(int_weights)
        for stage, per_bits in stage_schedule.items():
            decode_chain.STAGE_SCHEDULE[stage] = dict(per_bits)

    def check_chain() -> None:
        """Greedy steps from one random token with the chain on, then the same tokens with it off,
        then with every fused decode kernel off (the reference ops: how far two bf16 paths drift
        apart anyway); eager, each setting runs the ops it would compile."""
        if not args.check_chain or late():
            return
        logits = {}
        tokens = [mx.random.randint(0, config.vocab_size, (1, 1), key=mx.random.key(1)).astype(mx.int32)]
        for setting in ("chain", "chain off", "reference"):
            decode_chain.set_decode_chain(setting == "chain")
            decode.set_fused_decode(setting != "reference")
            state, out = model.make_state(1), []
            for i in range(4):
                step_logits, state = model(tokens[i], state)
                out.append(step_logits[:, -1].astype(mx.float32))
                if setting == "chain":
                    tokens.append(mx.argmax(out[-1], axis=-1).reshape(1, 1).astype(mx.int32))
            mx.eval(out)
            logits[setting] = out
        decode_chain.set_decode_chain(True)
        decode.set_fused_decode(True)

        def compare(a_name: str, b_name: str) -> dict:
            pairs = list(zip(logits[a_name], logits[b_name]))
            rel = [float(mx.max(mx.abs(a - b)) / mx.max(mx.abs(b))) for a, b in pairs]
            return {"max_rel_logits": max(rel), "rel_per_step": rel,
                    "greedy_agreement": [int(mx.argmax(a).item() == mx.argmax(b).item()) for a, b in pairs]}

        emit({"kind": "chain_check", **compare("chain", "chain off"),
              "chain_off_vs_reference": compare("chain off", "reference")})

    if args.batches:
        check_chain()
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
        settings["decode"] = q_settings
        check_chain()
        for batch in map(int, filter(None, args.q_batches.split(","))):
            run("decode", batch)
    decode.set_fused_decode(True)
    decode.set_step_kernel_version(step_default)
    skinny.set_skinny_gemm(skinny_default)
    wg.TARGET_BLOCKS, wg.SCHEDULE, wg.STREAMK_BLOCKS = wg_target, wg_schedule, wg_sk_blocks
    skinny.SWIGLU_IN_PRODUCT, skinny.NORM_GATE_IN_PRODUCT = swiglu_in_product, norm_gate_in_product
    wg.SPLIT_FIT, wg.L2_PREFETCH = split_fit, l2_prefetch
    emit({"kind": "done", "seconds_total": time.perf_counter() - start, "device": str(mx.default_device())})


if __name__ == "__main__":
    main()
