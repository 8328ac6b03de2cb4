"""Two processes beside one on this machine (MLX's ring backend over loopback): what splitting
the work across processes costs or gains when both share one CPU.

- training: `xlstm-metal train` (pydoc-4m shape, global batch 8 x 256) in one process and under
  `mlx.launch -n 2` (data parallel, 4 rows per rank); steady-state tokens/s from metrics.jsonl
  (the first logged window, which holds compilation, is dropped);
- inference: `xlstm-metal bench` (125m shape, float32) in one process and under `mlx.launch -n 2`
  with --parallel tensor and --parallel pipeline: prefill and decode tokens/s.

Writes benchmarks/results/distributed_cpu.json and prints a Markdown table.

    python benchmarks/distributed_cpu.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = str(Path(sys.executable).parent / "mlx.launch")
XLSTM = [sys.executable, "-m", "xlstm_metal"]


def free_port(count: int = 2) -> int:
    for _ in range(100):
        port = random.randrange(20000, 60000 - count)
        try:
            for p in range(port, port + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free ports")


def launched(n: int, cmd: list[str]) -> list[str]:
    return cmd if n == 1 else [LAUNCH, "-n", str(n), "-p", str(free_port(n)), "--backend", "ring", "--", *cmd]


def corpus(directory: Path) -> Path:
    """Python's own library sources: real text, present wherever Python is."""
    import sysconfig

    src = Path(sysconfig.get_paths()["stdlib"])
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("argparse.py", "pathlib.py", "typing.py", "inspect.py", "dataclasses.py", "functools.py"):
        if (src / name).is_file():
            shutil.copy(src / name, directory / name)
    return directory


def train(n: int, data: Path, work: Path, steps: int) -> dict:
    out = work / f"train-{n}"
    cmd = [*XLSTM, "train", str(data), "--out", str(out), "--config", "pydoc-4m", "--vocab-size", "1024",
           "--seq-len", "256", "--batch-size", "8", "--steps", str(steps), "--warmup", "2", "--log-every", "5",
           "--eval-every", "100000", "--save-every", "100000", "--no-progress", "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.run(launched(n, cmd), capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0 or "done:" not in proc.stderr:
        raise RuntimeError(proc.stderr[-3000:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in records if r["kind"] == "train"][1:]
    return {"processes": n, "tok_s": statistics.median(windows), "windows": windows,
            "wall_s": time.perf_counter() - t0, "world_size": records[-1].get("world_size")}


def bench(n: int, parallel: str | None, quick: bool) -> list[dict]:
    cmd = [*XLSTM, "bench", "--shape", "125m", "--dtype", "float32", "--prefill-lengths", "256" if quick else "512",
           "--decode-batches", "1,8", "--decode-tokens", "16" if quick else "32", "--json"]
    if parallel:
        cmd += ["--parallel", parallel]
    proc = subprocess.run(launched(n, cmd), capture_output=True, text=True, cwd=ROOT)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not records:
        raise RuntimeError(proc.stderr[-3000:])
    return [{"processes": n, "parallel": parallel or "none", "kind": r["kind"], "batch": r["batch"],
             "length": r["length"], "tok_s": r["tok_s"]} for r in records]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and tokens")
    parser.add_argument("--only", choices=("train", "inference"), help="run one half (the JSON keeps the other's last figures)")
    args = parser.parse_args()
    import mlx.core as mx

    with tempfile.TemporaryDirectory(prefix="xlstm-dist-bench-") as tmp:
        work = Path(tmp)
        data = corpus(work / "corpus")
        steps = 15 if args.quick else 40
        out = ROOT / "benchmarks" / "results" / "distributed_cpu.json"
        packed = out.with_name(out.name + ".xz")  # the archived result is stored xz-compressed
        previous = json.loads(out.read_text() if out.is_file() else lzma.open(packed, "rt").read()) \
            if out.is_file() or packed.is_file() else {}
        load = [os.getloadavg()[0]]
        training = previous.get("training", [])
        if args.only != "inference":
            training = [train(1, data, work, steps), train(2, data, work, steps)]
            load.append(os.getloadavg()[0])
        inference = previous.get("inference", [])
        if args.only != "train":
            inference = bench(1, None, args.quick) + bench(2, "tensor", args.quick) + bench(2, "pipeline", args.quick)
            load.append(os.getloadavg()[0])
    command = "python " + " ".join(["benchmarks/distributed_cpu.py", *sys.argv[1:]])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = {
        # Each half keeps the date and command of the run that measured it.
        "training_run": ({"date": when, "command": command, "loadavg_1m": load}
                         if args.only != "inference" else previous.get("training_run")),
        "inference_run": ({"date": when, "command": command, "loadavg_1m": load}
                          if args.only != "train" else previous.get("inference_run")),
        "machine": f"{os.cpu_count()} CPU cores, Linux; other agents' jobs share it",
        "mlx": mx.__version__, "backend": "ring (loopback)",
        "training": training, "inference": inference,
    }
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=1))
    os.replace(tmp_out, out)

    print("| run | processes | tokens/s |\n|---|---|---|")
    for t in training:
        print(f"| train pydoc-4m, 8 x 256 per step | {t['processes']} | {t['tok_s']:,.0f} |")
    for r in inference:
        print(f"| {r['kind']} 125m, batch {r['batch']}, {r['parallel']} | {r['processes']} | {r['tok_s']:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
