"""Host time of one compiled decode step, apart from the device's: is decode host-bound?

For each weight format (bf16, then the same model quantized to ``--q-bits``) and each way of
compiling the greedy step, one process measures, per step (medians over ``--steps``):

- ``call_ms``: the Python call of the compiled step (MLX flattens the step's inputs, finds the
  cached trace and builds the step's graph), nothing evaluated;
- ``submit_ms``: ``mx.async_eval`` of that graph with the device idle (the host's work to
  allocate and launch every kernel of the step);
- ``wall_ms``: call + submit + waiting for the device (one step alone, synchronised);
- ``pipelined_ms``: steps queued back to back as :func:`xlstm_metal.benchmark.measure_decode` runs
  them, i.e. max(host, device) per step once the queue is full.

Compile modes: ``inputs`` (``mx.compile(step, inputs=model.state)``: the weights are inputs, so
a later weight update is seen: what ``generate`` and ``bench`` run) and ``constants``
(``mx.compile(step)``: the weights are captured as constants of the trace, no per-call
flattening of the module tree). ``leaves`` is the number of arrays in ``model.state``.
``aheadN``: ``bm.measure_decode(..., ahead=N)`` over ``--queued-steps`` (steps queued at most N
beyond the newest token read back). ``runner``: the greedy decode loop of ``xLSTMRunner.generate`` (its compiled step with sampling,
one ``tolist`` per token while the next step is queued), per step over ``--queued-steps`` tokens.

MLX's CUDA back-end reads its command-buffer settings once per process (``MLX_MAX_OPS_PER_BUFFER``,
``MLX_MAX_MB_PER_BUFFER``: a CUDA graph is committed after that many kernels or MB of kernel
inputs; ``MLX_USE_CUDA_GRAPHS=0``: kernels launched one by one, no graphs), so settings are
compared across processes: each record names the values in effect (``mlx_env``; None: MLX's
default) and ``--label``. ``--queued-repeats`` times the queued steps that many times (a list,
and its median in ``pipelined_ms``).

    python benchmarks/decode_host.py --shape 7b --q-bits 4 --steps 30 --out results.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import xlstm_metal  # noqa: E402,F401  (binds the fast CPU BLAS before mlx)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from xlstm_metal import benchmark as bm  # noqa: E402
from xlstm_metal.generation import xLSTMRunner  # noqa: E402
from xlstm_metal.kernels.mlstm import deferred_terms  # noqa: E402


def _step(model):
    def step(tokens: mx.array, state: list) -> tuple[mx.array, list]:
        logits, state = model(tokens, state)
        return mx.argmax(logits[:, -1, :], axis=-1, keepdims=True).astype(mx.int32), state

    return step


#: MLX's CUDA settings read once per process that change how a decode step is submitted.
MLX_ENV = ("MLX_MAX_OPS_PER_BUFFER", "MLX_MAX_MB_PER_BUFFER", "MLX_USE_CUDA_GRAPHS")


def measure(model, batch: int, steps: int, mode: str, queued_steps: int | None = None, repeats: int = 1) -> dict:
    """Per-step host and device times of the greedy step compiled as ``mode``."""
    step = mx.compile(_step(model), inputs=model.state) if mode == "inputs" else mx.compile(_step(model))
    tok, state = bm.start_decode(model, step, mx.zeros((batch, 1), dtype=mx.int32), warmup=4)
    call, submit, wall = [], [], []
    for _ in range(steps):
        mx.synchronize()
        t0 = time.perf_counter()
        tok, state = step(tok, state)
        t1 = time.perf_counter()
        mx.async_eval(tok, state)
        t2 = time.perf_counter()
        mx.eval(tok, state)
        mx.synchronize()
        t3 = time.perf_counter()
        call.append(t1 - t0)
        submit.append(t2 - t1)
        wall.append(t3 - t0)
    queued_steps = queued_steps or steps
    pipelined = []
    mx.reset_peak_memory()
    for _ in range(max(1, repeats)):
        mx.synchronize()
        t0 = time.perf_counter()
        for _ in range(queued_steps):
            tok, state = step(tok, state)
            mx.async_eval(tok, state)
        mx.eval(tok, state)
        pipelined.append((time.perf_counter() - t0) / queued_steps)
    ms = lambda xs: round(1000 * statistics.median(xs), 4)  # noqa: E731
    return {"mode": mode, "batch": batch, "defer_terms": deferred_terms(state[0]), "steps": steps,
            "call_ms": ms(call), "submit_ms": ms(submit),
            "host_ms": round(ms(call) + ms(submit), 4), "wall_ms": ms(wall),
            "queued_steps": queued_steps, "pipelined_ms": ms(pipelined),
            "pipelined_each_ms": [round(1000 * t, 4) for t in pipelined],
            "tok_s": round(batch / statistics.median(pipelined), 2),
            "peak_mem_gb": round(mx.get_peak_memory() / 2**30, 3)}


def measure_runner(model, runner, batch: int, steps: int, repeats: int = 1) -> dict:
    """Per-step time of xLSTMRunner's greedy decode loop: the whole loop, every step's building
    included (timed from before it queues its first step to the last token read)."""
    params = runner._params(0.0, 0, 1.0, 0.0, 1.0)
    times = []
    mx.reset_peak_memory()
    for r in range(max(1, repeats) + 1):  # the first run warms up
        state = model.make_state(batch)
        logits = mx.zeros((batch, model.config.vocab_size), dtype=mx.float32)
        keys, seen = runner._start_keys(None, batch, params), mx.zeros((batch, 1), dtype=mx.bool_)
        mx.eval(state, logits, keys, seen)
        mx.synchronize()
        t0 = time.perf_counter()
        # steps + 1 tokens: the first comes from the logits passed in, the others from the model.
        n = sum(1 for _ in runner._decode(logits, state, params, keys, seen, steps + 1))
        assert n == steps + 1
        if r:
            times.append((time.perf_counter() - t0) / steps)
    ms = round(1000 * statistics.median(times), 4)
    return {"mode": "runner", "batch": batch, "queued_steps": steps, "pipelined_ms": ms,
            "pipelined_each_ms": [round(1000 * t, 4) for t in times], "tok_s": round(batch * 1000 / ms, 2),
            "peak_mem_gb": round(mx.get_peak_memory() / 2**30, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="7b")
    p.add_argument("--dtype", default=None, help="weights (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--q-bits", default="4", help="then the model quantized to these bits (group 64, gates in float)")
    p.add_argument("--no-float", action="store_true", help="measure only the quantized model(s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--modes", default="inputs,constants")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--embedding-dim", type=int, default=None, help="override the shape's width (CPU tries)")
    p.add_argument("--queued-steps", type=int, default=None, help="steps per queued run (default --steps)")
    p.add_argument("--queued-repeats", type=int, default=1, help="queued runs per measurement")
    p.add_argument("--prefill-lengths", default="",
                   help="first, prefill the float model at these lengths (bm.measure_prefill: tok/s, peak memory)")
    p.add_argument("--label", default="", help="a name for this process's settings, in every record")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args()
    modes = args.modes.split(",")
    if any(m not in ("inputs", "constants", "runner") and not (m.startswith("ahead") and m[5:].isdigit())
           for m in modes):
        p.error(f"--modes takes inputs and/or constants (and runner, aheadN), got {args.modes!r}")
    overrides = {"embedding_dim": args.embedding_dim} if args.embedding_dim else {}
    config = bm.shape_config(args.shape, **overrides)
    dtype = args.dtype or bm.default_dtype()
    start = time.perf_counter()

    def progress(what: str) -> None:  # to stderr: where a time-limited run got to
        print(f"[{time.perf_counter() - start:7.1f} s] {what}", file=sys.stderr, flush=True)

    model = bm.random_model(config, dtype=dtype)
    model.fuse_projections()
    progress("model built")
    out = open(args.out, "a") if args.out else None
    env = bm.environment()
    for length in map(int, filter(None, args.prefill_lengths.split(","))):
        record = {"label": args.label, "shape": args.shape, "dtype": dtype, "q_bits": None,
                  **bm.measure_prefill(model, length), "mlx_env": {k: os.environ.get(k) for k in MLX_ENV},
                  "device": env.get("device")}
        print(json.dumps(record), flush=True)
        if out:
            out.write(json.dumps(record) + "\n")
            out.flush()
    for bits in ([] if args.no_float else [None]) + [int(b) for b in filter(None, args.q_bits.split(","))]:
        if bits is not None:
            from xlstm_metal.quantization import dequantize_model, quantize_model  # noqa: PLC0415

            dequantize_model(model)
            quantize_model(model, bits=bits, group_size=64)
            model.fuse_projections()
            progress(f"quantized to {bits} bits")
        leaves = len(tree_flatten(model.state))
        runner = xLSTMRunner(model)
        for round_ in range(args.rounds):
            for mode in modes:
                gc_before = [g["collections"] for g in gc.get_stats()]
                if mode.startswith("ahead"):
                    runs = [bm.measure_decode(model, args.batch, tokens=args.queued_steps or args.steps, ahead=int(mode[5:]))
                            for _ in range(max(1, args.queued_repeats))]
                    each = [r["ms_per_step"] for r in runs]
                    ms = statistics.median(each)
                    result = {"mode": mode, "batch": args.batch, "queued_steps": args.queued_steps or args.steps,
                              "pipelined_ms": round(ms, 4), "pipelined_each_ms": [round(t, 4) for t in each],
                              "tok_s": round(args.batch * 1000 / ms, 2),
                              "peak_mem_gb": round(max(r["peak_mem_gb"] for r in runs), 3)}
                elif mode == "runner":
                    result = measure_runner(model, runner, args.batch, args.queued_steps or args.steps,
                                            args.queued_repeats)
                else:
                    result = measure(model, args.batch, args.steps, mode, args.queued_steps, args.queued_repeats)
                # Python's garbage collections (per generation) during the measurement: host pauses
                result["gc_collections"] = [g["collections"] - b for g, b in zip(gc.get_stats(), gc_before)]
                record = {"label": args.label, "shape": args.shape, "dtype": dtype, "q_bits": bits, "round": round_,
                          "leaves": leaves, **result,
                          "mlx_env": {k: os.environ.get(k) for k in MLX_ENV}, "device": env.get("device")}
                print(json.dumps(record), flush=True)
                progress(f"{bits} bits, {mode}, round {round_}")
                if out:
                    out.write(json.dumps(record) + "\n")
                    out.flush()


if __name__ == "__main__":
    main()
