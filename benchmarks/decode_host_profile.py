"""Where the host's time goes in a compiled decode step, and how much it moves the step.

    python benchmarks/decode_host_profile.py --shape 7b --q-bits 4 --py-spy 5 --out $OUT/host_profile.json

For the model in bf16 (float32 on a CPU) and then quantized to each of ``--q-bits`` (group 64, gate
projections in float, as ``xlstm-metal bench --q-bits``), one process records:

- ``queued``: :func:`xlstm_metal.benchmark.measure_decode` (every step queued, what ``bench``
  and the side-by-side runs time) at each of ``--tokens``, ``--repeats`` times: how far the
  step's rate moves from one measurement to the next in one process;
- ``synced_ms``: ``--synced-steps`` steps each evaluated before the next is built (host and
  device in series, so a step's time is the host's work plus the device's);
- ``build_ms``: the compiled step's call alone (MLX flattens its inputs and replays the trace),
  nothing evaluated, per step;
- ``leaves``: arrays the compiled step takes as inputs (``model.state``);
- with ``--py-spy S`` (the ``py-spy`` program on PATH): S seconds of queued steps sampled by
  ``py-spy record --native`` on this process, summarised as the share of samples in which each
  frame is on the stack (``frames``, the ``--top`` largest) and as the frames each of ``--split``
  calls directly (``children``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import xlstm_metal  # noqa: E402,F401  (first: BLAS preload on Linux CPUs)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from xlstm_metal import benchmark as bm  # noqa: E402

#: Frames whose direct callees ``--py-spy`` also lists (a prefix of the frame's name).
SPLIT = ("mlx::core::fast::CustomKernel::eval_gpu", "mlx::core::detail::compile_replace", "mlx::core::gpu::eval",
         "mlx::core::eval_impl")


def _name(frame: str) -> str:
    """A py-spy frame without its trailing " (file:line)" or " (library)"."""
    return frame.rpartition(" (")[0] if frame.endswith(")") and " (" in frame else frame


def summarise_stacks(lines: list[str], top: int, split: tuple[str, ...] = SPLIT) -> dict:
    """py-spy's raw output (``frame;frame;... count`` per line, outermost first) -> the share
    of samples with each frame on the stack (largest ``top``) and, for each prefix in ``split``,
    the samples of its direct callees (``<self>``: the frame itself was running)."""
    on_stack: collections.Counter = collections.Counter()
    children = {name: collections.Counter() for name in split}
    total = 0
    for line in lines:
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [_name(f) for f in stack.split(";")]
        for frame in set(frames):
            on_stack[frame] += n
        for name in split:
            index = next((i for i, f in enumerate(frames) if f.startswith(name)), None)
            if index is not None:
                children[name][frames[index + 1] if index + 1 < len(frames) else "<self>"] += n
    return {"samples": total,
            "frames": [(f, round(n / total, 4)) for f, n in on_stack.most_common(top)] if total else [],
            "children": {name: [(f, round(n / total, 4)) for f, n in c.most_common(12)] for name, c in children.items()
                         if c}}


def py_spy(seconds: int, rate: int, top: int, run_steps) -> dict:
    """Sample this process with ``py-spy record --native`` while ``run_steps(stop)`` queues steps."""
    exe = shutil.which("py-spy")
    if exe is None:
        return {"error": "py-spy is not on PATH"}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.txt"
        spy = subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--native", "-r", str(rate), "-d",
                                str(seconds), "-f", "raw", "-o", str(raw)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.5)  # py-spy attaches
        steps = run_steps(lambda: spy.poll() is not None)
        log = spy.communicate()[0]
        if spy.returncode != 0 or not raw.exists():
            return {"error": f"py-spy exited {spy.returncode}: {log[-500:]}"}
        return {"steps_while_sampled": steps, **summarise_stacks(raw.read_text().splitlines(), top)}


def measure(model, label: str, args: argparse.Namespace) -> dict:
    record: dict = {"weights": label, "leaves": len(tree_flatten(model.state)), "queued": []}
    for tokens in args.tokens:
        for _ in range(args.repeats):
            r = bm.measure_decode(model, args.batch, tokens=tokens)
            record["queued"].append({"tokens": tokens, "tok_s": round(r["tok_s"], 2),
                                     "ms_per_step": round(r["ms_per_step"], 4)})
    step = bm.make_decode_step(model, compiled=True)
    tok, state = bm.start_decode(model, step, mx.zeros((args.batch, 1), dtype=mx.int32), 4)
    synced = []
    for _ in range(args.synced_steps):
        t0 = time.perf_counter()
        tok, state = step(tok, state)
        mx.eval(tok, state)
        synced.append(round(1000 * (time.perf_counter() - t0), 3))
    record["synced_ms"] = synced
    t0 = time.perf_counter()
    for _ in range(args.synced_steps):
        tok, state = step(tok, state)  # the calls alone: the graph of all these steps is evaluated below
    record["build_ms"] = round(1000 * (time.perf_counter() - t0) / args.synced_steps, 4)
    mx.eval(tok, state)
    if args.py_spy:
        carry = {"tok": tok, "state": state}

        def run_steps(done) -> int:
            n, t0 = 0, time.perf_counter()
            while not done() and time.perf_counter() - t0 < args.py_spy + 10:
                carry["tok"], carry["state"] = step(carry["tok"], carry["state"])
                mx.async_eval(carry["tok"], carry["state"])
                n += 1
            mx.eval(carry["tok"], carry["state"])
            return n

        record["py_spy"] = py_spy(args.py_spy, args.rate, args.top, run_steps)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="7b")
    p.add_argument("--dtype", default=None, help="weights (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--q-bits", default="4", help="then the model quantized to these bits (comma-separated; '' none)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", default="64,128", help="queued measurements' lengths (comma-separated)")
    p.add_argument("--repeats", type=int, default=3, help="queued measurements per length")
    p.add_argument("--synced-steps", type=int, default=32)
    p.add_argument("--py-spy", type=int, default=0, help="whole seconds of py-spy sampling per weight format (0: none)")
    p.add_argument("--rate", type=int, default=400, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--embedding-dim", type=int, default=None, help="override the shape's width (CPU tries)")
    p.add_argument("--num-blocks", type=int, default=None, help="override the shape's depth (CPU tries)")
    p.add_argument("--out", type=Path, required=True, help="results JSON (written at the end, atomically)")
    args = p.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",") if t]
    bits = [int(b) for b in args.q_bits.split(",") if b]
    if args.out.exists():
        p.error(f"--out {args.out} exists")
    overrides = {k: v for k, v in (("embedding_dim", args.embedding_dim), ("num_blocks", args.num_blocks)) if v}
    dtype = args.dtype or bm.default_dtype()
    model = bm.random_model(bm.shape_config(args.shape, **overrides), dtype=dtype)
    model.fuse_projections()
    result = {"command": "python benchmarks/decode_host_profile.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "env": bm.environment(),
              "shape": args.shape, "overrides": overrides, "batch": args.batch, "records": []}
    result["records"].append(measure(model, dtype, args))
    print(json.dumps(result["records"][-1])[:400], flush=True)
    from xlstm_metal.quantization import dequantize_model, quantize_model  # noqa: PLC0415

    for b in bits:
        dequantize_model(model)
        quantize_model(model, bits=b, group_size=64)
        model.fuse_projections()
        result["records"].append(measure(model, f"{b}-bit g64", args))
        print(json.dumps(result["records"][-1])[:400], flush=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
