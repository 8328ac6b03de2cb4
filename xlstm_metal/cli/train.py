"""`xlstm-metal train`: train or fine-tune an xLSTM language model on text.

    xlstm-metal train DATA... --out runs/my-model [--config preset|config.json | --init-from CKPT]
                      [--tokenizer tokenizer.json | --vocab-size 4096] [--steps N | --max-time S]

DATA are text files, directories of them, or JSON Lines files (``.jsonl``, ``.ndjson``;
``--text-field``). Without --tokenizer a byte-level BPE is trained on the data's documents (the
validation split's too). The run directory gets ``checkpoint-<step>/`` (Hugging Face format + optimizer/data state), ``metrics.jsonl``,
``loss.png`` and, with --export, the model with the best validation loss.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..jsonfiles import read_json_object
from . import (
    UsageError, check_apart_from_data, check_kept_by_overwrite, check_output_path, check_text_field, check_vocab_size,
    finite_float, seed_value,
)
from .profile import add_profile_argument, apply_training_profile, profile_from_args

#: Named model configs (xLSTM-Large fields); vocab_size comes from the tokenizer when absent.
PRESETS: dict[str, dict] = {
    # For tests and smoke runs: trains in seconds on a CPU.
    "tiny": dict(embedding_dim=64, num_heads=2, num_blocks=2, chunk_size=16),
    # The previous default model (~4.3M parameters with a 4096-token vocabulary).
    "pydoc-4m": dict(embedding_dim=256, num_heads=4, num_blocks=4, tie_word_embeddings=True, chunk_size=64),
    # The shipped default model (~15M parameters; shipped quantized, see MODEL_CARD.md).
    "pydoc-15m": dict(embedding_dim=512, num_heads=4, num_blocks=4, tie_word_embeddings=True, chunk_size=64),
    # GPT-2-small-like width and depth (~125M parameters with a 50k vocabulary).
    "xlstm-125m": dict(embedding_dim=768, num_heads=4, num_blocks=12, chunk_size=64),
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train or fine-tune a model on text", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", nargs="*", help="text files, directories, or JSON Lines files (.jsonl, .ndjson; or .json) (default on --resume: the run's data)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, loss.png)")
    src = p.add_argument_group("model")
    src.add_argument("--config", default=None,
                     help=f"config JSON (xLSTM-Large fields) or a preset: {', '.join(PRESETS)} (default: tiny)")
    src.add_argument("--init-from", default=None, metavar="CKPT",
                     help="fine-tune this checkpoint directory ('default': the packaged model)")
    src.add_argument("--arch", default=None, metavar="SPEC", help="an architecture-lab model instead: shipped arch "
                     "name or YAML/JSON arch / wiring spec (width: its embedding_dim, default 128)")
    src.add_argument("--kernel", default=None,
                     help="mLSTM kernel for training (default: the --config's chunkwise_kernel where it names one "
                          "of ours, else chunkwise_fused on CUDA GPUs, its fused kernels with their own backward, and "
                          "chunkwise elsewhere; NX-AI's names, e.g. chunkwise--triton_xl_chunk, take that default)")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", default=None, help="tokenizer.json (or its directory); default: the checkpoint's, or train a BPE")
    tok.add_argument("--vocab-size", type=int, help="vocabulary of a BPE trained here (default 4096)")
    d = p.add_argument_group("data")
    d.add_argument("--text-field", help="field of JSON Lines records holding the text (default: text)")
    d.add_argument("--val-fraction", type=finite_float, help="held-out fraction of the tokens (default 0.02); 0: no "
                   "validation split (all data trains; no validation loss, --export writes the last model)")
    d.add_argument("--seq-len", type=int, help="tokens per training sequence (default 512)")
    d.add_argument("--batch-size", type=int, help="sequences per step (default 16)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default 1000 unless --max-time); with --resume: the new total, which "
                        "extends the run (the cosine restarts at the checkpoint's step from its learning rate)")
    o.add_argument("--max-time", type=finite_float, default=None, metavar="SECONDS",
                   help="train for this long: the step count is sized from measured step time, evaluations "
                        "and checkpoint saves (one save is timed first, into a temporary directory)")
    o.add_argument("--lr", type=finite_float, help="peak learning rate (default 1e-3); with --resume: the rate the "
                                            "cosine restarts from at the checkpoint's step")
    o.add_argument("--min-lr-ratio", type=finite_float, help="the cosine ends at lr * this (default 0.1)")
    o.add_argument("--warmup", type=int, help="linear warmup steps (default min(100, steps / 10); with --max-time, "
                                              "max(min(44, steps / 2), min(100, steps / 10)) of the step count the "
                                              "time budget allows, and past the steps that measured it)")
    o.add_argument("--weight-decay", type=finite_float, help="AdamW weight decay of matrices (default 0.1)")
    o.add_argument("--grad-clip", type=finite_float, help="global gradient-norm clip, 0 = off (default 1.0)")
    o.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (weights stay float32; default float32); use float32 on CPUs")
    o.add_argument("--seed", type=seed_value, help="seed of initialisation, data order and sampling (default 0)")
    o.add_argument("--recompute", choices=["none", "head", "mlstm", "ffn", "blocks"],
                   help="recompute activations in the backward pass instead of keeping them (same losses, less "
                        "memory, more compute): the LM head and loss; with them the mLSTM or the FFN half of "
                        "every block (2024 xLSTM: the mLSTM/sLSTM layer or the sLSTM blocks' FFN); or whole "
                        "blocks (~1/3 more compute); default none")
    o.add_argument("--head-loss", choices=["plain", "fused"], default=None,
                   help="LM head + cross-entropy: fused computes their gradients in the forward, a block of "
                        "tokens at a time, and keeps no logits for the backward (less memory; xLSTM-Large "
                        "without --recompute); default: " + _DEFAULT_NOTE)
    o.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=None,
                   help="run the projections that read one input (q|k|v|o|i|f, the FFN's gate|up) as one matmul "
                        "each in the compiled step (the same math); default: " + _DEFAULT_NOTE)
    o.add_argument("--mlstm-products", choices=["float32", "bf16"], default=None,
                   help="how the fused CUDA mLSTM kernels multiply their float32 operands (states, weighted keys, "
                        "score matrices): float32 (three bf16 terms each, float32's precision) or bf16 (rounded "
                        "to bf16, as NX-AI's Triton kernels do; fewer products); default: "
                        + _PRODUCTS_NOTE)
    add_profile_argument(o)
    r = p.add_argument_group("run")
    r.add_argument("--eval-every", type=int, help="steps between validation passes (default 200)")
    r.add_argument("--eval-batches", type=int, help="validation batches per pass (default 16)")
    r.add_argument("--save-every", type=int, help="steps between checkpoints (default 500)")
    r.add_argument("--keep", type=int, help="newest checkpoints kept (default 2; 0 keeps all); the one with the "
                   "best validation loss is kept as well")
    r.add_argument("--log-every", type=int, help="steps between metrics.jsonl records (default 10)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint with its saved settings and data "
                        f"paths; {', '.join(map(_flag, RESUME_CHANGEABLE))} may change (and --export, "
                        "--export-dtype, --no-progress, --memory-limit apply to this session), the other settings "
                        "of the run may not")
    r.add_argument("--overwrite", action="store_true", help="allow a non-empty --out for a new run")
    r.add_argument("--export", default=None, metavar="DIR",
                   help="write the best-validation model (+ tokenizer, generation_config.json: the --init-from "
                        "model's, else sampling at 0.8) here (--resume: a finished run's, no training)")
    r.add_argument("--export-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the --export weights (default float32)")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--memory-limit", type=finite_float, default=None, metavar="GB",
                   help="MLX's memory limit for this process (mx.set_memory_limit): past it, evaluation waits "
                        "for the GPU to finish queued work, whose inputs MLX keeps until then (GPU back-ends "
                        "run up to 10 command buffers ahead). Lowers the peak, may cost speed; not saved with "
                        "the run")
    p.set_defaults(func=run)


#: Defaults of the settings a run saves: applied to a new run; a resumed run keeps its own.
RUN_DEFAULTS: dict = dict(vocab_size=4096, text_field="text", val_fraction=0.02, seq_len=512, batch_size=16, lr=1e-3,
                          min_lr_ratio=0.1, warmup=None, weight_decay=0.1, grad_clip=1.0, dtype="float32", seed=0,
                          eval_every=200, eval_batches=16, save_every=500, keep=2, log_every=10, recompute="none")
#: Settings --resume may change (the schedule is extended / re-rated: TrainingConfig.reschedule_*).
RESUME_CHANGEABLE = ("steps", "lr", "eval_every", "save_every", "keep", "log_every", "kernel", "recompute",
                     "head_loss", "fuse_projections", "mlstm_products")
#: Settings fixed by the run being resumed: giving one with --resume is an error naming it.
RESUME_FIXED = ("config", "init_from", "arch", "tokenizer", "vocab_size", "text_field", "val_fraction", "seq_len",
                "batch_size", "max_time", "min_lr_ratio", "warmup", "weight_decay", "grad_clip", "dtype", "seed",
                "eval_batches")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


#: Files of a run in --out that a new run given --overwrite deletes (with every checkpoint-*).
OVERWRITTEN = ("metrics.jsonl", "loss.png", "summary.json")


def _check_output_paths(out: Path, export: Path | None, resume: bool, overwrite: bool, sources=()) -> None:
    """Every output path is usable before any work starts (UsageError naming it otherwise); no
    input among ``sources`` (``(flag, path)``: --init-from, --tokenizer) is a file that a new
    run's --overwrite deletes from --out."""
    for flag, path in (("--out", out), ("--export", export)):
        if path is not None:
            check_output_path(path, flag, directory=True)
    if not resume and out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} is not empty; use --resume to continue that run or --overwrite")
    if not resume and overwrite and out.is_dir():
        for name in OVERWRITTEN:  # the run's own files: a directory of that name is the user's (it was deleted)
            if (out / name).is_dir():
                raise UsageError(f"--out {out} holds a directory {out / name}, where the run writes its file "
                                 f"{name}; --overwrite replaces only the run's own files: move it, or use "
                                 "another --out")
        check_kept_by_overwrite(out, sources, lambda name: name.startswith("checkpoint-") or name in OVERWRITTEN,
                                where="the run directory --out", new="the new run")
    if export is not None:
        out_abs, export_abs = out.resolve(), export.resolve()
        if export_abs == out_abs or export_abs in out_abs.parents:
            raise UsageError(f"--export {export} would replace the run directory --out {out}; export elsewhere")
        # A checkpoint-* (or metrics/summary) name in --out is the run's own: the trainer writes it,
        # prunes it, --resume reads it (the export replaced a checkpoint, or failed after training).
        if out_abs in export_abs.parents:
            top = export_abs.relative_to(out_abs).parts[0]
            if top.startswith("checkpoint-") or top in OVERWRITTEN:
                raise UsageError(f"--export {export} writes into {top}, a file of the run in --out {out}; "
                                 "export elsewhere")
        if export.exists() and any(export.iterdir()) and not overwrite:
            raise UsageError(f"--export directory {export} is not empty; pass --overwrite to replace it")


def _check_flag_combinations(args) -> tuple[dict | None, dict | None]:
    """Flags that would have no effect with the others given: UsageError naming them (before
    any work), never silently ignored; so are settings that would fail only once the model is
    built. Returns the --arch architecture and the --config fields, each read here, once (None
    where not given, and on --resume)."""
    if args.export_dtype is not None and not args.export:
        raise UsageError("--export-dtype sets the dtype of the --export DIR model; give --export DIR too")
    check_vocab_size(args.vocab_size, f"--tokenizer {args.tokenizer}" if args.tokenizer
                     else f"--init-from {args.init_from}" if args.init_from else None)
    if args.arch and args.kernel is not None:
        raise UsageError(f"--kernel sets the mLSTM kernel of xLSTM models; --arch {args.arch} names each "
                         "cell's kernel in its spec: leave out --kernel or set it there")
    if args.arch and args.profile and not args.resume:  # (it failed only after a BPE tokenizer was trained)
        raise UsageError(f"--profile sets the numerics of xLSTM models; --arch {args.arch} builds an "
                         "architecture-lab model, which takes no profile: leave out --profile")
    if args.head_loss == "fused" and args.recompute not in (None, "none"):
        raise UsageError(f"--head-loss fused keeps no logits by computing the head's gradients in the forward; "
                         f"--recompute {args.recompute} recomputes the forward in the backward pass, so the step "
                         "would take the plain head: leave out one of them")
    if args.resume and args.overwrite and not args.export:
        raise UsageError(f"--resume continues the run in --out {args.out}; --overwrite (which lets a new run replace "
                         "it, or the run replace a non-empty --export DIR) would be ignored: give one")
    check_text_field(args.text_field, args.data, "the data")
    # Settings that fail only once the model is built are checked now, not after the data is read
    # and a BPE tokenizer trained on it.
    if args.kernel is not None:
        from ..kernels import resolve_kernel_name

        try:
            resolve_kernel_name(args.kernel)
        except KeyError as err:
            raise UsageError(f"--kernel: {err.args[0]}") from None
    config = None
    if args.config is not None and not args.resume:
        try:
            config = _config_dict(args.config)  # the model is built from this (the file is read once)
        except UsageError as err:
            raise UsageError(str(err) if str(err).startswith("--config") else f"--config {args.config}: {err}") \
                from None
        _config_kernel(args, config)
        _check_config_fields(args, config)
    if args.arch and not args.resume:  # a bad spec fails now, not after the data is read and a BPE trained
        from ..lab import WiringError
        from ..lab.library import load_arch

        try:
            return load_arch(args.arch), config  # the model is built from this (the file is read once)
        except WiringError as err:
            raise UsageError(f"--arch {args.arch}: {err}") from None
    return None, config


# ------------------------------------------------------------------------------ helpers
def _warn_no_validation(args, why: str) -> None:
    """--eval-every / --eval-batches size validation passes; without a validation split (``why``)
    none run: given, they are named in a warning (never dropped without a word)."""
    given = [flag for flag, value in (("--eval-every", args.eval_every), ("--eval-batches", args.eval_batches))
             if value is not None]
    if given:
        print(f"warning: {' and '.join(given)} {'have' if len(given) > 1 else 'has'} no effect: {why} leaves no "
              "validation split, so no validation pass runs", file=sys.stderr)


def _warn_few_eval_batches(cfg, val_tokens: int) -> None:
    """--eval-batches N given, and the validation split holds fewer batches (each pass reads the
    split's windows, at most N batches of them): a warning says how many a pass reads."""
    windows = max(0, (val_tokens - 1) // cfg.seq_len)
    batches = math.ceil(windows / cfg.batch_size)
    if 0 < batches < cfg.eval_batches:
        print(f"warning: --eval-batches {cfg.eval_batches}: the validation split ({val_tokens:,} tokens) holds "
              f"{windows} window{'s' if windows > 1 else ''} of {cfg.seq_len + 1} tokens: {batches} "
              f"batch{'es' if batches > 1 else ''} of --batch-size {cfg.batch_size}, which each validation pass "
              "reads (fewer than asked)", file=sys.stderr)


def _config_kernel(args, config: dict) -> None:
    """The --config's ``chunkwise_kernel`` (xLSTM-Large): an unknown name is a UsageError (it was
    replaced by the training kernel without a word); one of our kernels' names trains with that
    kernel where --kernel is not given. NX-AI's names (their Triton kernels) take the default."""
    from ..kernels import available_mlstm_kernels, resolve_kernel_name

    name = config.get("chunkwise_kernel")
    if name is None:
        return
    try:
        resolve_kernel_name(str(name))
    except KeyError as err:
        raise UsageError(f"--config {args.config}: chunkwise_kernel: {err.args[0]}") from None
    if args.kernel is None and name in available_mlstm_kernels():
        args.kernel = name


def _check_config_fields(args, config: dict) -> None:
    """An xLSTM-Large --config that cannot describe a model (an unknown field, a bad value) fails
    now, not once the data is read and a BPE tokenizer trained on it; a vocab_size left out is
    the tokenizer's, which is not known yet (any will do for the check)."""
    from ..config import xLSTMConfig
    from ..config_2024 import is_xlstm_2024_config

    _check_config_vocab(args, config)
    if is_xlstm_2024_config(config):
        return
    try:
        xLSTMConfig.from_dict({"vocab_size": 64, **config,
                               "chunkwise_kernel": args.kernel or default_training_kernel()})
    except (ValueError, TypeError, KeyError) as err:  # ConfigError is a ValueError
        raise UsageError(f"--config {args.config}: bad model config: {err}") from None


def _check_config_vocab(args, config: dict) -> None:
    """A --config vocab_size too small for the BPE tokenizer trained here (no --tokenizer): below
    MIN_BPE_VOCAB (the bytes and special tokens alone), or below the --vocab-size given, is a
    UsageError now, not once the tokenizer is trained. (Below the default 4096, the trained
    vocabulary may still fit: small data merges fewer tokens.)"""
    from ..config_2024 import is_xlstm_2024_config
    from ..training.data import MIN_BPE_VOCAB

    if args.tokenizer is not None or args.init_from:
        return
    section = config
    if is_xlstm_2024_config(config) and isinstance(config.get("model"), dict) and "vocab_size" not in config:
        section = config["model"]  # (as _build_model reads it)
    vocab = section.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab == -1:
        return  # left out (-1: NX-AI's "unset"): the tokenizer's; a bad value is the config check's
    if args.vocab_size is not None and vocab < args.vocab_size:
        smaller = f"give a --vocab-size of at most {vocab}, or " if vocab >= MIN_BPE_VOCAB else ""
        raise UsageError(f"--config {args.config}: the model's vocab_size ({vocab}) is smaller than the tokenizer's "
                         f"vocabulary (--vocab-size {args.vocab_size}, a BPE trained here): token ids would fall "
                         f"outside the embedding; {smaller}raise vocab_size in the config to {args.vocab_size}")
    if vocab < MIN_BPE_VOCAB:
        raise UsageError(f"--config {args.config}: the model's vocab_size ({vocab}) is smaller than any BPE "
                         f"tokenizer trained here (>= {MIN_BPE_VOCAB}: 256 bytes + special tokens): raise vocab_size, "
                         "leave it out (the tokenizer's is taken), or give --tokenizer")


def _config_dict(spec: str) -> dict:
    path = Path(spec).expanduser()
    # A preset name wins over a directory of that name (a run called `tiny` in the working
    # directory); a file of that name is read, so a config.json can still be called `tiny`.
    if path.suffix == ".json" or path.is_file() or (path.exists() and spec not in PRESETS):
        return read_json_object(path, UsageError)
    if spec in PRESETS:
        return dict(PRESETS[spec])
    raise UsageError(f"--config {spec!r} is neither a JSON file nor a preset ({', '.join(PRESETS)})")


def _build_model(config: dict, kernel: str, seed: int, vocab: int):
    """A freshly initialised model from a config dict: xLSTM-Large fields, or NX-AI's nested
    2024 xLSTM config (mlstm_block / slstm_block / slstm_at; NX-AI's init). A missing
    vocab_size becomes the tokenizer's vocabulary rounded up to a multiple of 64."""
    from ..config import ConfigError, xLSTMConfig
    from ..config_2024 import is_xlstm_2024_config
    from ..models.xlstm_2024 import model_from_config

    padded_vocab = int(math.ceil(vocab / 64) * 64)
    try:
        if is_xlstm_2024_config(config):
            section = config["model"] if isinstance(config.get("model"), dict) and "vocab_size" not in config else config
            if section.get("vocab_size") in (None, -1):
                section["vocab_size"] = padded_vocab
            return model_from_config(section, seed=seed, mlstm_kernel=kernel,
                                     chunk_size=int(section.get("chunk_size", 64)))
        from ..models.xlstm_large import xLSTMLarge
        from ..training.trainer import init_xlstm_large

        config.setdefault("vocab_size", padded_vocab)
        model = xLSTMLarge(xLSTMConfig.from_dict({**config, "chunkwise_kernel": kernel}))
    except (ConfigError, TypeError, KeyError) as err:
        raise UsageError(f"bad model config: {err}") from None
    init_xlstm_large(model, seed)
    return model


def _named_tokens(tokenizer_dir: Path | None) -> dict[str, str]:
    """The tokens a tokenizer_config.json in ``tokenizer_dir`` names (``bos_token``,
    ``eos_token``, ``pad_token``, ...: a string, or an AddedToken's fields' ``content``); {}
    where there is none or it cannot be read."""
    path = None if tokenizer_dir is None else tokenizer_dir / "tokenizer_config.json"
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    named = {}
    for key, token in data.items():
        token = token.get("content") if isinstance(token, dict) else token
        if key.endswith("_token") and isinstance(token, str):
            named[key] = token
    return named


def _special_ids(tokenizer, config, tokenizer_dir: Path | None = None, warn: bool = True) -> tuple[int | None, int | None]:
    """BOS / EOS ids wrapped around each document: the tokenizer's <|bos|>/<|eos|> tokens when
    it has them, else those its tokenizer_config.json names (``bos_token`` / ``eos_token``, e.g.
    GPT-2's <|endoftext|>), else the model config's ids where they are special tokens of the
    tokenizer. An id that is an ordinary token (a preset's 0 and 2 are "!" and "#" in GPT-2's
    vocabulary) is not used: the documents go without it, and a warning says so."""
    from ..training.data import BOS_TOKEN, EOS_TOKEN

    named = _named_tokens(tokenizer_dir)
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    ids = []
    for ours, key, config_key in ((BOS_TOKEN, "bos_token", "bos_token_id"), (EOS_TOKEN, "eos_token", "eos_token_id")):
        value = tokenizer.token_to_id(ours)
        if value is None and key in named:
            value = tokenizer.token_to_id(named[key])
        if value is None:
            value = getattr(config, config_key, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int) and value not in special:
                if warn:
                    print(f"xlstm-metal: warning: the model config's {config_key} {value} is the ordinary token "
                          f"{tokenizer.id_to_token(value)!r} of this tokenizer, which has no {key.split('_')[0].upper()} "
                          "token of its own: documents are not wrapped with it", file=sys.stderr)
                value = None
        ids.append(value)
    return ids[0], ids[1]


def _record_special_ids(config, tokenizer, tokenizer_dir: Path, bos: int | None, eos: int | None) -> None:
    """Make the model config name the BOS / EOS ids the documents are wrapped with (see
    :func:`_special_ids`), and a pad id only where it is a special token: the checkpoints and the
    export take their special tokens from it. A preset keeps 0 / 1 / 2, which in a foreign
    tokenizer are ordinary tokens ("!", '"', "#" in GPT-2's): its checkpoints then put "!"
    before every prompt and stopped generation at "#", never at the EOS the model learnt."""
    from ..training.data import PAD_TOKEN

    if hasattr(config, "bos_token_id"):
        config.bos_token_id = bos
    if hasattr(config, "eos_token_id"):
        config.eos_token_id = eos
    if hasattr(config, "force_bos_token_insert"):  # prompts start as the documents did
        config.force_bos_token_insert = bos is not None
    if hasattr(config, "pad_token_id"):
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        pad = config.pad_token_id if config.pad_token_id in special else tokenizer.token_to_id(PAD_TOKEN)
        if pad is None and "pad_token" in (named := _named_tokens(tokenizer_dir)):
            pad = tokenizer.token_to_id(named["pad_token"])
        config.pad_token_id = pad


def _export(model, best_params, out: Path, tokenizer_dir: Path, dtype: str, overwrite: bool,
            generation: dict | None = None) -> Path:
    """Write the best-validation weights as a shippable checkpoint (atomic directory swap). Its
    generation_config.json: ``generation`` (a fine-tuned model's source's: replacing it with ours
    turned a greedy model into one sampling at 0.8) with the model's special ids, else ours."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from ..training.checkpoint import pass_on_save_warnings, save_model_recording_warnings

    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--export directory {out} is not empty; pass --overwrite to replace it")
    out = out.resolve()  # a link's directory is replaced, not the link (rmtree refuses one)
    current = dict(tree_flatten(model.parameters()))
    weights = best_params or current
    target = getattr(mx, dtype)
    model.update(tree_unflatten([(k, v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v)
                                 for k, v in weights.items()]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        caught = save_model_recording_warnings(model, tmp, tokenizer=tokenizer_dir, overwrite=True)
        cfg = model.config
        ids = {"bos_token_id": getattr(cfg, "bos_token_id", None), "eos_token_id": getattr(cfg, "eos_token_id", None),
               "pad_token_id": getattr(cfg, "pad_token_id", None)}
        gen = {**generation, **ids} if generation is not None else {
            **ids, "do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.1,
            "max_new_tokens": 200}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        pass_on_save_warnings(caught, tmp, out, out.parent, None)  # naming --export, not its temporary folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.update(tree_unflatten(list(current.items())))
    return out


# ------------------------------------------------------------------------------ run
def run(args) -> int:
    try:
        return _run(args)
    except RuntimeError as err:
        # Under mlx.launch: a collective of the set-up (rank 0's files and tokenizer, the same
        # start) whose peer died, e.g. of an error only it saw. The training loop names its own
        # step (DistributedError); this one ended in a traceback. Others are raised again.
        from . import peer_lost_exit

        return peer_lost_exit(err, "the run stopped while starting, before training began")
    finally:
        _SCRATCH.end()  # on every exit: the files received from rank 0 (see _Scratch)


def _run(args) -> int:
    import mlx.core as mx  # xlstm_metal's __init__ has preloaded the BLAS by now

    from ..distributed import DistributedError
    from ..loading import CheckpointError, load_model
    from ..training.checkpoint import ResumeError, read_trainer_state
    from ..training.data import (
        DataError,
        atomic_write_text,
        load_documents,
        load_tokenizer_file,
        save_tokenizer,
        split_stream,
        tokenize_documents,
        tokenizer_config_dict,
        train_bpe_tokenizer,
    )
    from ..training.tempdirs import claim_tokenizer_dir, release_tokenizer_dir
    from ..training.trainer import (
        AUTO_WARMUP_CAP,
        Trainer,
        TrainingConfig,
        TrainingDiverged,
        TrainingInterrupted,
        capped_perplexity,
        count_parameters,
        fused_head_weight,
        joined_weight_groups,
        limit_command_buffers,
    )

    limit_command_buffers()  # before anything runs on the GPU (MLX reads the limits once)
    arch, config = _check_flag_combinations(args)
    kernel_given = args.kernel is not None
    if args.kernel is None:
        args.kernel = default_training_kernel()
    if args.memory_limit is not None and not args.memory_limit > 0:
        raise UsageError(f"--memory-limit must be a positive number of GB, got {args.memory_limit:g}")
    out = Path(args.out).expanduser()
    export = Path(args.export).expanduser() if args.export else None
    group, main = _launched_group()
    from ..kernels.fast.step import cuda_available

    if main and args.mlstm_products == "bf16" and not cuda_available():  # (kept for a resume on CUDA)
        print("warning: --mlstm-products bf16 has no effect: no CUDA mLSTM kernels run here", file=sys.stderr)
    # Rank 0 owns --out and --export: it alone checks and writes them.
    sources = [(flag, value) for flag, value in (("--init-from", args.init_from), ("--tokenizer", args.tokenizer))
               if value and not (flag == "--init-from" and value == "default")]
    _from_rank0(group, lambda: _check_output_paths(out, export, args.resume, args.overwrite, sources))
    resume_ckpt = None
    data_paths = list(args.data)
    eval_batches_given = args.eval_batches is not None  # (a new run's: --resume keeps the run's own)
    if args.resume:
        fixed = [_flag(name) for name in RESUME_FIXED if getattr(args, name) is not None]
        if fixed:
            raise UsageError(f"--resume continues the run with its saved settings; {', '.join(fixed)} cannot "
                             f"change (only {', '.join(map(_flag, RESUME_CHANGEABLE))} can): start a new run "
                             "in another --out instead")
        idle = [_flag(n) for n in RESUME_CHANGEABLE[1:] if getattr(args, n) is not None and
                (n != "kernel" or kernel_given)] + ["DATA"] * bool(args.data)
        # Rank 0 finds the checkpoint; ranks without the same files receive a copy.
        resume_ckpt = _from_rank0(group, lambda: _latest(out))
        try:
            saved = read_trainer_state(resume_ckpt)
        except ResumeError as err:
            raise UsageError(str(err)) from None
        if args.profile:
            raise UsageError("--profile applies to a new run; a resumed run keeps its settings")
        profile = None
        # The model keeps the profile's numerics in its config; the process's settings (OpenBLAS
        # threads, float32 GEMMs) come from the profile the run saved: they were lost on --resume.
        saved_profile = _saved_profile(saved, resume_ckpt)
        from ..kernels import available_mlstm_kernels

        if not kernel_given and saved.get("kernel") in available_mlstm_kernels():
            args.kernel = saved["kernel"]  # (the default's numerics differ)
            kernel_given = True
        cfg = TrainingConfig(**saved["training_config"])
        for name in ("eval_every", "save_every", "keep", "log_every", "recompute", "head_loss", "fuse_projections",
                     "mlstm_products"):
            if getattr(args, name) is not None:
                setattr(cfg, name, getattr(args, name))
        if args.head_loss == "fused" and cfg.recompute != "none":  # (the run's saved --recompute)
            raise UsageError(f"--head-loss fused computes the head's gradients in the forward; the run in {out} "
                             f"recomputes the forward in the backward pass (--recompute {cfg.recompute}), so the "
                             "step would take the plain head: leave out --head-loss or give --recompute none")
        step, total = saved["step"], saved["total_steps"]
        if args.steps is not None and args.steps <= step:
            raise UsageError(f"--steps {args.steps} must be greater than the checkpoint's step {step} "
                             f"({resume_ckpt}): it is the run's new total")
        finished = None
        if args.steps is None and total is not None and step >= total and not saved.get("eval_pending", False):
            finished = f"step {step} of {total}"
        elif args.steps is None and cfg.max_time is not None and (
                saved["elapsed"] >= cfg.max_time or saved.get("time_budget_spent", False)):
            finished = f"its --max-time budget of {cfg.max_time:g} s ran out at step {step}"
        if finished and export is None:
            raise UsageError(f"the run in {out} is finished ({finished}); pass --steps N with N > {step} to train "
                             "it further, or --export DIR")
        if finished and idle:
            raise UsageError(f"the run in {out} is finished ({finished}), so --export takes its model as is: "
                             f"{', '.join(idle)} would do nothing")
        saved_data = saved.get("data", [])
        if not isinstance(saved_data, list) or not all(isinstance(p, str) for p in saved_data):
            raise UsageError(f"{resume_ckpt / 'trainer_state.json'}: 'data' must be a list of paths")
        data_paths = data_paths or saved_data
        val_fraction = saved.get("val_fraction", RUN_DEFAULTS["val_fraction"])
        text_field = saved.get("text_field", RUN_DEFAULTS["text_field"])
        generation = saved.get("generation_config")
        if generation is not None and not isinstance(generation, dict):
            raise UsageError(f"{resume_ckpt / 'trainer_state.json'}: 'generation_config' must be an object")
        if finished:
            check_apart_from_data((("--export", export),), saved_data, replaced=("--export",))
            return _export_finished(args, out, export, saved, resume_ckpt, generation) if main else 0
        if val_fraction == 0 and main:
            _warn_no_validation(args, f"the run in {out} (--val-fraction 0)")
    else:
        profile = _profile_from_rank0(group, args)
        if profile is not None and args.dtype is None:
            args.dtype = profile.dtype  # the compute dtype; weights stay float32
        if args.val_fraction == 0 and main:
            _warn_no_validation(args, "--val-fraction 0")
        for name, value in RUN_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        if sum(bool(v) for v in (args.config, args.init_from, args.arch)) > 1:
            raise UsageError("give one of --config / --arch (new model) or --init-from (fine-tuning)")
        steps = args.steps if args.steps is not None else (None if args.max_time else 1000)
        cfg = TrainingConfig(
            seq_len=args.seq_len, batch_size=args.batch_size, steps=steps, max_time=args.max_time, lr=args.lr,
            min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay,
            grad_clip=args.grad_clip, dtype=args.dtype, eval_every=args.eval_every, eval_batches=args.eval_batches,
            save_every=args.save_every, keep=args.keep, log_every=args.log_every, seed=args.seed,
            recompute=args.recompute, **{name: value if getattr(args, name) is None else getattr(args, name)
                                         for name, value in default_step_paths().items()},
        )
        val_fraction, text_field = args.val_fraction, args.text_field
        generation = None
        saved_profile = None if profile is None else profile.to_dict()
    try:  # the messages name the flags
        cfg.validate({f: "--" + f.replace("_", "-") for f in ("batch_size", "eval_every", "eval_batches", "save_every",
                      "log_every", "keep", "steps", "max_time", "warmup", "lr", "min_lr_ratio", "weight_decay",
                      "grad_clip")})
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not 0 <= val_fraction < 1:  # before the data is read and a tokenizer trained
        raise UsageError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if group is not None and cfg.batch_size % group.size():
        raise UsageError(f"the batch size ({cfg.batch_size}) is the global batch and must be divisible by the "
                         f"number of processes ({group.size()})")
    if not data_paths:
        raise UsageError("no training data given")
    # --export is replaced as a whole (under --overwrite); a run leaves other files in --out alone.
    check_apart_from_data((("--out", out), ("--export", export)), data_paths, replaced=("--export",))

    # Everything that can fail on bad input happens before anything is written to --out.
    saved_paths = [str(Path(p).resolve()) for p in data_paths]
    if group is not None:
        data_paths = [_from_rank0(group, lambda p=p: p) for p in data_paths]
    try:
        docs = load_documents(data_paths, text_field)
    except DataError as err:
        raise UsageError(str(err)) from None
    try:
        if resume_ckpt is not None:
            model = load_model(resume_ckpt, dtype="float32")
            tokenizer_src = resume_ckpt
        elif args.init_from:
            if args.init_from == "default":
                from ..assets import default_model_path

                args.init_from = str(default_model_path())
            args.init_from = _from_rank0(group, lambda: args.init_from)
            from ..training.checkpoint import checkpoint_dirs

            found = checkpoint_dirs(args.init_from)  # (load_model named only the missing config.json)
            if found and not any(Path(args.init_from).glob("config.*")):
                raise UsageError(f"--init-from {args.init_from} is a run directory: fine-tune one of its checkpoints, "
                                 f"the newest: --init-from {found[-1]}")
            model = load_model(args.init_from, dtype="float32")
            from ..quantization import dequantize_model, quantization_config

            if quantization_config(model) is not None:
                # Packed weights cannot be trained (nn.QuantizedLinear freezes them): fine-tune the
                # dequantized float32 weights (the packaged default model ships quantized).
                dequantize_model(model)
            tokenizer_src = args.tokenizer or args.init_from
            # The fine-tuned model samples as the one it started from (kept in the run's state,
            # so a resumed run's --export has it too).
            if (Path(args.init_from) / "generation_config.json").is_file():
                generation = read_json_object(Path(args.init_from) / "generation_config.json", UsageError)
        else:
            model = None
            tokenizer_src = args.tokenizer
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    if group is not None and tokenizer_src is not None:
        tokenizer_src = _from_rank0(group, lambda: tokenizer_src)

    # Locked for the run's life; folders of runs killed with SIGKILL (no cleanup) are removed here.
    tok_dir, tok_lock = claim_tokenizer_dir()
    try:
        try:
            if tokenizer_src is not None:
                tokenizer = load_tokenizer_file(tokenizer_src)
                src = Path(tokenizer_src)
                src_dir = src if src.is_dir() else src.parent
                shutil.copyfile(src_dir / "tokenizer.json" if src.is_dir() else src, tok_dir / "tokenizer.json")
                if (src_dir / "tokenizer_config.json").is_file():
                    read_json_object(src_dir / "tokenizer_config.json", DataError)  # copied on: must be sound
                    shutil.copyfile(src_dir / "tokenizer_config.json", tok_dir / "tokenizer_config.json")
            else:
                if main:
                    print(f"training a byte-level BPE tokenizer (vocab {args.vocab_size}) on {len(docs)} documents",
                          file=sys.stderr)
                    # tokenizers draws its progress bars on stdout; piped, they are blank lines.
                    tokenizer = train_bpe_tokenizer((d.text for d in docs), args.vocab_size,
                                                    show_progress=not args.no_progress and sys.stdout.isatty())
                if group is not None:  # one tokenizer for all ranks: rank 0's
                    from tokenizers import Tokenizer

                    from ..distributed import broadcast_bytes

                    text = broadcast_bytes(tokenizer.to_str().encode() if main else None, group)
                    tokenizer = tokenizer if main else Tokenizer.from_str(text.decode())
                save_tokenizer(tokenizer, tok_dir, tokenizer_config_dict(tokenizer))
        except DataError as err:
            raise UsageError(str(err)) from None

        vocab = tokenizer.get_vocab_size()
        if model is None and arch is not None:
            from ..lab import WiringError, training_model

            try:
                model = training_model(arch, vocab, cfg.seed)
            except WiringError as err:
                raise UsageError(f"--arch {args.arch}: {err}") from None
        from_scratch = model is None
        if model is None:
            model = _build_model(config if config is not None else _config_dict("tiny"), args.kernel, cfg.seed, vocab)
        else:
            _set_training_kernel(model, args.kernel)
        if profile is not None:  # numerics of the profile; its gate init for a new model, from --seed
            from ..profiles import init_gates

            apply_training_profile(model, profile, args.kernel, False)
            if from_scratch and not args.arch:
                init_gates(model, profile.init, seed=cfg.seed)
        elif saved_profile is not None:  # --resume: its process settings, where the first run set them
            from ..profiles import apply_process_settings, profile_from_dict

            apply_process_settings(profile_from_dict(saved_profile))
        if args.head_loss == "fused" and fused_head_weight(model) is None:  # the step would take the plain head
            raise UsageError("--head-loss fused needs the LM head as one plain product (xLSTM-Large's unbiased "
                             "lm_head or its tied embeddings); this model's head is not one (a 2024 xLSTM, a lab "
                             "architecture of another layout, or a head with a bias): leave out --head-loss")
        if args.fuse_projections and not joined_weight_groups(model):  # (a no-op without a word)
            raise UsageError("--fuse-projections joins xLSTM-Large's projections; this model has none: leave it out")
        model_vocab = int(model.config.vocab_size)
        if model_vocab < vocab:
            raise UsageError(
                f"the model's vocab_size ({model_vocab}) is smaller than the tokenizer's vocabulary ({vocab}): "
                "token ids would fall outside the embedding; raise vocab_size in the config or use another tokenizer"
            )
        bos, eos = _special_ids(tokenizer, model.config, tok_dir, warn=main)
        for name, value in (("BOS", bos), ("EOS", eos)):
            if value is not None and not 0 <= value < model_vocab:
                raise UsageError(f"{name} token id {value} is outside the model's vocabulary ({model_vocab})")
        _record_special_ids(model.config, tokenizer, tok_dir, bos, eos)

        doc_tokens = tokenize_documents(tokenizer, docs, bos, eos)
        # (ids may skip: a vocab size below the largest id)
        top = max((int(d.max()) for d in doc_tokens if len(d)), default=-1)
        if top >= model_vocab:
            raise UsageError(f"the tokenizer gives token id {top} ({tokenizer.id_to_token(top)!r}), outside the "
                             f"model's vocab_size ({model_vocab}): raise vocab_size or use another tokenizer")
        train_stream, val_stream = split_stream(doc_tokens, val_fraction, cfg.seed)
        if main and eval_batches_given:
            _warn_few_eval_batches(cfg, len(val_stream))
        extra = {"data": saved_paths, "val_fraction": val_fraction, "text_field": text_field,
                 "kernel": args.kernel if kernel_given else None}
        if generation is not None:
            extra["generation_config"] = generation
        if saved_profile is not None:
            extra["profile"] = saved_profile
        if group is not None:
            _same_start(group, model, train_stream, val_stream, cfg)
        if args.memory_limit is not None:
            mx.set_memory_limit(int(args.memory_limit * 1e9))
        try:
            trainer = Trainer(model, train_stream, val_stream, cfg, out, tok_dir,
                              progress=not args.no_progress, extra_state=extra, group=group)
        except (DataError, ValueError) as err:
            raise UsageError(str(err)) from None
        if resume_ckpt is not None:
            try:
                trainer.resume_from(resume_ckpt, steps=args.steps, lr=args.lr)
            except (ResumeError, ValueError) as err:
                raise UsageError(str(err)) from None
        elif main and out.exists() and args.overwrite:
            from ..training.checkpoint import remove_partial_checkpoints

            remove_partial_checkpoints(out)  # a killed save's temporary directory
            for child in out.iterdir():
                if child.name.startswith("checkpoint-") and child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name.startswith("checkpoint-") or (child.name in OVERWRITTEN and not child.is_dir()):
                    child.unlink()  # a file (or a link: the link, never what it points to)

        if main and cfg.dtype != "float32" and mx.default_device() == mx.cpu:
            print(f"warning: {cfg.dtype} compute on a CPU is slow in MLX (no fast half-precision matmul); "
                  "--dtype float32 is faster there", file=sys.stderr)
        n_params = count_parameters(model)
        warmup = (f"warmup {cfg.warmup_for(trainer.total_steps)} steps" if trainer.total_steps or cfg.warmup is not None
                  else f"warmup max(min({cfg.warmup_for(None)}, steps / 2), min({AUTO_WARMUP_CAP}, steps / 10)), "
                       "steps sized from --max-time")
        world = f"; {group.size()} processes ({cfg.batch_size // group.size()} rows each)" if group else ""
        if main:
            print(f"model: {n_params / 1e6:.2f}M parameters, vocab {model_vocab}; data: {len(train_stream):,} training "
                  f"/ {len(val_stream):,} validation tokens; {cfg.batch_size} x {cfg.seq_len} tokens per step, "
                  f"{warmup}, device {mx.default_device()}{world}", file=sys.stderr)
            if not trainer.validating:
                print("note: --val-fraction 0: no validation split; every token trains, no validation loss is "
                      "measured, checkpoints are kept by step alone and --export writes the last model",
                      file=sys.stderr)
        t0 = time.perf_counter()
        start_step, start_tokens = trainer.step, trainer.tokens
        try:
            result = trainer.train()
        except DistributedError as err:
            print(f"xlstm-metal: error: {err}", file=sys.stderr)
            return 1
        except TrainingDiverged as err:  # every rank stops; nothing non-finite saved, summarised or exported
            if main:
                print(f"xlstm-metal: error: {err}", file=sys.stderr)
            return 1
        except TrainingInterrupted as stop:  # Ctrl-C: the checkpoint of the last step resumes it
            if main:  # the hint runs as printed: quoted, --overwrite where --export is not empty
                import shlex

                again = [] if export is None else ["--export", str(export)] + (
                    ["--export-dtype", args.export_dtype] * bool(args.export_dtype)) + (
                    ["--overwrite"] * (export.exists() and any(export.iterdir())))
                hint = shlex.join(["xlstm-metal", "train", "--out", str(out), "--resume", *again])
                lost = f"; --export {shlex.quote(str(export))} was not written" if again else ""
                print(f"interrupted at step {stop.step}; checkpoint {stop.checkpoint} (continue with `{hint}`{lost})",
                      file=sys.stderr)
            return 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
        wall = time.perf_counter() - t0
        if not main:
            return 0
        new_tokens = result.tokens - start_tokens  # this session's, not the resumed run's earlier ones
        if result.best_val_loss is None:
            best = "no validation split"
        else:
            best = (f"best validation loss {result.best_val_loss:.4f} (perplexity "
                    f"{capped_perplexity(result.best_val_loss):.2f}) at step {result.best_step}")
        print(f"done: {result.step - start_step} steps (to step {result.step}), {new_tokens:,} tokens in {wall:.0f} s "
              f"({new_tokens / max(wall, 1e-9):,.0f} tok/s); {best}; checkpoint {result.checkpoint or trainer.out_dir}",
              file=sys.stderr)
        in_warmup = trainer.budget_spent and cfg.warmup is not None and result.step < cfg.warmup
        if in_warmup:  # (the time limit wins: said)
            print(f"warning: --max-time ended the run inside its warmup (step {result.step} of {cfg.warmup}): the "
                  f"lr never reached --lr {cfg.lr:g} nor decayed", file=sys.stderr)
        # steps and tokens: the whole run's; wall_s: this session's, with its own steps and tokens (a
        # --resume's whole-run tokens over its wall_s overstated the rate)
        summary = {"params": n_params, "steps": result.step, "tokens": result.tokens, "wall_s": wall,
                   "session_steps": result.step - start_step, "session_tokens": new_tokens,
                   "session_tok_s": new_tokens / max(wall, 1e-9),
                   "best_val_loss": result.best_val_loss,
                   "best_val_ppl": None if result.best_val_loss is None else capped_perplexity(result.best_val_loss),
                   "best_step": result.best_step, "train_tokens": int(len(train_stream)),
                   "val_tokens": int(len(val_stream)), "device": str(mx.default_device()),
                   "mlx": mx.__version__, "argv": sys.argv,
                   "world_size": group.size() if group else 1, "ended_in_warmup": in_warmup}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        if export is not None:
            best_params, from_disk = trainer.best_params, False
            if best_params is None and result.best_step is not None:
                # The best evaluation happened before a resume: its weights are not in memory, but
                # checkpoint rotation keeps that step's checkpoint where one was saved there.
                best_params = _checkpoint_params(out / f"checkpoint-{result.best_step:07d}", model)
                from_disk = best_params is not None
            path = _export(model, best_params, export, tok_dir, args.export_dtype or "float32",
                           args.overwrite, generation)
            if best_params is not None:
                print(f"exported the step-{result.best_step} model (best validation loss"
                      f"{', from its checkpoint' if from_disk else ''}) to {path}", file=sys.stderr)
            elif result.best_step is None:  # no validation split: nothing to choose by
                print(f"exported the final step-{result.step} model to {path}", file=sys.stderr)
            else:  # the best evaluation happened before a resume, at a step with no checkpoint left
                print(f"exported the final step-{result.step} model to {path} (the best validation loss was at "
                      f"step {result.best_step}, before the resume, where no checkpoint was saved)", file=sys.stderr)
    finally:
        release_tokenizer_dir(tok_dir, tok_lock)
    return 0


def _export_finished(args, out: Path, export: Path, saved: dict, last: Path, generation) -> int:
    """A finished run's --export: its best-validation checkpoint where kept, else the last."""
    from ..loading import CheckpointError, load_model

    best = saved.get("best_step")
    ckpt = out / f"checkpoint-{best:07d}" if isinstance(best, int) else last
    ckpt = ckpt if (ckpt / "config.json").is_file() else last
    try:
        model = load_model(ckpt, dtype="float32")
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    path = _export(model, None, export, ckpt, args.export_dtype or "float32", args.overwrite, generation)
    kept = ckpt != last or best == saved["step"]
    print(f"the run is finished: exported its {'best-validation' if kept else 'last'} model (step "
          f"{best if kept else saved['step']}) to {path}", file=sys.stderr)
    return 0


def _checkpoint_params(ckpt: Path, model) -> dict | None:
    """The parameters (flattened, float32) of the run's checkpoint ``ckpt``, named and shaped as
    ``model``'s; None where there is none (not saved at that step, or removed) or they differ."""
    from mlx.utils import tree_flatten

    from ..loading import CheckpointError, load_model

    if not (ckpt / "config.json").is_file():
        return None
    try:
        params = dict(tree_flatten(load_model(ckpt, dtype="float32").parameters()))
    except CheckpointError:
        return None
    current = dict(tree_flatten(model.parameters()))
    if params.keys() != current.keys() or any(params[k].shape != v.shape for k, v in current.items()):
        return None
    return params


# ------------------------------------------------------------------------------ distributed
def _launched_group():
    """(group, is rank 0): the ``mlx.launch`` group (None in a single process)."""
    from ..distributed import launched, world

    if not launched() or world().size() == 1:
        return None, True
    from ..monitor import note_on_sigterm

    # mlx.launch ends the other ranks with SIGTERM when one fails, and so does the ring watch
    # (distributed.comm) of a rank started otherwise (by hand) once it lost a peer: the job's
    # handler unwinds (so a checkpoint being written is removed, never left half-written) instead
    # of dying on the spot, and a rank stuck in a collective with the dead one still ends
    # (monitor.job's watch). The note names neither sender: it holds for both.
    note_on_sigterm(f"xlstm-metal: error: rank {world().rank()} stopped by signal 15 (another process of the run "
                    "failed or was lost: mlx.launch, or the ring watch of ranks started without it, then stops the "
                    "others); checkpoints are whole or absent: continue with --resume")
    return world(), world().rank() == 0


def _latest(out: Path) -> Path:
    from ..training.checkpoint import ResumeError, latest_checkpoint

    try:
        return latest_checkpoint(out)
    except ResumeError as err:
        raise UsageError(str(err)) from None


class _Scratch(os.PathLike):
    """Where this rank keeps the files it received from rank 0 (distributed.share_path, which
    makes a folder per path it receives in it): ``<temp dir>/xlstm-dist-<pid>-<random>``. The
    folder is made the first time share_path puts something there (it asks for the path then:
    ``__fspath__``), so a rank that sees rank 0's files itself (one machine, a shared file
    system) makes none; it goes when the run ends (:func:`run`), also when SIGTERM forces the
    process out (monitor.partial_output). Its ``.lock`` (training.tempdirs) lets the next
    run remove the folder of a rank killed with SIGKILL, which no handler can."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._fd: int | None = None
        self._stack = contextlib.ExitStack()
        self.swept = False

    def __fspath__(self) -> str:
        if self.path is None:
            from ..monitor import partial_output
            from ..training.tempdirs import DIST_PREFIX, claim_dir

            self.path, self._fd = claim_dir(DIST_PREFIX)
            self._stack.enter_context(partial_output(self.path))
        return str(self.path)

    def __truediv__(self, other) -> Path:
        return Path(os.fspath(self)) / other

    def release(self) -> None:
        if self.path is not None:
            from ..training.tempdirs import release_dir

            try:
                release_dir(self.path, self._fd)
            finally:
                self._stack.close()
                self.path = self._fd = None

    def end(self) -> None:
        """The run ended: remove the folder; the next run in this process sweeps again."""
        self.release()
        self.swept = False


_SCRATCH = _Scratch()


def _from_rank0(group, fn):
    """``fn()`` (a path or None; may raise UsageError) decided on rank 0: every rank gets the
    result, as a local copy of the files where its own differ (see distributed.share_path and
    _Scratch). Rank 0's UsageError stops all ranks; only rank 0 prints it."""
    if group is None:
        return fn()
    from ..distributed import share_path
    from ..training.tempdirs import DIST_PREFIX, remove_stale_dirs

    if not _SCRATCH.swept:  # the folders of ranks killed with SIGKILL, even where this run makes none
        remove_stale_dirs(DIST_PREFIX)
        _SCRATCH.swept = True
    return share_path(_rank0_value(group, fn), group, _SCRATCH)


def _rank0_value(group, fn):
    """``fn()`` (may raise UsageError) run on rank 0: its value there, None on the other ranks.
    Rank 0's UsageError stops all ranks; only rank 0 prints it."""
    from ..distributed import broadcast_json

    error, value = None, None
    if group.rank() == 0:
        try:
            value = fn()
        except UsageError as err:
            error = str(err)
    error = broadcast_json(error, group)
    if error is not None:
        if group.rank() == 0:
            raise UsageError(error)
        raise SystemExit(2)
    return value


def _saved_profile(saved: dict, ckpt: Path) -> dict | None:
    """The --profile a run started with, as its trainer_state.json keeps it (None without one);
    UsageError for one that is not a valid profile."""
    from ..profiles import ProfileError, profile_from_dict

    fields = saved.get("profile")
    if fields is None:
        return None
    where = f"{ckpt / 'trainer_state.json'}: 'profile'"
    if not isinstance(fields, dict):
        raise UsageError(f"{where} must be an object")
    try:
        return profile_from_dict(fields, where).to_dict()
    except ProfileError as err:
        raise UsageError(str(err)) from None


def _profile_from_rank0(group, args):
    """A new run's --profile (with the flags that replace its fields) as rank 0 reads it, on
    every rank: a profile file, or one `tune` saved by name, that only rank 0's machine has (as
    it may have the data alone) stopped the other ranks, and a profile of one name that differs
    between machines would have trained the ranks under different numerics."""
    from ..distributed import broadcast_json
    from ..profiles import profile_from_dict

    if group is None:
        return profile_from_args(args)

    def read_on_rank0():
        profile = profile_from_args(args)
        return None if profile is None else profile.to_dict()

    fields = broadcast_json(_rank0_value(group, read_on_rank0), group)
    return None if fields is None else profile_from_dict(fields, str(args.profile))


def _same_start(group, model, train_stream, val_stream, cfg) -> None:
    """Every rank starts from rank 0's weights, on the same data and settings."""
    from dataclasses import asdict

    from mlx.utils import tree_flatten, tree_unflatten

    from ..distributed import DistributedError, broadcast_arrays, check_same
    from ..training.trainer import stream_fingerprint

    try:
        check_same("the training data and settings", json.dumps(
            [stream_fingerprint(train_stream), stream_fingerprint(val_stream), asdict(cfg)], sort_keys=True), group)
    except DistributedError as err:
        raise UsageError(str(err)) from None
    model.update(tree_unflatten(list(broadcast_arrays(dict(tree_flatten(model.parameters())), group).items())))


def default_training_kernel() -> str:
    """chunkwise_fused where its CUDA kernels run (MLX's CUDA backend, GPU default device);
    elsewhere the reference chunkwise kernel, which MLX differentiates."""
    from ..kernels.fast.step import cuda_available

    return "chunkwise_fused" if cuda_available() else "chunkwise"


#: --head-loss / --fuse-projections defaults, by where the step runs (see default_step_paths).
_DEFAULT_NOTE = "on for NVIDIA GPUs (part of the CUDA training step BENCHMARKS.md measures), off elsewhere"
#: --mlstm-products's default (see default_step_paths).
#: (The step times are the S8R2 log's A and F rows; BENCHMARKS.md, cited before, has no such figure.)
_PRODUCTS_NOTE = ("bf16 on NVIDIA GPUs (H200, 1.3b, one run of 6 timed steps each: 178.2 against 186.9 ms, a 4.7%% "
                  "faster step, benchmarks/results/train_h200_s8r2_log.txt.xz; gradients within bf16 round-off of "
                  "float32), float32 elsewhere (the kernels are CUDA's)")
#: (head_loss, fuse_projections, mlstm_products) where MLX's CUDA back-end runs, and elsewhere.
_STEP_PATHS = {True: {"head_loss": "fused", "fuse_projections": True, "mlstm_products": "bf16"},
               False: {"head_loss": "plain", "fuse_projections": False, "mlstm_products": "float32"}}


def default_step_paths() -> dict:
    """The train step's fast paths a new run takes unless flags say otherwise:
    ``{"head_loss": ..., "fuse_projections": ..., "mlstm_products": ...}`` (TrainingConfig fields)."""
    from ..kernels.fast.step import cuda_available

    return dict(_STEP_PATHS[cuda_available()])


def _set_training_kernel(model, kernel: str) -> None:
    """Point a loaded model's mLSTM sequence kernels at ``kernel`` (default: see
    :func:`default_training_kernel`): an xLSTM-Large's parallel kernel cells, a 2024 xLSTM's
    mLSTM layers. Other models (lab models) keep the kernels their spec names."""
    from ..kernels import resolve_kernel_name

    try:
        name = resolve_kernel_name(kernel)
    except KeyError as err:
        raise UsageError(f"--kernel: {err.args[0]}") from None
    if hasattr(model.config, "chunkwise_kernel"):
        model.config.chunkwise_kernel = kernel
    for block in getattr(model, "blocks", []):
        cell = getattr(getattr(block, "mlstm_layer", None), "parallel_kernel_cell", None)
        if cell is not None:
            cell.kernel = name
        layer = getattr(block, "xlstm", None)
        if hasattr(layer, "set_kernel"):  # a 2024 mLSTM layer
            layer.set_kernel(name)
