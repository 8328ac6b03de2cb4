#!/usr/bin/env python3
"""Train the byte-level BPE tokenizer of a corpus (text files, directories, JSON Lines).

Usage: python scripts/train_tokenizer.py DATA... --vocab-size 4096 --out DIR
Writes DIR/tokenizer.json and DIR/tokenizer_config.json (ids 0/1/2 = <|bos|>/<|pad|>/<|eos|>).
"""

from __future__ import annotations

import argparse
import sys

from xlstm_metal.training.data import load_documents, save_tokenizer, tokenizer_config_dict, train_bpe_tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="+")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    docs = load_documents(args.data, args.text_field)
    tok = train_bpe_tokenizer((d.text for d in docs), args.vocab_size)
    save_tokenizer(tok, args.out, tokenizer_config_dict(tok))
    n_chars = sum(len(d.text) for d in docs)
    n_tokens = sum(len(e.ids) for e in tok.encode_batch([d.text for d in docs]))
    print(f"{len(docs)} documents, {n_chars} characters -> {n_tokens} tokens "
          f"({n_chars / n_tokens:.2f} characters/token), vocab {tok.get_vocab_size()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
