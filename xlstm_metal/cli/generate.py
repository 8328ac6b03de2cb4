"""`xlstm-metal generate`: stream a completion of a prompt (or chat with --interactive)."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from ..jsonfiles import read_json_object
from ..monitor import current_job
from . import UsageError, any_text, peer_lost_exit, read_text_file, seed_value
from .profile import add_profile_argument, apply_cli_profile, profile_from_args

DESCRIPTION = """\
Generate text with an xLSTM model. The model is a local checkpoint directory, a Hugging Face id
(downloaded through huggingface_hub), or, without --model, the small model shipped with the
package. Output streams to stdout; --verbose adds speed and memory figures on stderr."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `generate` and `chat`."""
    parser.add_argument("--model", "-m", help="checkpoint directory or Hugging Face id (default: the packaged model)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="weight dtype (default: bfloat16 on a GPU / Metal, float32 on CPU)")
    parser.add_argument("--prompt", "-p", type=any_text,
                        help="prompt text; '-' reads it from stdin (not in an interactive chat, whose turns come "
                             "from stdin, nor under mlx.launch, whose stdin never ends: use --prompt-file there)")
    parser.add_argument("--prompt-file", help="read the prompt from this file (UTF-8)")
    # Sampling defaults (None here) come from the checkpoint's generation_config.json, as in
    # transformers, else from BUILTIN_SAMPLING; see apply_generation_defaults.
    parser.add_argument("--max-tokens", "-n", type=int,
                        help="tokens to generate at most (default: max_new_tokens of the model's "
                             "generation_config.json, else what its max_length (prompt + generated "
                             "tokens, as in transformers) leaves after the prompt, else 256)")
    parser.add_argument("--temperature", "--temp", type=float,
                        help="sampling temperature; 0 = greedy (default: the model's generation_config.json "
                             "when it sets do_sample (1 if it gives none, as in transformers), else 0)")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off; default: the model's "
                        "generation_config.json when it sets do_sample (50 if it gives none, as in "
                        "transformers), else 0)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (1 = off)")
    parser.add_argument("--min-p", type=float, help="drop tokens below min_p * top probability")
    parser.add_argument("--repetition-penalty", type=float, help="> 1 discourages tokens already seen (1 = off)")
    parser.add_argument("--seed", type=seed_value, help="random seed (reproducible sampling)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when this text appears (repeatable; \\n, \\t, \\r and \\\\ are read as "
                             "newline, tab, carriage return and backslash); EOS always stops")
    parser.add_argument("--prefill-chunk-size", type=int,
                        help="prompt tokens per forward pass during prefill (default min(2048, config))")
    add_profile_argument(parser)
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="print prompt / generation tok/s and peak memory to stderr")
    parser.add_argument("--info", action="store_true",
                        help="print the model's blocks, dims, heads, parameter count, dtype and memory")
    parser.add_argument("--show-wiring", action="store_true", help="print the model's blocks and their cells")
    from ..distributed import add_parallel_argument

    add_parallel_argument(parser)  # under mlx.launch: tensor or pipeline parallel


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("generate", help="generate text from a prompt", description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--interactive", "-i", action="store_true",
                        help="chat: keep the recurrent state across turns (same as `xlstm-metal chat`)")
    parser.set_defaults(func=run)
    return parser


# ---------------------------------------------------------------------- argument checks
#: Used where neither the command line nor the model's generation_config.json says otherwise.
BUILTIN_SAMPLING = dict(max_tokens=256, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
#: generation_config.json key -> our argument, for the sampling keys (read when do_sample is true).
_GENERATION_CONFIG_KEYS = dict(temperature="temperature", top_k="top_k", top_p="top_p", min_p="min_p",
                               repetition_penalty="repetition_penalty")
#: What transformers samples with when a generation_config.json sets do_sample but leaves these out
#: (GenerationConfig._get_default_generation_params): temperature 1 and top-k 50.
TRANSFORMERS_SAMPLING_DEFAULTS = dict(temperature=1.0, top_k=50)


#: What each sampling value may be: name -> (test, the rule in words). `serve` checks its flags
#: by these too.
SAMPLING_RULES = dict(
    max_tokens=(lambda x: x >= 0, ">= 0"),
    temperature=(lambda x: x >= 0 and math.isfinite(x), "a finite number >= 0"),
    top_k=(lambda x: x >= 0, ">= 0"),
    top_p=(lambda x: 0 < x <= 1, "in (0, 1]"),
    min_p=(lambda x: 0 <= x <= 1, "in [0, 1]"),
    repetition_penalty=(lambda x: x > 0 and math.isfinite(x), "a finite number > 0"),
)
#: The sampling values that count tokens: integers (flags parse them so; generation_config.json's
#: JSON numbers may be 2.5 or 1e400, which int() truncated or the runner refused naming no file).
INTEGER_SAMPLING = ("max_tokens", "top_k")


def _check_sampling_values(values: dict[str, Any], source: str) -> None:
    def bad(name: str, rule: str) -> UsageError:
        flag = "--" + name.replace("_", "-")
        return UsageError(f"{flag} must be {rule}, got {values[name]}{source}")

    for name, (ok, rule) in SAMPLING_RULES.items():
        value = values.get(name)
        if value is None:
            continue
        if name in INTEGER_SAMPLING and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad(name, "an integer")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise bad(name, rule)


def read_generation_config(model_dir: Path) -> tuple[dict[str, Any], int | None]:
    """The sampling defaults in a checkpoint's generation_config.json, read as transformers reads
    it: values for keys of BUILTIN_SAMPLING (none without the file), and the file's max_length
    where it bounds the length (no max_new_tokens), else None. transformers applies the file's
    repetition_penalty with greedy search too; the other sampling keys count only when it sets
    do_sample, and then a temperature or top_k it leaves out is transformers' 1.0 or 50.
    UsageError names a bad value and the file. `generate`, `chat` and `serve` read it here."""
    from_file: dict[str, Any] = {}
    max_length = None
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        config = read_json_object(path, UsageError)
        if config.get("max_new_tokens") is not None:
            from_file["max_tokens"] = config["max_new_tokens"]
        elif config.get("max_length") is not None:  # transformers: max_new_tokens wins over it
            max_length = config["max_length"]
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
                raise UsageError(f"max_length must be an integer > 0, got {max_length!r} (from {path})")
        if config.get("repetition_penalty") is not None:
            from_file["repetition_penalty"] = config["repetition_penalty"]
        do_sample = config.get("do_sample")
        if do_sample is not None and not isinstance(do_sample, bool):  # "no" read as true: sampling on
            raise UsageError(f"do_sample must be true or false, got {do_sample!r} (from {path})")
        if do_sample:
            from_file.update(TRANSFORMERS_SAMPLING_DEFAULTS)
            from_file.update({ours: config[key] for key, ours in _GENERATION_CONFIG_KEYS.items()
                              if config.get(key) is not None})
        _check_sampling_values(from_file, f" (from {path})")
    return from_file, max_length


def apply_generation_defaults(args: argparse.Namespace, model_dir: Path) -> None:
    """Fill sampling arguments the user left out: the model's generation_config.json
    (:func:`read_generation_config`), then BUILTIN_SAMPLING. ``args.max_length`` is the file's
    max_length when it bounds the length (no --max-tokens, no max_new_tokens), else None;
    :func:`max_tokens_for` turns it into a per-prompt budget."""
    from_file, max_length = read_generation_config(model_dir)
    args.max_length = max_length if args.max_tokens is None else None  # an explicit --max-tokens wins
    given = {name for name in BUILTIN_SAMPLING if getattr(args, name) is not None}
    for name, value in BUILTIN_SAMPLING.items():
        if getattr(args, name) is None:
            setattr(args, name, from_file.get(name, value))
    if args.temperature == 0:
        check_greedy_options(args, given, from_file, model_dir)


#: Options that only shape sampling, with their values that change nothing: at temperature 0
#: (greedy decoding: the most likely token) they have no effect.
SAMPLING_ONLY = (("--top-k", "top_k", 0), ("--top-p", "top_p", 1.0), ("--min-p", "min_p", 0.0),
                 ("--seed", "seed", None))


def check_greedy_options(args: argparse.Namespace, given: set[str], from_file: dict[str, Any],
                         model_dir: Path) -> None:
    """UsageError naming the sampling options given on the command line (``given``: the sampling
    arguments that were set before the defaults; ``from_file``: what generation_config.json gave)
    when the temperature is 0: greedy decoding ignores them (`--top-k 40` alone on a model whose
    generation_config.json does not sample ran greedy without a word)."""
    ignored = [flag for flag, dest, off in SAMPLING_ONLY
               if getattr(args, dest, None) is not None and getattr(args, dest) != off
               and (dest in given or dest == "seed")]
    if not ignored:
        return
    if "temperature" in given:
        why = "--temperature 0 decodes greedily"
    elif "temperature" in from_file:
        why = "the temperature is 0 (greedy: no --temperature given, and the model's generation_config.json sets 0)"
    elif (Path(model_dir) / "generation_config.json").is_file():
        why = "the temperature is 0 (greedy: no --temperature given, and the model's generation_config.json does " \
              "not set do_sample)"
    else:
        why = "the temperature is 0 (greedy: no --temperature given, and the model has no generation_config.json)"
    raise UsageError(f"{', '.join(ignored)} would be ignored: {why}; give --temperature > 0 to sample, or leave "
                     f"{'it' if len(ignored) == 1 else 'them'} out")


def max_tokens_for(args: argparse.Namespace, prompt_tokens: int, what: str = "the prompt") -> int:
    """Tokens to generate after ``prompt_tokens`` tokens of context: ``args.max_tokens``, or,
    where generation_config.json's max_length bounds the length, what it leaves. transformers
    reads max_length as prompt + generated tokens and refuses a prompt that already fills it;
    so does this (UsageError)."""
    max_length = getattr(args, "max_length", None)
    if max_length is None:
        return args.max_tokens
    if prompt_tokens >= max_length:
        raise UsageError(f"{what} is {prompt_tokens} tokens, but the model's generation_config.json sets "
                         f"max_length {max_length} (prompt + generated tokens), which leaves no room to "
                         "generate; pass --max-tokens N")
    return max_length - prompt_tokens


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_ESCAPE_RE = re.compile(r"\\([ntr\\])")


def unescape_stop(text: str) -> str:
    """``--stop`` text with ``\\n``, ``\\t``, ``\\r`` and ``\\\\`` read as newline, tab, carriage
    return and one backslash (shells pass ``"\\n"`` on as two characters); any other backslash
    stays as typed."""
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group(1)], text)


def check_utf8(text: str, source: str) -> str:
    """``text`` unchanged, or UsageError when it holds bytes that were not UTF-8 (Python keeps
    such bytes of argv / stdin as lone surrogates, which no tokenizer accepts)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"character U+{ord(bad):04X}"
        raise UsageError(f"{source} is not UTF-8 text ({byte} at character {err.start})") from None
    return text


def validate_sampling(args: argparse.Namespace) -> None:
    _check_sampling_values({name: getattr(args, name) for name in BUILTIN_SAMPLING}, "")
    if args.prefill_chunk_size is not None and args.prefill_chunk_size <= 0:
        raise UsageError(f"--prefill-chunk-size must be > 0, got {args.prefill_chunk_size}")
    if any(s == "" for s in args.stop):
        raise UsageError("--stop must not be empty")
    args.stop = [check_utf8(unescape_stop(s), "--stop") for s in args.stop]
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give either --prompt or --prompt-file, not both")


_BOM = "\ufeff"


def read_prompt(args: argparse.Namespace) -> str | None:
    """The prompt from --prompt / --prompt - (stdin) / --prompt-file, or None. A byte-order
    mark that starts a file or stdin (Windows editors write one) is no text: it went to the model
    as three byte tokens before the prompt (train reads its data without it)."""
    if args.prompt_file is not None:
        return read_text_file(args.prompt_file, "prompt file").removeprefix(_BOM)
    if args.prompt == "-" and getattr(args, "interactive", False):
        # A chat reads its turns from stdin: reading the prompt to its end took every turn (and
        # the /quit line) as one first turn.
        raise UsageError("--prompt - reads the prompt until stdin ends, but an interactive chat reads its turns "
                         "from stdin: give the first turn with --prompt TEXT or --prompt-file FILE, or send it "
                         "as the first line on stdin")
    if args.prompt == "-":
        if under_a_launch():
            raise UsageError("--prompt - reads the prompt until stdin ends, and under mlx.launch it never does "
                             "(mlx.launch copies its stdin to every process and never closes it; mpirun gives it "
                             "to rank 0 only): give the prompt with --prompt-file FILE (or --prompt TEXT)")
        return read_stdin_text().removeprefix(_BOM)
    return None if args.prompt is None else check_utf8(args.prompt, "--prompt")


def under_a_launch() -> bool:
    """Whether this process is one of several started by ``mlx.launch`` (or mpirun), read from
    the environment without joining the group. ``mlx.launch`` writes its own stdin to every
    process's stdin and never closes it (so reading stdin to its end waits forever, and a
    piped chat never sees Ctrl-D's end of input); a launch whose size the environment does not
    tell counts as one."""
    from ..monitor.watchdog import job_rank  # the rank a launch of several gave this process

    return job_rank() is not None


def read_stdin_text() -> str:
    """All of stdin as UTF-8 text (UsageError naming the first bad byte otherwise)."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a replaced sys.stdin (io.StringIO) already holds text
        return check_utf8(sys.stdin.read(), "the prompt on stdin")
    data = raw.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"the prompt on stdin is not UTF-8 text (byte 0x{data[err.start]:02x} at "
                         f"offset {err.start})") from None


#: Options that only shape a generation (with their argparse dests): `generate --info` or
#: `--show-wiring` without a prompt generates nothing, so given there they would be ignored.
GENERATION_OPTIONS = (("--max-tokens", "max_tokens"), ("--temperature", "temperature"), ("--top-k", "top_k"),
                      ("--top-p", "top_p"), ("--min-p", "min_p"), ("--repetition-penalty", "repetition_penalty"),
                      ("--seed", "seed"), ("--stop", "stop"), ("--prefill-chunk-size", "prefill_chunk_size"),
                      ("--verbose", "verbose"))


def check_nothing_to_generate(args: argparse.Namespace) -> None:
    """UsageError naming the generation options given to a `generate --info` / `--show-wiring`
    that has no prompt: it describes the model and exits, so they would be silently ignored."""
    given = [flag for flag, dest in GENERATION_OPTIONS if getattr(args, dest, None) not in (None, False, [])]
    if given:
        shown = " / ".join(flag for flag, on in (("--info", args.info), ("--show-wiring", args.show_wiring)) if on)
        raise UsageError(f"{shown} without a prompt describes the model and generates nothing; {', '.join(given)} "
                         f"would be ignored: give a prompt too, or leave {'it' if len(given) == 1 else 'them'} out")


# ---------------------------------------------------------------------- loading
def load_runner(args: argparse.Namespace, need_tokenizer: bool = True):
    """(runner, tokenizer) for args.model (default: the packaged model), or UsageError."""
    from ..config import ConfigError
    from ..generation import DEFAULT_MODEL_DIR, TokenizerError, default_dtype, xLSTMRunner
    from ..loading import CheckpointError, load, resolve_model_path

    if args.model is None:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise UsageError(
                f"no --model given and the packaged default model is not installed ({DEFAULT_MODEL_DIR}); "
                "pass --model DIR or a Hugging Face id"
            )
        source: Any = DEFAULT_MODEL_DIR
    else:
        source = args.model
    profile = profile_from_args(args, dtype=args.dtype, prefill_chunk=args.prefill_chunk_size)
    args.profile_fields = profile.to_dict() if profile else None  # compared between ranks (same_on_every_rank)
    dtype = profile.dtype if profile else args.dtype or default_dtype()
    from ..distributed import parallelize, print_on_rank0_only

    def split(model):  # several mlx.launch processes: each reads and keeps only its part
        return parallelize(model, getattr(args, "parallel", None))

    try:
        directory = resolve_model_path(source)  # downloads a Hugging Face id once
        apply_generation_defaults(args, directory)  # (UsageError: not caught here) before the weights are read
        model, tokenizer = load(directory, dtype=dtype, prepare=split)
    except (CheckpointError, ConfigError, TokenizerError) as err:
        raise UsageError(str(err)) from None
    except ValueError as err:  # the model cannot be split that way
        raise UsageError(str(err)) from None
    except OSError as err:
        raise UsageError(f"cannot load model {source}: {err}") from None
    if tokenizer is None and need_tokenizer:
        raise UsageError(f"model {source} has no tokenizer.json; text generation needs one")
    if args.model is None:
        from ..assets import for_this_device

        for_this_device(model)  # quantized on disk; dequantized on CPUs without the C kernels
    print_on_rank0_only()  # every rank generates the same tokens; rank 0 prints them
    if profile is not None:
        apply_cli_profile(model, profile)  # kernels, chunk sizes, state dtype, eps, fused or not
    elif callable(getattr(model, "fuse_projections", None)):
        model.fuse_projections()  # one matmul for q|k|v|o|i|f and one for gate|up: fewer launches per token
    try:
        runner = xLSTMRunner(model, tokenizer, prefill_chunk_size=profile.prefill_chunk if profile else
                             args.prefill_chunk_size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    current_job().shrink_prefill_on_soft(runner)  # memory watchdog: smaller pieces near the limit
    return runner, tokenizer


def same_on_every_rank(settings: dict[str, Any], what: str) -> None:
    """In a run split across processes (none on its own: a no-op): UsageError on every rank
    unless every rank holds the same ``settings`` (label -> value: a string, or anything JSON
    writes), naming the first label that differs and this rank's value. Ranks given different
    prompts or settings (each rank reads its own command line and stdin) paired their
    collectives wrongly: rank 0 blamed rank 1's memory limit (exit 3), or printed wrong text
    with exit code 0. A collective: every rank calls it at the same point (one all-gather of a
    digest; one per setting only once they differ)."""
    from ..distributed import DistributedError, check_same, joined_world

    group = joined_world()
    if group is None:
        return
    values = {label: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
              for label, value in settings.items()}
    try:
        check_same(what, json.dumps(values, sort_keys=True), group)
        return
    except DistributedError as err:
        first = err
    for label, value in values.items():  # the same labels in the same order on every rank
        try:
            check_same(label, value, group)
        except DistributedError as err:
            first = err
            break
    raise UsageError(f"rank {group.rank()} of {group.size()}: {first}; every process must be given the same "
                     f"{what}") from None


def _tokenizer_fingerprint(tokenizer) -> str | None:
    """A digest of a tokenizer's vocabulary, merges, templates and special ids (None without one)."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend", None)
    text = backend.to_str() if hasattr(backend, "to_str") else ""
    return hashlib.sha256((text + repr(tokenizer)).encode()).hexdigest()[:16]


def _float(value):
    return None if value is None else float(value)  # 1 from a generation_config.json is 1.0 from a flag


def check_same_request(runner, args: argparse.Namespace, prompt: str | None, command: str) -> str | None:
    """:func:`same_on_every_rank` for `generate` / `chat` (``command``: "generate", "chat" or
    "describe"): the prompt's token ids, the tokenizer, the sampling values, stop strings,
    prefill piece size, profile and --info / --show-wiring (a pipeline split's model
    description is a collective). Returns the error of a prompt the runner cannot encode
    (raised by the caller after the check, so that every rank stops alike), else None."""
    ids: Any = None
    error = None
    if prompt is not None:
        try:
            ids = runner.encode(prompt)
        except ValueError as err:
            error = str(err)
            ids = f"(not encoded: {error})"
    same_on_every_rank({
        "the command": command, "the prompt's token ids": ids,
        "the tokenizer": _tokenizer_fingerprint(runner.tokenizer),
        "--max-tokens": args.max_tokens, "max_length (generation_config.json)": getattr(args, "max_length", None),
        "--temperature": _float(args.temperature), "--top-k": args.top_k, "--top-p": _float(args.top_p),
        "--min-p": _float(args.min_p), "--repetition-penalty": _float(args.repetition_penalty), "--seed": args.seed,
        "--stop": list(args.stop), "--prefill-chunk-size": runner.prefill_chunk_size,
        "--profile": getattr(args, "profile_fields", None), "--info": bool(args.info),
        "--show-wiring": bool(args.show_wiring),
    }, "prompt and generation settings")
    return error


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=list(args.stop) or None)


def stats_line(chunk) -> str:
    # The first token comes with the prompt (prefill): the rate is of the tokens after it, so
    # one token has none (it said 0.0 tok/s).
    generation = (f"{chunk.generation_tokens} tokens, {chunk.generation_tps:,.1f} tok/s"
                  if chunk.generation_tokens > 1 else
                  f"{chunk.generation_tokens} token{'' if chunk.generation_tokens == 1 else 's'} "
                  "(a rate needs 2 or more)")
    from ..distributed import joined_world

    group = joined_world()  # split across processes: the memory figure is this rank's (rank 0 prints it)
    whose = f" (rank {group.rank()} of {group.size()})" if group is not None else ""
    return (f"prompt: {chunk.prompt_tokens} tokens, {chunk.prompt_tps:,.1f} tok/s | "
            f"generation: {generation} | peak memory: {chunk.peak_memory_gb:.3f} GB{whose}")


def main_stderr():
    """Where rank 0 (or a process on its own) writes notes and figures: stderr; the other ranks
    of an ``mlx.launch`` run, which compute and would print the same lines, write them nowhere
    (errors go to every rank's stderr as ever)."""
    from ..distributed import is_main, joined_world

    return sys.stderr if is_main(joined_world()) else _DISCARD


class _Discard:
    """A text stream that drops what is written to it."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


_DISCARD = _Discard()


def print_model_description(args: argparse.Namespace, runner) -> None:
    from ..generation.runner import format_model_info, wiring_text

    if args.info:
        print(format_model_info(runner.get_model_info()))
    if args.show_wiring:
        print(wiring_text(runner.model))


def replace_unencodable(out) -> None:
    """Characters the output's encoding lacks (a latin-1 terminal) written as '?': the first one
    (the packaged model's curly quotes) ended the text as a usage error, exit code 2."""
    if callable(getattr(out, "reconfigure", None)) and getattr(out, "errors", None) == "strict":
        out.reconfigure(errors="replace")


def stream_to(out, chunks) -> Any:
    """Write each chunk's text as it comes; returns the last chunk (or None)."""
    last = None
    for chunk in chunks:
        if chunk.text:
            out.write(chunk.text)
            out.flush()
        last = chunk
    return last


def generation_peer_lost_exit(err: RuntimeError, what: str = "the generation stopped") -> int:
    """:func:`~xlstm_metal.cli.peer_lost_exit` for a generation: the message also says after
    how many tokens ``what`` happened (the text so far is printed). Any other RuntimeError is
    raised again."""
    done = getattr(current_job(), "fields", {}).get("done")
    return peer_lost_exit(err, what + (f" after {done} tokens" if done else ""))


# ---------------------------------------------------------------------- entry point
def run(args: argparse.Namespace) -> int:
    validate_sampling(args)
    replace_unencodable(sys.stdout)
    interactive = bool(getattr(args, "interactive", False))
    prompt = read_prompt(args)
    describe_only = (args.info or args.show_wiring) and prompt is None and not interactive
    if describe_only:
        check_nothing_to_generate(args)
    if prompt is None and not interactive and not describe_only:
        raise UsageError("give a prompt: --prompt TEXT, --prompt - (stdin), --prompt-file FILE, or --interactive")
    runner, _ = load_runner(args, need_tokenizer=not describe_only)
    try:  # under several ranks: every rank was given the same prompt and settings
        unencoded = check_same_request(runner, args, prompt,
                                       "describe" if describe_only else "chat" if interactive else "generate")
    except RuntimeError as err:  # a peer process died (else raised again)
        return peer_lost_exit(err, "the processes stopped comparing their prompts and settings")
    print_model_description(args, runner)
    if describe_only:
        return 0
    if interactive:
        from .chat import chat_loop

        try:
            return chat_loop(runner, args, first_turn=prompt)
        except RuntimeError as err:
            return generation_peer_lost_exit(err)
    if unencoded is not None:  # e.g. a prompt that encodes to nothing
        raise UsageError(unencoded)
    try:
        args.max_tokens = max_tokens_for(args, len(runner.encode(prompt)))
        chunks = runner.stream(prompt, **sampling_kwargs(args))
        last = stream_to(sys.stdout, current_job().track_generation(chunks, args.max_tokens))
    except ValueError as err:  # e.g. a prompt that encodes to nothing
        raise UsageError(str(err)) from None
    except RuntimeError as err:
        return generation_peer_lost_exit(err)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose and last is not None:
        print(stats_line(last), file=main_stderr())
    return 0
