"""`xlstm-metal convert SRC OUT`: change a checkpoint's dtype and/or quantize it.

    xlstm-metal convert NX-AI/xLSTM-7b xlstm-7b-4bit -q                 # 4-bit, group 64
    xlstm-metal convert ckpt out --dtype bfloat16                       # cast only
    xlstm-metal convert ckpt out -q --q-recipe mixed-4-6 --check val.txt
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..monitor import current_job
from . import UsageError, check_apart_from_data, check_output_path, read_text_file, read_tokenizer

#: Files copied from the source checkout besides the weights, config and tokenizer.json +
#: tokenizer_config.json (save_model writes those two, with the BOS handling other tools need).
COPIED_FILES = (
    "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json",
)

DESCRIPTION = """\
Convert a checkpoint: an xLSTM-Large checkpoint in Hugging Face format (directory or Hugging Face
id), NX-AI's native xLSTMLarge state dict (a directory with config.json and safetensors under
NX-AI's names), or a 2024 xLSTMLMModel directory (config.json or config.yaml). Writes OUT with
config.json, model.safetensors and the source's tokenizer and generation config; it loads with
xlstm_metal.load / load_model and in generate, chat and bench.

-q quantizes the weights (MLX affine quantization, mlx-lm's format: config.json gets a
"quantization" entry, the safetensors hold packed weights with .scales and .biases; --q-mode
mxfp4, mxfp8 or nvfp4 writes MLX's microscaling float formats instead: 4, 8 and 4 bits in groups
of 32, 32 and 16, uint8 scales, no biases, as mlx-lm's convert --q-mode writes them). The input
and forget gate projections stay in float by default (one output per head; they drive
exponential gates). A quantized SRC converted without -q is written dequantized.
"""

EPILOG = """\
recipes (--q-recipe):
  mixed-B-H      B-bit body, embeddings and LM head at H bits (e.g. mixed-4-6, mixed-3-6)
  FILE.json      per-layer overrides: {"bits": 4, "group_size": 64,
                 "backbone.blocks.*.ffn.proj_down": 6, "lm_head": {"bits": 8}, "backbone.embeddings": false}
                 (exact layer paths or glob patterns; the i/f gates stay in float unless a path or a
                 pattern ending in their name says otherwise, or "float_gates": false)

On CPUs MLX's quantized matmul saves memory, not time: measured on a 2-core x86 machine, it took
6.9-8.4x the time of a float32 matmul through OpenBLAS for 7B-sized layers at batch 1, 3.3-3.7x
for small layers, and 70-90x at 512 rows (BENCHMARKS.md); from 16 rows our quantized layers
dequantize and multiply through OpenBLAS instead (1.6-2.6x float32's time at 512 rows). xLSTM-Large models on Linux CPUs decode
and prefill in C instead, reading the packed weights: there a quantized model decodes faster than
float32 (8-bit 1.9x, 4-bit 2.0x at the 125m shape) and prefills as fast. Quantize for Metal and
NVIDIA GPUs, to fit memory, or for xLSTM-Large decode on Linux CPUs. The C code reads affine
weights, and mxfp4 / nvfp4 as affine 8-bit (exactly, from a copy: ~3.4x / 3.7x their memory; about
as fast as 4-bit affine there); mxfp8
runs MLX's quantized graph on CPUs, ~200x slower in a 512-token prefill on that machine.

--check TEXTFILE compares SRC and OUT on that text: perplexity of both, mean KL divergence of the
next-token distributions, top-1 agreement, and greedy agreement over --check-greedy tokens, with
both models' stored weights computed in --check-dtype (on CPUs the result's quantized weights are
dequantized for this: the same products, far faster).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..quantization import BITS, GROUP_SIZES, MODES

    p = subparsers.add_parser(
        "convert", help="convert a checkpoint's dtype, or quantize it (-q)", description=DESCRIPTION,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SRC", help="checkpoint directory or Hugging Face id")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the float weights and of the quantization scales (default: the source's)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, choices=BITS, default=None,
                   help="bits per quantized weight (default: 4, or the recipe's)")
    p.add_argument("--q-group-size", type=int, choices=GROUP_SIZES, default=None,
                   help="weights sharing one scale and bias (default: 64)")
    p.add_argument("--q-mode", choices=tuple(MODES), default=None,
                   help="quantization mode (default: affine; mxfp4, mxfp8 and nvfp4 fix bits and group size)")
    p.add_argument("--q-recipe", metavar="RECIPE", default=None,
                   help="mixed precision: mixed-B-H or a JSON file of per-layer overrides (see below)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (an empty directory or a checkpoint, never the source's parent)")
    p.add_argument("--check", metavar="TEXTFILE", default=None,
                   help="after converting, compare SRC and OUT on this UTF-8 text (see below)")
    p.add_argument("--check-tokens", type=int, default=None,
                   help="use at most this many tokens of TEXTFILE (default: 8192)")
    p.add_argument("--check-greedy", type=int, default=None,
                   help="tokens decoded greedily by both models for --check (default: 256)")
    p.add_argument("--check-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype of both models for --check (default: float32, so the figures "
                        "measure the stored weights, not half-precision arithmetic)")
    p.add_argument("--json", action="store_true",
                   help="print the summary (and the --check figures) as one JSON object on stdout")
    p.set_defaults(func=run)


#: Files that make a directory a checkpoint, one --overwrite may replace.
CHECKPOINT_FILES = ("config.json", "config.yaml", "model.safetensors", "model.safetensors.index.json")
#: What else a checkpoint holds (ours, a training run's, Hugging Face's; names or patterns): a
#: directory holding any other file is no checkpoint that --overwrite may replace.
CHECKPOINT_CONTENTS = (
    *CHECKPOINT_FILES, *COPIED_FILES, "tokenizer.json", "tokenizer_config.json", "xlstm_mlx_lm.py",
    "trainer_state.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
    "pytorch_model.bin.index.json", "README.md", "LICENSE", ".gitattributes", ".DS_Store",
)


# ------------------------------------------------------------------------------ checks
def _check_output(out: Path, source_dir: Path | None, overwrite: bool) -> None:
    """OUT may be written: apart from the source checkpoint (not it, not inside it, not holding
    it), and absent, or with --overwrite an empty directory or a checkpoint (the whole directory
    is replaced, so never one holding subdirectories or other files without a checkpoint)."""
    if source_dir is not None:
        check_apart_from_data((("OUT", out),), [source_dir], replaced=("OUT",), data="the source checkpoint",
                              read_back="the result would be written into the checkpoint it converts")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UsageError(f"OUT {out} exists and is not a directory")
        if not overwrite:
            raise UsageError(f"OUT {out} already exists; pass --overwrite to replace it")
        entries = sorted(out.iterdir())
        # Subdirectories and files no checkpoint holds (a checkpoint with the user's notes, or
        # the --check text or --q-recipe of this very run, which were deleted with it).
        foreign = [p.name + ("/" if p.is_dir() else "") for p in entries
                   if not p.is_file() or not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in CHECKPOINT_CONTENTS)]
        if foreign or (entries and not any((out / name).is_file() for name in CHECKPOINT_FILES)):
            shown = foreign or [p.name for p in entries]
            raise UsageError(
                f"OUT {out} is not a checkpoint directory (it holds {', '.join(shown[:5])}"
                f"{', ...' if len(shown) > 5 else ''}); --overwrite replaces only a checkpoint (config.json, "
                f"weights, tokenizer: no subdirectories or other files): remove it yourself or choose another OUT"
            )
    check_output_path(out, "OUT", directory=True)


#: --check's options when left out.
CHECK_DEFAULTS = {"check_tokens": 8192, "check_greedy": 256, "check_dtype": "float32"}


def _read_check_ids(args: argparse.Namespace, source_dir: Path, vocab_size: Any = None) -> list[int] | None:
    """The --check text's token ids (first --check-tokens), read before any work is done;
    ``vocab_size``: the source config's, which the tokenizer must fit."""
    from ..loading import CheckpointError, check_tokenizer_fits

    if args.check is None:
        for flag in CHECK_DEFAULTS:  # given, even at its default value, they would be ignored
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} needs --check TEXTFILE")
        return None
    for flag, default in CHECK_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    if args.check_tokens < 2:
        raise UsageError(f"--check-tokens must be at least 2, got {args.check_tokens}")
    if args.check_greedy < 1:
        raise UsageError(f"--check-greedy must be positive, got {args.check_greedy}")
    tokenizer = read_tokenizer(source_dir, "--check",
                               missing=f"--check needs a tokenizer, and {source_dir} has no tokenizer.json")
    try:  # ids beyond the embedding gave figures of garbage (a lossless copy: perplexity -14%, top-1 21%)
        check_tokenizer_fits(tokenizer, vocab_size, source_dir)
    except CheckpointError as err:
        raise UsageError(f"--check: {err}") from None
    # Only the text the ids need (a whole 37 MB file took 81 s, 7.4 GB); 64 more ids: the cut is past them
    chars = 16 * args.check_tokens
    while True:
        text = _read_prefix(args.check, chars)
        ids = tokenizer.encode(text)
        if len(ids) > args.check_tokens + 64 or len(text) < chars:
            break
        chars *= 4
    ids = ids[: args.check_tokens]
    if len(ids) < 2:
        raise UsageError(f"--check file {args.check} holds fewer than 2 tokens")
    return ids


def _read_prefix(path: str, chars: int) -> str:
    try:
        with open(Path(path).expanduser(), encoding="utf-8") as handle:
            return handle.read(chars)
    except UnicodeDecodeError as err:
        raise UsageError(f"--check file {path} is not UTF-8 text: {err}") from None
    except OSError:
        return read_text_file(path, "--check file")


def _check_tokenizer(source_dir: Path):
    """The tokenizer written to OUT with the weights (tokenizer.json, tokenizer_config.json,
    generation_config.json) must be readable: checked before the model is loaded, converted and
    quantized, not when it is written (UsageError naming the file). Returns it (None: none)."""
    return read_tokenizer(source_dir, f"cannot read the tokenizer of SRC {source_dir}")


def _keep_bos_insertion(model, source_config: dict[str, Any], source_dir: Path, tokenizer) -> None:
    """OUT's prompts start with BOS exactly when SRC's do. A config.json without
    ``force_bos_token_insert`` (transformers' own xLSTMConfig and NX-AI's native xLSTMLarge
    config have no such field) leaves BOS to the tokenizer, but the loaded model's config takes
    the field's default (true) and save_model writes it, with a tokenizer that inserts BOS: the
    converted checkpoint then encoded every prompt with one more token than its source, in
    xlstm-metal, mlx-lm and transformers' AutoTokenizer alike, and generated other text."""
    config = getattr(model, "config", None)
    if not hasattr(config, "force_bos_token_insert") or "force_bos_token_insert" in source_config:
        return
    if tokenizer is not None:
        config.force_bos_token_insert = tokenizer.add_bos
        return
    from ..jsonfiles import read_json_object

    tok_config_path = source_dir / "tokenizer_config.json"
    try:
        tok_config = read_json_object(tok_config_path, ValueError) if tok_config_path.is_file() else {}
    except ValueError:
        tok_config = {}
    config.force_bos_token_insert = tok_config.get("add_bos_token") is True


def _recipe(args: argparse.Namespace):
    from ..quantization import QuantizationError, make_recipe

    given = [f for f, v in (("--q-bits", args.q_bits), ("--q-group-size", args.q_group_size),
                            ("--q-mode", args.q_mode), ("--q-recipe", args.q_recipe)) if v is not None]
    if not args.quantize:
        if given:
            raise UsageError(f"{', '.join(given)} only apply with -q/--quantize")
        return None
    try:
        return make_recipe(args.q_recipe, args.q_bits, args.q_group_size, args.q_mode)
    except QuantizationError as err:
        raise UsageError(str(err)) from None


# ------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..loading import CheckpointError, load_model, read_config_dict, resolve_model_path
    from ..quantization import (
        QuantizationError, bits_per_weight, dequantize_model, describe, parameter_count, quantization_config,
        quantize_model,
    )
    from ..training.checkpoint import save_model_recording_warnings

    out = Path(args.out).expanduser()
    local = Path(args.source).expanduser()
    _check_output(out, local if local.is_dir() else None, args.overwrite)  # before a download
    recipe = _recipe(args)
    try:
        source_dir = resolve_model_path(args.source)
        source_config = read_config_dict(source_dir)  # a directory without config fails here, before loading
    except CheckpointError as err:
        raise UsageError(f"cannot read SRC {args.source}: {err}") from None
    _check_output(out, source_dir, args.overwrite)
    source_tokenizer = _check_tokenizer(source_dir)
    check_ids = _read_check_ids(args, source_dir, source_config.get("vocab_size"))

    print(f"reading {source_dir}", file=sys.stderr)
    # A quantized source is read as stored and dequantized before --dtype casts it (casting its
    # scales and biases first rounds them: every weight then carries their error); a float one
    # is cast as it is read (peak memory: the result's size).
    quantized_source = isinstance(source_config.get("quantization", source_config.get("quantization_config")), dict)
    try:
        model = load_model(source_dir, dtype=None if quantized_source else args.dtype)
    except CheckpointError as err:
        raise UsageError(f"cannot load SRC {args.source}: {err}") from None
    _keep_bos_insertion(model, source_config, source_dir, source_tokenizer)
    source_bpw = bits_per_weight(model) if args.dtype is None or quantized_source \
        else _stored_bits_per_weight(source_dir, model)
    if quantization_config(model) is not None:
        print("the source is quantized: dequantizing" + (" (quantizing again adds error)" if recipe else ""),
              file=sys.stderr)
        dequantize_model(model)
        if args.dtype is not None:
            import mlx.core as mx

            model.set_dtype(getattr(mx, args.dtype))
    if recipe is not None:
        from ..quantization import plan

        try:
            decisions = plan(model, recipe)
            todo = sum(1 for v in decisions.values() if v is not False)
            _warn_kept_by_width(model, recipe, decisions, todo)
            with tqdm(total=todo, desc="quantizing", unit="layer", file=sys.stderr, disable=None) as bar:
                quantize_model(model, recipe=recipe, progress=lambda path: _layer_done(bar, out))
        except QuantizationError as err:
            raise UsageError(str(err)) from None

    from mlx.utils import tree_flatten

    from ..loading import non_finite_tensors

    # A quantized SRC's weights or new scales past float16's range: OUT was written, and no loader took it
    bad = non_finite_tensors(dict(tree_flatten(model.parameters())))
    if bad:
        raise UsageError(f"the result would hold NaN or infinite values in {', '.join(bad[:3])}: --dtype "
                         f"{args.dtype} cannot hold them; nothing was written")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.convert-"))
    try:
        print(f"writing {out}", file=sys.stderr)
        current_job().update(phase="save")
        tokenizer_source = source_dir if (source_dir / "tokenizer.json").is_file() else None
        caught = save_model_recording_warnings(model, tmp, tokenizer=tokenizer_source, overwrite=True)
        # Without tokenizer.json (a slow tokenizer: vocab.json + merges.txt, tokenizer.model)
        # save_model writes no tokenizer_config.json: the source's is copied as it is.
        copied = COPIED_FILES if tokenizer_source is not None else (*COPIED_FILES, "tokenizer_config.json")
        for name in copied:
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, tmp / name)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # save_model's warnings (e.g. a shape transformers cannot run) named the temporary folder, gone
    # now, and came as raw Python warnings with a line of this file: one line each, naming OUT.
    for warning in caught:
        print(f"warning: {str(warning.message).replace(str(tmp), str(out))}", file=sys.stderr)

    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    quantization = quantization_config(model)
    summary: dict[str, Any] = {
        "source": str(args.source), "out": str(out), "dtype": _dtype_name(model),
        "bits": None if quantization is None else quantization["bits"],
        "group_size": None if quantization is None else quantization["group_size"],
        "mode": None if quantization is None else quantization.get("mode", "affine"),
        "recipe": None if recipe is None else recipe.name, "parameters": parameter_count(model),
        "weight_bytes": size, "bits_per_weight": bits_per_weight(model), "source_bits_per_weight": source_bpw,
    }
    what = "float" if quantization is None else (
        describe(quantization) + (f", recipe {recipe.name}" if recipe is not None and recipe.name != "uniform" else ""))
    if not args.json:
        print(f"wrote {out}: {what}, {summary['dtype']} float weights, {summary['parameters'] / 1e6:.2f}M "
              f"parameters, {size / 1e6:.2f} MB, {summary['bits_per_weight']:.2f} bits per weight "
              f"(source: {source_bpw:.2f})")
    if check_ids is not None:
        del model
        summary["check"] = _run_check(source_dir, out, check_ids, args)
        if not args.json:
            print(format_check(summary["check"], args.check))
    if args.json:
        print(json.dumps(summary))
    return 0


def _warn_kept_by_width(model, recipe, decisions: dict[str, Any], todo: int) -> None:
    """-q names the layers its group size cannot quantize (input width not a multiple of it):
    they stayed in float without a word (a 2024 model of width 32 at the default group 64: its
    embedding, LM head and up projections, 26.6 bits per weight), as `xlstm-metal mlx-lm convert`
    already says. (None at all is quantize_model's error.)"""
    from ..quantization import _get_module

    if not todo:
        return
    left = sorted(path for path, params in decisions.items()
                  if params is False and recipe.kept_by_width(path, _get_module(model, path)))
    if left:
        stay = "layers stay" if len(left) > 1 else "layer stays"
        print(f"warning: {len(left)} {stay} in float (input width not a multiple of the group size; a smaller "
              f"--q-group-size quantizes them): {', '.join(left[:4])}{', ...' if len(left) > 4 else ''}",
              file=sys.stderr)


def _stored_bits_per_weight(source_dir: Path, model) -> float:
    """Bits per weight as SRC stores them: ``--dtype`` already changed the loaded model's
    (safetensors tensors load lazily, so this reads headers, not weights)."""
    from mlx.utils import tree_flatten

    from ..loading import read_weights
    from ..quantization import bits_per_weight

    weights = read_weights(source_dir)
    if "lm_head.weight" not in dict(tree_flatten(model.parameters())):
        # A tied LM head stored for transformers (our checkpoints) or listed twice (NX-AI's
        # state dicts) is the embedding: the loaded model drops it and counts it once.
        weights.pop("lm_head.weight", None)
    return bits_per_weight(model, sum(v.nbytes for v in weights.values()))


def _layer_done(bar, out: Path) -> None:
    """One layer quantized: progress bar, `top`'s status record, and a memory-watchdog safe
    point (at the hard limit the command stops here; OUT is not touched)."""
    bar.update(1)
    job = current_job()
    job.update(phase="quantize", done=bar.n, total=bar.total, unit="layers")
    job.check(note=f"nothing was written to {out}")


def _dtype_name(model) -> str:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    dtypes = {v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}
    return "/".join(sorted(str(d).removeprefix("mlx.core.") for d in dtypes)) or "no"


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is removed only afterwards."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _run_check(source_dir: Path, out: Path, ids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from ..loading import load_model
    from ..quantization import fidelity

    import mlx.core as mx

    from ..quantization import dequantize_model

    reference = load_model(source_dir, dtype=args.check_dtype)
    candidate = load_model(out, dtype=args.check_dtype)
    if mx.default_device() == mx.cpu:
        # Same weights, same products to float round-off; MLX's CPU quantized matmul takes 15-200x
        # float32's time over a text's many rows (BENCHMARKS.md), and in bf16 it is ~10x less
        # accurate than a bf16 float matmul: a quantized SRC is dequantized too, so both sides
        # measure their stored weights with the same arithmetic.
        dequantize_model(reference)
        dequantize_model(candidate)
    total = len(ids) - 1 + 2 * args.check_greedy
    job = current_job()  # `xlstm-metal top` shows the check's progress
    job.update(phase="check", done=0, total=total, unit="tokens", tokens=0)
    with tqdm(total=total, desc="checking", unit="tok", file=sys.stderr, disable=None) as bar:
        def progress(n: int) -> None:
            bar.update(n)
            job.update(done=bar.n, tokens=bar.n)
            job.check(note=f"{out} is written; the check did not finish")
        return fidelity(reference, candidate, ids, greedy_tokens=args.check_greedy, progress=progress)


def format_check(result: dict[str, Any], text_name: str) -> str:
    """The --check table."""
    change = result["ppl_candidate"] / result["ppl_reference"] - 1
    n = result["greedy_tokens"]
    return "\n".join([
        f"check on {text_name} ({result['tokens']} predicted tokens):",
        f"  perplexity  source {result['ppl_reference']:.4f}   result {result['ppl_candidate']:.4f}   "
        f"({change:+.2%})",
        f"  mean KL(source || result)  {result['kl']:.5f} nats/token",
        f"  top-1 agreement            {result['top1']:.2%}",
        f"  greedy agreement           {result['greedy_agree']}/{n} tokens "
        f"(identical for the first {result['greedy_prefix']})",
    ])
