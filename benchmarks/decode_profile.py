"""Where a decode step's time goes (7B shape by default): the matrix products alone, per shape
and weight layout, against the whole compiled step.

    python benchmarks/decode_profile.py --shape 7b --batches 1,16,64 --out $OUT/decode_profile.jsonl

Records (one JSON object per line):
- ``matmul``: x [B, K] times each block's weight of one kind (fused q|k|v|o|i|f, out_proj, fused
  gate|up, proj_down) for all blocks in one evaluation, as ``x @ W.T`` (the checkpoint layout
  [N, K]), ``(W @ x.T).T`` (the weight as the left operand: another BLAS kernel choice) and
  ``x @ Wt`` (a transposed copy [K, N]); ms per block and GB/s of weights read.
- ``step``: the compiled greedy step of the whole model (as ``xlstm-metal bench``) and a compiled
  chain of only the blocks' four matmuls (as the model computes them: MLX's matmul, and the skinny
  kernels for 2-64 rows on CUDA: xlstm_metal/kernels/fast/skinny.py's, k unsplit and split for 264
  blocks, and skinny_wgmma.py's; ``--chains`` picks them), ms per step. ``--only-chain`` measures the chain and nothing else.
- ``breakdown`` (``--breakdown``, in place of the above): in one process, the whole compiled step,
  the chain of the 128 products (MLX's matmul), the LM head's product alone, the gated step kernel
  of every block alone (benchmarks/step_kernel.py: each layer's own state) and what is left of
  the step for everything else (norms, gates, output gate, SwiGLU, embedding, argmax, the gaps
  between ~300 kernels), ms per step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import xlstm_metal  # noqa: E402,F401  (first: BLAS preload on Linux CPUs)
import mlx.core as mx  # noqa: E402

from xlstm_metal import benchmark as bm  # noqa: E402
from xlstm_metal.kernels.fast import skinny  # noqa: E402
from xlstm_metal.kernels.fast import skinny_wgmma as wg  # noqa: E402
from xlstm_metal.kernels.fast.skinny import linear_product, set_skinny_gemm  # noqa: E402
from xlstm_metal.kernels.fast import decode  # noqa: E402
from step_kernel import make_steps  # noqa: E402  (benchmarks/, the script's own folder)


def products_chain(blocks, x: mx.array) -> mx.array:
    """The four products of every block, chained as the model computes them (``linear_product``:
    MLX's matmul, or the skinny kernel where switched on), with nothing else of the step."""
    for b in blocks:
        h = linear_product(x, b.mlstm_layer["_fused_projection"][0]["weight"])
        x = x + b.mlstm_layer.out_proj(h[..., : b.mlstm_layer.out_proj.weight.shape[1]])
        g = linear_product(x, b.ffn["_fused_gate_up"][0]["weight"])
        x = x + b.ffn.proj_down(g[..., : b.ffn.proj_down.weight.shape[1]])
    return x


def breakdown(model, B: int, repeats: int) -> dict:
    """ms per decode step at B rows: the whole compiled step and its parts timed alone."""
    config, blocks = model.config, model.blocks
    dtype = model.lm_head.weight.dtype
    x = mx.random.normal((B, 1, config.embedding_dim)).astype(dtype)

    def products(x):  # with the default product
        return products_chain(blocks, x)

    steps, _, state_bytes = make_steps(config, B, dtype, len(blocks))
    step = bm.make_decode_step(model)
    tok, state = mx.zeros((B, 1), dtype=mx.int32), model.make_state(B)
    mx.eval(state)
    ms = {"whole_step": bm.median_seconds(lambda: step(tok, state), repeats),
          "products": bm.median_seconds(lambda f=mx.compile(products): f(x), repeats),
          "lm_head": bm.median_seconds(lambda f=mx.compile(model.lm_head): f(x), repeats),
          "step_kernels": bm.median_seconds(mx.compile(steps), repeats)}
    ms = {k: 1000 * v for k, v in ms.items()}
    ms["rest"] = ms["whole_step"] - ms["products"] - ms["lm_head"] - ms["step_kernels"]
    return {"ms": ms, "state_gb_s": state_bytes / ms["step_kernels"] / 1e6, "tok_s": B / ms["whole_step"] * 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="7b")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--only-chain", action="store_true", help="only the compiled chain of products")
    p.add_argument("--chains", default="mlx;skinny, k not split;skinny, k split for 264 blocks",
                   help="the chains of products to time (names separated by ';': mlx, 'skinny, k not split', "
                        "'skinny, k split for 264 blocks', wgmma, 'wgmma, k not split', 'wgmma, k split for 528 blocks'")
    p.add_argument("--breakdown", action="store_true",
                   help="only where a step's time goes: whole step, products, LM head, step kernels, the rest")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dtype = bm.default_dtype()
    config = bm.shape_config(args.shape)
    model = bm.random_model(config, dtype=dtype).fuse_projections()
    out = open(args.out, "w") if args.out else None

    def emit(record: dict) -> None:
        line = json.dumps({"shape": args.shape, "dtype": dtype, **record})
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    blocks = model.blocks
    kinds = {
        "q|k|v|o|i|f": [b.mlstm_layer["_fused_projection"][0]["weight"] for b in blocks],
        "out_proj": [b.mlstm_layer.out_proj.weight for b in blocks],
        "gate|up": [b.ffn["_fused_gate_up"][0]["weight"] for b in blocks],
        "proj_down": [b.ffn.proj_down.weight for b in blocks],
    }
    E = config.embedding_dim
    if args.breakdown:
        for B in map(int, args.batches.split(",")):
            emit({"kind": "breakdown", "batch": B, "step_kernel": decode.step_kernel_version(),
                  **breakdown(model, B, args.repeats)})
        return
    for B in map(int, args.batches.split(",")):
        for kind, weights in [] if args.only_chain else kinds.items():
            K = weights[0].shape[1]
            x = mx.random.normal((B, K)).astype(weights[0].dtype)
            nbytes = sum(w.nbytes for w in weights)
            ms = 1000 * bm.median_seconds(lambda: [x @ w.T for w in weights], args.repeats) / len(weights)
            emit({"kind": "matmul", "batch": B, "what": kind, "layout": "x @ W.T", "N": weights[0].shape[0],
                  "K": K, "ms_per_block": ms, "gb_s": nbytes / len(weights) / (ms / 1000) / 1e9})
            # The same product with the weight as the left operand: BLAS then sees a tall-skinny
            # product [N, K] x [K, B] instead of [B, K] x [K, N] and may pick another kernel.
            ms = 1000 * bm.median_seconds(lambda: [mx.contiguous((w @ x.T).T) for w in weights],
                                          args.repeats) / len(weights)
            emit({"kind": "matmul", "batch": B, "what": kind, "layout": "(W @ x.T).T", "ms_per_block": ms,
                  "gb_s": nbytes / len(weights) / (ms / 1000) / 1e9})
            wts = [mx.contiguous(w.T) for w in weights]
            mx.eval(wts)
            ms = 1000 * bm.median_seconds(lambda: [x @ w for w in wts], args.repeats) / len(weights)
            emit({"kind": "matmul", "batch": B, "what": kind, "layout": "x @ Wt", "ms_per_block": ms,
                  "gb_s": nbytes / len(weights) / (ms / 1000) / 1e9})
            del wts

        def chain(x):
            return products_chain(blocks, x)

        x = mx.random.normal((B, 1, E)).astype(getattr(mx, dtype))
        default_kernel, target, wg_target = skinny.skinny_gemm_kernel(), skinny.TARGET_BLOCKS, wg.TARGET_BLOCKS
        chains = {"mlx": ("off", target, wg_target), "skinny, k not split": ("mma", 0, wg_target),
                  "skinny, k split for 264 blocks": ("mma", 264, wg_target),
                  "wgmma": ("wgmma", target, wg_target), "wgmma, k not split": ("wgmma", target, 0),
                  "wgmma, k split for 528 blocks": ("wgmma", target, 528)}
        ref = None
        for name in args.chains.split(";"):
            if name not in chains:
                p.error(f"unknown chain {name!r}; known: {list(chains)}")
            kernel, skinny.TARGET_BLOCKS, wg.TARGET_BLOCKS = chains[name]
            set_skinny_gemm(kernel)
            chain_c = mx.compile(chain)  # traced afresh: the dispatch is decided at trace time
            ms = 1000 * bm.median_seconds(lambda: chain_c(x), args.repeats)
            # The chain's result against MLX's matmul chain (the first run): a product that
            # computed nothing (or garbage) shows here, not only in its time.
            y = chain_c(x).astype(mx.float32)
            ref = y if name == "mlx" else ref
            emit({"kind": "step", "batch": B, "what": "matmul chain only (4 per block)", "products": name,
                  "ms": ms, "gb_s": sum(sum(w.nbytes for w in ws) for ws in kinds.values()) / (ms / 1000) / 1e9,
                  "max_rel_diff_vs_mlx": None if ref is None else (mx.max(mx.abs(y - ref)) / mx.max(mx.abs(ref))).item()})
        set_skinny_gemm(default_kernel)
        skinny.TARGET_BLOCKS, wg.TARGET_BLOCKS = target, wg_target
        if args.only_chain:
            continue

        step = bm.make_decode_step(model)
        tok = mx.zeros((B, 1), dtype=mx.int32)
        state = model.make_state(B)
        mx.eval(state)
        ms = 1000 * bm.median_seconds(lambda: step(tok, state), args.repeats)
        emit({"kind": "step", "batch": B, "what": "whole compiled step (sync each)", "ms": ms})
        for kernel in ("step", "step_fused"):
            for b in blocks:
                b.mlstm_layer.recurrent_kernel_cell.step_kernel = kernel
            r = bm.measure_decode(model, B, tokens=args.steps)
            emit({"kind": "step", "batch": B, "what": f"measure_decode ({kernel})", "ms": r["ms_per_step"]})


if __name__ == "__main__":
    main()
