"""The `xlstm-metal` command line: one subcommand per module in this package.

Each subcommand module defines ``add_parser(subparsers)`` (registering its parser, with
``set_defaults(func=run)``) and ``run(args) -> int``. Bad input raises :class:`UsageError`,
which prints ``xlstm-metal: error: <message>`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from pathlib import Path

#: Subcommand modules, in the order `--help` lists them. A module not (yet) present is skipped,
#: so each feature registers its command by adding its module here.
SUBCOMMANDS = (
    "generate", "chat", "serve", "train", "convert", "bench", "top", "tune", "profile", "judge",
    "plot", "mad", "evolve", "mlxlm",
)
#: Commands that run as jobs: they publish status records for `xlstm-metal top` and run the
#: memory watchdog (--mem-soft / --mem-hard / --mem-log; exit code 3 at the hard limit).
JOB_COMMANDS = ("generate", "chat", "serve", "train", "convert", "bench", "tune", "mad", "evolve")


class UsageError(Exception):
    """Bad user input: printed without a traceback, exit code 2."""


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
    path = Path(path).expanduser()
    if directory and path.exists() and not path.is_dir():
        raise UsageError(f"{label} {path} is a file, not a directory")
    if not directory and path.is_dir():
        raise UsageError(f"{label} {path} is a directory, not a file")
    start = path if directory else path.parent
    existing = next((p for p in (start, *start.parents) if p.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        raise UsageError(f"{label} {path} cannot be created: {existing} is not a writable directory")
    return path


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
    return parser


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
    except UsageError as err:
        print(f"xlstm-metal: error: {err}", file=sys.stderr)
        return 2
    except MemoryLimitExceeded as err:
        print(f"\nxlstm-metal: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read our output stopped reading (`... | head -2`): that ends the command, not
        # an error. stdout now points at /dev/null so the interpreter's last flush stays quiet.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0


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
