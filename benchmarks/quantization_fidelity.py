"""Quantization fidelity of a checkpoint: `xlstm-metal convert --check` for 8, 6 and 4 bits at
group sizes 32 and 64 and the mixed-4-6 recipe, on held-out text. Prints a Markdown table and writes
benchmarks/results/quantization_fidelity_<name>.json.

    python benchmarks/quantization_fidelity.py --model ckpt --text heldout.txt
    python benchmarks/quantization_fidelity.py --model float32-export --corpus .train_data/corpus.jsonl \
        --tokens 80000 --dtype bfloat16 --name pydoc-15m    # the packaged model's source, as published

Without --model the packaged model is the source; it ships quantized, so each setting then
measures quantizing its dequantized weights again, not the loss from the trained weights.

--dtype D converts every setting with `convert --dtype D` (scales, biases and the layers left in
float take D, as the packaged model's were) and adds a first row: the source in D, not quantized.
A row whose weights file is byte-identical to the packaged model's is marked "as shipped".

With --corpus (the JSON Lines corpus `scripts/build_default_model.sh corpus` writes), the text is
the start of the validation split `xlstm-metal train` holds out (documents shuffled with --seed,
the last --val-fraction of the tokens), so the model never trained on it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import xlstm_metal  # noqa: F401  (first: binds MLX to OpenBLAS on Linux)
from xlstm_metal.assets import DEFAULT_MODEL_DIR
from xlstm_metal.benchmark import environment
from xlstm_metal.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = "model.safetensors"
SETTINGS = [
    ("8-bit, group 64", ["--q-bits", "8", "--q-group-size", "64"]),
    ("8-bit, group 32", ["--q-bits", "8", "--q-group-size", "32"]),
    ("6-bit, group 64", ["--q-bits", "6", "--q-group-size", "64"]),
    ("6-bit, group 32", ["--q-bits", "6", "--q-group-size", "32"]),
    ("4-bit, group 64", ["--q-bits", "4", "--q-group-size", "64"]),
    ("4-bit, group 32", ["--q-bits", "4", "--q-group-size", "32"]),
    ("mixed-4-6, group 64", ["--q-recipe", "mixed-4-6", "--q-group-size", "64"]),
    ("mixed-4-6, group 32", ["--q-recipe", "mixed-4-6", "--q-group-size", "32"]),
]


def sha256(path: Path) -> str | None:
    """Hex digest of a file, None if it does not exist."""
    import hashlib

    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def heldout_text(model_dir: Path, corpus: Path, tokens: int, val_fraction: float, seed: int) -> str:
    """The first ``tokens`` tokens of the validation split, from the first whole document on."""
    from xlstm_metal.training.data import (
        BOS_TOKEN, EOS_TOKEN, load_documents, load_tokenizer_file, split_stream, tokenize_documents,
    )

    tok = load_tokenizer_file(model_dir)
    bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    streams = tokenize_documents(tok, load_documents([str(corpus)]), bos, eos)
    _, val = split_stream(streams, val_fraction, seed)
    ids = val.tolist()
    ids = ids[ids.index(eos) + 1 :]  # the first document may have been cut at the split
    docs, current = [], []
    for token in ids[: tokens + 64]:
        if token == eos:
            docs.append(tok.decode(current, skip_special_tokens=True))
            current = []
        elif token != bos:
            current.append(token)
    if current:
        docs.append(tok.decode(current, skip_special_tokens=True))
    return "\n\n".join(docs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="checkpoint (default: the packaged model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", type=Path, help="training corpus (JSON Lines): use its held-out split")
    src.add_argument("--text", type=Path, help="a held-out text file")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of text compared (default: 4096)")
    p.add_argument("--greedy", type=int, default=256, help="greedy tokens compared (default: 256)")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="convert with --dtype D, and add the source in D, not quantized, as the first row")
    p.add_argument("--name", default="default", help="results file suffix (default: default)")
    p.add_argument("--label", help="how the results name the model (default: the --model path)")
    args = p.parse_args(argv)
    settings = [(f"{args.dtype}, not quantized", [])] if args.dtype else []
    settings += [(label, ["-q", *flags]) for label, flags in SETTINGS]
    dtype_flags = ["--dtype", args.dtype] if args.dtype else []
    packaged = sha256(DEFAULT_MODEL_DIR / WEIGHTS)

    with tempfile.TemporaryDirectory() as tmp:
        text_path = args.text
        if args.corpus is not None:
            text_path = Path(tmp) / "heldout.txt"
            text_path.write_text(heldout_text(Path(args.model), args.corpus, args.tokens, args.val_fraction, args.seed))
        text_digest = sha256(text_path)
        rows, started = [], time.monotonic()
        for number, (label, flags) in enumerate(settings, start=1):
            out = io.StringIO()
            flags = [*flags, *dtype_flags]
            command = ["convert", args.model, str(Path(tmp) / "out"), *flags, "--overwrite",
                       "--check", str(text_path), "--check-tokens", str(args.tokens),
                       "--check-greedy", str(args.greedy), "--json"]
            with contextlib.redirect_stdout(out):
                code = cli_main(command)
            if code:
                raise SystemExit(f"convert failed ({code}): {' '.join(command)}")
            summary = json.loads(out.getvalue().strip().splitlines()[-1])
            digest = sha256(Path(tmp) / "out" / WEIGHTS)
            rows.append({"setting": label, "flags": " ".join(flags), **summary, "weights_sha256": digest,
                         "as_shipped": digest == packaged})
            print(f"[{number}/{len(settings)}] {label}: done ({time.monotonic() - started:.0f} s)", file=sys.stderr)

    first = rows[0]["check"]
    lines = [
        f"held-out text: {first['tokens'] + 1} tokens; source perplexity {first['ppl_reference']:.3f} "
        f"({rows[0]['source_bits_per_weight']:.0f}-bit weights, {rows[0]['parameters'] / 1e6:.2f}M parameters)",
        "",
        "| setting | bits/weight | weights MB | perplexity | change | mean KL (nats) | top-1 agree | "
        f"greedy agree / {args.greedy} | identical prefix |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        c = row["check"]
        setting = row["setting"] + (" (**as shipped**)" if row["as_shipped"] else "")
        lines.append(
            f"| {setting} | {row['bits_per_weight']:.2f} | {row['weight_bytes'] / 1e6:.2f} | "
            f"{c['ppl_candidate']:.3f} | {c['ppl_candidate'] / c['ppl_reference'] - 1:+.2%} | {c['kl']:.5f} | "
            f"{c['top1']:.2%} | {c['greedy_agree']} | {c['greedy_prefix']} |"
        )
    table = "\n".join(lines)
    print(table)
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": environment(),
              "model": args.label or (os.path.relpath(args.model, ROOT) if Path(args.model).resolve().is_relative_to(ROOT)
                                      else args.model),
              "command": shlex.join(["python", "benchmarks/quantization_fidelity.py", *sys.argv[1:]]),
              "text": (f"the validation split `xlstm-metal train` holds out of {args.corpus} (--val-fraction "
                       f"{args.val_fraction}, --seed {args.seed}) from its first whole document: text the model "
                       "never trained on") if args.corpus is not None else str(args.text),
              "source_weights_sha256": sha256(Path(args.model) / WEIGHTS),
              "packaged_weights_sha256": packaged,
              "text_sha256": text_digest,
              "rows": rows,
              "table": table}
    path = ROOT / "benchmarks" / "results" / f"quantization_fidelity_{args.name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
