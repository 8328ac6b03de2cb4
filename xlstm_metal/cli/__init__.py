"""The `xlstm-metal` command line: one subcommand per module in this package.

Each subcommand module defines ``add_parser(subparsers)`` (registering its parser, with
``set_defaults(func=run)``) and ``run(args) -> int``. Bad input raises :class:`UsageError`,
which prints ``xlstm-metal: error: <message>`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import math
import os
import sys
from pathlib import Path

from ..errors import SettingError

#: Subcommand modules, in the order `--help` lists them. A module not (yet) present is skipped,
#: so each feature registers its command by adding its module here.
SUBCOMMANDS = (
    "generate", "chat", "serve", "train", "convert", "bench", "top", "tune", "profile", "judge",
    "plot", "mad", "evolve", "mlxlm",
)
#: Commands that run as jobs: they publish status records for `xlstm-metal top` and run the
#: memory watchdog (--mem-soft / --mem-hard / --mem-log; exit code 3 at the hard limit).
JOB_COMMANDS = ("generate", "chat", "serve", "train", "convert", "bench", "tune", "mad", "evolve")


#: OS errors that a path given on the command line causes (exit 2, no traceback).
BAD_PATH_ERRORS = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EROFS, errno.ELOOP})


class UsageError(Exception):
    """Bad user input: printed without a traceback, exit code 2."""


def reader_left() -> int:
    """Exit status 0 for a BrokenPipeError: whoever read our output stopped reading (`... | head
    -2`), which ends the command, not an error. stdout now points at /dev/null so the
    interpreter's last flush stays quiet."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 0


def peer_lost_exit(err: RuntimeError, what: str) -> int:
    """Under mlx.launch a collective whose peer process died raises a RuntimeError: print one
    line naming this rank, ``what`` happened ("the generation stopped after 12 tokens") and the
    lost rank, and return exit code 1 (the output so far is flushed first). Any other
    RuntimeError, and any in a process on its own, is raised again unchanged."""
    from ..distributed import peer_lost

    lost = peer_lost(err, what)
    if lost is None:
        raise err
    sys.stdout.flush()
    print(f"\nxlstm-metal: error: {lost}", file=sys.stderr)
    return 1


def read_text_file(path: str | Path, label: str) -> str:
    """The UTF-8 text of ``path``; UsageError naming ``label`` (e.g. "prompt file") otherwise."""
    path = Path(path).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{label} not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{label} {path} is a directory") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{label} {path} is not UTF-8 text: {err}") from None
    except OSError as err:
        raise UsageError(f"cannot read {label} {path}: {err.strerror or err}") from None


def seed_value(text: str) -> int:
    """argparse type of ``--seed``: an integer in 0 .. 2**64 - 1 (others fail in MLX's RNG)."""
    from ..generation.sampling import SEED_LIMIT

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in 0..{SEED_LIMIT - 1}, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type of a real-valued option: a finite number (``nan`` and ``inf`` parse as
    floats but reach no sensible setting: NaN losses, a memory limit that overflows)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def read_tokenizer(path: str | Path, label: str, missing: str | None = None):
    """The tokenizer of model folder ``path`` before any work, or a UsageError: ``label: <why>``
    when it cannot be read; ``missing`` is the message when the folder has none (None: then
    None is returned)."""
    from ..generation.tokenizer import TokenizerError, load_tokenizer

    try:
        tokenizer = load_tokenizer(path)
    except TokenizerError as err:
        raise UsageError(f"{label}: {err}") from None
    if tokenizer is None and missing is not None:
        raise UsageError(missing)
    return tokenizer


def check_output_path(path: str | Path, label: str, *, directory: bool) -> Path:
    """``path`` (expanded) when it can be written, before any work starts: a directory to create
    or fill (``directory``) must not be a file, a file must not be a directory, and the nearest
    existing ancestor must be a writable directory. UsageError naming ``label`` otherwise."""
    from ..checks import probe_writable

    path = Path(path).expanduser()
    try:
        if directory and path.exists() and not path.is_dir():
            raise UsageError(f"{label} {path} is a file, not a directory")
        if not directory and path.is_dir():
            raise UsageError(f"{label} {path} is a directory, not a file")
        start = path if directory else path.parent
        existing = next((p for p in (start, *start.parents) if p.exists()), None)
    except OSError as err:  # e.g. a name over 255 bytes: Path.exists raises, it does not say False
        raise UsageError(f"{label} {_shown(path)}: {err.strerror}") from None
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        raise UsageError(f"{label} {path} cannot be created: {existing} is not a writable directory")
    if existing is not None and (reason := probe_writable(existing)) is not None:
        raise UsageError(f"{label} {path} cannot be created: {existing} is not writable ({reason})")
    return path


def _shown(path: Path, most: int = 80) -> str:
    """A path for a message: its start and end where it is long (one of 300 characters)."""
    text = str(path)
    return text if len(text) <= most else f"{text[:most // 2]}...{text[-most // 2:]}"


def check_apart_from_data(outputs, data_paths, *, replaced=(), data="the training data", data_dir=None,
                          read_back="the files written there would be read as training data by the next run") -> None:
    """Output paths (``(flag, path or None)`` pairs) must not overlap the inputs a command reads
    (``data_paths``: files or directories), checked before any work: UsageError naming both. An
    output may not be an input; one inside an input directory puts its files among the inputs
    (``read_back`` says what follows: the next run reads checkpoints or study.db as training data);
    one of ``replaced`` (written by replacing the whole directory) must not hold an input either,
    or ``--overwrite`` deletes it. ``data`` names the inputs in the messages ("the training data",
    "the source checkpoint", "--outputs"), ``data_dir`` an input directory (default: ``data``
    followed by "directory")."""
    data_dir = data_dir or f"{data} directory"
    for raw in data_paths:
        source = Path(raw).expanduser().resolve()
        for flag, path in outputs:
            if path is None:
                continue
            target = Path(path).expanduser().resolve()
            if target == source:
                raise UsageError(f"{flag} {path} is {data} {raw}"
                                 + (" (--overwrite would replace it)" if flag in replaced else "")
                                 + "; write it elsewhere")
            if source.is_dir() and source in target.parents:
                raise UsageError(f"{flag} {path} is inside {data_dir} {raw}: {read_back}; write it elsewhere")
            if flag in replaced and target in source.parents:
                raise UsageError(f"{flag} {path} contains {data} {raw}: --overwrite would delete it; "
                                 "write it elsewhere")


def check_kept_by_overwrite(out: Path, inputs, deleted, *, where: str, new: str) -> None:
    """Inputs a command reads (``(flag, path or None)`` pairs) must not lie among the entries of
    ``out`` that its ``--overwrite`` deletes before ``new`` starts (``deleted(name)``: whether
    the entry ``out/name`` is one): UsageError naming the input (``where`` names ``out`` in it:
    "--out", "the run directory --out")."""
    for flag, value in inputs:
        if not value:
            continue
        try:
            relative = Path(value).expanduser().resolve().relative_to(out.resolve())
        except ValueError:
            continue
        if relative.parts and deleted(relative.parts[0]):
            raise UsageError(f"{flag} {value} is in {where} {out}, whose {relative.parts[0]} --overwrite deletes "
                             f"before {new} starts: copy it elsewhere first, or write {new} to another --out")


def check_vocab_size(vocab_size: int | None, tokenizer_source: str | None = None) -> None:
    """``--vocab-size`` (train, tune) sizes the byte-level BPE tokenizer a command trains: given
    (not None) with a tokenizer from elsewhere (``tokenizer_source``, as the message names it:
    "--tokenizer tok.json", "--init-from ckpt") it would be ignored, and below
    :data:`~xlstm_metal.training.data.MIN_BPE_VOCAB` no such tokenizer exists: UsageError."""
    if vocab_size is None:
        return
    if tokenizer_source is not None:
        raise UsageError(f"--vocab-size sizes a BPE tokenizer trained here; {tokenizer_source} brings its own "
                         "tokenizer: leave out --vocab-size")
    from ..training.data import MIN_BPE_VOCAB

    if vocab_size < MIN_BPE_VOCAB:
        raise UsageError(f"--vocab-size must be >= {MIN_BPE_VOCAB} (256 bytes + special tokens), got {vocab_size}")


def check_text_field(text_field: str | None, data_paths, label: str) -> None:
    """``--text-field`` names the text field of JSON Lines records: given (not None) where every
    data path exists and none is, or holds, a ``.jsonl`` file, it would be ignored: UsageError
    (``label``: how the message names the data)."""
    if text_field is None or not data_paths:
        return
    from ..training.data import holds_jsonl

    if all(Path(d).expanduser().exists() for d in data_paths) and not holds_jsonl(data_paths):
        raise UsageError(f"--text-field {text_field} names the text field of JSON Lines (.jsonl) records, and none of "
                         f"{label} is JSON Lines: leave it out")


#: Largest magnitude an integer option takes (``type=int`` options are checked against it when
#: the parser is built): MLX computes shapes, slices and step counts in 32 bits, so larger values
#: failed deep inside a run (a C++ ``std::bad_cast`` or an OverflowError traceback, sometimes
#: after training had started). Options that count beyond it (parameter budgets) use
#: :func:`large_int`.
INT_LIMIT = 2**31 - 1
#: :func:`large_int`'s limit: a signed 64-bit integer.
LARGE_INT_LIMIT = 2**63 - 1


def _int_in_range(text: str, limit: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not -limit <= value <= limit:
        raise argparse.ArgumentTypeError(f"must be between {-limit} and {limit}, got {text}")
    return value


def bounded_int(text: str) -> int:
    """argparse type of every ``type=int`` option (installed by :func:`harden_parser`): an
    integer of magnitude at most :data:`INT_LIMIT`."""
    return _int_in_range(text, INT_LIMIT)


def large_int(text: str) -> int:
    """argparse type of an integer option that may exceed :data:`INT_LIMIT` (a parameter or
    token budget, only compared in Python): magnitude at most :data:`LARGE_INT_LIMIT`."""
    return _int_in_range(text, LARGE_INT_LIMIT)


def nonempty_text(text: str) -> str:
    """argparse type of every text option and argument (installed by :func:`harden_parser` where
    no type is given): an empty value is refused. Commands read an empty path, model, profile or
    config as "not given" (``--init-from ''`` trained from scratch, ``bench --config ''`` ran the
    default shape, ``serve --host ''`` listened on every interface) or as the working directory."""
    if text == "":
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def any_text(text: str) -> str:
    """argparse type of a text option that may be empty (a prompt; ``evolve --start ''``)."""
    return text


#: Actions that hold one value (store, store_const / store_true / store_false, --x/--no-x): one
#: given twice would silently keep only the last. append / append_const / count / extend
#: actions are meant to repeat and are left alone.
_SINGLE_VALUED = (argparse._StoreAction, argparse._StoreConstAction, argparse.BooleanOptionalAction)
#: Per parse (keyed by the namespace being filled, dropped with it): dest -> the option string
#: that set it.
_GIVEN: dict[int, dict[str, str]] = {}
_ONCE_CLASSES: dict[type, type] = {}


def _given_options(namespace) -> dict[str, str]:
    import weakref

    key = id(namespace)
    if key not in _GIVEN:
        _GIVEN[key] = {}
        weakref.finalize(namespace, _GIVEN.pop, key, None)
    return _GIVEN[key]


def _refusing_repeats(cls: type) -> type:
    """A subclass of action class ``cls`` that raises an ArgumentError naming the option when
    its destination was already set by an option during the same parse (argparse calls an
    action once per occurrence on the command line, never for defaults, so a value that merely
    looks like an option, as in ``--prompt=--max-tokens``, is not counted)."""
    if getattr(cls, "refuses_repeats", False):
        return cls
    if cls not in _ONCE_CLASSES:
        def __call__(self, parser, namespace, values, option_string=None):
            given = _given_options(namespace)
            earlier = given.get(self.dest)
            if earlier is not None:
                spelled = "" if earlier == option_string else f" (as {earlier}, then as {option_string})"
                lost = " (only the last value would count)" if isinstance(self, argparse._StoreAction) else ""
                raise argparse.ArgumentError(self, f"given more than once{spelled}; give it once{lost}")
            given[self.dest] = option_string or self.dest
            cls.__call__(self, parser, namespace, values, option_string)

        _ONCE_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "refuses_repeats": True})
    return _ONCE_CLASSES[cls]


def harden_parser(parser: argparse.ArgumentParser, *, value_types: bool = True) -> argparse.ArgumentParser:
    """Install the command line's common checks on ``parser`` and every subcommand parser
    under it: a single-valued option given more than once is refused (exit 2, naming it) and,
    with ``value_types`` (our parsers), every ``type=int`` option is :func:`bounded_int` and every
    text option or argument without a type (and without choices) is :func:`nonempty_text`."""
    done: set[int] = set()
    todo = [parser]
    while todo:
        current = todo.pop()
        if id(current) in done:
            continue
        done.add(id(current))
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
                continue
            if value_types and action.type is int:
                action.type = bounded_int
            if value_types and action.type is None and not action.choices and action.nargs not in (0, argparse.REMAINDER):
                action.type = nonempty_text
            if action.option_strings and isinstance(action, _SINGLE_VALUED):
                action.__class__ = _refusing_repeats(type(action))
    return parser


def build_parser() -> argparse.ArgumentParser:
    from xlstm_metal import __version__

    parser = argparse.ArgumentParser(
        prog="xlstm-metal", description="xLSTM language models on MLX (Metal, CPU, CUDA)."
    )
    parser.add_argument("--version", action="version", version=f"xlstm-metal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"xlstm_metal.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"xlstm_metal.cli.{name}":
                raise
            continue
        module.add_parser(sub)
        if name in JOB_COMMANDS and "--mem-hard" not in sub.choices[name]._option_string_actions:
            from ..monitor import add_job_arguments

            add_job_arguments(sub.choices[name])
    return harden_parser(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..monitor import MemoryLimitExceeded

    try:
        with _job(args):
            return int(args.func(args) or 0)
    except (UsageError, SettingError) as err:
        print(f"xlstm-metal: error: {err}", file=sys.stderr)
        return 2
    except MemoryLimitExceeded as err:
        print(f"\nxlstm-metal: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return reader_left()
    except RuntimeError as err:  # a collective whose peer died where no closer handler is (loading)
        return peer_lost_exit(err, f"{args.command} stopped")
    except OSError as err:
        # A path the user gave that the system refuses (a name over 255 bytes, a file where a
        # directory is needed, no permission) reaches many loaders; each one's own checks cover
        # the usual cases, this the rest. Other OS errors (a full disk) keep their traceback.
        if err.errno not in BAD_PATH_ERRORS:
            raise
        where = f"{_shown(Path(str(err.filename)))}: " if err.filename else ""
        print(f"xlstm-metal: error: {where}{err.strerror}", file=sys.stderr)
        return 2


def _job(args: argparse.Namespace):
    """The status record + memory watchdog of a job command (a no-op context otherwise)."""
    import contextlib

    if args.command not in JOB_COMMANDS:
        return contextlib.nullcontext()
    from ..monitor import job_from_args

    try:
        return job_from_args(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
