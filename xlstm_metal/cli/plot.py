"""`xlstm-metal plot`: figures of tune sweeps, training runs and benchmarks.

    xlstm-metal plot runs/tune-speed --out tune.png             # objective vs parameters, best so far
    xlstm-metal plot runs/a runs/b --out loss.svg               # training runs overlaid (metrics.jsonl)
    xlstm-metal plot bench.jsonl benchmarks/results/cpu.json --out speed.png

A tune directory (trials.jsonl), training runs (directories with metrics.jsonl, or the files) or
bench JSON (`xlstm-metal bench --json` lines, benchmarks/results/*.json); one kind per figure.
"""

from __future__ import annotations

import argparse
import sys

from . import UsageError, check_output_path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plot", help="plot tune sweeps, training runs or benchmark results",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="tune directory, training runs, or bench JSON files")
    p.add_argument("--out", required=True, help="image file: .png, .svg or .pdf")
    p.add_argument("--title", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..plotting import PlotError, plot_inputs, save_figure

    out = Path(args.out).expanduser()
    try:
        if out.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise PlotError(f"--out must end in .png, .svg or .pdf, got {out.name}")
        check_output_path(out, "--out", directory=False)
        if out.exists() and not args.overwrite:
            raise PlotError(f"{out} exists; pass --overwrite to replace it")
        fig = plot_inputs(args.inputs, args.title)
        path = save_figure(fig, out, overwrite=args.overwrite)
    except PlotError as err:
        raise UsageError(str(err)) from None
    print(f"wrote {path}", file=sys.stderr)
    return 0
