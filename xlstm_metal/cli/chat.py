"""`xlstm-metal chat`: a conversation that keeps the model's recurrent state across turns.

Each turn feeds only its own tokens (the state already holds the transcript), so a turn costs
the same however long the conversation is. The turn is fed as typed plus a newline; the model
is a plain language model, so its reply continues the transcript. --seed seeds the
conversation once (again after /reset): later turns continue its random stream.
Commands: /reset (forget the conversation), /help, /quit (or /exit); Ctrl-D quits; Ctrl-C stops
a reply (at the prompt, it quits).
Under mlx.launch only /quit ends the chat: mlx.launch copies its stdin to every process and never
closes it, so neither Ctrl-D nor the end of piped input reaches them (end piped turns with a
/quit line). The first line the chat prints says so when it runs under a launch.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys
from typing import Callable, TextIO

from ..monitor import current_job
from . import UsageError, peer_lost_exit
from .generate import (
    add_model_arguments,
    check_same_request,
    check_utf8,
    generation_peer_lost_exit,
    load_runner,
    main_stderr,
    max_tokens_for,
    print_model_description,
    read_prompt,
    replace_unencodable,
    same_on_every_rank,
    sampling_kwargs,
    stats_line,
    under_a_launch,
    validate_sampling,
)

HELP = ("commands: /reset clears the conversation, /quit or Ctrl-D exits, Ctrl-C stops a reply, /help; "
        "start a line with // to send text that begins with /")
#: HELP where the chat runs under mlx.launch (see the module's docstring).
LAUNCH_HELP = HELP.replace("/quit or Ctrl-D exits", "/quit exits (under mlx.launch stdin never ends: neither "
                           "Ctrl-D nor the end of piped input does)")
COMMANDS = ("/reset", "/quit", "/exit", "/help")
#: A line whose first word reads like a command (a slash and letters only): one not in COMMANDS
#: is a typo (/rest), not a turn; a path such as /usr/bin/env is text.
_COMMAND_LIKE = re.compile(r"/[A-Za-z]+")


def unknown_command(line: str, help_text: str = HELP) -> str | None:
    """The message for a stripped, non-empty ``line`` that names no command but reads like one,
    or names one with words after it (``/reset now``, ``/quit please``: those were sent to the
    model as a turn, the conversation neither reset nor ended), else None."""
    word, *rest = line.split(maxsplit=1)
    if word in COMMANDS and rest:
        return f"({word} takes nothing after it; start the line with // to send it as text)"
    if not _COMMAND_LIKE.fullmatch(word) or word in COMMANDS:
        return None
    close = difflib.get_close_matches(word, COMMANDS, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"(unknown command {word}: {hint}{help_text})"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("chat", help="chat with a model (keeps the recurrent state across turns)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.set_defaults(func=run, interactive=True)
    return parser


def turn_text(line: str, transcript_ends_with_newline: bool) -> str:
    """What a typed line adds to the transcript: the line and a newline, starting on a new
    line when the previous reply did not end with one."""
    return ("" if transcript_ends_with_newline else "\n") + line + "\n"


def read_line(prompt: str) -> str:
    """input(), showing the prompt only to a person at a terminal (piped output stays clean)."""
    return input(prompt if sys.stdin.isatty() else "")


def _ends_with_newline(runner) -> bool:
    """Whether the transcript the model has seen so far ends a line (True when empty)."""
    text = runner.tokenizer.decode(runner.session_tokens[-4:])
    return not text or text.endswith("\n")


def chat_loop(
    runner,
    args: argparse.Namespace,
    first_turn: str | None = None,
    input_fn: Callable[[str], str] = read_line,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Read turns until /quit, Ctrl-D or Ctrl-C at the prompt; stream each reply."""
    out = out or sys.stdout
    err = err or main_stderr()  # under mlx.launch: rank 0's notes only (every rank reads the same turns)
    if runner.tokenizer is None:
        raise UsageError("chat needs a tokenizer (tokenizer.json in the model directory)")
    try:  # line editing and history where the platform has it (importing it is enough)
        importlib.import_module("readline")
    except ImportError:
        pass
    kwargs = sampling_kwargs(args)
    help_text = LAUNCH_HELP if under_a_launch() else HELP
    print(help_text, file=err)
    pending = first_turn
    while True:
        typed = pending is None  # a first turn from --prompt / --prompt-file is text, never a command
        if not typed:
            line, pending = pending, None
        else:
            try:
                line = input_fn("> ")
            except EOFError:
                out.write("\n")
                return 0
            except KeyboardInterrupt:
                out.write("\n")
                return 0
            except UnicodeDecodeError as error:  # stdin decoded strictly (a UTF-8 locale)
                raise UsageError(f"input is not UTF-8 text (byte 0x{error.object[error.start]:02x})") from None
            check_utf8(line, "input")  # other locales hand undecodable bytes on as surrogates
            # Under several ranks each reads its own stdin (mlx.launch copies its own to every
            # rank; ranks started by hand have their own): a turn, /reset or /quit that only some
            # ranks read paired their collectives wrongly. (The end of input is not compared: a
            # rank whose stdin stays open would never answer; the others end, and its ring watch
            # ends it.)
            same_on_every_rank({"the chat input": line}, "turns (under mlx.launch every process reads the same "
                               "stdin)")
        command = line.strip()
        if not command:
            continue
        if typed and command in ("/quit", "/exit"):
            return 0
        if typed and command == "/reset":
            runner.reset_state()
            print("(conversation reset)", file=err)
            continue
        if typed and command == "/help":
            print(help_text, file=err)
            continue
        unknown = unknown_command(command, help_text) if typed else None
        if unknown is not None:
            print(unknown, file=err)
            continue
        if typed and command.startswith("//"):  # text that begins with "/": one slash goes
            line = line.replace("/", "", 1)
        text = turn_text(line.rstrip("\n"), _ends_with_newline(runner))
        # --seed seeds the conversation (its first turn, and the first after /reset); later turns
        # continue the session's random stream instead of replaying the same draws every turn.
        turn_kwargs = dict(kwargs, seed=None) if runner.session_tokens else dict(kwargs)
        # generation_config.json's max_length bounds the whole transcript (the prompt a
        # transformers chat would re-feed); a turn that finds it full is not fed.
        try:
            seen = runner.session_tokens
            context = len(seen) + len(runner.encode(text, add_special_tokens=not seen))
            turn_kwargs["max_tokens"] = max_tokens_for(args, context, what="the conversation")
        except UsageError as error:
            print(f"({error}, or /reset to start over)", file=err)
            continue
        except ValueError as error:
            raise UsageError(str(error)) from None
        reply = []
        last = None
        try:
            for chunk in current_job().track_generation(runner.stream(text, keep_state=True, **turn_kwargs),
                                                        turn_kwargs["max_tokens"]):
                if chunk.text:
                    out.write(chunk.text)
                    out.flush()
                    reply.append(chunk.text)
                last = chunk
        except KeyboardInterrupt:
            # The runner's session already holds every token shown; the next turn continues it.
            out.write("\n")
            print("(reply interrupted)", file=err)
            continue
        except ValueError as error:
            raise UsageError(str(error)) from None
        if not "".join(reply).endswith("\n"):
            out.write("\n")
        out.flush()
        if args.verbose and last is not None:
            print(stats_line(last), file=err)


def run(args: argparse.Namespace) -> int:
    validate_sampling(args)
    replace_unencodable(sys.stdout)
    prompt = read_prompt(args)
    runner, _ = load_runner(args)
    try:  # under several ranks: every rank was given the same first turn and settings
        check_same_request(runner, args, prompt, "chat")
    except RuntimeError as err:  # a peer process died (else raised again)
        return peer_lost_exit(err, "the processes stopped comparing their prompts and settings")
    print_model_description(args, runner)
    try:
        return chat_loop(runner, args, first_turn=prompt)
    except RuntimeError as err:  # under mlx.launch: a peer process died (else raised again)
        return generation_peer_lost_exit(err, "the reply stopped")


__all__ = ["add_parser", "run", "chat_loop"]
