"""`xlstm-metal mlx-lm {generate,server,lora,fuse,convert} ...`: mlx-lm's commands with xLSTM in place.

The arguments go to mlx-lm's command unchanged, after what an xLSTM needs there:

- OpenBLAS is bound to MLX (Linux CPUs) before mlx-lm imports mlx (``xlstm_metal`` is imported
  first; mlx-lm's own entry points import mlx before any model file could).
- mlx-lm's model type ``xlstm`` is this package's model module, so Hugging Face xLSTM
  checkpoints (transformers' format, NX-AI/xLSTM-7b) load in mlx-lm without a model file.
- A checkpoint written by xlstm-metal names its model file (``xlstm_mlx_lm.py``); when that file
  is exactly the one this package writes (it only imports this package's model code),
  ``--trust-remote-code`` is added for it. Any other model file still needs the flag; a config
  naming our file where the directory lacks it (a transformers re-save) loads as model type xlstm.
- mlx-lm's parsers are held to this command line's rules: an option given twice is refused, and
  so is a count below its smallest sensible value (``generate --max-tokens -3`` generated without
  a limit): :data:`COUNT_MINIMUMS`, or above its largest (:data:`COUNT_MAXIMUMS`), and a real
  number out of its range or not finite (:data:`FLOAT_RANGES`).
- What mlx-lm would silently ignore or lose is refused before it works (exit 2): convert's
  ``--q-*`` options without ``-q`` or outside MLX's quantization (:func:`check_convert_quantization`),
  generate's KV-cache options for an xLSTM and chat-template options without a chat template
  (:func:`check_generate_loaded`), an empty prompt (:func:`check_generate_prompt`), lora's
  ``--adapter-path`` holding earlier adapters (:func:`check_adapter_path`), fuse's ``--gguf-path``
  without ``--export-gguf`` and ``--export-gguf`` of an xLSTM (:func:`check_fuse_gguf`), and a
  local model path that does not exist (:func:`looks_local`), the --draft-model's too.
- Also refused before work starts: ``--draft-model`` with an xLSTM (:func:`check_no_draft_for_xlstm`),
  a ``--prompt-cache-file`` that is no prompt cache (:func:`prompt_cache_file_is_named`), ``convert -q``
  of a quantized model, lora's ``--resume-adapter-file`` that is not a readable file
  (:func:`check_resume_adapter_file`) and, once the model is adapted, one that does not hold the
  adapters the run trains (:func:`check_resume_adapters_fit`), and a server ``--host`` / ``--port``
  it cannot listen on (:func:`check_listen_address`). mlx-lm's messages of several lines are cut
  to one (:func:`one_line`).
- The server's other options that could not work: ``--prompt-cache-bytes`` mlx-lm cannot parse
  and ``--chat-template-args`` that are no JSON object of template variables (:data:`TYPE_WRAPPERS`),
  ``--num-draft-tokens`` without ``--draft-model`` (generate's too), ``--pipeline`` in one process,
  and a chat template that cannot render a chat (:func:`check_server_chat_template`). Its requests
  also go through :func:`check_server_request`: a few that crashed the process or stopped its
  generation thread for good get a 400 (``xlstm-metal serve`` checks requests fully).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from . import UsageError, _given_options, check_apart_from_data, check_output_path, finite_float, harden_parser

COMMANDS = ("generate", "server", "lora", "fuse", "convert")
#: The option naming the model, per command (convert also takes --hf-path).
MODEL_OPTIONS = {"generate": ("--model",), "server": ("--model",), "lora": ("--model",), "fuse": ("--model",),
                 "convert": ("--hf-path", "--model")}

#: Count options of mlx-lm's commands and their smallest sensible value. mlx-lm's parsers take
#: any integer, and below these a run went on silently: a negative --max-tokens generated without
#: limit, a negative --top-k turned top-k off, lora's --num-layers below -1 trained every layer
#: (-1: all, as --val-batches / --test-batches -1 are every batch), --prefill-step-size 0 made no
#: progress through the prompt. Refused at parse time (exit 2, naming the option). generate's
#: --max-tokens 0 passed here and was refused only once the model had loaded, by mlx-lm's "use -1
#: for no limit", a value refused here; the server's answered every request that gave no
#: max_tokens with an empty reply.
COUNT_MINIMUMS = {
    "generate": {"--seed": 0, "--max-tokens": 1, "--top-k": 0, "--min-tokens-to-keep": 1, "--max-kv-size": 1,
                 "--prefill-step-size": 1, "--quantized-kv-start": 0, "--num-draft-tokens": 1},
    "server": {"--port": 0, "--max-tokens": 1, "--top-k": 0, "--num-draft-tokens": 1, "--decode-concurrency": 1,
               "--prompt-concurrency": 1, "--prefill-step-size": 1, "--prompt-cache-size": 0,
               "--quantized-kv-start": 0},
    "lora": {"--num-layers": -1, "--batch-size": 1, "--iters": 0, "--val-batches": -1, "--test-batches": -1,
             "--steps-per-report": 1, "--steps-per-eval": 1, "--save-every": 1, "--max-seq-length": 1,
             "--grad-accumulation-steps": 1},
}
#: What the smallest value means, where it is a sentinel.
_MINIMUM_MEANS = {-1: " (-1: all)"}
#: Integer options with a largest value, per command (their smallest is in :data:`COUNT_MINIMUMS`):
#: beyond them generate's ``--seed`` (and below 0) ended in a TypeError traceback from
#: ``mx.random.seed``, and server's ``--port 99999`` listened on another port (99999 - 65536).
COUNT_MAXIMUMS = {
    "generate": {"--seed": 2**64 - 1},
    "server": {"--port": 65535},
}
#: Real-valued options of mlx-lm's commands and their range (inclusive). mlx-lm took any float:
#: a negative --temp sampled from the inverted distribution (the least likely tokens first), NaN
#: sampled garbage, and a --top-p or --min-p outside [0, 1] turned the filter off silently. Every
#: other float option must still be finite.
FLOAT_RANGES = {
    "generate": {"--temp": (0.0, math.inf), "--top-p": (0.0, 1.0), "--min-p": (0.0, 1.0),
                 "--xtc-probability": (0.0, 1.0), "--xtc-threshold": (0.0, 0.5)},
    "server": {"--temp": (0.0, math.inf), "--top-p": (0.0, 1.0), "--min-p": (0.0, 1.0)},
}
#: Real-valued options that must be above a bound (exclusive): lora's ``--learning-rate -1``
#: trained uphill (the loss rising) and 0 trained nothing, both without a word.
FLOAT_ABOVE = {"lora": {"--learning-rate": 0.0}}

#: convert's options (argparse dests) that only shape ``-q``'s quantization: without ``-q`` the
#: model was written in float without a word (``--q-bits 3`` alone).
QUANTIZE_OPTIONS = ("q_bits", "q_group_size", "q_mode", "quant_predicate")
#: generate's options (dests) for an attention model's KV cache. An xLSTM has none: it keeps a
#: fixed-size recurrent state, so ``--max-kv-size 2`` or ``--kv-bits 4`` changed nothing.
KV_CACHE_OPTIONS = ("max_kv_size", "kv_bits", "kv_group_size", "quantized_kv_start")
#: generate's options (dests) that only go into the chat template: without one (the tokenizer
#: has none, or --ignore-chat-template) mlx-lm dropped them without a word.
CHAT_TEMPLATE_OPTIONS = ("system_prompt", "prefill_response", "chat_template_config")
#: What lora --train writes into --adapter-path: the adapters, their config, and a checkpoint
#: every --save-every steps (``0000100_adapters.safetensors``).
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapters.safetensors"

DESCRIPTION = """\
Run mlx-lm's generate, server, lora, fuse or convert on xLSTM models. Everything after the command
goes to mlx-lm (see `xlstm-metal mlx-lm generate --help`). Checkpoints written by xlstm-metal
load without --trust-remote-code when their model file is this package's own; convert and fuse write
that model file into their output, so mlx_lm.load(OUT, trust_remote_code=True) opens it too."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("mlx-lm", help="mlx-lm's generate / server / lora / fuse / convert with xLSTM support",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mlx_lm_command", choices=COMMANDS, metavar="{" + ",".join(COMMANDS) + "}",
                        help="the mlx-lm command to run")
    parser.add_argument("mlx_lm_args", nargs=argparse.REMAINDER, help="arguments for that mlx-lm command")
    parser.set_defaults(func=run)
    return parser


def option_values(args: list[str], options) -> list[tuple[str, str | None]]:
    """Each ``(option, value)`` of ``options`` given in mlx-lm arguments ``args`` (``--opt X`` or
    ``--opt=X``), in order."""
    found = []
    index = 0
    while index < len(args):
        name, eq, value = args[index].partition("=")
        if name in options:
            found.append((name, value if eq else (args[index + 1] if index + 1 < len(args) else None)))
            index += 1 if eq else 2
            continue
        index += 1
    return found


def model_argument(command: str, args: list[str]) -> str | None:
    """The model path given to mlx-lm's ``command`` (``--model X`` or ``--model=X``), or None.
    UsageError when it is given more than once: the tokenizer check and ``--trust-remote-code``
    would be decided for one checkpoint while mlx-lm loaded another."""
    found = option_values(args, MODEL_OPTIONS[command])
    if len(found) > 1:
        given = ", ".join(f"{name} {value}" for name, value in found)
        raise UsageError(f"mlx-lm {command}: the model is given more than once ({given}); give it once")
    return found[0][1] if found else None


#: mlx-lm fuse's --save-path when it is left out.
FUSE_SAVE_PATH = "fused_model"


def check_fuse_save_path(model: str, save_path: str) -> None:
    """mlx-lm fuse writes the fused model into ``save_path`` over any files there: UsageError when
    it is (or is inside) the ``--model`` checkpoint, or an existing directory that is not empty.
    With --save-path the model's own directory, fuse replaced the base weights, config and
    tokenizer and then died on a SameFileError traceback; a second run to the same (default)
    path replaced the first run's model without a word."""
    try:
        check_apart_from_data((("--save-path", save_path),), [model], data="the --model checkpoint",
                              read_back="fuse would write the fused model into the checkpoint it reads")
        target = check_output_path(save_path, "--save-path", directory=True)
    except UsageError as err:
        raise UsageError(f"mlx-lm fuse: {err}") from None
    if target.is_dir() and any(target.iterdir()):
        raise UsageError(f"mlx-lm fuse: --save-path {save_path} already exists and is not empty: fuse would write over "
                         "its files; remove it or choose another --save-path")


def looks_local(model: str) -> bool:
    """Whether ``model`` names a local path rather than a Hugging Face repo id (``name`` or
    ``namespace/name``, so one ``/`` at most): it starts with ``/``, ``./``, ``../`` or ``~``, or
    holds two ``/`` or the system's own separator. mlx-lm looked a missing one up on the Hub and
    printed the Hub's "Repo id must be in the form ..." about it."""
    return (model in (".", "..") or model.startswith(("/", "./", "../", "~")) or model.count("/") > 1
            or any(sep in model for sep in (os.sep, os.altsep) if sep and sep != "/"))


def check_adapter_path(adapter_path: str) -> None:
    """lora --train writes its adapters into ``adapter_path`` over those there: UsageError when it
    is a file (mlx-lm's mkdir ended in a FileExistsError traceback) or a directory that already
    holds adapters (a second run to the same, default, path replaced the first one's without a
    word). Continuing from them is --resume-adapter-file's, into another --adapter-path."""
    try:
        target = check_output_path(adapter_path, "--adapter-path", directory=True)
    except UsageError as err:
        raise UsageError(f"mlx-lm lora: {err}") from None
    if not target.is_dir():
        return
    held = sorted(p.name for p in target.iterdir() if p.name == ADAPTER_CONFIG or p.name.endswith(ADAPTER_WEIGHTS))
    if held:
        raise UsageError(f"mlx-lm lora: --adapter-path {adapter_path} already holds adapters ({', '.join(held)}): "
                         "training would write over them; choose another --adapter-path (--resume-adapter-file "
                         f"{target / ADAPTER_WEIGHTS} continues from them) or remove the old ones")


def _them(names: list[str], subject: bool = False) -> str:
    """The pronoun for the options ``names``: it / they (``subject``) / them."""
    return "it" if len(names) == 1 else "they" if subject else "them"


def check_convert_quantization(args: argparse.Namespace, given: dict[str, str]) -> None:
    """convert's quantization options (``given``: dest -> the option as spelled) must take effect:
    UsageError for ``--q-*`` without ``-q`` (a float model was written), a bit width or group size
    MLX does not quantize with (mlx-lm took ``--q-bits 0`` / ``--q-group-size 0`` as its defaults
    while the config said otherwise, and ``--q-group-size 7`` quantized no layer but recorded 7,
    which our loader refuses), a float format's (``--q-mode``) other than its fixed pair, and
    ``--q-bits`` with ``--quant-predicate``, whose recipe sets every layer's bits."""
    from ..quantization import BITS, GROUP_SIZES, MODES

    named = [given[dest] for dest in QUANTIZE_OPTIONS if dest in given]
    if not args.quantize:
        if named:
            applies = "applies" if len(named) == 1 else "apply"
            raise UsageError(f"mlx-lm convert: {', '.join(named)} only {applies} with -q/--quantize (without it "
                             f"the model is written unquantized): add -q or leave {_them(named)} out")
        return
    if args.q_mode == "affine":
        allowed = {"q_bits": BITS, "q_group_size": GROUP_SIZES}
        for dest, value in (("q_bits", args.q_bits), ("q_group_size", args.q_group_size)):
            if value is not None and value not in allowed[dest]:
                raise UsageError(f"mlx-lm convert: {given[dest]} must be one of {', '.join(map(str, allowed[dest]))} "
                                 f"(MLX's affine quantization), got {value}")
    elif args.q_mode in MODES:  # a float format: its bits and group size are fixed
        for dest, value, fixed in (("q_bits", args.q_bits, MODES[args.q_mode][0]),
                                   ("q_group_size", args.q_group_size, MODES[args.q_mode][1])):
            if value is not None and value != fixed:
                raise UsageError(f"mlx-lm convert: --q-mode {args.q_mode} has {given[dest]} {fixed}, got {value}")
    if args.quant_predicate is not None and args.q_bits is not None:
        raise UsageError(f"mlx-lm convert: --quant-predicate {args.quant_predicate} sets every layer's bits, so "
                         f"{given['q_bits']} would be ignored: leave it out")


def check_generate_prompt(args: argparse.Namespace, given: dict[str, str]) -> None:
    """generate's prompt must hold text: ``--prompt -`` with nothing on stdin (or ``--prompt ''``)
    generated from no prompt at all without a word. Stdin is read here, before the model loads,
    and handed on unchanged to mlx-lm's own read (``run`` restores ``sys.stdin``)."""
    from .generate import read_stdin_text

    if args.prompt == "-":
        text = read_stdin_text()
        if not text:
            raise UsageError(f"mlx-lm generate: {given.get('prompt', '--prompt')} - read nothing from stdin: "
                             "the prompt is empty")
        sys.stdin = io.StringIO(text)
    elif args.prompt == "":
        raise UsageError(f"mlx-lm generate: {given.get('prompt', '--prompt')} is empty: give the prompt's text")


def check_kv_options(command: str, given: dict[str, str], model) -> None:
    """UsageError for KV-cache options (:data:`KV_CACHE_OPTIONS`; the server has all but
    --max-kv-size) given for an xLSTM, which mlx-lm ignored."""
    from .. import mlx_lm_model

    kv_options = [given[dest] for dest in KV_CACHE_OPTIONS if dest in given]
    if kv_options and isinstance(model, mlx_lm_model.Model):
        raise UsageError(f"mlx-lm {command}: {', '.join(kv_options)} set{'s' if len(kv_options) == 1 else ''} an "
                         "attention model's KV cache; xLSTM keeps a fixed-size recurrent state, no KV cache, so "
                         f"{_them(kv_options, subject=True)} would change nothing: leave {_them(kv_options)} out")


def check_no_draft_for_xlstm(command: str, args: argparse.Namespace, given: dict[str, str], model) -> None:
    """UsageError for ``--draft-model`` where ``model`` (the main or the draft model) is an
    xLSTM: speculative decoding rewinds both models' caches past the rejected draft tokens, and an
    xLSTM's recurrent state cannot be rewound. mlx-lm refused it only after loading both models
    (generate: "Speculative decoding requires a trimmable prompt cache"), and its server listened
    and failed every request."""
    from .. import mlx_lm_model

    if getattr(args, "draft_model", None) is not None and isinstance(model, mlx_lm_model.Model):
        raise UsageError(f"mlx-lm {command}: {given.get('draft_model', '--draft-model')} {args.draft_model}: "
                         "speculative decoding rewinds the models' caches past rejected draft tokens, and an "
                         "xLSTM's recurrent state cannot be rewound; leave --draft-model out")


def check_generate_loaded(args: argparse.Namespace, given: dict[str, str], model, tokenizer) -> None:
    """Once generate has loaded its model: UsageError for KV-cache options given for an xLSTM
    (:data:`KV_CACHE_OPTIONS`), and for chat-template options (:data:`CHAT_TEMPLATE_OPTIONS`)
    where no chat template is applied; mlx-lm ignored both."""
    check_kv_options("generate", given, model)
    check_no_draft_for_xlstm("generate", args, given, model)
    templated = [given[dest] for dest in CHAT_TEMPLATE_OPTIONS if dest in given]
    if not templated or (tokenizer.has_chat_template and not args.ignore_chat_template):
        return
    why = ("--ignore-chat-template is given" if args.ignore_chat_template
           else "the model's tokenizer has no chat template (no chat_template)")
    goes = "goes" if len(templated) == 1 else "go"
    raise UsageError(f"mlx-lm generate: {', '.join(templated)} only {goes} into the chat template, and {why}: "
                     f"{_them(templated, subject=True)} would be dropped; put the text into --prompt or leave "
                     f"{_them(templated)} out")


def check_fuse_gguf(args: argparse.Namespace, given: dict[str, str], model=None, tokenizer=None) -> None:
    """fuse's GGUF options must take effect: UsageError for ``--gguf-path`` without
    ``--export-gguf`` (no GGUF was written), and, once the model is loaded (``model``), for
    ``--export-gguf`` of an xLSTM: mlx-lm converts Llama, Mistral and Mixtral only, and refused
    the xLSTM only after writing the fused model."""
    from .. import mlx_lm_model

    if "gguf_path" in given and not args.export_gguf:
        raise UsageError(f"mlx-lm fuse: {given['gguf_path']} names the file --export-gguf writes; without "
                         "--export-gguf no GGUF is written: add --export-gguf or leave it out")
    if args.export_gguf and isinstance(model, mlx_lm_model.Model):
        raise UsageError(f"mlx-lm fuse: {given['export_gguf']}: mlx-lm writes GGUF for Llama, Mistral and Mixtral "
                         "models only, not xLSTM; leave it out")


def check_draft_tokens(command: str, args: argparse.Namespace, given: dict[str, str]) -> None:
    """UsageError for ``--num-draft-tokens`` without ``--draft-model``: it sizes speculative
    decoding's drafts, and without a draft model mlx-lm ignored it without a word."""
    if "num_draft_tokens" in given and getattr(args, "draft_model", None) is None:
        raise UsageError(f"mlx-lm {command}: {given['num_draft_tokens']} only applies with --draft-model "
                         "(speculative decoding, which an xLSTM cannot use: its state cannot be rewound); leave it out")


def check_generate_parsed(args: argparse.Namespace, given: dict[str, str]) -> None:
    """generate's parsed arguments: :func:`check_draft_tokens`, then :func:`check_generate_prompt`."""
    check_draft_tokens("generate", args, given)
    check_generate_prompt(args, given)


#: Checks of a command's parsed arguments, before mlx-lm does anything with them.
AFTER_PARSE: dict[str, Callable[[argparse.Namespace, dict[str, str]], None]] = {
    "convert": check_convert_quantization, "generate": check_generate_parsed, "fuse": check_fuse_gguf,
    "server": lambda args, given: check_draft_tokens("server", args, given)}
#: Checks once a command has loaded its model (what it is and its tokenizer are known: a Hub id's
#: too), before it generates or writes anything.
AFTER_LOAD: dict[str, Callable[..., None]] = {"generate": check_generate_loaded, "fuse": check_fuse_gguf}


def count_at_least(minimum: int, maximum: int | None = None):
    """argparse type of an mlx-lm count option: an integer >= ``minimum`` (and <= ``maximum``)."""
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{_MINIMUM_MEANS.get(minimum, '')}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    return count


def number_in(low: float, high: float, above: bool = False):
    """argparse type of an mlx-lm real-valued option: a finite number in [``low``, ``high``]
    (``above``: greater than ``low``)."""
    def number(text: str) -> float:
        value = finite_float(text)
        if not (low < value if above else low <= value) or value > high:
            span = (f"> {low:g}" if above else f">= {low:g}") if high == math.inf else f"in [{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value

    return number


def byte_size(parse: Callable[[str], int]):
    """argparse type of server's ``--prompt-cache-bytes``: mlx-lm's own size parser (``parse``),
    its failures one line: "abc", "-5" and "12K" ended in a decimal.InvalidOperation or KeyError
    traceback."""
    def size(text: str) -> int:
        try:
            return parse(text)
        except (ArithmeticError, LookupError, ValueError):
            raise argparse.ArgumentTypeError(f"must be a size in bytes: a number, optionally followed by M, MB, G "
                                             f"or GB (e.g. 512MB), got {text!r}") from None

    return size


def chat_template_arguments(parse: Callable[[str], Any]):
    """argparse type of server's ``--chat-template-args``: a JSON object (``parse``: mlx-lm's
    json.loads) of template variables. Any other JSON, or a key the template's call already
    takes (``tokenize``, ``add_generation_prompt``: serve's RESERVED_TEMPLATE_KWARGS), was
    taken, and then every chat request failed ("argument after ** must be a mapping", "got
    multiple values for keyword argument")."""
    from ..serve import RESERVED_TEMPLATE_KWARGS

    def arguments(text: str) -> dict:
        try:
            value = parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"is not valid JSON ({err}): give a JSON object such as "
                                             "'{\"enable_thinking\": false}'") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"must be a JSON object of template variables such as "
                                             f"'{{\"enable_thinking\": false}}', got {text!r}")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(value))
        if reserved:
            raise argparse.ArgumentTypeError(f"must not set {', '.join(reserved)}: the chat template call's own "
                                             "arguments, which the server sets, not template variables")
        return value

    return arguments


#: Options whose mlx-lm type is wrapped (per command: option -> wrapper of mlx-lm's type).
TYPE_WRAPPERS = {"server": {"--prompt-cache-bytes": byte_size, "--chat-template-args": chat_template_arguments}}


def check_counts(parser: argparse.ArgumentParser, command: str) -> None:
    """Give the integer options of mlx-lm ``command``'s ``parser`` named in :data:`COUNT_MINIMUMS`
    their bounds (and :data:`COUNT_MAXIMUMS`), its float options of :data:`FLOAT_RANGES` their
    range, every other float option :func:`~xlstm_metal.cli.finite_float`, and the options of
    :data:`TYPE_WRAPPERS` their wrapped type (once)."""
    minimums = COUNT_MINIMUMS.get(command, {})
    maximums = COUNT_MAXIMUMS.get(command, {})
    ranges = FLOAT_RANGES.get(command, {})
    above = FLOAT_ABOVE.get(command, {})
    for action in parser._actions:
        bounds = {minimums[o] for o in action.option_strings if o in minimums}
        if bounds and action.type is int:
            top = [maximums[o] for o in action.option_strings if o in maximums]
            action.type = count_at_least(bounds.pop(), top[0] if top else None)
        if action.type is float:
            spans = [ranges[o] for o in action.option_strings if o in ranges]
            lows = [above[o] for o in action.option_strings if o in above]
            action.type = (number_in(*spans[0]) if spans else number_in(lows[0], math.inf, above=True) if lows
                           else finite_float)
        wrappers = [TYPE_WRAPPERS.get(command, {})[o] for o in action.option_strings
                    if o in TYPE_WRAPPERS.get(command, {})]
        if wrappers and action.type is not None and not getattr(action.type, "wrapped", False):
            action.type = wrappers[0](action.type)
            action.type.wrapped = True


@contextlib.contextmanager
def hardened_mlx_lm_parsers(command: str, parsed: dict[str, Any] | None = None):
    """While mlx-lm's ``command`` parses its arguments, its parsers refuse a single-valued option
    given more than once, as every xlstm-metal parser does (:func:`~xlstm_metal.cli.harden_parser`),
    and a count below its minimum (:data:`COUNT_MINIMUMS`): mlx-lm builds its parsers inside its
    ``main()``, so they are hardened as they parse. Its first complete parse goes into ``parsed``
    (``args``, and ``given``: dest -> the option as spelled, abbreviations and ``--opt=X`` read
    as argparse reads them) and through :data:`AFTER_PARSE`'s check, before mlx-lm acts on it."""
    original = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        harden_parser(self, value_types=False)
        check_counts(self, command)
        namespace, extras = original(self, args, namespace)
        if parsed is not None and not parsed and not extras:  # extras: argparse refuses them next
            parsed.update(args=namespace, given=dict(_given_options(namespace)))
            if command in AFTER_PARSE:
                AFTER_PARSE[command](namespace, parsed["given"])
        return namespace, extras

    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args = original


@contextlib.contextmanager
def checked_after_loading(module, parsed: dict[str, Any], check: Callable[..., None]):
    """While mlx-lm's command ``module`` runs, the first model it loads (``module.load``; a draft
    model comes later) goes through ``check(args, given, model, tokenizer)`` with the arguments
    :func:`hardened_mlx_lm_parsers` put into ``parsed``."""
    original = module.load
    checked = []

    def load(*args, **kwargs):
        loaded = original(*args, **kwargs)
        if not checked and parsed:
            checked.append(True)
            check(parsed["args"], parsed["given"], loaded[0], loaded[1])
        elif parsed:  # generate's --draft-model, loaded after the model
            check_no_draft_for_xlstm("generate", parsed["args"], parsed["given"], loaded[0])
        return loaded

    module.load = load
    try:
        yield
    finally:
        module.load = original


@contextlib.contextmanager
def prompt_cache_file_is_named(generate):
    """While mlx-lm's ``generate`` runs, a ``--prompt-cache-file`` it cannot read is a UsageError
    naming the option: a missing file or one that is not safetensors ended in "cannot read the
    weights" (it holds no weights), a weight file in "not enough values to unpack"."""
    original = generate.load_prompt_cache

    def load_prompt_cache(file_name, *args, **kwargs):
        if not Path(file_name).expanduser().is_file():
            what = "is a directory" if Path(file_name).expanduser().is_dir() else "does not exist"
            raise UsageError(f"mlx-lm generate: --prompt-cache-file {file_name} {what}")
        try:
            return original(file_name, *args, **kwargs)
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as err:
            raise UsageError(f"mlx-lm generate: --prompt-cache-file {file_name} is not a prompt cache mlx-lm can "
                             f"read ({type(err).__name__}: {err}); mlx-lm's cache_prompt / save_prompt_cache "
                             "write one") from None

    generate.load_prompt_cache = load_prompt_cache
    try:
        yield
    finally:
        generate.load_prompt_cache = original


@contextlib.contextmanager
def output_carries_our_model_file(command):
    """While mlx-lm's ``convert`` or ``fuse`` runs, an xLSTM's output carries our model file
    (``xlstm_mlx_lm.py``, named by config.json's ``model_file``), as every checkpoint
    :func:`xlstm_metal.save_model` writes does. mlx-lm copies it from a source of ours, but a
    transformers or NX-AI source has none: the output said model type ``xlstm`` and nothing
    else, which mlx-lm resolves only inside this command (:func:`register_model_type`), so
    ``mlx_lm.load(OUT, trust_remote_code=True)`` refused it ("Model type xlstm not supported")."""
    from ..checkpoint_files import mlx_lm_config, write_shim
    from ..models.xlstm_2024 import xLSTMLMModel
    from ..models.xlstm_large import xLSTMLarge

    original = command.save

    def write_text(path: Path, text: str) -> None:
        path.write_text(text)
        os.chmod(path, 0o644)

    def save(dst_path, src_path_or_repo, model, tokenizer, config, *args, **kwargs):
        if not isinstance(model, (xLSTMLarge, xLSTMLMModel)) or not isinstance(config, dict):
            return original(dst_path, src_path_or_repo, model, tokenizer, config, *args, **kwargs)
        result = original(dst_path, src_path_or_repo, model, tokenizer, mlx_lm_config(config), *args, **kwargs)
        if not writes_our_shim(str(dst_path)):  # (a source of ours: mlx-lm copied the file)
            write_shim(Path(dst_path), write_text)
        return result

    command.save = save
    try:
        yield
    finally:
        command.save = original


@contextlib.contextmanager
def convert_output_is_finite(convert):
    """mlx-lm ``convert`` --dtype float16 of weights past its range wrote inf (exit 0). Its save
    casts piece by piece, so the shards are read back after it, a tensor at a time; on NaN or inf
    the output, which convert created (it refuses an existing --mlx-path), is removed."""
    import shutil

    import mlx.core as mx

    original = convert.save

    def save(dst_path, *args, **kwargs):
        existed = Path(dst_path).exists()
        result = original(dst_path, *args, **kwargs)
        bad = []
        for shard in sorted(Path(dst_path).glob("*.safetensors")):
            weights = mx.load(str(shard))
            while weights:  # (popped: one tensor in memory at a time)
                name, value = weights.popitem()
                if mx.issubdtype(value.dtype, mx.inexact) and not mx.all(mx.isfinite(value)).item():
                    bad.append((name, str(value.dtype).removeprefix("mlx.core.")))
        if bad:
            if not existed:
                shutil.rmtree(dst_path, ignore_errors=True)
            dtypes = " / ".join(sorted({dtype for _, dtype in bad}))
            raise UsageError(f"mlx-lm convert: the result holds NaN or infinite values in {len(bad)} {dtypes} "
                             f"tensor(s) ({', '.join(name for name, _ in bad[:3])}{', ...' if len(bad) > 3 else ''}): "
                             f"{dtypes} cannot hold them (try --dtype bfloat16 or float32); {dst_path} was removed")
        return result

    convert.save = save
    try:
        yield
    finally:
        convert.save = original


@contextlib.contextmanager
def convert_quantizes_what_it_says(convert):
    """While mlx-lm's ``convert`` runs, its quantization must reach the layers: a group size that
    divides no layer's input width (``-q --q-group-size 128`` of a 64-wide model) quantized none
    and wrote a float model whose config.json said it was quantized; that is a UsageError before
    anything is written. Layers kept in float by the width alone are named in a warning."""
    import mlx.nn as nn

    original = convert.quantize_model

    def quantized(model) -> list[str]:
        return [name for name, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]

    def quantize_model(model, config, group_size, bits, *args, **kwargs):
        # A quantized model's layers have no float weights left to quantize: mlx-lm wrote the
        # model as it was (its config's bits and group size) whatever -q --q-bits asked.
        if quantized(model):
            held = config.get("quantization") or {}
            how = (f" ({held['bits']}-bit, groups of {held['group_size']})"
                   if isinstance(held.get("bits"), int) and isinstance(held.get("group_size"), int) else "")
            raise UsageError(f"mlx-lm convert: the model is already quantized{how}: -q cannot quantize it again "
                             "and would write it as it is; convert it with --dequantize first, then quantize that")
        model, config = original(model, config, group_size, bits, *args, **kwargs)
        group = (config.get("quantization") or {}).get("group_size", group_size)
        done = quantized(model)
        # (layers the model keeps in float on purpose, the i/f gates, are not the width's doing)
        left = [name for name, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % group]
        if not done:
            raise UsageError(f"mlx-lm convert: quantization with groups of {group} reached no layer (each layer's "
                             f"input width must be a multiple of the group size): choose a smaller --q-group-size")
        if left:
            stay = "layers stay" if len(left) > 1 else "layer stays"
            print(f"warning: {len(left)} {stay} in float (input width not a multiple of {group}): "
                  f"{', '.join(left[:4])}{', ...' if len(left) > 4 else ''}", file=sys.stderr)
        return model, config

    convert.quantize_model = quantize_model
    try:
        yield
    finally:
        convert.quantize_model = original


def check_resume_adapter_file(path: str) -> None:
    """lora's ``--resume-adapter-file`` must be a readable safetensors file: mlx-lm loaded the
    model and data and began training before it failed on it ("cannot read the weights")."""
    from ..loading import CheckpointError, check_weight_file

    target = Path(path).expanduser()
    if not target.is_file():
        what = "is a directory" if target.is_dir() else "does not exist"
        hint = f" (the adapters are {target / ADAPTER_WEIGHTS})" if (target / ADAPTER_WEIGHTS).is_file() else ""
        raise UsageError(f"mlx-lm lora: --resume-adapter-file {path} {what}{hint}")
    try:
        check_weight_file(target)
    except CheckpointError as err:
        raise UsageError(f"mlx-lm lora: --resume-adapter-file: {err}") from None


@contextlib.contextmanager
def lora_keeps_earlier_adapters(lora):
    """While mlx-lm's ``lora`` module runs, --train's --adapter-path (from the command line, its
    --config or the default) is checked before the model loads (:func:`check_adapter_path`), and
    so are --resume-adapter-file and the learning rate (a --config's too)."""
    original = lora.run

    def run(args, *rest, **kwargs):
        if getattr(args, "train", False):
            check_adapter_path(str(args.adapter_path))
            if getattr(args, "resume_adapter_file", None) is not None:
                check_resume_adapter_file(str(args.resume_adapter_file))
            # --config's learning_rate skips the parser's check (FLOAT_ABOVE): -1 trained uphill
            rate = getattr(args, "learning_rate", None)
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < math.inf:
                raise UsageError(f"mlx-lm lora: the learning rate (--learning-rate or the --config's learning_rate) "
                                 f"must be a finite number > 0, got {rate!r}")
        return original(args, *rest, **kwargs)

    lora.run = run
    try:
        yield
    finally:
        lora.run = original


def _some(names: list[str], limit: int = 3) -> str:
    """The first ``limit`` of ``names``, and how many more."""
    more = f", and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_resume_adapters_fit(path: str, model, args) -> None:
    """lora's ``--resume-adapter-file`` must hold the tensors this run trains, ``model`` being
    adapted and frozen as mlx-lm trains it (LoRA layers applied, only the adapters trainable):
    every tensor of the file names a trainable parameter of the same shape, and every trainable
    parameter is in the file, as training saves them. mlx-lm loaded the file with
    ``load_weights(strict=False)``: adapters saved for another model, other blocks (--num-layers)
    or another rank resumed nothing (or part), silently, and training began from fresh adapters;
    a tensor of another shape replaced the adapter's. UsageError naming the file and the first
    tensors that do not fit, before anything is trained or written."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    held = {name: tuple(array.shape) for name, array in mx.load(str(Path(path).expanduser())).items()}
    shapes = {name: tuple(array.shape) for name, array in tree_flatten(model.parameters())}
    trained = {name for name, _ in tree_flatten(model.trainable_parameters())}
    misshaped = [f"{name} {list(held[name])} (the model's {list(shapes[name])})"
                 for name in sorted(held) if name in trained and held[name] != shapes[name]]
    unknown = sorted(name for name in held if name not in shapes)
    frozen = sorted(name for name in held if name in shapes and name not in trained)
    missing = sorted(trained - held.keys())
    if not (misshaped or unknown or frozen or missing):
        return
    problems = []
    if misshaped:
        problems.append(f"{len(misshaped)} of its tensors have another shape: {_some(misshaped, 2)}")
    if unknown:
        problems.append(f"{len(unknown)} of its {len(held)} tensors name no parameter of the model: "
                        f"{_some(unknown, 2)}")
    if frozen:
        problems.append(f"{len(frozen)} name parameters this run does not train: {_some(frozen, 2)}")
    if missing and not held:
        problems.append(f"it holds no tensors (this run trains {len(trained)})")
    elif missing:
        none = len(missing) == len(trained)
        problems.append(f"{'none' if none else len(missing)} of the {len(trained)} tensors this run trains are"
                        f"{'' if none else ' not'} in it ({'they' if none else 'those'} would start fresh: "
                        f"{_some(missing, 2)})")
    rank = (args.lora_parameters or {}).get("rank") if args.fine_tune_type in ("lora", "dora") else None
    run = f"--fine-tune-type {args.fine_tune_type}, --num-layers {args.num_layers}" + (
        f", rank {rank}" if rank is not None else "")
    raise UsageError(f"mlx-lm lora: --resume-adapter-file {path} does not hold the adapters this run trains "
                     f"({run}): {'; '.join(problems)}. Resume with the model and the settings they were trained "
                     "with (their adapter_config.json records them)")


@contextlib.contextmanager
def lora_resumes_what_it_names(lora):
    """While mlx-lm's ``lora`` module trains, the weights it resumes from (``--resume-adapter-file``,
    read with ``model.load_weights`` once the model is adapted) are checked against the adapted
    model first (:func:`check_resume_adapters_fit`)."""
    original = lora.train_model

    def train_model(args, model, *rest, **kwargs):
        resume = getattr(args, "resume_adapter_file", None)
        if resume is None:
            return original(args, model, *rest, **kwargs)

        def load_weights(file_or_weights, strict=True):
            if isinstance(file_or_weights, (str, os.PathLike)) and str(file_or_weights) == str(resume):
                model.__dict__.pop("load_weights", None)  # mlx-lm's resume: checked once
                check_resume_adapters_fit(str(resume), model, args)
                file_or_weights = str(Path(file_or_weights).expanduser())
            return type(model).load_weights(model, file_or_weights, strict=strict)

        model.load_weights = load_weights  # this model only (nn.Module keeps a function as an attribute)
        try:
            return original(args, model, *rest, **kwargs)
        finally:
            model.__dict__.pop("load_weights", None)

    lora.train_model = train_model
    try:
        yield
    finally:
        lora.train_model = original


@contextlib.contextmanager
def config_must_be_a_mapping():
    """While lora runs, its ``--config`` YAML must hold a mapping of options: lora reads it with
    ``yaml.load`` (its only YAML read) and takes ``.items()`` of the result, so an empty file or a
    list ended in an AttributeError traceback. ValueError naming the file otherwise."""
    import yaml

    original = yaml.load

    def load(stream, Loader):
        data = original(stream, Loader)
        if not isinstance(data, dict):
            name = getattr(stream, "name", "the file")
            kind = "nothing" if data is None else f"a {type(data).__name__}"
            raise ValueError(f"--config {name} must hold a YAML mapping of options (name: value), got {kind}")
        return data

    yaml.load = load
    try:
        yield
    finally:
        yaml.load = original


class _DefaultNumLayers(int):
    """mlx-lm lora's default ``num_layers`` (16), told apart from a value the user gave (on the
    command line or in ``--config``: plain ints)."""


@contextlib.contextmanager
def lora_layers_default_fits_the_model():
    """While lora runs, its default ``--num-layers`` (the last 16 blocks) means every block of a
    model with fewer: mlx-lm refused it ("Requested to train 16 layers but the model only has 4
    layers"), so ``lora --model M --train --data D`` failed on every model below 16 blocks (the
    training presets have 2 to 12). A ``--num-layers`` given (or set in ``--config``) is mlx-lm's
    to check; the number used is recorded in the adapters' ``adapter_config.json``."""
    import mlx_lm.lora as lora

    defaults, train_model = lora.CONFIG_DEFAULTS, lora.train_model
    default = defaults.get("num_layers")

    def train(args, model, *rest, **kwargs):
        import mlx.core as mx
        import mlx.nn as nn

        from ..quantization import quantization_config

        if args.fine_tune_type == "full" and quantization_config(model) is not None:
            # it trained the packed weights as floats, then MLX's "[dequantize] ..." at step 2
            raise UsageError("mlx-lm lora: --fine-tune-type full cannot train a quantized model's packed weights: "
                             "use lora or dora, or train a float copy (xlstm-metal convert MODEL OUT)")
        layers = len(model.layers)
        if args.num_layers == 0 or args.num_layers < -1:  # mlx-lm's layers[-0:] trained every block
            raise UsageError(f"mlx-lm lora: --num-layers must be -1 (all) or 1 to {layers}, got {args.num_layers}")
        keys, n = (args.lora_parameters or {}).get("keys"), args.num_layers
        adapted = {f"layers.{i}.{p}": m for i, b in enumerate(model.layers) if n < 0 or i >= layers - n
                   for p, m in b.named_modules() if p in (keys or [p])}
        if keys and not adapted and args.fine_tune_type != "full":  # MLX's "[grad] Must specify at least one..."
            raise UsageError(f"mlx-lm lora: lora_parameters' keys {keys} name no layer of the blocks trained")
        linear = (nn.Linear, nn.QuantizedLinear) if args.fine_tune_type == "dora" else ()
        for name, m in ((k, m) for k, m in adapted.items() if isinstance(m, linear)):  # DoRA divides rows by norms
            q = isinstance(m, nn.QuantizedLinear)
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, m.mode) if q else m.weight
            if not mx.all(mx.any(w != 0, axis=1)).item():
                raise UsageError(f"mlx-lm lora: --fine-tune-type dora: {name} has an all-zero weight row (NaN loss)")
        if isinstance(args.num_layers, _DefaultNumLayers):
            args.num_layers = int(args.num_layers)
            if args.num_layers > layers:
                print(f"mlx-lm lora: the model has {layers} blocks, fewer than --num-layers' default "
                      f"{args.num_layers}: training all {layers}", file=sys.stderr)
                args.num_layers = layers
        return train_model(args, model, *rest, **kwargs)

    if isinstance(default, int):
        defaults["num_layers"] = _DefaultNumLayers(default)
    lora.train_model = train
    try:
        yield
    finally:
        lora.train_model = train_model
        if isinstance(default, int):
            defaults["num_layers"] = default


@contextlib.contextmanager
def server_loads_model_first(parsed: dict[str, Any] | None = None):
    """While mlx-lm's server starts, its model is loaded before it listens, in this thread:
    mlx-lm loads it in its generation thread, where a model that cannot be loaded (a bad config,
    mis-shaped weights) was logged with a traceback from a dead thread while the server went on
    listening. Its error now ends the command, as do KV-cache options given for an xLSTM
    (:func:`check_kv_options`, with the arguments :func:`hardened_mlx_lm_parsers` put into
    ``parsed``), chat-template options that cannot work (:func:`check_server_chat_template`),
    ``--use-default-chat-template`` where there is no template to use (an AttributeError
    traceback), and ``--pipeline`` in one process (ignored). One process only: under mlx.launch
    every rank still loads its part in the generation thread."""
    import mlx_lm.server as server

    original = server.run

    def run(host, port, model_provider, *args, **kwargs):
        from ..distributed.comm import world

        if parsed and getattr(parsed["args"], "pipeline", False) and not model_provider.is_distributed:
            raise UsageError(f"mlx-lm server: {parsed['given'].get('pipeline', '--pipeline')} splits the model "
                             "across the processes mlx.launch starts; in one process it would change nothing: "
                             "leave it out (or start the server with mlx.launch -n N)")
        if world().rank() == 0:  # the process that listens (world(): the launch environment checked)
            check_listen_address(host, port)
        if not model_provider.is_distributed:
            try:
                model_provider.load_default()  # the generation thread then finds it loaded
            except AttributeError as err:
                if "default_chat_template" not in str(err):
                    raise
                # transformers 4.43 dropped tokenizers' default templates: an AttributeError traceback
                raise UsageError("mlx-lm server: --use-default-chat-template: the model's tokenizer has no chat "
                                 "template and this transformers has no default one to fall back on; give one "
                                 "with --chat-template TEMPLATE or leave the option out") from None
            if parsed:
                check_server_chat_template(parsed["args"], parsed["given"], model_provider.tokenizer)
                check_kv_options("server", parsed["given"], model_provider.model)
                check_no_draft_for_xlstm("server", parsed["args"], parsed["given"], model_provider.model)
                if model_provider.draft_model is not None:
                    check_no_draft_for_xlstm("server", parsed["args"], parsed["given"], model_provider.draft_model)
        return original(host, port, model_provider, *args, **kwargs)

    server.run = run
    try:
        yield
    finally:
        server.run = original


#: The message the server's chat template check renders (it must come back in the prompt).
PROBE_MESSAGE = "xlstm-metal checks the chat template"


def check_server_chat_template(args: argparse.Namespace, given: dict[str, str], tokenizer) -> None:
    """Once the server's model is loaded: UsageError for ``--chat-template-args`` where no chat
    template is applied (mlx-lm dropped them without a word), and for a ``--chat-template`` (or
    ``--chat-template-args``) that cannot render a one-message chat, or renders it without the
    message (a file name given as the template is the template's text): the server listened, and
    every chat request failed (a Jinja syntax error, a template variable of the wrong type) or got
    the same prompt whatever its messages."""
    if "chat_template" in given and not args.chat_template:  # mlx-lm's "if chat_template:" skipped it
        raise UsageError(f"mlx-lm server: {given['chat_template']} is empty: give the template's text or leave it out")
    if "chat_template_args" in given and not tokenizer.has_chat_template:
        raise UsageError(f"mlx-lm server: {given['chat_template_args']} only goes into the chat template, and the "
                         "model's tokenizer has none: it would be dropped; give --chat-template or leave it out")
    if not {"chat_template", "chat_template_args"} & given.keys() or not tokenizer.has_chat_template:
        return
    import jinja2

    named = " and ".join(given[d] for d in ("chat_template", "chat_template_args") if d in given)
    try:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROBE_MESSAGE}],
                                               add_generation_prompt=True, tokenize=False,
                                               **(args.chat_template_args or {}))
    except jinja2.TemplateError as err:
        raise UsageError(f"mlx-lm server: the chat template ({named}) cannot render a chat: {type(err).__name__}: "
                         f"{one_line(str(err))}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise UsageError(f"mlx-lm server: the chat template cannot render a chat with {named}: "
                         f"{type(err).__name__}: {one_line(str(err))}") from None
    if "chat_template" in given and PROBE_MESSAGE not in str(prompt):
        raise UsageError(f"mlx-lm server: {given['chat_template']} renders no message of the chat (every request "
                         "would get the same prompt): give the template's text, which loops over messages, "
                         "not a file name")


def check_server_request(handler) -> None:
    """ValueError (mlx-lm's handler answers it with a 400 naming it) for a request to mlx-lm's
    server that mlx-lm's own checks let through and that then broke the server: a ``stop`` that is
    not text (the generation thread died, and every later request got "generation thread died"),
    a ``seed`` MLX cannot take (a dropped connection), a ``logit_bias`` token id outside the
    vocabulary (the process crashed, SIGSEGV). Also what it ignored without a word: ``n`` other
    than 1 (one choice came back), and draft-model fields for an xLSTM, which cannot rewind its
    state. ``xlstm-metal serve`` checks requests fully."""
    from .. import mlx_lm_model

    body = handler.body
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(word, str) for word in stop)):
        raise ValueError("stop must be a string or a list of strings")
    if handler.seed is not None and not 0 <= handler.seed < 2**64:
        raise ValueError(f"seed must be in 0..2**64-1, got {handler.seed}")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ValueError(f"n must be 1 (this server returns one choice per request), got {n!r}")
    provider = handler.response_generator.model_provider
    model = provider.model
    drafting = sorted({"draft_model", "num_draft_tokens"} & body.keys())
    if drafting and isinstance(model, mlx_lm_model.Model):
        raise ValueError(f"{' and '.join(drafting)}: speculative decoding rewinds the model's cache past rejected "
                         "draft tokens, and an xLSTM's recurrent state cannot be rewound; leave it out")
    served = handler.requested_model in ("default_model", provider.cli_args.model)
    config = getattr(model, "config", None) or getattr(model, "args", None)
    vocab_size = getattr(config, "vocab_size", None) if served else None
    for token in handler.logit_bias or ():
        if token < 0 or (isinstance(vocab_size, int) and token >= vocab_size):
            inside = f" (0..{vocab_size - 1})" if isinstance(vocab_size, int) else ""
            raise ValueError(f"logit_bias token id {token} is not in the vocabulary{inside}")


@contextlib.contextmanager
def server_requests_checked():
    """While mlx-lm's server runs, each request also goes through :func:`check_server_request`,
    after mlx-lm's own ``validate_model_parameters`` (whose ValueError its handler answers with
    a 400); an exact prompt-cache hit (an xLSTM's caches keep every prefix) leaves the last
    token to compute: "empty prompt" killed its generation thread."""
    import mlx_lm.server as server

    original = server.APIHandler.validate_model_parameters

    def validate_model_parameters(self):
        original(self)
        check_server_request(self)

    fetch, scan = server.LRUPromptCache.fetch_nearest_cache, server.scan_cache_dir

    def scan_cache_dir():  # without a Hugging Face cache, GET /v1/models sent a 200 and no body
        from huggingface_hub.errors import CacheNotFound

        try:
            return scan()
        except CacheNotFound:
            return argparse.Namespace(repos=())

    def fetch_nearest_cache(self, model, tokens):
        cache, rest = fetch(self, model, tokens)
        if cache is not None and not rest:
            cache, rest = fetch(self, model, tokens[:-1]) if len(tokens) > 1 else (None, [])
            rest = [*rest, *tokens[-1:]]
        return cache, rest

    server.APIHandler.validate_model_parameters = validate_model_parameters
    server.LRUPromptCache.fetch_nearest_cache, server.scan_cache_dir = fetch_nearest_cache, scan_cache_dir
    try:
        yield
    finally:
        server.APIHandler.validate_model_parameters = original
        server.LRUPromptCache.fetch_nearest_cache, server.scan_cache_dir = fetch, scan


def check_listen_address(host: str, port: int) -> None:
    """UsageError unless the server can listen on ``host``:``port`` (resolved as mlx-lm resolves
    it, then bound and let go): a --host that does not resolve or a --port in use ended in a
    traceback from mlx-lm's ``_run_http_server`` after the model had loaded, and the process
    then hung, its generation thread still running."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        raise UsageError(f"mlx-lm server: --host {host} cannot be resolved ({getattr(err, 'strerror', None) or err})"
                         ) from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server's own socket
        try:
            probe.bind(address)
        except OSError as err:
            raise UsageError(f"mlx-lm server: cannot listen on {host} port {port}: {err.strerror or err}") from None


def writes_our_shim(path: str | None) -> bool:
    """True when ``path`` is a checkpoint directory whose model file is exactly ours."""
    from ..checkpoint_files import MLX_LM_SHIM, SHIM_SOURCE

    if path is None:
        return False
    directory = Path(path).expanduser()
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        shim = (directory / MLX_LM_SHIM).read_text(encoding="utf-8")
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_file") == MLX_LM_SHIM and shim == SHIM_SOURCE


#: Files from which transformers' AutoTokenizer (mlx-lm's loader) builds a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def missing_tokenizer(path: str) -> str | None:
    """The message for a local checkpoint directory without a tokenizer, else None (a hub id, or
    a directory that has one). mlx-lm loads the tokenizer from the model's directory; without
    one its generate stops on a message about input embeddings."""
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file() or any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    return (f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)}): mlx-lm loads it from the model's "
            f"directory; copy the tokenizer files there")


def unreadable_weights(path: str) -> str | None:
    """The message for a local checkpoint directory whose weight files (mlx-lm reads its
    ``model*.safetensors``) are corrupt or cut off, else None; headers only. mlx-lm's ``mx.load``
    failed on them with a RuntimeError traceback (an empty file: "[read] Unable to read 8 bytes
    from file."), and its server logged that from a dead generation thread and kept listening."""
    from ..loading import CheckpointError, check_weight_file

    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        return None
    try:
        for weight_file in sorted(directory.glob("model*.safetensors")):
            check_weight_file(weight_file)
    except CheckpointError as err:
        return str(err)
    return None


def one_line(message: str) -> str:
    """mlx-lm's message on one line: its first line and the first item of a list after it, with
    a count of the rest (adapters for another model listed every mismatched tensor, one a line)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return message.strip()
    more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    return f"{lines[0]} {lines[1]}{more}"


def register_model_type() -> None:
    """Make mlx-lm's ``model_type: xlstm`` lookup find this package's model module."""
    from .. import mlx_lm_model

    sys.modules.setdefault("mlx_lm.models.xlstm", mlx_lm_model)


#: Fields every xLSTM-Large config has, NX-AI's native one (no ``model_type``) included.
_XLSTM_LARGE_FIELDS = ("embedding_dim", "num_heads", "num_blocks", "vocab_size", "qk_dim_factor", "v_dim_factor")


def is_native_xlstm_config(config: dict) -> bool:
    """True for a config.json NX-AI's own classes wrote (no ``model_type``): xLSTMLarge's native
    state dict config, or a 2024 xLSTMLMModel's. This package's model module reads both."""
    from ..config_2024 import is_xlstm_2024_config

    return is_xlstm_2024_config(config) or all(name in config for name in _XLSTM_LARGE_FIELDS)


def tolerate_missing_model_file() -> None:
    """Let mlx-lm load a checkpoint whose config names our model file without holding it
    (transformers' ``save_pretrained`` keeps config.json's ``model_file`` but not the file): such
    a config with a ``model_type`` (xLSTM-Large's) loses ``model_file`` as mlx-lm reads it, so the
    registered ``xlstm`` model type (what the file would import) builds the model. A 2024 config,
    which has no model type, still needs the file. An xLSTM-Large config is read in the form
    :func:`xlstm_metal.save_model` writes (:meth:`xLSTMConfig.to_dict`), which convert and fuse
    then write: transformers opens their output of an NX-AI native checkpoint."""
    import mlx_lm.utils as utils

    from ..checkpoint_files import MLX_LM_SHIM
    from ..config import xLSTMConfig
    from ..config_2024 import is_xlstm_2024_config

    read = utils.load_config
    if getattr(read, "tolerates_missing_model_file", False):
        return

    def load_config(model_path):
        config = read(model_path)
        if (config.get("model_file") == MLX_LM_SHIM and "model_type" in config
                and not (Path(model_path) / MLX_LM_SHIM).is_file()):
            config.pop("model_file")
        if "model_type" not in config and "model_file" not in config and is_native_xlstm_config(config):
            config["model_type"] = "xlstm"  # mlx-lm looked it up unguarded: a KeyError traceback
        if config.get("model_type") == "xlstm" and not is_xlstm_2024_config(config):
            # In the form save_model writes: convert and fuse save this dict beside the weights
            # as sanitize left them, and NX-AI's native config (no hidden_size, weight_mode
            # "fused" for tensors now split) gave a checkpoint transformers could not open.
            config = xLSTMConfig.from_dict(config).to_dict()
        return config

    load_config.tolerates_missing_model_file = True
    utils.load_config = load_config


def run(args: argparse.Namespace) -> int:
    import xlstm_metal  # noqa: F401  (binds OpenBLAS before mlx-lm imports mlx)

    try:
        module = importlib.import_module(f"mlx_lm.{args.mlx_lm_command}")
    except ImportError as err:
        raise UsageError(f"mlx-lm is not installed ({err}); pip install 'xlstm-metal[serve]'") from None
    import yaml  # mlx-lm's dependency: lora reads --config with it
    register_model_type()
    tolerate_missing_model_file()
    forwarded = list(args.mlx_lm_args)
    model = model_argument(args.mlx_lm_command, forwarded)
    if args.mlx_lm_command == "convert" and model is None and not {"-h", "--help"} & set(forwarded):
        raise UsageError("mlx-lm convert needs the model to convert: --hf-path DIR (or --model DIR)")
    if model is not None and not {"-h", "--help"} & set(forwarded):
        if Path(model).expanduser().is_file():
            # mlx-lm read <file>/config.json: a NotADirectoryError traceback (server: a dead
            # generation thread behind a server that kept listening).
            raise UsageError(f"mlx-lm {args.mlx_lm_command}: model path {model} is a file; "
                             "give the checkpoint directory")
        directory = Path(model).expanduser()
        if (directory / "config.yaml").is_file() and not (directory / "config.json").exists():
            # A 2024 xLSTMLMModel directory as NX-AI's repository keeps it: mlx-lm reads only
            # config.json (its error named the missing file, not the way on).
            raise UsageError(f"mlx-lm {args.mlx_lm_command}: {model} has config.yaml but no config.json, which "
                             f"mlx-lm reads; `xlstm-metal convert {model} OUT` writes a checkpoint with one "
                             "(xlstm-metal's own commands read config.yaml as it is)")
        if looks_local(model) and not Path(model).expanduser().exists():
            raise UsageError(f"mlx-lm {args.mlx_lm_command}: model path {model} does not exist")
        missing = missing_tokenizer(model)
        if missing is not None:
            raise UsageError(missing)
        unreadable = unreadable_weights(model)
        if unreadable is not None:
            raise UsageError(f"mlx-lm {args.mlx_lm_command}: {unreadable}")
        if args.mlx_lm_command in ("generate", "server"):
            for _, draft in option_values(forwarded, ("--draft-model",)):
                if draft is not None and looks_local(draft) and not Path(draft).expanduser().exists():
                    # mlx-lm looked it up on the Hub: "Repo id must be in the form ..."
                    raise UsageError(f"mlx-lm {args.mlx_lm_command}: --draft-model path {draft} does not exist")
        if args.mlx_lm_command == "fuse":
            save_path = option_values(forwarded, ("--save-path",))
            check_fuse_save_path(model, (save_path[0][1] if save_path else None) or FUSE_SAVE_PATH)
        if args.mlx_lm_command == "convert":  # it wrote into a folder inside the model it read
            mlx_path = option_values(forwarded, ("--mlx-path",))
            check_apart_from_data((("mlx-lm convert: --mlx-path", (mlx_path[0][1] if mlx_path else None) or
                                    "mlx_model"),), [model], data="the --hf-path checkpoint",
                                  read_back="the result would be written into the model it reads")
    if "--trust-remote-code" not in forwarded and writes_our_shim(model):
        forwarded.append("--trust-remote-code")
    saved, saved_stdin = sys.argv, sys.stdin  # generate's --prompt - is read ahead (check_generate_prompt)
    sys.argv = [f"mlx_lm.{args.mlx_lm_command}", *forwarded]
    parsed: dict[str, Any] = {}
    try:
        with contextlib.ExitStack() as guards:
            guards.enter_context(hardened_mlx_lm_parsers(args.mlx_lm_command, parsed))
            if args.mlx_lm_command == "lora":
                guards.enter_context(config_must_be_a_mapping())
                guards.enter_context(lora_layers_default_fits_the_model())
                guards.enter_context(lora_keeps_earlier_adapters(module))
                guards.enter_context(lora_resumes_what_it_names(module))
            if args.mlx_lm_command == "server":
                guards.enter_context(server_loads_model_first(parsed))
                guards.enter_context(server_requests_checked())
            if args.mlx_lm_command == "convert":
                guards.enter_context(convert_quantizes_what_it_says(module))
            if args.mlx_lm_command in ("convert", "fuse"):
                guards.enter_context(output_carries_our_model_file(module))
            if args.mlx_lm_command == "convert":  # (outermost: checks what the model file wrapper wrote)
                guards.enter_context(convert_output_is_finite(module))
            if args.mlx_lm_command == "generate":
                guards.enter_context(prompt_cache_file_is_named(module))
            if args.mlx_lm_command in AFTER_LOAD:
                guards.enter_context(checked_after_loading(module, parsed, AFTER_LOAD[args.mlx_lm_command]))
            if args.mlx_lm_command in ("generate", "lora"):
                from ..distributed.comm import launched, world

                if launched():  # mlx.launch's environment checked and its host names resolved before
                    world()     # mlx-lm's own mx.distributed.init(), which then finds this group
            module.main()
    except (ValueError, FileNotFoundError, NotADirectoryError, ConnectionError) as err:
        # mlx-lm's messages for bad paths and settings (ConnectionError: a path that is not there,
        # looked up on the Hugging Face Hub while offline, as lora does with --data)
        raise UsageError(f"mlx-lm {args.mlx_lm_command}: {one_line(str(err))}") from None
    except yaml.YAMLError as err:  # lora --config FILE; PyYAML's message spans lines: one line here
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(err, "problem", None) or " ".join(str(err).split())
        name = f" {mark.name}" if mark is not None and mark.name and not mark.name.startswith("<") else ""
        raise UsageError(f"mlx-lm {args.mlx_lm_command}: --config{name} is not valid YAML: {where}{what}") from None
    except RuntimeError as err:
        if not str(err).startswith("[load"):  # mx.load on a corrupt or truncated weight file
            raise
        raise UsageError(f"mlx-lm {args.mlx_lm_command}: cannot read the weights: {err}") from None
    finally:
        sys.argv, sys.stdin = saved, saved_stdin
    return 0
