"""Speed of the README's first command on this machine, against an older checkout (issue 11 item 6).

Runs ``xlstm-metal generate --prompt "The Python interpreter" -v`` (the packaged model, 200 new
tokens as its generation config says) in turns for each configuration, several rounds, and
records the generation tok/s it prints with the 1-minute load average at each run's start:

- ``this tree``: this checkout and its packaged model;
- ``this tree, --model OLD``: this checkout running the older checkout's packaged model;
- ``OLD tree``: the older checkout (code and model) as it was, the "before" of the issue;
- ``this tree, no row kernel``: ``XLSTM_METAL_GEMV_ROWS=0`` (one-row products through OpenBLAS's
  GEMV, as before the forwarder's own row kernel in ``xlstm_metal/_blas.py``);
- ``this tree, no GEMV forwarding``: ``XLSTM_METAL_GEMV_FORWARD=0`` (one-row products through
  OpenBLAS's GEMM, as before the forwarder);
- ``this tree, no C step``: ``XLSTM_METAL_CPU_STEP=0`` (each token through the MLX graph instead of
  the one-call C step of ``xlstm_metal/kernels/cpu/decode_step.py``);
- ``this tree, no C prefill``: ``XLSTM_METAL_CPU_PREFILL=0`` (the prompt through the MLX graph instead
  of ``xlstm_metal/kernels/cpu/prefill.py``);
- ``this tree, float32``: the packaged model dequantized to float32 (``xlstm-metal convert --dtype
  float32`` into a temporary folder, then ``--model`` it), where ``this tree`` keeps it quantized
  for the C code.

    python benchmarks/readme_speed.py --old-rev 02a6d4d~1 --rounds 4 --out benchmarks/results/readme_speed.json

The older checkout is extracted with ``git archive`` into a temporary folder. Prints a Markdown
table; the JSON keeps every run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = ["-m", "xlstm_metal", "generate", "--prompt", "The Python interpreter", "-v"]
#: The configurations, in the order they run each round (see the module docstring).
CONFIGS = ("this", "this-float32", "this-old-model", "old", "this-no-rows", "this-no-forward", "this-no-cpu-step",
           "this-no-cpu-prefill")
_RATE = re.compile(r"generation: (\d+) tokens, ([\d.]+) tok/s")


def run_once(tree: Path, extra: list[str], env: dict[str, str]) -> dict:
    """One run of the README command from ``tree``; tokens, tok/s and the load at its start."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("XLSTM_METAL_")}
    full.update(env, PYTHONPATH=str(tree))
    load = os.getloadavg()[0]
    out = subprocess.run([sys.executable, *COMMAND, *extra], env=full, cwd=tree, capture_output=True,
                         text=True, timeout=900)
    match = _RATE.search(out.stdout + out.stderr)
    if out.returncode != 0 or match is None:
        return {"error": (out.stderr or out.stdout)[-1000:], "loadavg_1m": load}
    return {"tokens": int(match.group(1)), "tok_s": float(match.group(2)), "loadavg_1m": load,
            "utc": time.strftime("%H:%M:%S", time.gmtime())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-rev", default="02a6d4d~1",
                   help="git revision of the older checkout (default: the commit before pydoc-15m)")
    p.add_argument("--old-tree", type=Path, help="an older checkout already on disk (instead of --old-rev)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    p.add_argument("--threads", help="XLSTM_METAL_BLAS_THREADS for every run (default: the automatic choice)")
    p.add_argument("--out", type=Path, help="JSON file for every run (written atomically)")
    args = p.parse_args()
    if args.out is not None and not args.out.parent.is_dir():
        p.error(f"--out: folder {args.out.parent} does not exist")
    wanted = [c for c in args.configs.split(",") if c]
    known = set(CONFIGS)
    if not wanted or set(wanted) - known:
        p.error(f"--configs: choose from {', '.join(sorted(known))}")
    env = {"XLSTM_METAL_BLAS_THREADS": args.threads} if args.threads else {}
    from tqdm import tqdm

    if args.old_tree is not None and not (args.old_tree / "xlstm_metal").is_dir():
        p.error(f"--old-tree: {args.old_tree} holds no xlstm_metal package")
    with tempfile.TemporaryDirectory(prefix="readme_speed-") as tmp:
        old = args.old_tree
        if old is None and {"old", "this-old-model"} & set(wanted):
            old = Path(tmp)
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.old_rev], capture_output=True)
            if archive.returncode != 0:
                p.error(f"--old-rev: git archive {args.old_rev} failed: {archive.stderr.decode()[-300:]}")
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        old = old if old is not None else Path(tmp)  # (not extracted: no configuration runs it)
        old_model = str(old / "xlstm_metal" / "assets" / "default_model")
        float32 = Path(tmp) / "float32-export"
        if "this-float32" in wanted:
            made = subprocess.run([sys.executable, "-m", "xlstm_metal", "convert",
                                   str(ROOT / "xlstm_metal" / "assets" / "default_model"), str(float32),
                                   "--dtype", "float32"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                                  capture_output=True, text=True)
            if made.returncode != 0:
                p.error(f"this-float32: converting the packaged model failed: {made.stderr[-300:]}")
        configs = {
            "this": (ROOT, [], {}),
            "this-float32": (ROOT, ["--model", str(float32)], {}),
            "this-old-model": (ROOT, ["--model", old_model], {}),
            "old": (old, [], {}),
            "this-no-rows": (ROOT, [], {"XLSTM_METAL_GEMV_ROWS": "0"}),
            "this-no-forward": (ROOT, [], {"XLSTM_METAL_GEMV_FORWARD": "0"}),
            "this-no-cpu-step": (ROOT, [], {"XLSTM_METAL_CPU_STEP": "0"}),
            "this-no-cpu-prefill": (ROOT, [], {"XLSTM_METAL_CPU_PREFILL": "0"}),
        }
        runs: list[dict] = []
        for rnd in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
            for name in wanted:
                tree, extra, cfg_env = configs[name]
                runs.append({"config": name, "round": rnd + 1, **run_once(tree, extra, {**env, **cfg_env})})
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    result = {"command": "python benchmarks/readme_speed.py " + " ".join(sys.argv[1:]),
              "readme_command": "xlstm-metal " + shlex.join(COMMAND[2:]),
              "old": str(args.old_tree) if args.old_tree else args.old_rev,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
              "threads": args.threads or "automatic", "runs": runs}
    if args.out is not None:
        tmp_out = args.out.with_suffix(".json.tmp")
        tmp_out.write_text(json.dumps(result, indent=1))
        os.replace(tmp_out, args.out)
    print("| configuration | generation tok/s per round | median | load average per run |")
    print("| --- | --- | ---: | --- |")
    for name in wanted:
        mine = [r for r in runs if r["config"] == name]
        rates = [r["tok_s"] for r in mine if "tok_s" in r]
        loads = ", ".join(f"{r['loadavg_1m']:.1f}" for r in mine)
        shown = ", ".join(f"{x:.1f}" for x in rates) or "failed"
        median = f"{statistics.median(rates):.1f}" if rates else "-"
        print(f"| {name} | {shown} | {median} | {loads} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
