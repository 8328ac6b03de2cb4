"""`xlstm-metal judge`: rate generated texts under a judge model.

    xlstm-metal judge --model ckpt --outputs runs/tune/outputs --out runs/ratings
    xlstm-metal judge --outputs samples.jsonl --out ratings/          # the packaged model judges

--outputs: JSON Lines files (or directories of them, e.g. a tune run's outputs/) whose records
hold "text" and optionally "prompt"; other fields are kept. For each record: mean log-probability
and perplexity of the text given the prompt, distinct-1/2/3, share of repeated 4-grams, longest
repeated span, lengths. Writes ratings.jsonl and ratings.csv to --out; a text with no scored token
(empty) has null mean_logprob and perplexity (one past float range: null perplexity). Each row also
gets "source" (the file) and "line": a
record with a field of one of these names or a rating's (mean_logprob, perplexity, scored_tokens,
distinct_1/2/3, repeated_4gram_share, longest_repeated_span, chars, words, tokens) is refused.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path

from ..jsonfiles import check_unicode, read_jsonl
from . import UsageError, check_apart_from_data, check_output_path
from .profile import add_profile_argument, apply_cli_profile, profile_from_args

RATING_FIELDS = ("mean_logprob", "perplexity", "scored_tokens", "distinct_1", "distinct_2", "distinct_3",
                 "repeated_4gram_share", "longest_repeated_span", "chars", "words", "tokens")
#: The fields judge writes into each row besides the record's own: where it came from, then its ratings.
WRITTEN_FIELDS = ("source", "line", *RATING_FIELDS)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("judge", help="rate generated texts: log-probability, perplexity, diversity, repetition",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=None, help="judge model checkpoint (default: the packaged model)")
    p.add_argument("--outputs", nargs="+", required=True, metavar="FILE_OR_DIR",
                   help="JSON Lines files with 'text' (+ optional 'prompt') records, or directories of them")
    p.add_argument("--out", required=True, help="directory for ratings.jsonl and ratings.csv")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="judge model dtype (default: the --profile's, else float32)")
    add_profile_argument(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing ratings in --out")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr (it shows only at a terminal anyway)")
    p.set_defaults(func=run)
    return p


def source_names(files: list[Path]) -> list[str]:
    """Each file's name, with as many of its parent folders as it takes to tell it from the other
    files (two tune sweeps' outputs: a/outputs/trial-0000.jsonl and b/outputs/trial-0000.jsonl;
    both rows said "trial-0000.jsonl", so a rating could not be traced to its sweep)."""
    from ..pathnames import distinct_names

    return distinct_names([f.resolve().parts for f in files])


def read_records(sources: list[str]) -> list[dict]:
    """Records of every JSON Lines file (directories: their *.jsonl, sorted), each with a
    "source" (file name; with parent folders where files of one name are given) and "line"
    added; UsageError naming the file and line when bad, or when a record has a field of
    WRITTEN_FIELDS (its own "line" or "tokens" was replaced by judge's without a word)."""
    files: list[Path] = []
    for spec in sources:
        path = Path(spec)
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise UsageError(f"--outputs directory {path} has no .jsonl files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"--outputs: no such file or directory: {path}")
    seen: dict[Path, Path] = {}
    for file in files:  # a file given twice (or as itself and in its directory) was rated and counted twice
        if (earlier := seen.setdefault(file.resolve(), file)) is not file:
            raise UsageError(f"--outputs names {earlier} more than once (a file, or one in a directory given): "
                             "give each file once")
    records = []
    empty = []
    for file, source in zip(files, source_names(files)):
        count = len(records)
        for n, record in read_jsonl(file, UsageError):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UsageError(f"{file}:{n}: a record needs a string 'text' field")
            if record.get("prompt") is not None and not isinstance(record["prompt"], str):
                raise UsageError(f"{file}:{n}: 'prompt' must be a string")
            for key in ("text", "prompt"):
                check_unicode(record.get(key) or "", f"{file}:{n}: '{key}'", UsageError)
            clash = [k for k in WRITTEN_FIELDS if k in record]
            if clash:
                raise UsageError(f"{file}:{n}: field{'s' if len(clash) > 1 else ''} {', '.join(map(repr, clash))} "
                                 f"would be replaced: judge writes {'them' if len(clash) > 1 else 'it'} into each "
                                 "row (source, line and the ratings); rename the field in the file")
            try:  # a nested one failed the writing, after every text was judged
                json.dumps(record, allow_nan=False)
            except ValueError:
                raise UsageError(f"{file}:{n}: NaN or Infinity in the record (JSON has neither)") from None
            records.append({"source": source, "line": n, **record})
        if len(records) == count:
            empty.append(file)
    if not records:
        raise UsageError(f"no records in --outputs {', '.join(map(str, empty))}")
    for file in empty:  # one empty file among others was passed over without a word (alone: refused above)
        print(f"warning: --outputs file {file} holds no records: nothing of it is rated", file=sys.stderr)
    return records


def perplexity_summary(rows: list[dict]) -> str:
    """The texts' perplexity over all their scored tokens together (each text weighted by its
    tokens, as a corpus perplexity is), and the plain mean of the texts' own perplexities, which
    a short text moves as much as a long one."""
    scored = [r for r in rows if r["scored_tokens"] and r["mean_logprob"] is not None]
    if not scored:
        return "no scored token"
    from ..judge import perplexity

    tokens = sum(r["scored_tokens"] for r in scored)
    pooled = perplexity(sum(r["mean_logprob"] * r["scored_tokens"] for r in scored) / tokens)
    mean = sum(perplexity(r["mean_logprob"]) for r in scored) / len(scored)
    return f"perplexity {pooled:.2f} over {tokens:,} scored tokens (mean of the texts' own: {mean:.2f})"


def ratings_csv(rows: list[dict]) -> str:
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in RATING_FIELDS and k != "prompt"]
    cols = [*extra, *RATING_FIELDS]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()})
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..config import ConfigError
    from ..generation.tokenizer import TokenizerError
    from ..judge import judge_record
    from ..loading import CheckpointError, load
    from ..training.data import atomic_write_text

    out = Path(args.out).expanduser()
    targets = [out / "ratings.jsonl", out / "ratings.csv"]
    # Before any work: --out is not an --outputs path or inside an --outputs directory (the ratings
    # would land among the texts they rate), and neither ratings file is an --outputs file.
    check_apart_from_data([("--out", args.out), *(("the --out file", t) for t in targets)], args.outputs,
                          data="--outputs", data_dir="the --outputs directory",
                          read_back="the ratings would be written among the texts they rate")
    check_output_path(out, "--out", directory=True)
    if any(t.exists() for t in targets) and not args.overwrite:
        raise UsageError(f"{out} already holds ratings; pass --overwrite to replace them")
    records = read_records(args.outputs)
    # A profile decides the judge's numerics as it does generate's (soft caps, eps, kernels change
    # the log-probabilities); an explicit --dtype wins over its dtype.
    profile = profile_from_args(args, dtype=args.dtype)
    dtype = profile.dtype if profile else args.dtype or "float32"
    if args.model is None:
        from ..assets import default_model_path

        source = default_model_path()
    else:
        source = args.model
    try:
        model, tokenizer = load(source, dtype=dtype)
    except (CheckpointError, ConfigError, TokenizerError, OSError) as err:
        raise UsageError(f"cannot load judge model {source}: {err}") from None
    if tokenizer is None:
        raise UsageError(f"judge model {source} has no tokenizer.json")
    if args.model is None:
        from ..assets import for_this_device

        for_this_device(model)  # the packaged model, as generate runs it (see for_this_device)
    if profile is not None:
        apply_cli_profile(model, profile)
    rows = []
    for record in tqdm(records, desc="judge", unit="text", file=sys.stderr,
                       disable=True if args.no_progress else None):
        keep = {k: v for k, v in record.items() if k != "text"}
        rows.append({**keep, **judge_record(model, tokenizer, record)})
    out.mkdir(parents=True, exist_ok=True)
    # A text with no scored token (empty) has no log-probability: null (JSON has no NaN), empty in the CSV.
    rows = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
    atomic_write_text(targets[0], "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    atomic_write_text(targets[1], ratings_csv(rows))
    print(f"judged {len(rows)} text{'' if len(rows) == 1 else 's'} with {source}: {perplexity_summary(rows)}; "
          f"ratings in {targets[0]} and {targets[1]}", file=sys.stderr)
    return 0
