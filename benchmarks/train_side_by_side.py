"""Training throughput, xlstm-metal beside NX-AI's official PyTorch ``xlstm`` (issue 19 item 3).

One full train step (forward, backward, global-norm clipping at 1.0, AdamW) of an xLSTM-Large
shape on random tokens, float32 master weights with bfloat16 compute, each side in its own
process (its own allocator and peak-memory counter):

- ours: the compiled step ``xlstm-metal train`` runs (``Trainer``: parameters cast to bf16 inside
  the loss, AdamW on the float32 masters, ``--kernel`` / ``--recompute`` variants);
- official: ``xLSTMLarge(mode="train")`` with the Triton kernels
  (``chunkwise--triton_limit_chunk``), ``torch.autocast(bfloat16)``, ``clip_grad_norm_``,
  fused ``torch.optim.AdamW``; optionally the model under ``torch.compile``.

    python benchmarks/train_side_by_side.py --out results/train_h200.json            # 1.3b, 4 x 2048
    python benchmarks/train_side_by_side.py --shape 125m --batch 1 --seq-len 256 --steps 3   # smoke run

tokens/s = batch x seq_len / step time over the timed steps (after --warmup steps that
compile). Ours runs the timed steps back to back as ``xlstm-metal train`` does (each evaluated
asynchronously while the host builds the next step's graph; the step time is the span from the
last warm-up step's completion to the last timed step's over their count; ``--no-pipeline``
times each step alone, the median, ``--alone-steps N``
adds N steps timed alone after the timed ones, in the same process). Peak memory = the allocator's peak over the whole run, weights and optimizer state
included (MLX ``mx.get_peak_memory``, PyTorch ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "7b": dict(embedding_dim=4096, num_heads=8, num_blocks=32, vocab_size=50304),
    "1.3b": dict(embedding_dim=2048, num_heads=4, num_blocks=24, vocab_size=50304),
    "125m": dict(embedding_dim=768, num_heads=4, num_blocks=12, vocab_size=50304),
}
_GB = 1e9


def _emit(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def _summary(times: list[float], tokens: int) -> dict:
    med = statistics.median(times)
    return {"step_s": med, "step_s_all": times, "tok_s": tokens / med}


# ----------------------------------------------------------------------------------- ours
def worker_ours(args) -> None:
    import xlstm_metal  # noqa: F401  (BLAS before mlx)
    import mlx.core as mx
    import numpy as np

    from xlstm_metal.benchmark import environment, shape_config
    from xlstm_metal.models.xlstm_large import xLSTMLarge
    from xlstm_metal.training.trainer import (
        StepBuilder, Trainer, TrainingConfig, build_thread_enabled, count_parameters, init_xlstm_large,
        limit_command_buffers, state_arrays,
    )

    limit_command_buffers()  # as `xlstm-metal train` (unless the environment sets the limits)
    out = Path(args.worker_out)
    deadline = time.time() + args.budget
    _emit(out, {"side": "ours", "kind": "env", **environment()})
    if args.grad_check:
        grad_check(args, out)
    variants = [v for v in args.variants.split(",") if v]
    if not variants and args.profile_kernels:  # alone: its peak memory is the kernel's
        kernel_profile(args, out)
    if not variants and not args.profile_parts:
        return
    B, S = args.batch, args.seq_len
    t0 = time.time()
    model = xLSTMLarge(shape_config(args.shape, chunk_size=args.chunk_size))
    init_xlstm_large(model, 0)
    vocab = model.config.vocab_size
    stream = np.random.default_rng(0).integers(0, vocab, size=B * (S + 1) * (args.steps + 4), dtype=np.int32)
    _emit(out, {"side": "ours", "kind": "build", "seconds": time.time() - t0, "params": count_parameters(model)})
    fits = False  # a variant so far peaked within --memory-target
    traced = False  # a variant's steps were traced (--trace-once: the first variant's alone)
    censused = False  # --graph-census: the first variant's alone
    ab_done = False  # --build-thread-ab: the first variant's alone
    adamw_env = os.environ.get("XLSTM_METAL_FUSED_ADAMW")
    saved_env: dict[str, str | None] = {}  # the previous variant's env-NAME=VALUE settings, as they were
    default_limit = mx.set_memory_limit(1 << 40)  # MLX's default, to restore between variants
    mx.set_memory_limit(default_limit)
    for variant in variants:
        if time.time() > deadline or (fits and args.memory_target):
            break
        kernel, recompute, *mode = variant.split("/")
        limits = [m for m in mode if m.startswith("mem-limit-")]
        # env-NAME=VALUE: an XLSTM_METAL_* setting for this variant alone (read when its step is
        # traced), so one process can alternate settings
        envs = dict(m[4:].split("=", 1) for m in mode if m.startswith("env-XLSTM_METAL_") and "=" in m)
        mode = [m for m in mode if m not in limits and not m.startswith("env-")]
        for name in saved_env:
            if saved_env[name] is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = saved_env[name]
        saved_env = {name: os.environ.get(name) for name in envs}
        os.environ.update(envs)
        if set(mode) - {"eager", "fused-head", "fused-proj", "mlx-adamw", "bf16-products", "build-thread"} \
                or len(limits) > 1:
            raise SystemExit(f"--variants: {variant!r}: after KERNEL/RECOMPUTE only eager, fused-head, fused-proj, "
                             "mlx-adamw, bf16-products, build-thread, one mem-limit-GB and env-XLSTM_METAL_NAME=VALUE "
                             "may follow")
        # the next step built on a second thread (the trainer's XLSTM_METAL_TRAIN_BUILD_THREAD)
        threaded = "build-thread" in mode or build_thread_enabled()
        # mem-limit-GB: mx.set_memory_limit for this variant. MLX keeps every op's inputs until the
        # GPU has run its command buffer, up to 10 buffers ahead of it; over the limit, evaluation
        # waits for the GPU (the limit is soft: allocations still succeed).
        limit_gb = float(limits[0][len("mem-limit-"):]) if limits else None
        mx.set_memory_limit(int(limit_gb * _GB) if limit_gb else default_limit)
        eager, head_loss = "eager" in mode, "fused" if "fused-head" in mode else "plain"
        fuse = "fused-proj" in mode
        # MLX's AdamW ops instead of the AdamW kernel (read when the step is traced); else as given
        if "mlx-adamw" in mode:
            os.environ["XLSTM_METAL_FUSED_ADAMW"] = "0"
        elif adamw_env is None:
            os.environ.pop("XLSTM_METAL_FUSED_ADAMW", None)
        else:
            os.environ["XLSTM_METAL_FUSED_ADAMW"] = adamw_env
        for block in model.blocks:
            block.mlstm_layer.parallel_kernel_cell.kernel = kernel
        cfg = TrainingConfig(seq_len=S, batch_size=B, steps=args.steps + args.warmup, dtype="bfloat16",
                             recompute=recompute, eval_batches=1, lr=1e-4, head_loss=head_loss,
                             fuse_projections=fuse, mlstm_products="bf16" if "bf16-products" in mode else "float32")
        record = {"side": "ours", "kind": "train_step",
                  "variant": f"{kernel}, recompute {recompute}, " + ("fused head + loss, " if head_loss == "fused" else "")
                  + ("fused projections, " if fuse else "") + ("MLX's AdamW ops, " if "mlx-adamw" in mode else "")
                  + ("mLSTM products in bf16, " if "bf16-products" in mode else "")
                  + (f"memory limit {limit_gb:g} GB, " if limit_gb else "")
                  + ("eager step" if eager else "compiled step")
                  + (", steps back to back" if args.pipelined else ", each step alone")
                  + (", next step built on a second thread" if threaded and args.pipelined else "") + _graphs_note(),
                  "build_thread": threaded and args.pipelined,
                  "xlstm_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("XLSTM_METAL_")},
                  "kernel": kernel, "recompute": recompute, "head_loss": head_loss, "fuse_projections": fuse, "compiled": not eager,
                  "mlstm_products": cfg.mlstm_products,
                  "cuda_graphs": os.environ.get("MLX_USE_CUDA_GRAPHS", "1") != "0", "batch": B, "seq_len": S,
                  "command_buffers": [os.environ.get("MLX_MAX_OPS_PER_BUFFER"), os.environ.get("MLX_MAX_MB_PER_BUFFER")],
                  "shape": args.shape}
        emitted = False
        try:
            with tempfile.TemporaryDirectory() as tmp:
                trainer = Trainer(model, stream, stream[: 2 * B * (S + 1)], cfg, tmp, tmp, progress=False)
                trainer._build_steps(compiled=not eager)
                mx.clear_cache()
                mx.reset_peak_memory()
                times, losses, synced = [], [], []
                # Warmup steps one at a time (each timed alone: `synced`); the timed steps back to
                # back as `xlstm-metal train` runs them (Trainer._train): each step evaluated
                # asynchronously while the host builds the next one's graph. Their time per step is
                # the span from the last warm-up step's completion to the last timed step's over
                # their count: the intervals between completions alone mislead (MLX's async_eval
                # returns once all but the last command buffers are queued, so a step's wait ends
                # late and the last one's comes almost at once: S8R1).
                pending, last_done, t_timed, n_timed = None, None, None, 0

                def build_one(trainer=trainer):
                    x, y = trainer.batches.next()
                    t = time.perf_counter()
                    xa, ya = mx.array(x), mx.array(y)
                    made = time.perf_counter() - t  # the batch's arrays (MLX: managed memory on CUDA)
                    loss, grad_norm = trainer._train_step(xa, ya)
                    built = time.perf_counter() - t  # tracing (first compiled step) or building the graph
                    # on the builder thread: the arrays the step leaves, off the queueing thread's path
                    state = state_arrays(model.state, trainer.optimizer.state) if threaded else None
                    return loss, grad_norm, made, built, t, state

                # build-thread: each timed step's successor built on a second host thread while
                # this one's command buffers are queued (StepBuilder), not after. Every step is
                # built there (MLX's compile cache is per thread: the step is traced there once).
                builder = StepBuilder() if threaded and args.pipelined else None
                ahead = None  # the next step's build, running on the builder thread
                for step in range(args.warmup + args.steps):
                    if ahead is not None:
                        loss, grad_norm, made, built, t, state = ahead.result()
                        ahead = None
                    elif builder is not None:
                        loss, grad_norm, made, built, t, state = builder.submit(build_one).result()
                    else:
                        loss, grad_norm, made, built, t, state = build_one()
                    if step == 0:
                        _emit(out, {**record, "kind": "train_progress", "step": 0, "graph_built_s": built})
                    if step < args.warmup or not args.pipelined:
                        mx.eval(loss, grad_norm, model.state, trainer.optimizer.state)
                        dt = time.perf_counter() - t
                        last_done = time.perf_counter()
                        losses.append(loss)
                        if step == 0 and (args.ready_file or args.start_after):
                            # Runs beside each other on one GPU: each compiles its step (CPU work) at
                            # the same time; the rest of the GPU work runs one process at a time.
                            _touch(args.ready_file)
                            mx.clear_cache()  # a waiting process holds its live arrays only
                            _wait_for(args.start_after, deadline)
                            last_done = time.perf_counter()
                        if step >= args.warmup:
                            times.append(dt)
                        else:
                            synced.append(dt)
                            if step == 0:
                                record["first_step_s"] = dt
                    else:
                        if t_timed is None:
                            t_timed = last_done
                        if builder is not None and step + 1 < args.warmup + args.steps \
                                and not (time.time() > deadline and len(times) >= 2):
                            ahead = builder.submit(build_one)
                            mx.async_eval([loss, grad_norm] + state)
                        else:
                            mx.async_eval(loss, grad_norm, model.state, trainer.optimizer.state)
                        n_timed += 1
                        dt = None
                        if pending is not None:
                            mx.eval(pending)
                            now = time.perf_counter()
                            dt, last_done = now - last_done, now
                            times.append(dt)
                        pending = [loss, grad_norm]
                        losses.append(loss)
                    # Progress (a time limit may end the process before the variant's record).
                    _emit(out, {**record, "kind": "train_progress", "step": step + 1, "seconds": dt, "graph_built_s": built,
                                "inputs_s": made, "peak_mem_gb": mx.get_peak_memory() / _GB})
                    if time.time() > deadline and len(times) >= 2:
                        break
                if ahead is not None:  # a step built ahead (the loop ended early): run it as a timed one
                    loss, grad_norm, made, built, t, state = ahead.result()
                    mx.async_eval(loss, grad_norm, model.state, trainer.optimizer.state)
                    n_timed += 1
                    mx.eval(pending)
                    pending = [loss, grad_norm]
                    losses.append(loss)
                if builder is not None:
                    builder.close()
                if pending is not None:
                    mx.eval(pending, model.state, trainer.optimizer.state)
                    times.append(time.perf_counter() - last_done)
                    span = time.perf_counter() - t_timed
                # --alone-steps: the same step evaluated before the next one is built, in the same
                # process right after the timed ones (the two loops compared on one allocator state).
                alone = []
                for _ in range(args.alone_steps if args.pipelined else 0):
                    x, y = trainer.batches.next()
                    t = time.perf_counter()
                    loss, grad_norm = trainer._train_step(mx.array(x), mx.array(y))
                    mx.eval(loss, grad_norm, model.state, trainer.optimizer.state)
                    alone.append(time.perf_counter() - t)
                    losses.append(loss)
                record.update(_summary(times, B * S), peak_mem_gb=mx.get_peak_memory() / _GB,
                              losses=[v.item() for v in losses], step_s_synced=synced[1:])
                if n_timed:  # steps back to back: the span over the count (step_s_all: the intervals)
                    record.update(step_s=span / n_timed, tok_s=B * S * n_timed / span, timed_steps=n_timed)
                if alone:
                    record.update(step_s_alone=alone, tok_s_alone=B * S / statistics.median(alone))
                _emit(out, record)  # before the trace: a profiler that fails hard must not take it along
                emitted = True
                if args.graph_census and not censused and time.time() < deadline:
                    censused = True
                    _emit(out, {"side": "ours", "variant": record["variant"], "kind": "graph_census", **graph_census(trainer)})
                if args.build_thread_ab and args.pipelined and not ab_done and time.time() < deadline:
                    ab_done = True
                    # The same compiled step, steps back to back in blocks that alternate the plain
                    # loop and the loop whose next step is built on a second thread.
                    _emit(out, {"side": "ours", "variant": record["variant"], "kind": "build_thread_ab",
                                **build_thread_ab(trainer, args.build_thread_ab, args.steps, deadline)})
                if args.trace_steps and time.time() < deadline and not (args.trace_once and traced):
                    def traced_steps(trainer=trainer, n=args.trace_steps):
                        # The timed loop's steps: back to back, or each alone; the host's phases
                        # marked (host_timeline: when the host built and queued each step).
                        pending = None
                        for _ in range(n):
                            with _host_phase("build"):
                                x, y = trainer.batches.next()
                                loss, grad_norm = trainer._train_step(mx.array(x), mx.array(y))
                            if not args.pipelined:
                                with _host_phase("eval"):
                                    mx.eval(loss, grad_norm, model.state, trainer.optimizer.state)
                                continue
                            with _host_phase("async_eval"):
                                mx.async_eval(loss, grad_norm, model.state, trainer.optimizer.state)
                            if pending is not None:
                                with _host_phase("wait"):
                                    mx.eval(pending)
                            pending = [loss, grad_norm]
                        with _host_phase("wait"):
                            mx.eval(pending or [], model.state, trainer.optimizer.state)

                    _emit(out, {"side": "ours", "kind": "step_trace", "variant": record["variant"],
                                **trace_kernels(traced_steps, args.trace_steps, record["step_s"], calls=1)})
                    traced = True
                del trainer
        except Exception as err:  # e.g. out of memory: report it and go on
            record["error"] = repr(err)[:800]
        if not emitted:
            _emit(out, record)
        fits = fits or (args.memory_target is not None and record.get("peak_mem_gb", math.inf) <= args.memory_target)
        mx.clear_cache()
    _touch(args.done_file)  # the next process beside this one may run its steps
    if variants and args.profile_kernels and time.time() < deadline:  # after the steps (peak: the process's)
        kernel_profile(args, out)
    for part in (p for p in args.profile_parts.split(",") if p):
        if time.time() < deadline:
            _emit(out, part_profile(part, args, model))


def graph_census(trainer) -> dict:
    """The graph one call of ``trainer``'s compiled step builds (what the host makes every step):
    its operations (nodes with a primitive) by primitive, from ``mx.export_to_dot`` of the
    step's outputs before they are evaluated; the step is then evaluated as any other."""
    import re

    import mlx.core as mx

    from xlstm_metal.training.trainer import state_arrays

    model, optimizer = trainer.model, trainer.optimizer
    try:
        mx.eval(model.state, optimizer.state)
        x, y = trainer.batches.next()
        t = time.perf_counter()
        loss, grad_norm = trainer._train_step(mx.array(x), mx.array(y))
        built = time.perf_counter() - t
        outputs = [loss, grad_norm] + state_arrays(model.state, optimizer.state)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "step.dot"
            mx.export_to_dot(str(path), *outputs)
            text = path.read_text()
        mx.eval(outputs)
    except Exception as err:
        return {"error": repr(err)[:800]}
    names: dict[str, int] = {}
    for name in re.findall(r'\[label ="([^"]*)", shape=rectangle\]', text):
        names[name] = names.get(name, 0) + 1
    return {"nodes": sum(names.values()), "graph_built_s": built, "outputs": len(outputs),
            "leaves": len(re.findall(r"rank=source", text)),
            "by_primitive": dict(sorted(names.items(), key=lambda kv: -kv[1])[:60])}


def build_thread_ab(trainer, blocks: int, steps: int, deadline: float) -> dict:
    """``blocks`` pairs of blocks of ``steps`` steps back to back with ``trainer``'s compiled step:
    the plain loop (the next step built after this one is queued) and the loop that builds it on
    a second thread meanwhile (:class:`~xlstm_metal.training.trainer.StepBuilder`), alternated
    (plain first), after one untimed threaded and one untimed plain block of two steps (each thread
    traces the step once: MLX's compile cache is per thread). Each block starts and ends synchronised; its
    time per step is the span over its count."""
    import mlx.core as mx

    from xlstm_metal.training.trainer import StepBuilder, state_arrays

    model, optimizer = trainer.model, trainer.optimizer
    builder = StepBuilder()

    def build(threaded: bool):
        x, y = trainer.batches.next()
        t = time.perf_counter()
        loss, grad_norm = trainer._train_step(mx.array(x), mx.array(y))
        built = time.perf_counter() - t
        # on the builder thread: the arrays the step leaves, off the queueing thread's path
        return loss, grad_norm, built, state_arrays(model.state, optimizer.state) if threaded else None

    def block(threaded: bool, n: int) -> dict:
        mx.eval(model.state, optimizer.state)
        t0 = time.perf_counter()
        pending, ahead, built, losses = None, None, [], []
        for k in range(n):
            if ahead is not None:
                loss, grad_norm, b, state = ahead.result()
            elif threaded:
                loss, grad_norm, b, state = builder.submit(build, True).result()
            else:
                loss, grad_norm, b, state = build(False)
            ahead = None
            built.append(b)
            if threaded and k + 1 < n:
                ahead = builder.submit(build, True)
                mx.async_eval([loss, grad_norm] + state)
            else:
                mx.async_eval(loss, grad_norm, model.state, optimizer.state)
            if pending is not None:
                mx.eval(pending)
            pending = [loss, grad_norm]
            losses.append(loss)
        mx.eval(pending, model.state, optimizer.state)
        span = time.perf_counter() - t0
        return {"build_thread": threaded, "steps": n, "step_ms": 1000 * span / n,
                "graph_built_ms": [round(1000 * b, 2) for b in built], "losses": [v.item() for v in losses]}

    result = {"blocks": []}
    try:
        block(True, 2)  # the builder thread's trace
        block(False, 2)  # and the calling thread's (where the timed loop built every step on the builder)
        for _ in range(blocks):
            for threaded in (False, True):
                if time.time() > deadline:
                    break
                result["blocks"].append(block(threaded, steps))
    except Exception as err:
        result["error"] = repr(err)[:800]
    finally:
        builder.close()
    for threaded in (False, True):
        ms = [b["step_ms"] for b in result["blocks"] if b["build_thread"] == threaded]
        if ms:
            result["threaded" if threaded else "plain"] = {"step_ms": ms, "mean_ms": sum(ms) / len(ms)}
    return result


def _wait_for(paths: str | None, deadline: float) -> None:
    """Until every file of the comma-separated ``paths`` exists (or the deadline): runs beside
    each other on one GPU compile at the same time (CPU work) but run their steps one after the
    other."""
    for path in (Path(p) for p in (paths or "").split(",") if p):
        while not path.exists() and time.time() < deadline:
            time.sleep(0.2)


def _touch(path: str | None) -> None:
    if path:
        Path(path).touch()


def _graphs_note() -> str:
    """", CUDA graphs off" when MLX_USE_CUDA_GRAPHS=0 (MLX's CUDA back-end uses them by default),
    and the command-buffer limits when the environment sets them (``limit_command_buffers``)."""
    note = ", CUDA graphs off" if os.environ.get("MLX_USE_CUDA_GRAPHS", "1") == "0" else ""
    ops, mb = os.environ.get("MLX_MAX_OPS_PER_BUFFER"), os.environ.get("MLX_MAX_MB_PER_BUFFER")
    if ops or mb:
        note += f", command buffers {ops or 'default'} ops / {mb or 'default'} MB"
    return note


# ------------------------------------------------------------------------- profiling
#: Kernel name -> what it is, first match wins (MLX 0.32 CUDA back-end names, as CUPTI reports them).
KERNEL_CATEGORIES = (
    ("our CUDA kernels (mLSTM, AdamW)", r"xlstm_"),
    ("GEMM (cuBLASLt / CUTLASS)", r"gemm|cutlass|xmma|nvjet|cublas|ab_t_aligned|gemv"),
    ("fused elementwise (mx.compile)", r"::cu::(?!(?:copy|binary|unary|ternary)_)\w+_(?:contiguous|strided)<"),
    ("reductions", r"reduce|scan"),
    ("norms / softmax / logsumexp", r"rms_norm|layer_norm|softmax|logsumexp"),
    ("copies, casts, gathers", r"copy|gather|scatter|slice_update|arange|memcpy|memset"),
    ("elementwise (unfused)", r"unary|binary|ternary"),
)


def kernel_category(name: str) -> str:
    """The KERNEL_CATEGORIES entry a CUDA kernel's name falls in ("other" if none)."""
    import re

    return next((cat for cat, pattern in KERNEL_CATEGORIES if re.search(pattern, name, re.I)), "other")


def summarize_kernels(events: list[dict], steps: int, step_s: float | None = None, top: int = 120) -> dict:
    """GPU time per step by category and the costliest kernels, from chrome-trace events
    (``{"cat": "kernel", "name", "ts", "dur"}``, microseconds) of ``steps`` train steps.

    ``gpu_busy_ms``: the kernels' summed durations per step (one stream: they do not overlap);
    ``idle_ms``: the measured step time minus that (launch gaps, host work, synchronisation)."""
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not kernels:
        return {"error": "the trace holds no kernel events (no CUPTI?)"}
    per = 1000.0 * steps  # microseconds per `steps` steps -> milliseconds per step
    by_cat: dict[str, list[float]] = {}
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        name = e["name"]
        for stat, key in ((by_cat, kernel_category(name)), (by_name, name)):
            entry = stat.setdefault(key, [0.0, 0])
            entry[0] += float(e["dur"])
            entry[1] += 1
    busy = sum(float(e["dur"]) for e in kernels) / per
    span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)) / per
    result = {
        "steps": steps, "kernels_per_step": len(kernels) / steps, "gpu_busy_ms": busy, "span_ms": span,
        "gaps": kernel_gaps(kernels, steps),
        "categories": {k: {"ms": v[0] / per, "launches": v[1] / steps}
                       for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1][0])},
        "top": [{"name": k[:320], "category": kernel_category(k), "ms": v[0] / per, "launches": v[1] / steps}
                for k, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
    }
    if step_s is not None:
        result["step_ms"] = 1000 * step_s
        result["idle_ms"] = 1000 * step_s - busy
    return result


def kernel_gaps(kernels: list[dict], steps: int, top: int = 24, least_us: float = 20.0) -> dict:
    """Where the GPU runs no kernel: the time per step between the end of all kernels so far and
    the next kernel's start (``idle_ms``; kernels that overlap, as CUDA graphs' branches may,
    count as one busy span), the part of it in gaps of at least ``least_us`` microseconds
    (``idle_ms_in_long_gaps``, their count per step), and the ``top`` longest gaps with the
    kernels around them (the one that ended last before) and when they came (ms from the
    trace's first kernel)."""
    ordered = sorted(kernels, key=lambda e: float(e["ts"]))
    t0 = float(ordered[0]["ts"])
    gaps = []
    last = ordered[0]
    end = float(last["ts"]) + float(last["dur"])
    for after in ordered[1:]:
        gap = float(after["ts"]) - end
        if gap > 0:
            gaps.append((gap, last["name"], after["name"], float(after["ts"]) - t0))
        if float(after["ts"]) + float(after["dur"]) > end:
            last, end = after, float(after["ts"]) + float(after["dur"])
    per = 1000.0 * steps
    long = [g for g in gaps if g[0] >= least_us]
    return {
        "idle_ms": sum(g[0] for g in gaps) / per, "idle_ms_in_long_gaps": sum(g[0] for g in long) / per,
        "long_gaps_per_step": len(long) / steps, "least_us": least_us,
        "longest": [{"us": round(g, 1), "at_ms": round(at / 1000, 3), "before": b[:100], "after": a[:100]}
                    for g, b, a, at in sorted(gaps, key=lambda g: -g[0])[:top]],
    }


#: Prefix of the host phases :func:`_host_phase` marks in a trace.
HOST_PHASE = "xlstm:"


class _host_phase:
    """A host phase of the traced loop (``build``, ``async_eval``, ``wait``) as a PyTorch
    profiler range (``record_function``), so the trace has the host's times on the kernels'
    clock (:func:`host_timeline`); nothing without PyTorch."""

    def __init__(self, name: str):
        self.name = HOST_PHASE + name
        self.ctx = None

    def __enter__(self):
        try:
            from torch.profiler import record_function
        except ImportError:
            return self
        self.ctx = record_function(self.name)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
        return False


def trace_kernels(run, steps: int, step_s: float | None = None, calls: int | None = None) -> dict:
    """``run()`` ``calls`` times (default ``steps``; a run may do several steps) under CUPTI
    (PyTorch's profiler, which records every kernel of the process, MLX's included, the CUDA
    runtime's calls and the host phases ``run`` marks with :class:`_host_phase`) ->
    :func:`summarize_kernels` of the trace of ``steps`` steps, with :func:`host_timeline`."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError as err:
        return {"error": f"no PyTorch profiler: {err}"}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(steps if calls is None else calls):
                    run()
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            events = json.loads(path.read_text()).get("traceEvents", [])
    except Exception as err:  # a profiler that cannot attach: say so, keep the run
        return {"error": repr(err)[:800]}
    result = summarize_kernels(events, steps, step_s)
    if "error" not in result:
        result["host"] = host_timeline(events)
    return result


def host_timeline(events: list[dict], least_us: float = 200.0) -> dict:
    """When the host built and queued each traced step, against the GPU's work (chrome-trace
    events in microseconds; times in ms from the first kernel's start):

    - ``phases``: the host phases marked with :class:`_host_phase` (name, start, duration);
    - ``queued_ms``: for each ``async_eval`` (MLX returns once all but the last command buffers
      of the step are queued): the GPU work still ahead when it returned, i.e. from its end to
      the start of the next GPU idle gap of at least ``least_us`` (or the last kernel's end),
      with that gap's length (``gap_ms``): the host must build and queue the next step's first
      kernels within ``queued_ms`` or the GPU waits;
    - ``launches``: the CUDA runtime's launch calls (cudaGraphLaunch: one per MLX command buffer
      with CUDA graphs; cudaLaunchKernel...) by name, their count and summed host time."""
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                     key=lambda e: float(e["ts"]))
    if not kernels:
        return {}
    t0 = float(kernels[0]["ts"])
    # GPU busy spans merged, then the idle gaps of at least least_us
    gaps, end = [], float(kernels[0]["ts"]) + float(kernels[0]["dur"])
    for e in kernels[1:]:
        ts = float(e["ts"])
        if ts - end >= least_us:
            gaps.append((end, ts))
        end = max(end, ts + float(e["dur"]))
    last_end = end
    phases = sorted(({"name": e["name"][len(HOST_PHASE):], "start_ms": round((float(e["ts"]) - t0) / 1000, 3),
                      "ms": round(float(e["dur"]) / 1000, 3)} for e in events
                     if str(e.get("name", "")).startswith(HOST_PHASE) and "dur" in e
                     and e.get("ph") == "X" and e.get("cat") != "gpu_user_annotation"),
                    key=lambda p: p["start_ms"])
    queued = []
    for p in phases:
        if p["name"] != "async_eval":
            continue
        ret = t0 + 1000 * (p["start_ms"] + p["ms"])
        nxt = next(((a, b) for a, b in gaps if a >= ret), None)
        queued.append({"at_ms": round((ret - t0) / 1000, 3),
                       "queued_ms": round(((nxt[0] if nxt else last_end) - ret) / 1000, 3),
                       "gap_ms": round((nxt[1] - nxt[0]) / 1000, 3) if nxt else 0.0})
    launches: dict[str, list[float]] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "dur" in e and "aunch" in name:
            entry = launches.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += float(e["dur"]) / 1000
    return {"phases": phases, "queued": queued, "least_us": least_us,
            "launches": {k: {"count": v[0], "host_ms": round(v[1], 3)} for k, v in launches.items()}}


def _gemm_shapes(config) -> list[tuple[str, int, int, int]]:
    """(name, times per forward, in features K, out features N) of every projection but the
    gates' (4 outputs)."""
    E, F, n = config.embedding_dim, config.ffn_dim, config.num_blocks
    return [("q, k", 2 * n, E, config.qk_dim), ("v, output gate", 2 * n, E, config.v_dim),
            ("out_proj", n, config.v_dim, E), ("FFN up + gate", 2 * n, E, F), ("FFN down", n, F, E),
            ("LM head", 1, E, config.vocab_size)]


def part_profile(part: str, args, model) -> dict:
    """One piece of the train step alone at the run's shape (median of 10, synchronised):

    - ``gemm``: every projection's three bf16 matrix products (forward X W^T, input gradient
      dY W, weight gradient dY^T X) at batch x seq_len tokens, counted as often as one step runs
      them; the gate projections (4 outputs) are left out;
    - ``optimizer``: global-norm clipping + the trainer's AdamW on the model's float32
      parameters with random gradients, compiled as the train step compiles it."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    from xlstm_metal.benchmark import median_seconds
    from xlstm_metal.training.trainer import TrainingConfig, make_optimizer

    T = args.batch * args.seq_len
    record = {"side": "ours", "kind": "part_profile", "part": part, "shape": args.shape, "tokens": T}
    try:
        if part == "gemm":
            rows, total_ms, total_flop = [], 0.0, 0.0
            for name, count, K, N in _gemm_shapes(model.config):
                x = mx.random.normal((T, K)).astype(mx.bfloat16)
                w = mx.random.normal((N, K)).astype(mx.bfloat16)
                dy = mx.random.normal((T, N)).astype(mx.bfloat16)
                mx.eval(x, w, dy)
                ms = {label: 1000 * median_seconds(fn, 10) for label, fn in (
                    ("forward", lambda: x @ w.T), ("input grad", lambda: dy @ w), ("weight grad", lambda: dy.T @ x))}
                flop = 3 * 2 * T * K * N
                each = sum(ms.values())
                rows.append({"name": name, "count": count, "K": K, "N": N, **{f"{k}_ms": v for k, v in ms.items()},
                             "tflops": flop / (each / 1000) / 1e12})
                total_ms += count * each
                total_flop += count * flop
                del x, w, dy
            record.update(rows=rows, ms=total_ms, tflop=total_flop / 1e12, tflops=total_flop / (total_ms / 1000) / 1e12)
        elif part == "optimizer":
            cfg = TrainingConfig(seq_len=args.seq_len, batch_size=args.batch, lr=1e-4)
            opt = make_optimizer(cfg, model)
            params = model.trainable_parameters()
            opt.init(params)
            grads = tree_map(lambda p: mx.random.normal(p.shape) * 1e-3, params)
            mx.eval(grads, opt.state)
            state = [model.state, opt.state]

            @partial(mx.compile, inputs=state, outputs=state)
            def update(grads):
                grads, norm = optim.clip_grad_norm(grads, 1.0)
                opt.update(model, grads)
                return norm

            record["ms"] = 1000 * median_seconds(lambda: update(grads), 10)
        else:
            record["error"] = f"unknown part {part!r} (gemm, optimizer)"
    except Exception as err:
        record["error"] = repr(err)[:800]
    return record


def kernel_profile(args, out: Path) -> None:
    """One layer's mLSTM kernel alone at the run's shape (bf16 q, k, v): forward, and forward +
    backward (a loss on h), compiled, median of 10 after a warm-up; peak memory of each."""
    import mlx.core as mx

    from xlstm_metal.benchmark import shape_config, median_seconds
    from xlstm_metal.kernels import get_mlstm_kernel

    config = shape_config(args.shape)
    B, S, NH = args.batch, args.seq_len, config.num_heads
    dqk, dv = config.qk_head_dim, config.v_head_dim
    mx.random.seed(0)
    q, k = (mx.random.normal((B, NH, S, dqk)).astype(mx.bfloat16) for _ in range(2))
    v = mx.random.normal((B, NH, S, dv)).astype(mx.bfloat16)
    i = mx.random.normal((B, NH, S)).astype(mx.bfloat16) - 5
    f = mx.random.normal((B, NH, S)).astype(mx.bfloat16) + 3
    w = mx.random.normal((B, NH, S, dv))
    mx.eval(q, k, v, i, f, w)
    saved_switch = os.environ.get("XLSTM_METAL_FUSED_MLSTM_BWD", "1")
    for name in args.profile_kernels.split(","):
        # "chunkwise_fused@ops": that kernel with the MLX-ops backward of its custom vjp
        # (XLSTM_METAL_FUSED_MLSTM_BWD=0) instead of the CUDA backward kernels.
        name, _, backward = name.partition("@")
        os.environ["XLSTM_METAL_FUSED_MLSTM_BWD"] = "0" if backward == "ops" else saved_switch
        kernel = get_mlstm_kernel(name)

        def loss(q, k, v, i, f, kernel=kernel):
            h, _ = kernel(q, k, v, i, f, None, chunk_size=args.chunk_size)
            return mx.sum(h.astype(mx.float32) * w)

        fwd = mx.compile(lambda *a, kernel=kernel: kernel(*a, None, chunk_size=args.chunk_size)[0])
        both = mx.compile(mx.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
        record = {"side": "ours", "kind": "kernel_profile", "kernel": name, "shape": args.shape, "batch": B,
                  "seq_len": S, "chunk_size": args.chunk_size, "backward": backward or "kernels"}
        try:
            for part, fn in (("forward", fwd), ("forward+backward", both)):
                mx.clear_cache()
                mx.reset_peak_memory()
                record[f"{part}_ms"] = 1000 * median_seconds(lambda fn=fn: fn(q, k, v, i, f), 10)
                record[f"{part}_peak_gb"] = mx.get_peak_memory() / _GB
        except Exception as err:
            record["error"] = repr(err)[:800]
        _emit(out, record)
    os.environ["XLSTM_METAL_FUSED_MLSTM_BWD"] = saved_switch


def grad_check(args, out: Path) -> None:
    """Gradients of ``chunkwise_fused`` (its custom vjp; on CUDA the fused kernels) against MLX's
    autodiff of the reference and of ``chunkwise_scan``, eager, at the run's head sizes (the
    train step's kernel instances, so their compilation is shared): max |a - b| / max |b| per
    input; the scan-vs-reference spread calibrates (float32 GEMMs may run as TF32 here)."""
    import mlx.core as mx
    import numpy as np

    from xlstm_metal.benchmark import shape_config
    from xlstm_metal.kernels.fast.chunkwise import mlstm_chunkwise_scan
    from xlstm_metal.kernels.fast.chunkwise_fused import fused_chunkwise_supported, mlstm_chunkwise_fused
    from xlstm_metal.kernels.mlstm import mlstm_chunkwise

    config = shape_config(args.shape)
    B, NH, S, dqk, dv = 1, 2, 256, config.qk_head_dim, config.v_head_dim
    rng = np.random.default_rng(0)

    def arr(*shape, scale=1.0, shift=0.0, dtype=mx.float32):
        return mx.array((rng.standard_normal(shape) * scale + shift).astype(np.float32)).astype(dtype)

    q, k, v = (arr(B, NH, S, d, dtype=mx.bfloat16) for d in (dqk, dqk, dv))
    i, f, w = arr(B, NH, S, scale=3.0), arr(B, NH, S, scale=3.0, shift=2.0), arr(B, NH, S, dv)

    def grads(kernel):
        def loss(q, k, v, i, f):
            h, _ = kernel(q, k, v, i, f, None, chunk_size=args.chunk_size)
            return mx.sum(h.astype(mx.float32) * w)

        return mx.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, i, f)

    def rel(a, b):
        a, b = np.array(a.astype(mx.float32), dtype=np.float64), np.array(b.astype(mx.float32), dtype=np.float64)
        return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))

    t0 = time.time()
    ours, ref, scan = grads(mlstm_chunkwise_fused), grads(mlstm_chunkwise), grads(mlstm_chunkwise_scan)
    mx.eval(ours, ref, scan)
    names = ["q", "k", "v", "i", "f"]
    _emit(out, {"side": "ours", "kind": "grad_check", "fused": fused_chunkwise_supported(q, v, args.chunk_size),
                "shape": [B, NH, S, dqk, dv], "seconds": time.time() - t0,
                "fused_vs_reference": dict(zip(names, map(rel, ours, ref))),
                "fused_vs_scan": dict(zip(names, map(rel, ours, scan))),
                "scan_vs_reference": dict(zip(names, map(rel, scan, ref)))})


# ------------------------------------------------------------------------------- official
def worker_official(args) -> None:
    import torch
    import torch.nn.functional as F
    import xlstm
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    out = Path(args.worker_out)
    deadline = time.time() + args.budget
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    _emit(out, {"side": "official", "kind": "env", "torch": torch.__version__, "xlstm": xlstm.__version__,
                "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()})
    B, S = args.batch, args.seq_len
    cfg = xLSTMLargeConfig(
        **SHAPES[args.shape], mode="train", chunk_size=args.chunk_size, return_last_states=True,  # False breaks its mLSTM layer
        chunkwise_kernel="chunkwise--triton_limit_chunk" if cuda else "chunkwise--native_autograd",
        sequence_kernel="native_sequence__triton" if cuda else "native_sequence__native",
        step_kernel="triton" if cuda else "native", autocast_kernel_dtype="bfloat16",
    )
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(dev):
        model = xLSTMLarge(cfg)
    _emit(out, {"side": "official", "kind": "build", "seconds": time.time() - t0,
                "params": sum(p.numel() for p in model.parameters())})
    gen = torch.Generator(device=dev).manual_seed(0)

    names = {"off": "eager", "on": "torch.compile (whole model)", "blocks": "torch.compile (each block)"}
    for compiled in args.official_compile.split(","):
        if time.time() > deadline:
            break
        if compiled not in names:
            raise SystemExit(f"--official-compile: {compiled!r} is not one of {', '.join(names)}")
        record = {"side": "official", "kind": "train_step", "batch": B, "seq_len": S, "shape": args.shape,
                  "variant": f"{cfg.chunkwise_kernel}, autocast bf16, {'fused ' if cuda else ''}AdamW, {names[compiled]}",
                  "compiled": compiled}
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                    fused=cuda)
            net = torch.compile(model) if compiled == "on" else model
            if compiled == "blocks":  # one compiled graph serves every block (parameters are its inputs)
                for block in model.backbone.blocks:
                    block.compile()

            def step(x, y):
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    logits = net(x)
                    if isinstance(logits, tuple):
                        logits = logits[0]
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss, grad_norm

            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times, losses = [], []
            for i in range(args.warmup + args.steps):
                ids = torch.randint(0, cfg.vocab_size, (B, S + 1), device=dev, generator=gen)
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                loss, _ = step(ids[:, :-1], ids[:, 1:])
                losses.append(loss.item())  # synchronises
                dt = time.perf_counter() - t
                if i >= args.warmup:
                    times.append(dt)
                elif i == 0:
                    record["first_step_s"] = dt
                if time.time() > deadline and len(times) >= 2:
                    break
            record.update(_summary(times, B * S), losses=losses,
                          peak_mem_gb=torch.cuda.max_memory_allocated() / _GB if cuda else None)
            del opt
        except Exception as err:
            record["error"] = repr(err)[:800]
        _emit(out, record)
        if cuda:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- driver
def _run_worker(side: str, args, budget: float, jsonl: Path) -> None:
    """One side in its own process, its records appended to ``jsonl``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--worker-out", str(jsonl),
           "--shape", args.shape, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--chunk-size", str(args.chunk_size),
           "--variants", args.variants, "--official-compile", args.official_compile, "--budget", str(budget),
           "--profile-kernels", args.profile_kernels, "--profile-parts", args.profile_parts,
           "--trace-steps", str(args.trace_steps)] + (["--grad-check"] if args.grad_check else []) \
        + (["--trace-once"] if args.trace_once else []) + (["--graph-census"] if args.graph_census else []) \
        + (["--build-thread-ab", str(args.build_thread_ab)] if args.build_thread_ab else []) \
        + (["--start-after", args.start_after] if args.start_after else []) \
        + (["--ready-file", args.ready_file] if args.ready_file else []) \
        + (["--done-file", args.done_file] if args.done_file else []) \
        + ["--alone-steps", str(args.alone_steps)] \
        + (["--memory-target", str(args.memory_target)] if args.memory_target is not None else []) \
        + ([] if args.pipelined else ["--no-pipeline"])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(signum, _frame):  # killed from outside (a time limit): end the worker too, keep its records
        proc.kill()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        _, err = proc.communicate(timeout=budget + 90)
        if proc.returncode != 0:
            print(f"[{side}] exit {proc.returncode}: {err[-3000:]}", file=sys.stderr)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        print(f"[{side}] timed out after {budget + 90:.0f} s", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)


def markdown(records: list[dict]) -> str:
    """The table BENCHMARKS.md shows: every measured variant, tokens/s relative to the official's
    best (eager or compiled)."""
    env = {r["side"]: r for r in records if r.get("kind") == "env"}
    builds = {r["side"]: r for r in records if r.get("kind") == "build"}
    steps = [r for r in records if r.get("kind") == "train_step"]
    official = max((r["tok_s"] for r in steps if r["side"] == "official" and "tok_s" in r), default=None)
    lines = []
    if "ours" in env:
        e = env["ours"]
        lines.append(f"- ours: MLX {e.get('mlx')}, xlstm-metal {e.get('xlstm_metal')}, {e.get('device_name') or e.get('device')}"
                     + (f", {builds['ours']['params'] / 1e9:.3f}B parameters" if "ours" in builds else ""))
    if "official" in env:
        e = env["official"]
        lines.append(f"- official: xlstm {e.get('xlstm')}, torch {e.get('torch')}, {e.get('device')}"
                     + (f", {builds['official']['params'] / 1e9:.3f}B parameters" if "official" in builds else ""))
    lines += ["", "| side | variant | tokens/s | step (ms) | peak memory (GB) | vs official |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in steps:
        if "tok_s" not in r:
            lines.append(f"| {r['side']} | {r['variant']} | failed: {r.get('error', '?')[:120]} | | | |")
            continue
        ratio = f"{r['tok_s'] / official:.2f}x" if official else "-"
        peak = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") is not None else "-"
        lines.append(f"| {r['side']} | {r['variant']} | {r['tok_s']:,.0f} | {1000 * r['step_s']:.1f} | {peak} | {ratio} |")
    for r in (r for r in steps if "tok_s_alone" in r):
        lines.append(f"\n{r['side']}, {r['variant']}: the same step evaluated alone (not back to back, same process): "
                     f"{r['tok_s_alone']:,.0f} tok/s, {1000 * statistics.median(r['step_s_alone']):.1f} ms")
    for r in (r for r in records if r.get("kind") == "grad_check"):
        names = list(r["fused_vs_reference"])
        lines += ["", f"Gradients of `chunkwise_fused` (custom vjp; fused CUDA kernels: {r['fused']}) at [B, NH, S, DQK, "
                  f"DV] = {r['shape']}, bf16 q, k, v, eager: max |a - b| / max |b| per input", "",
                  "| compared | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
        for key in ("fused_vs_reference", "fused_vs_scan", "scan_vs_reference"):
            lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(f"{r[key][n]:.1e}" for n in names) + " |")
    kernels = [r for r in records if r.get("kind") == "kernel_profile" and "forward_ms" in r]
    if kernels:
        lines += ["", "One layer's mLSTM kernel alone (bf16 q, k, v; compiled; median of 10):", "",
                  "| kernel | forward (ms) | forward + backward (ms) | peak (GB) |", "| --- | ---: | ---: | ---: |"]
        for r in kernels:
            lines.append(f"| {r['kernel']} | {r['forward_ms']:.2f} | {r.get('forward+backward_ms', float('nan')):.2f} | "
                         f"{r.get('forward+backward_peak_gb', float('nan')):.2f} |")
    for r in (r for r in records if r.get("kind") == "step_trace"):
        if "error" in r:
            lines += ["", f"Kernel trace of {r['variant']}: failed ({r['error'][:200]})"]
            continue
        lines += ["", f"GPU time per step by kernel category, {r['variant']} (CUPTI trace of {r['steps']} steps: "
                  f"{r['kernels_per_step']:,.0f} kernels per step, {r['gpu_busy_ms']:.1f} ms busy"
                  + (f" of a {r['step_ms']:.1f} ms step" if "step_ms" in r else "") + "):", "",
                  "| category | ms per step | launches per step |", "| --- | ---: | ---: |"]
        lines += [f"| {k} | {v['ms']:.1f} | {v['launches']:,.0f} |" for k, v in r["categories"].items()]
        if "idle_ms" in r:
            lines.append(f"| GPU idle (launch gaps, host) | {r['idle_ms']:.1f} | |")
        lines += ["", "| costliest kernels | category | ms per step | launches |", "| --- | --- | ---: | ---: |"]
        lines += [f"| `{k['name'][:90]}` | {k['category']} | {k['ms']:.2f} | {k['launches']:,.0f} |" for k in r["top"][:15]]
    parts = {r["part"]: r for r in records if r.get("kind") == "part_profile"}
    if "gemm" in parts and "rows" in parts["gemm"]:
        g = parts["gemm"]
        lines += ["", f"The step's projections alone (bf16, {g['tokens']:,} tokens; forward, input and weight "
                  f"gradient products; median of 10): {g['ms']:.1f} ms for {g['tflop']:.1f} TFLOP = "
                  f"{g['tflops']:.0f} TFLOP/s", "",
                  "| projection | per step | K x N | forward (ms) | input grad (ms) | weight grad (ms) | TFLOP/s |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['name']} | {r['count']} | {r['K']} x {r['N']} | {r['forward_ms']:.3f} | {r['input grad_ms']:.3f} | "
                  f"{r['weight grad_ms']:.3f} | {r['tflops']:.0f} |" for r in g["rows"]]
    if "optimizer" in parts and "ms" in parts["optimizer"]:
        lines += ["", f"Clipping + AdamW alone (float32 masters, compiled): {parts['optimizer']['ms']:.1f} ms"]
    return "\n".join(lines)


#: Issue 19 item 3: tokens/s >= 1.25x the official's at no more than its peak memory.
TARGET_RATIO = 1.25


def report_section(result: dict) -> list[str]:
    """BENCHMARKS.md's training section from a result file (``benchmarks/report.py`` calls it)."""
    records = result["records"]
    steps = [r for r in records if r.get("kind") == "train_step" and "tok_s" in r]
    off = max((r for r in steps if r["side"] == "official"), key=lambda r: r["tok_s"], default=None)
    ours = [r for r in steps if r["side"] == "ours"]
    lines = ["", f"## {result.get('title', 'Training throughput')}", "",
             f"- {result['date']}, {result.get('where', '')}".rstrip(", "),
             f"- command: `{result['command']}`",
             f"- one train step: forward, backward, global-norm clipping (1.0), AdamW; {result['shape']} shape, "
             f"batch {result['batch']} x {result['seq_len']} tokens, float32 master weights, bf16 compute; random "
             "tokens; tokens/s from the step time after warm-up (the official's median step; ours back to back: the "
             "span over the timed steps' count, since S8R2); peak = the allocator's peak over the run "
             "(weights and optimizer state included)", ""]
    lines += markdown(records).splitlines()
    if off is not None and ours:
        fits = [r for r in ours if r.get("peak_mem_gb") is not None and r["peak_mem_gb"] <= off["peak_mem_gb"]]
        best = max(fits or ours, key=lambda r: r["tok_s"])
        ratio = best["tok_s"] / off["tok_s"]
        met = ratio >= TARGET_RATIO and best["peak_mem_gb"] <= off["peak_mem_gb"]
        status = "**met**" if met else (
            f"not met: {TARGET_RATIO / ratio:.2f}x short" if ratio < TARGET_RATIO
            else f"not met: peak {best['peak_mem_gb']:.1f} GB > {off['peak_mem_gb']:.1f} GB")
        lines += ["", "| target | goal | measured | status |", "| --- | --- | --- | --- |",
                  f"| training tokens/s at <= the official's peak memory ({off['peak_mem_gb']:.1f} GB) | "
                  f">= {TARGET_RATIO}x official ({TARGET_RATIO * off['tok_s']:,.0f} tok/s) | {best['tok_s']:,.0f} tok/s "
                  f"= {ratio:.2f}x, peak {best['peak_mem_gb']:.1f} GB ({best['variant']}) | {status} |"]
    return lines


def write_result(args, jsonl: Path) -> list[dict]:
    """The run's records (``jsonl``) with its settings, as ``args.out`` (atomically)."""
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()] if jsonl.exists() else []
    records = [r for r in records if r.get("kind") != "train_progress"]
    steps = [r for r in records if r.get("kind") == "train_step" and "tok_s" in r]
    best = {side: max((r for r in steps if r["side"] == side), key=lambda r: r["tok_s"], default=None)
            for side in ("ours", "official")}
    result = {"date": args.date or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": args.command or " ".join(sys.argv), "title": args.title, "where": args.where,
              "shape": args.shape, "batch": args.batch, "seq_len": args.seq_len, "records": records}
    if best["ours"] and best["official"]:
        result["ratio_tok_s"] = best["ours"]["tok_s"] / best["official"]["tok_s"]
    tmp = tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp")
    with tmp:
        json.dump(result, tmp, indent=1)
    os.replace(tmp.name, args.out)
    return records


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1.3b", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--variants", default="chunkwise_fused/none",
                   help="ours: comma-separated KERNEL/RECOMPUTE[/eager][/fused-head][/fused-proj][/mlx-adamw]"
                        "[/bf16-products][/mem-limit-GB][/env-XLSTM_METAL_NAME=VALUE] (bf16-products: TrainingConfig.mlstm_products='bf16'; recompute: "
                        "none, head, mlstm, ffn, blocks; eager: the step uncompiled; fused-head: --head-loss fused; "
                        "fused-proj: projections reading one input as one matmul; mlx-adamw: MLX's AdamW ops instead "
                        "of the AdamW kernel)")
    p.add_argument("--memory-target", type=float, default=None, metavar="GB",
                   help="ours: stop trying further variants once one peaked within this (e.g. the official's peak)")
    p.add_argument("--official-compile", default="off",
                   help="official: comma-separated off (eager), on (torch.compile of the model), blocks (of each block)")
    p.add_argument("--profile-kernels", default="",
                   help="ours: first time these kernels alone (one layer, forward and forward + backward; "
                        "NAME@ops: chunkwise_fused's MLX-ops backward instead of its CUDA kernels), "
                        "e.g. chunkwise_fused,chunkwise_scan")
    p.add_argument("--no-pipeline", dest="pipelined", action="store_false",
                   help="ours: time each step alone (evaluated before the next one is built) instead of back to "
                        "back as `xlstm-metal train` runs them")
    p.add_argument("--trace-steps", type=int, default=0, metavar="N",
                   help="ours: after each variant, trace N more steps with CUPTI (PyTorch's profiler) and "
                        "record GPU time per kernel category and the costliest kernels")
    p.add_argument("--build-thread-ab", type=int, default=0, metavar="N",
                   help="ours: after the first variant's timed steps, N pairs of blocks of --steps steps alternating "
                        "the plain loop and the loop building the next step on a second thread (same compiled step)")
    p.add_argument("--graph-census", action="store_true",
                   help="ours: after the first variant's timed steps, count the operations of one step's graph by primitive")
    p.add_argument("--trace-once", action="store_true",
                   help="with --trace-steps: trace the first variant's steps alone (the others untraced)")
    p.add_argument("--profile-parts", default="",
                   help="ours: time pieces of the step alone at the run's shape: gemm (every projection's "
                        "matmuls), optimizer (clipping + AdamW)")
    p.add_argument("--start-after", default=None, metavar="FILES",
                   help="ours: after the first (compiling) step, wait until these comma-separated files exist "
                        "(runs beside others on the same GPU: compile together, run the rest one after the other)")
    p.add_argument("--ready-file", default=None, metavar="FILE", help="ours: touched after the first (compiling) step")
    p.add_argument("--done-file", default=None, metavar="FILE",
                   help="ours: touched when this process's variants are done (another's --start-after)")
    p.add_argument("--alone-steps", type=int, default=0, metavar="N",
                   help="ours: after the timed steps (back to back), N more steps each evaluated alone in the "
                        "same process (step_s_alone, tok_s_alone)")
    p.add_argument("--grad-check", action="store_true",
                   help="ours: first compare chunkwise_fused's gradients with the reference's at the run's head sizes")
    p.add_argument("--sides", default="ours,official")
    p.add_argument("--budget", type=float, default=120, help="seconds per side (a side stops starting work after)")
    p.add_argument("--official-budget", type=float, default=None, help="the official side's, if not --budget")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train.json")
    p.add_argument("--title", default="Training throughput", help="section title in BENCHMARKS.md")
    p.add_argument("--where", default="", help="where the run happened (round, machine), for BENCHMARKS.md")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--markdown", type=Path, metavar="JSONL", help="print the tables of a run's records (.jsonl) and exit")
    p.add_argument("--assemble", type=Path, metavar="JSONL",
                   help="write --out from records of workers run on their own (with --command, --date, --where)")
    p.add_argument("--command", default=None, help="with --assemble: the command that measured the records")
    p.add_argument("--date", default=None, help="with --assemble: when they were measured")
    p.add_argument("--worker", choices=["ours", "official"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.assemble is not None:  # records of workers run on their own (a GPU round)
        records = write_result(args, args.assemble)
        print(markdown(records))
        return 0
    if args.markdown is not None:
        print(markdown([json.loads(line) for line in args.markdown.read_text().splitlines() if line.strip()]))
        return 0
    if args.worker == "ours":
        worker_ours(args)
        return 0
    if args.worker == "official":
        worker_official(args)
        return 0
    if args.out.exists() and not args.overwrite:
        print(f"error: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = args.out.with_suffix(".jsonl")
    if jsonl.exists():
        jsonl.unlink()
    try:
        for side in args.sides.split(","):
            budget = args.official_budget if side == "official" and args.official_budget else args.budget
            _run_worker(side, args, budget, jsonl)
    finally:  # also when stopped from outside: what was measured is kept
        records = write_result(args, jsonl)
    print(markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
