"""Drawing a wiring as a graph (matplotlib, Agg): cells in columns by stage, connections as
arrows - red for inhibitory (polarity -1), dashed for weighted/masked, dotted for the delayed
connections that close a cycle through a recurrent cell."""

from __future__ import annotations

from pathlib import Path

from .wiring import WiredBlock


def render_wiring(block: WiredBlock, path: str | Path, title: str | None = None) -> Path:
    """Write the graph of ``block`` to ``path`` (.png, .svg or .pdf by its suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    path = Path(path)
    columns = [[f"in.{p}" for p in block.input_ports]] + [list(s) for s in block.stages] + \
        [[f"out.{p}" for p in block.output_ports]]
    pos = {}
    for x, column in enumerate(columns):
        for y, name in enumerate(column):
            pos[name] = (x * 3.0, -(y - (len(column) - 1) / 2) * 1.2)
    height = max(len(c) for c in columns)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(columns)), max(3.0, 0.75 * height + 1.5)))
    types = {name: block.resolved.cells[name]["type"] for name in block.cell_names}
    for name, (x, y) in pos.items():
        stateful = name in types and getattr(block.cell(name), "stateful", False)
        label = name if name not in types else f"{name}\n{types[name]}"
        ax.text(x, y, label, ha="center", va="center", fontsize=6.5, zorder=3,
                bbox=dict(boxstyle="round,pad=0.3", fc="#fde9c9" if stateful else "#e8eef7",
                          ec="#b9770e" if stateful else "#34495e", lw=0.8))
    delayed = set(block._delayed)
    for index, (s_cell, s_port, d_cell, d_port) in enumerate(block._ends):
        src = f"in.{s_port}" if s_cell == "in" else s_cell
        dst = f"out.{d_port}" if d_cell == "out" else d_cell
        syn = block.synapses[index]
        span = abs(pos[dst][0] - pos[src][0]) / 3.0  # columns crossed
        # Long edges (residuals) arc over the columns between, so they do not run behind the boxes.
        rad = 0.35 if index in delayed else (-0.3 / span if span > 1 else
                                             (0.12 if abs(pos[src][1] - pos[dst][1]) > 0.1 else 0.0))
        arrow = FancyArrowPatch(
            pos[src], pos[dst], arrowstyle="-|>", mutation_scale=8, shrinkA=22, shrinkB=22, lw=0.7,
            color="#c0392b" if syn.polarity < 0 else "#555555",
            linestyle=":" if index in delayed else ("--" if syn.weighted else "-"),
            connectionstyle=f"arc3,rad={rad}", zorder=2)
        ax.add_patch(arrow)
        if len(block.cell(d_cell).input_ports if d_cell not in ("out",) else []) > 1:
            mx_, my_ = (pos[src][0] + pos[dst][0]) / 2, (pos[src][1] + pos[dst][1]) / 2
            ax.text(mx_ + 0.6, my_, d_port, fontsize=5, color="#777777", zorder=4)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 1.6, max(xs) + 1.6)
    ax.set_ylim(min(ys) - 1.0, max(ys) + 1.0)
    ax.axis("off")
    # "$\\foo$" in a name was read as mathtext: a traceback
    ax.set_title(title or f"wiring {block.resolved.name} ({len(block.stages)} stages)", fontsize=9,
                 parse_math=False)
    fig.tight_layout()
    from ..plotting import save_figure

    return save_figure(fig, path, overwrite=True)


__all__ = ["render_wiring"]
