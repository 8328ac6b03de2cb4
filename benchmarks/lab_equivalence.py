"""Speed of the architecture lab's wired blocks against the hand-written ones (same weights).

The xLSTM-Large model (``xlstm_large_block`` spec) and a 2024 sLSTM stack (``slstm_2024_block``
spec) are built from wiring specs with the hand-written models' weights (``wired_equivalent``);
the script checks the logits agree, then times prefill and decode of both, interleaved
(hand-written, wired, hand-written, ...) so load changes hit both alike, and reports the median
speed of the wired model relative to the hand-written one (target: >= 0.9x), in tokens per CPU
second of the process (robust on a shared machine) and in wall-clock time.

    python benchmarks/lab_equivalence.py [--repeats 5] [--json benchmarks/results/lab_equivalence.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import xlstm_metal  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx
import numpy as np

from xlstm_metal.benchmark import environment, shape_config
from xlstm_metal.lab import wired_equivalent


def _large(shape: str):
    from xlstm_metal.models.xlstm_large import xLSTMLarge
    from xlstm_metal.training import init_xlstm_large

    model = xLSTMLarge(shape_config(shape))
    init_xlstm_large(model, 0)
    return model


def _slstm(dim: int, blocks: int, vocab: int):
    from xlstm_metal.models.xlstm_2024 import xLSTMLMConfig, model_from_config

    cfg = xLSTMLMConfig.from_dict({"vocab_size": vocab, "embedding_dim": dim, "num_blocks": blocks,
                                   "slstm_at": "all", "slstm_block": {"slstm": {"num_heads": 4}}})
    return model_from_config(cfg, seed=0)


def _prefill(model, ids):
    return lambda: model(ids, last_only=True)[0]


def _decode(model, steps: int, compiled: bool):
    step = mx.compile(lambda t, s: model(t, s), inputs=model.state) if compiled else model

    def run():
        state, tok = model.make_state(1), mx.array([[1]])
        for _ in range(steps):
            logits, state = step(tok, state)
            tok = mx.argmax(logits[:, -1:], axis=-1)
            mx.eval(tok, state)
        return tok

    return run


def _time(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one synchronised call."""
    w0, c0 = time.perf_counter(), time.process_time()
    mx.eval(fn())
    return time.perf_counter() - w0, time.process_time() - c0


def compare(name: str, model, prefill_len: int, decode_steps: int, repeats: int) -> list[dict]:
    wired = wired_equivalent(model)
    ids = mx.array(np.random.default_rng(0).integers(0, model.config.vocab_size, (1, prefill_len)))
    a, b = model(ids[:, :64])[0], wired(ids[:, :64])[0]
    rel = float(mx.abs(a - b).max() / mx.abs(a).max())
    rows = []
    cases = [("prefill", prefill_len, _prefill(model, ids), _prefill(wired, ids)),
             ("decode (eager)", decode_steps, _decode(model, decode_steps, False), _decode(wired, decode_steps, False)),
             ("decode (compiled)", decode_steps, _decode(model, decode_steps, True),
              _decode(wired, decode_steps, True))]
    for case, tokens, hand_fn, wired_fn in cases:
        _time(hand_fn), _time(wired_fn)  # warm-up (and compile)
        hand, wire = [], []
        for _ in range(repeats):
            hand.append(_time(hand_fn))
            wire.append(_time(wired_fn))
        # CPU time is the fair measure on a machine shared with other jobs (wall time there
        # mostly measures the others); both are reported.
        h, w = (statistics.median(t[1] for t in ts) for ts in (hand, wire))
        hw, ww = (statistics.median(t[0] for t in ts) for ts in (hand, wire))
        rows.append({"model": name, "case": case, "tokens": tokens, "hand_tok_s": tokens / h, "wired_tok_s": tokens / w,
                     "speed_ratio": h / w, "hand_tok_s_wall": tokens / hw, "wired_tok_s_wall": tokens / ww,
                     "speed_ratio_wall": hw / ww, "logits_rel_diff": rel})
        print(f"{name:>22} {case:>18}: per CPU second: hand-written {tokens / h:9.1f} tok/s, wired "
              f"{tokens / w:9.1f} tok/s, wired/hand {h / w:.3f}; wall-clock ratio {hw / ww:.3f} "
              f"(logits rel diff {rel:.1e})", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="125m", help="xLSTM-Large shape (default: 125m)")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--slstm-dim", type=int, default=256)
    p.add_argument("--models", default="large,slstm", help="which comparisons: large, slstm (default: both)")
    p.add_argument("--json", default=None, help="write the rows and the environment here")
    args = p.parse_args()
    start = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = os.getloadavg()[0]
    rows = []
    models = args.models.split(",")
    if "large" in models:
        rows += compare(f"xLSTM-Large {args.shape}", _large(args.shape), args.prefill, args.decode, args.repeats)
    if "slstm" in models:
        rows += compare(f"sLSTM 2024 E={args.slstm_dim} x4", _slstm(args.slstm_dim, 4, 4096), args.prefill // 4,
                        args.decode, args.repeats)
    if args.json:
        meta = {"date": start, "command": "python " + " ".join(sys.argv), "cpu_count": os.cpu_count(),
                "loadavg_1m_start": load_start, "loadavg_1m_end": os.getloadavg()[0], "repeats": args.repeats}
        Path(args.json).write_text(json.dumps({**meta, "environment": environment(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
