"""How far each side's mLSTM kernel gradients land from the exact ones, at the same inputs (issue 19
item 3: what training's ``--mlstm-products bf16`` costs in precision, beside the official's).

One layer's chunkwise mLSTM at a model shape's head sizes: bf16 q, k, v and float32 gates drawn
once (numpy, seeded), loss = sum(h * W) with a float32 W. The reference is autodiff of NX-AI's
native PyTorch chunkwise implementation in float64 on the same (bf16-exact) inputs. Compared,
each as the relative Frobenius error of dq, dk, dv, di, df against it:

- ours: ``mlstm_chunkwise_fused`` (MLX; on CUDA its fused kernels and their backward) with the
  products' float32 operands as three bf16 terms (``float32``, the default) and rounded to bf16
  (``bf16``: ``chunkwise_grad.product_terms(1)``, training's ``mlstm_products="bf16"``);
- official: ``mlstm_chunkwise__limit_chunk`` (Triton, ``autocast_kernel_dtype=bfloat16``, as
  xLSTMLarge trains), once as called (float32 gates) and once under ``torch.autocast`` (its
  training step: the gates cast to bf16 too). Needs torch with CUDA and Triton.

    python benchmarks/mlstm_grad_error.py --shape 1.3b --batch 1 --seq-len 2048 --out results/x.jsonl

One JSON record per line to stdout and (appended) --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import xlstm_metal  # noqa: E402,F401  (BLAS before mlx)
import mlx.core as mx  # noqa: E402

from xlstm_metal.benchmark import shape_config  # noqa: E402

NAMES = ("q", "k", "v", "i", "f")


def _inputs(B: int, NH: int, S: int, dqk: int, dv: int, seed: int) -> dict[str, np.ndarray]:
    """float32 arrays; q, k, v rounded to bf16 (both sides take them exactly)."""
    rng = np.random.default_rng(seed)

    def bf16(a: np.ndarray) -> np.ndarray:
        return np.array(mx.array(a.astype(np.float32)).astype(mx.bfloat16).astype(mx.float32))

    return {"q": bf16(rng.standard_normal((B, NH, S, dqk))), "k": bf16(rng.standard_normal((B, NH, S, dqk))),
            "v": bf16(rng.standard_normal((B, NH, S, dv))),
            "i": rng.standard_normal((B, NH, S)).astype(np.float32),
            "f": (rng.standard_normal((B, NH, S)) + 3.0).astype(np.float32),
            "w": rng.standard_normal((B, NH, S, dv)).astype(np.float32)}


def ours(x: dict[str, np.ndarray], terms: int | None, chunk: int) -> tuple[list[np.ndarray], bool]:
    """Gradients of sum(h * W) by ``mlstm_chunkwise_fused`` with ``product_terms(terms)``, and
    whether its CUDA kernels ran."""
    from xlstm_metal.kernels.fast.chunkwise_fused import fused_chunkwise_supported, mlstm_chunkwise_fused
    from xlstm_metal.kernels.fast.chunkwise_grad import product_terms

    q, k, v = (mx.array(x[n]).astype(mx.bfloat16) for n in "qkv")
    i, f, w = (mx.array(x[n]) for n in "ifw")

    def loss(q, k, v, i, f):
        h, _ = mlstm_chunkwise_fused(q, k, v, i, f, None, chunk_size=chunk)
        return mx.sum(h.astype(mx.float32) * w)

    with product_terms(terms):
        grads = mx.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, i, f)
    return [np.array(g.astype(mx.float32), dtype=np.float64) for g in grads], fused_chunkwise_supported(q, v, chunk)


def reference(x: dict[str, np.ndarray], chunk: int, device: str) -> list[np.ndarray]:
    """Autodiff of NX-AI's native chunkwise mLSTM in float64."""
    import torch
    from mlstm_kernels.torch.chunkwise.native import mlstm_chunkwise__native_autograd

    t = {n: torch.tensor(x[n], dtype=torch.float64, device=device, requires_grad=n != "w") for n in x}
    h = mlstm_chunkwise__native_autograd(t["q"], t["k"], t["v"], t["i"], t["f"], chunk_size=chunk)
    (h * t["w"]).sum().backward()
    return [t[n].grad.cpu().numpy() for n in NAMES]


def official(x: dict[str, np.ndarray], chunk: int, autocast: bool) -> list[np.ndarray]:
    """Gradients through NX-AI's Triton kernels (bf16 kernel dtype), optionally under autocast."""
    import torch
    from mlstm_kernels.torch.chunkwise.triton_limit_chunk import mlstm_chunkwise__limit_chunk

    t = {n: torch.tensor(x[n], device="cuda") for n in x}
    for n in "qkv":
        t[n] = t[n].to(torch.bfloat16)
    for n in NAMES:
        t[n].requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        h = mlstm_chunkwise__limit_chunk(t["q"], t["k"], t["v"], t["i"], t["f"], chunk_size=chunk,
                                         autocast_kernel_dtype=torch.bfloat16)
    (h.float() * t["w"]).sum().backward()
    return [t[n].grad.double().cpu().numpy() for n in NAMES]


def rel_errors(grads: list[np.ndarray], ref: list[np.ndarray]) -> dict[str, float]:
    return {n: float(np.linalg.norm(g - r) / (np.linalg.norm(r) + 1e-300)) for n, g, r in zip(NAMES, grads, ref)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1.3b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", default="ours,official", help="comma-separated: ours, official")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.seq_len % args.chunk_size:
        raise SystemExit(f"--seq-len {args.seq_len} must be a multiple of --chunk-size {args.chunk_size} "
                         "(the official's kernels take whole chunks)")
    try:
        import torch
    except ImportError:
        raise SystemExit("needs PyTorch and NX-AI's mlstm_kernels (the float64 reference)") from None
    config = shape_config(args.shape)
    x = _inputs(args.batch, config.num_heads, args.seq_len, config.qk_head_dim, config.v_head_dim, args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = reference(x, args.chunk_size, device)
    base = {"kind": "grad_error", "shape": args.shape, "batch": args.batch, "seq_len": args.seq_len,
            "chunk_size": args.chunk_size, "seed": args.seed, "reference": f"native chunkwise, float64, {device}"}

    def emit(record: dict) -> None:
        line = json.dumps({**base, **record})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")

    sides = [s for s in args.sides.split(",") if s]
    if "ours" in sides:
        for products, terms in (("float32", None), ("bf16", 1)):
            grads, kernels = ours(x, terms, args.chunk_size)
            emit({"side": "ours", "products": products, "cuda_kernels": kernels, "rel_error": rel_errors(grads, ref)})
    if "official" in sides:
        if device != "cuda":
            emit({"side": "official", "error": "its Triton kernels need CUDA"})
        else:
            for autocast in (False, True):
                try:
                    grads = official(x, args.chunk_size, autocast)
                    emit({"side": "official", "kernel": "triton_limit_chunk, bf16", "autocast": autocast,
                          "rel_error": rel_errors(grads, ref)})
                except Exception as err:  # Triton missing or failing: say so, keep ours
                    emit({"side": "official", "autocast": autocast, "error": repr(err)[:500]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
