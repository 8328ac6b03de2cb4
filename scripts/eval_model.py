#!/usr/bin/env python3
"""Validation loss / perplexity of a checkpoint on the held-out split `xlstm-metal train` makes.

Usage: python scripts/eval_model.py CKPT DATA... [--seq-len 512] [--val-fraction 0.02] [--seed 0]
       [--dtype float32]
The split is rebuilt exactly as the trainer builds it (same tokenizer, seed and fraction), so
the figure is comparable with the run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import math

import xlstm_metal  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from xlstm_metal.loading import load_model
from xlstm_metal.training.data import (
    BOS_TOKEN, EOS_TOKEN, load_documents, load_tokenizer_file, split_stream, tokenize_documents, validation_windows,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("data", nargs="+")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--val-fraction", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    model = load_model(args.checkpoint, dtype=args.dtype)
    tok = load_tokenizer_file(args.checkpoint)
    docs = load_documents(args.data)
    streams = tokenize_documents(tok, docs, tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN))
    _, val = split_stream(streams, args.val_fraction, args.seed)
    windows = validation_windows(val, args.seq_len)
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), args.batch_size), desc="eval"):
        w = mx.array(windows[start : start + args.batch_size])
        logits, _ = model(w[:, :-1])
        loss = nn.losses.cross_entropy(logits.astype(mx.float32), w[:, 1:], reduction="sum")
        total += loss.item()
        count += w[:, 1:].size
    mean = total / count
    print(f"{args.checkpoint}: {len(windows)} windows x {args.seq_len} tokens = {count} tokens; "
          f"validation loss {mean:.4f} nats/token, perplexity {math.exp(mean):.2f}; device {mx.default_device()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
