"""`xlstm-metal top` (also the `xltop` command): a live monitor of every running xlstm-metal job.

Every job (generate, chat, serve, train, bench, convert, tune, mad, evolve) publishes a status record about
once a second; top lists them with the machine's CPU, RAM and GPUs. Keys in the terminal UI:
up/down select, s sort (pid, command, tok/s, memory, progress), r reverse, k kill the selected
job (SIGTERM, asks first), c ask it to clear its MLX cache, + / - refresh faster / slower,
q quit.

    xlstm-metal top                      # full-screen terminal UI
    xlstm-metal top --once               # one text snapshot
    xlstm-metal top --json --interval 2  # one JSON object per line (NDJSON), for scripts

With --json and a piped stdin, top reads commands, one a line: kill PID, clear_cache PID,
interval S, quit.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time

from . import UsageError, harden_parser, reader_left

DESCRIPTION = __doc__


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per interval (NDJSON): time, interval, machine, jobs; "
                             "a piped stdin takes commands (kill PID, clear_cache PID, interval S, quit)")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--interval", type=float, default=None, metavar="S",
                        help="seconds between refreshes (default 1; the UI's + / - change it)")
    parser.add_argument("--count", type=int, default=None, metavar="N", help="with --json: stop after N objects")
    parser.add_argument("--sort", choices=("pid", "command", "tokens_per_s", "memory", "progress"), default=None,
                        help="row order (default pid; tokens_per_s, memory and progress: largest first)")
    parser.add_argument("--clear-cache", type=int, metavar="PID", help="ask job PID to clear its MLX cache, then exit")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("top", help="live monitor of running xlstm-metal jobs (also: xltop)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..monitor.records import send_command
    from ..monitor.top import DESCENDING, MAX_INTERVAL, MIN_INTERVAL, Monitor, render_text, sort_jobs

    if args.clear_cache is not None:  # it sends one request and exits: the view's options would be ignored
        view = [flag for flag, value in (("--json", args.json), ("--once", args.once), ("--interval", args.interval),
                                         ("--count", args.count), ("--sort", args.sort)) if value not in (None, False)]
        if view:
            raise UsageError(f"--clear-cache PID asks one job to clear its cache and exits, showing nothing; "
                             f"{', '.join(view)} would be ignored: leave {'it' if len(view) == 1 else 'them'} out")
    if args.once and args.interval is not None:  # one snapshot: no refresh to time
        raise UsageError(f"--interval {args.interval:g} sets the time between refreshes; --once prints one snapshot "
                         "and exits: leave out --interval")
    if args.interval is None:
        args.interval = 1.0
    if args.sort is None:
        args.sort = "pid"
    if not MIN_INTERVAL <= args.interval <= MAX_INTERVAL:
        raise UsageError(f"--interval must be between {MIN_INTERVAL} and {MAX_INTERVAL} seconds, got {args.interval}")
    if args.count is not None and args.count < 1:
        raise UsageError(f"--count must be >= 1, got {args.count}")
    if args.count is not None and (not args.json or args.once):
        raise UsageError("--count goes with --json (a stream), not with --once or the live view")
    if args.clear_cache is not None:
        try:
            send_command(args.clear_cache, "clear_cache")
        except ProcessLookupError as err:
            raise UsageError(str(err)) from None
        except OSError as err:  # e.g. the runtime directory cannot take the request file
            raise UsageError(f"cannot ask job {args.clear_cache} to clear its MLX cache: {err}") from None
        print(f"asked {args.clear_cache} to clear its MLX cache", file=sys.stderr)
        return 0
    monitor = Monitor()
    if args.json or args.once:
        count = 1 if args.once else args.count
        commands: queue.Queue[str] = queue.Queue()
        if args.json and not args.once and not sys.stdin.isatty():
            threading.Thread(target=_read_commands, args=(commands,), daemon=True).start()
        interval, n = args.interval, 0
        try:
            while True:
                snapshot = monitor.poll(interval)
                snapshot["jobs"] = sort_jobs(snapshot["jobs"], args.sort, args.sort in DESCENDING)
                if args.json:
                    print(json.dumps(snapshot, default=str), flush=True)
                else:
                    # "?" where stdout cannot encode ("…": a UnicodeEncodeError)
                    encoding = sys.stdout.encoding or "utf-8"
                    sys.stdout.write(render_text(snapshot).encode(encoding, "replace").decode(encoding))
                    sys.stdout.flush()
                n += 1
                if count is not None and n >= count:
                    return 0
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        line = commands.get(timeout=left)
                    except queue.Empty:
                        break
                    if line is None or line in ("quit", "q", "exit"):
                        if line is not None:
                            return 0
                        continue  # stdin ended: keep streaming
                    interval = _run_command(line, interval)
        except KeyboardInterrupt:
            return 0
    if not (sys.stdout.isatty() and sys.stdin.isatty()):
        raise UsageError("the live view needs a terminal; use --once or --json when piping")
    from ..monitor.tui import TopApp

    app = TopApp(interval=args.interval, monitor=monitor)
    app.sort_key, app.reverse = args.sort, args.sort in DESCENDING
    app.run()
    return 0


def _read_commands(commands: "queue.Queue[str | None]") -> None:
    """With --json and a piped stdin: one command a line (kill PID, clear_cache PID, interval S,
    quit), as the seed's xltop took them."""
    for line in sys.stdin:
        if line.strip():
            commands.put(line.strip())
    commands.put(None)


def _run_command(line: str, interval: float) -> float:
    """Run one stdin command; answers go to stderr (stdout stays NDJSON). Returns the interval."""
    from ..monitor.records import send_command
    from ..monitor.top import MAX_INTERVAL, MIN_INTERVAL, kill_job

    word, _, rest = line.partition(" ")
    try:
        if word in ("kill", "K"):
            kill_job(int(rest))  # never signals a process that is no job
            print(f"xltop: sent SIGTERM to {int(rest)}", file=sys.stderr)
        elif word in ("clear_cache", "empty_cache", "c"):
            send_command(int(rest), "clear_cache")
            print(f"xltop: asked {int(rest)} to clear its MLX cache", file=sys.stderr)
        elif word == "interval":
            value = float(rest)
            if not MIN_INTERVAL <= value <= MAX_INTERVAL:
                raise ValueError(f"interval must be between {MIN_INTERVAL} and {MAX_INTERVAL}")
            print(f"xltop: interval {value:g} s", file=sys.stderr)
            return value
        else:
            print(f"xltop: unknown command {line!r} (kill PID, clear_cache PID, interval S, quit)", file=sys.stderr)
    except (ValueError, OSError) as err:  # the stream goes on (ProcessLookupError and PermissionError included)
        print(f"xltop: {line!r}: {err}", file=sys.stderr)
    return interval


def main(argv: list[str] | None = None) -> int:
    """The `xltop` console script: `xlstm-metal top` under its own name."""
    parser = argparse.ArgumentParser(prog="xltop", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args = harden_parser(parser).parse_args(argv)
    try:
        return run(args)
    except UsageError as err:
        print(f"xltop: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `xltop --json | head -1`, as `xlstm-metal top`
        return reader_left()


if __name__ == "__main__":
    sys.exit(main())
