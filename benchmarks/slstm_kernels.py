"""The sLSTM recurrence alone: fused CUDA kernels vs the pure-ops reference, on the sLSTM of
the xLSTM[7:1] 350M shape (NH=4, DH=256) by default.

Times (median of --repeats, after a warm-up): the sequence forward, forward + backward (the
gradient of a weighted sum of h w.r.t. wx, R, bias and the state), and one decode step.

    python benchmarks/slstm_kernels.py --out results/slstm_kernels.json [--batch 4 --seq 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--exchange", choices=["barrier", "tagged"], default="barrier",
                   help="exchange used for the decode-step timing (S = 1 exchanges nothing)")
    p.add_argument("--reference-seq", type=int, default=512,
                   help="sequence length for the (slow) reference; its time is scaled to --seq")
    args = p.parse_args(argv)
    if args.out.exists():
        p.error(f"{args.out} exists; choose another --out")

    import xlstm_metal  # noqa: F401
    import mlx.core as mx

    from xlstm_metal.benchmark import environment, median_seconds
    from xlstm_metal.kernels.fast import slstm_fused as sf
    from xlstm_metal.kernels.fast.slstm_fused import kernel_supported, slstm_recurrence
    from xlstm_metal.kernels.slstm import slstm_sequence, slstm_step

    B, S, NH, DH = args.batch, args.seq, args.heads, args.head_dim
    key = mx.random.key(0)
    k1, k2, k3 = mx.random.split(key, 3)
    wx = mx.random.normal((B, S, NH, 4, DH), key=k1).astype(mx.bfloat16)
    R = mx.random.normal((NH, DH, 4 * DH), key=k2) * (1.0 / DH**0.5)
    bias = mx.random.normal((NH, 4, DH), key=k3)
    w = mx.random.normal((B, S, NH, DH))
    mx.eval(wx, R, bias, w)
    backend = "cuda" if kernel_supported(NH, DH) else "ops"

    def fused_fwd(x=wx):
        return slstm_recurrence(x, R, None, bias=bias, backend=backend)

    def ref_fwd(x=wx):
        return slstm_sequence(x.astype(mx.float32) + bias, R, None)

    def grad_of(fn, x):
        def loss(x, R_, b_):
            h, _ = (slstm_recurrence(x, R_, None, bias=b_, backend=backend) if fn == "fused"
                    else slstm_sequence(x.astype(mx.float32) + b_, R_, None))
            return mx.sum(h.astype(mx.float32) * w[:, : x.shape[1]])

        return mx.grad(loss, argnums=(0, 1, 2))(x, R, bias)

    records = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": "python benchmarks/slstm_kernels.py " + " ".join(sys.argv[1:]), "env": environment(), "shape": dict(B=B, S=S, NH=NH, DH=DH), "backend": backend}
    for exchange in ("barrier", "tagged"):
        sf.EXCHANGE = exchange
        t = median_seconds(fused_fwd, args.repeats)
        records[f"fused_forward_ms_{exchange}"] = 1e3 * t
        t = median_seconds(lambda: grad_of("fused", wx), args.repeats)
        records[f"fused_forward_backward_ms_{exchange}"] = 1e3 * t
        print(exchange, records[f"fused_forward_ms_{exchange}"], records[f"fused_forward_backward_ms_{exchange}"], flush=True)
    sf.EXCHANGE = args.exchange
    Sr = min(S, args.reference_seq)
    xr = wx[:, :Sr]
    t = median_seconds(lambda: ref_fwd(xr), max(1, args.repeats // 2))
    records["reference_forward_ms_scaled"] = 1e3 * t * S / Sr
    t = median_seconds(lambda: grad_of("ref", xr), 1)
    records["reference_forward_backward_ms_scaled"] = 1e3 * t * S / Sr
    records["reference_seq"] = Sr
    # decode step at batch 1
    x1 = wx[:1, :1]
    state = tuple(mx.zeros((1, NH, DH)) for _ in range(4))
    step_f = mx.compile(lambda x, s: slstm_recurrence(x, R, s, bias=bias, backend=backend))
    step_r = mx.compile(lambda x, s: slstm_step(x[:, 0].astype(mx.float32) + bias, R, s))
    for name, fn in (("fused_step_us", step_f), ("reference_step_us", step_r)):
        st = state
        for _ in range(3):
            _, st = fn(x1, st)
            mx.eval(st)
        n = 200
        mx.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            _, st = fn(x1, st)
            mx.async_eval(st)
        mx.eval(st)
        records[name] = 1e6 * (time.perf_counter() - t0) / n
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, args.out)
    print(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
