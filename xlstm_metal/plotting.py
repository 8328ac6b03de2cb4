"""Plots of tune sweeps, training runs and benchmarks (matplotlib, Agg backend).

Each ``plot_*`` function returns the figure, so callers (and tests) can read the plotted data
back from its axes; :func:`save_figure` writes it atomically.

- :func:`plot_tune`: a tune directory (trials.jsonl): the objective against each parameter,
  prefill against decode tokens/s (speed sweeps), and the best value so far by trial.
- :func:`plot_training`: runs (metrics.jsonl): training and validation loss, validation
  perplexity and learning rate against step, and loss against tokens; runs overlaid.
- :func:`plot_bench`: ``xlstm-metal bench --json`` output and ``benchmarks/results`` JSON:
  prefill tokens/s against prompt length and decode tokens/s against batch, one line per side
  (ours / official) and variant, the median of repeated measurements; records that differ in
  what they measured (shape, dtype, profile, ...: :data:`BENCH_CONFIG_FIELDS`) are separate
  lines, labelled with the fields that differ.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .pathnames import distinct_names  # noqa: E402


class PlotError(ValueError):
    """An input that cannot be plotted; the message names it."""


# ------------------------------------------------------------------------------ reading
def _jsonl(path: Path) -> list[dict[str, Any]]:
    from .jsonfiles import read_jsonl

    return [record for _, record in read_jsonl(path, PlotError) if isinstance(record, dict)]


def _metrics(path: Path) -> list[dict[str, Any]]:
    """A training run's metrics.jsonl, read as the trainer reads it: a last line cut short (a live
    or crashed run's) is dropped with a warning; any other bad line is a PlotError naming it."""
    from .training.checkpoint import read_metrics

    return read_metrics(path, PlotError)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_records(path: Path, records: list[dict[str, Any]], numbers: tuple[str, ...],
                   optional: tuple[str, ...] = ()) -> None:
    """PlotError naming ``path`` and the field when a record lacks one of ``numbers`` or holds
    something else than a number there or in one of ``optional`` (another tool's file, a file
    edited by hand): they were KeyError / TypeError tracebacks, or strings plotted as categories."""
    for r in records:
        for key in numbers + optional:
            if (key in numbers or key in r) and not _is_number(r.get(key)):
                kind = f"{r['kind']} " if isinstance(r.get("kind"), str) else ""
                raise PlotError(f"{path}: {key!r} must be a number in every {kind}record, got {r.get(key)!r}")


def _perplexity(loss: float) -> float:
    return math.inf if loss > 700 else math.exp(loss)  # a diverged run's loss overflows math.exp


def classify(path: str | os.PathLike) -> str:
    """"tune", "train" or "bench" for an input path (PlotError if none fits)."""
    p = Path(path)
    if p.is_dir():
        if (p / "trials.jsonl").is_file():
            return "tune"
        if (p / "metrics.jsonl").is_file():
            return "train"
        raise PlotError(f"{p}: a directory with neither trials.jsonl (tune) nor metrics.jsonl (training run)")
    if not p.is_file():
        raise PlotError(f"no such file or directory: {p}")
    if p.name == "trials.jsonl":
        return "tune"
    if p.name == "metrics.jsonl":
        return "train"
    if p.suffix in (".json", ".jsonl"):
        return "bench"
    raise PlotError(f"{p}: expected a tune directory, a training run (metrics.jsonl) or bench JSON")


def read_bench(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Prefill/decode records of a bench file: JSON Lines of records, or a JSON object with
    "records" (benchmarks/side_by_side.py), or a JSON list."""
    from .jsonfiles import read_jsonl

    p = Path(path)
    if p.suffix == ".jsonl":
        numbered = [(f"{p}:{n}", r) for n, r in read_jsonl(p, PlotError)]
    else:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PlotError(f"cannot read {p}: {err}") from None
        records = data.get("records", []) if isinstance(data, dict) else data if isinstance(data, list) else []
        numbered = [(f"{p} record {n}", r) for n, r in enumerate(records if isinstance(records, list) else [], 1)]
    out = [(w, r) for w, r in numbered if isinstance(r, dict) and r.get("kind") in ("prefill", "decode") and "tok_s" in r]
    for where, r in out:
        # A NaN, a string, true or a rate <= 0 was drawn as nothing (or as 1.0) without a word.
        if not (_is_number(r["tok_s"]) and math.isfinite(r["tok_s"]) and r["tok_s"] > 0):
            raise PlotError(f"{where}: 'tok_s' must be a positive number in every {r['kind']} record, "
                            f"got {r['tok_s']!r}")
        name = "length" if r["kind"] == "prefill" else "batch"  # the x axis
        x = r.get(name)
        if x is None:
            continue
        if not _is_number(x):
            raise PlotError(f"{where}: {name!r} must be a number in every {r['kind']} record, got {x!r}")
        if not (math.isfinite(x) and x > 0):  # the axis is logarithmic: a 0 was not drawn, without a word
            raise PlotError(f"{where}: {name!r} must be positive in every {r['kind']} record, got {x!r}")
        if x != int(x):  # int() drew a 1.5 at 1, without a word
            raise PlotError(f"{where}: {name!r} must be a whole number in every {r['kind']} record, got {x!r}")
    if not out:
        raise PlotError(f"{p} holds no prefill/decode records with tok_s")
    return [r for _, r in out]


# ------------------------------------------------------------------------------ tune
def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


#: What a speed sweep's value is, by --metric ("both": the geometric mean of the two rates).
_METRIC_LABELS = {("speed", "prefill"): "prefill tok/s", ("speed", "decode"): "decode tok/s",
                  ("speed", "both"): "sqrt(prefill x decode) tok/s"}


def plot_tune(directory: str | os.PathLike, title: str | None = None) -> Figure:
    """A tune directory's trials: objective vs each parameter, prefill vs decode, best so far."""
    d = Path(directory)
    path = d / "trials.jsonl" if d.is_dir() else d
    records = _jsonl(path)
    from .jsonfiles import read_json_object

    meta_path, best_path = path.parent / "run_meta.json", path.parent / "best.json"
    meta = read_json_object(meta_path, PlotError) if meta_path.is_file() else {}
    objective = meta.get("objective") if isinstance(meta.get("objective"), dict) else {}
    if not objective.get("direction") and best_path.is_file():  # no run_meta.json: best.json names it too
        best = read_json_object(best_path, PlotError)
        objective = {"objective": best.get("objective", ""), "metric": best.get("metric", "value"),
                     "direction": best.get("direction", "maximize")}
    metric = _METRIC_LABELS.get((objective.get("objective"), objective.get("metric")), objective.get("metric", "value"))
    maximize = objective.get("direction", "maximize") == "maximize"
    done = [r for r in records if r.get("status") == "complete" and r.get("value") is not None]
    if not done:
        raise PlotError(f"{path}: no complete trial to plot")
    _check_records(path, records, ("number",))
    _check_records(path, done, ("value",))
    for r in records:
        for key in ("params", "metrics"):
            if not isinstance(r.get(key, {}), dict):
                raise PlotError(f"{path}: trial {r['number']}'s {key!r} must be an object, got {r[key]!r}")
    params = sorted({k for r in records for k in r.get("params", {})})
    # (one without both, in a file edited by hand, was a KeyError)
    rates = [r["metrics"] for r in done if {"prefill_tok_s", "decode_tok_s"} <= set(r.get("metrics", {}))]
    _check_records(path, rates, ("prefill_tok_s", "decode_tok_s"))
    speed = bool(rates)
    panels = len(params) + 1 + (1 if speed else 0)
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), dpi=110, squeeze=False)
    flat = list(axes.flat)
    # Best so far, in trial order.
    ax = flat[0]
    order = sorted(done, key=lambda r: r["number"])
    best, xs, ys = None, [], []
    for r in order:
        v = r["value"]
        best = v if best is None else (max(best, v) if maximize else min(best, v))
        xs.append(r["number"])
        ys.append(best)
    ax.plot(xs, ys, "-", drawstyle="steps-post", color="tab:blue", label="best so far")
    ax.plot([r["number"] for r in order], [r["value"] for r in order], "o", ms=3, color="tab:gray", alpha=0.6,
            label="trial")
    rejected = [r["number"] for r in records if r.get("status") != "complete"]
    if rejected:
        ax.plot(rejected, [ys[0]] * len(rejected), "x", color="tab:red", label=f"rejected/failed ({len(rejected)})")
    ax.set(title="best so far", xlabel="trial", ylabel=metric)
    ax.legend(fontsize=7)
    index = 1
    if speed:
        ax = flat[index]
        index += 1
        ax.scatter([m["prefill_tok_s"] for m in rates], [m["decode_tok_s"] for m in rates], s=14, color="tab:green")
        ax.set(title="prefill vs decode", xlabel="prefill tok/s", ylabel="decode tok/s")
    for name in params:
        ax = flat[index]
        index += 1
        pairs = [(r["params"].get(name), r["value"]) for r in done if name in r["params"]]
        values = [p for p, _ in pairs]
        if _numeric(values):
            ax.scatter(values, [v for _, v in pairs], s=14)
            if len(set(values)) > 1 and min(values) > 0 and max(values) / min(values) > 50:
                ax.set_xscale("log")
        else:
            cats = sorted({str(v) for v in values})
            pos = {c: i for i, c in enumerate(cats)}
            ax.scatter([pos[str(v)] for v in values], [v for _, v in pairs], s=14)
            ax.set_xticks(range(len(cats)), cats, rotation=20, fontsize=7)
        ax.set(title=name, xlabel=name, ylabel=metric)
    for ax in flat[index:]:
        ax.axis("off")
    fig.suptitle(title or f"tune {objective.get('objective', '')}: {path.parent}", fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ training
def plot_training(runs: Iterable[str | os.PathLike], title: str | None = None) -> Figure:
    """Training runs overlaid: loss and lr against step, loss against tokens, validation
    perplexity against tokens."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=110)
    (ax_loss, ax_tok), (ax_ppl, ax_lr) = axes
    count = 0
    paths = [Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run) for run in runs]
    for path, label in zip(paths, _run_labels([path.parent for path in paths])):
        records = _metrics(path)
        train = [r for r in records if r.get("kind") == "train" and "loss" in r]
        evals = [r for r in records if r.get("kind") == "eval" and "val_loss" in r]
        if not train and not evals:
            raise PlotError(f"{path}: no train or eval records")
        _check_records(path, train, ("step", "loss"), ("tokens", "lr"))
        _check_records(path, evals, ("step", "val_loss"), ("tokens",))
        count += 1
        color = _run_color(count - 1, len(paths))
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], "-", color=color, lw=1,
                         label=f"{label} train")
            if all("tokens" in r for r in train):
                ax_tok.plot([r["tokens"] for r in train], [r["loss"] for r in train], "-", color=color, lw=1,
                            label=f"{label} train")
            if all("lr" in r for r in train):
                ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], "-", color=color, label=label)
        if evals:
            ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o--", ms=3, color=color,
                         label=f"{label} validation")
            tokens = _tokens_at(train, evals)
            if tokens:
                ax_ppl.plot(tokens, [_perplexity(r["val_loss"]) for r in evals], "o-", ms=3, color=color, label=label)
    ax_loss.set(title="loss", xlabel="step", ylabel="loss")
    ax_tok.set(title="training loss by tokens", xlabel="tokens", ylabel="loss")
    ax_ppl.set(title="validation perplexity", xlabel="tokens", ylabel="perplexity")
    ax_lr.set(title="learning rate", xlabel="step", ylabel="lr")
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title or f"training: {count} run(s)", fontsize=10)
    fig.tight_layout()
    return fig


def _run_color(index: int, runs: int):
    """Run ``index``'s colour of ``runs``: matplotlib's cycle (C0..C9) for up to 10 runs; more
    took its colours again (run 11 looked like run 1), so then each is its own, spread over a
    colormap."""
    if runs <= 10:
        return f"C{index}"
    return matplotlib.colormaps["turbo"](0.05 + 0.9 * index / (runs - 1))


def _run_labels(dirs: list[Path]) -> list[str]:
    """Each run directory's name, with as many of its parent folders as it takes to tell it from
    the other runs (runs/lr1/m and runs/lr2/m: "lr1/m" and "lr2/m"; both were "m")."""
    return distinct_names([d.resolve().parts for d in dirs])


def _file_labels(files: list[Path]) -> list[str]:
    """Each file's stem, with as many parent folders as it takes to tell it from the other files
    (mac/bench.jsonl and linux/bench.jsonl: "mac/bench" and "linux/bench"; both were "bench", drawn
    in one colour); files that differ only in their suffix keep it (cpu.json, cpu.jsonl)."""
    full = [f.resolve() for f in files]
    labels = distinct_names([(*f.parent.parts, f.stem) for f in full])
    names = distinct_names([f.parts for f in full])
    return [names[i] if any(labels[j] == label and full[j] != full[i] for j in range(len(full))) else label
            for i, label in enumerate(labels)]


def _tokens_at(train: list[dict], evals: list[dict]) -> list[float] | None:
    """Tokens seen at each evaluation: the eval record's own, else interpolated from the
    training records' (step, tokens)."""
    if all("tokens" in r for r in evals):
        return [r["tokens"] for r in evals]
    pts = [(r["step"], r["tokens"]) for r in train if "tokens" in r]
    if not pts:
        return None
    per_step = pts[-1][1] / pts[-1][0] if pts[-1][0] else 0
    return [r["step"] * per_step for r in evals]


# ------------------------------------------------------------------------------ bench
def _series_label(source: str, record: dict[str, Any]) -> str:
    parts = [str(record.get("side") or source)]
    if record.get("variant"):
        parts.append(str(record["variant"]))
    return " / ".join(parts)


#: Fields of a bench record that say what was measured (not the measurement). Records of one
#: series (side / variant) that differ in one of them are different configurations, not repeats
#: of one measurement: `bench --shape 125m --json >> b.jsonl; bench --shape 1.3b --json >> b.jsonl`
#: plotted the median of the two shapes' tokens/s as one line. Besides the x axis, a prefill's
#: batch and a decode's step count (length) are such fields too.
BENCH_CONFIG_FIELDS = ("shape", "dtype", "state_dtype", "profile", "q_bits", "q_group_size", "kernel", "chunk_size",
                       "chunk", "fused", "compiled", "ahead", "blas_threads", "world_size", "parallel", "device",
                       "device_name", "cpu_name", "mlx", "xlstm_metal")
_BENCH_OTHER_AXIS = {"prefill": "batch", "decode": "length"}


def _config_value(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _bench_labels(base: dict[int, str], records: list[dict[str, Any]]) -> dict[int, str]:
    """Record index -> series label: ``base``'s label, and where the records of one kind with
    that label differ in configuration fields, each record's values of those fields."""
    members: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(records):
        members.setdefault((r["kind"], base[i]), []).append(i)
    labels = dict(base)
    for (kind, label), idx in members.items():
        fields = (*BENCH_CONFIG_FIELDS, _BENCH_OTHER_AXIS[kind])
        varying = [k for k in fields if len({_config_value(records[i], k) for i in idx}) > 1]
        if varying:
            for i in idx:
                labels[i] = f"{label} ({', '.join(f'{k}={_config_value(records[i], k)}' for k in varying)})"
    return labels


def plot_bench(files: Iterable[str | os.PathLike], title: str | None = None) -> Figure:
    """Prefill tok/s against prompt length and decode tok/s against batch size."""
    fig, (ax_pre, ax_dec) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    sources = list(files)
    styles: dict[str, tuple[str, str]] = {}  # label -> (color, marker): one series looks the same in both panels

    def style(label: str) -> tuple[str, str]:
        if label not in styles:
            n = len(styles)
            styles[label] = (f"C{n % 10}", "osd^v<>"[(n // 10) % 7])
        return styles[label]

    for file, source in zip(sources, _file_labels([Path(f) for f in sources])):
        groups: dict[tuple[str, str], dict[int, list[float]]] = {}
        records = read_bench(file)
        base = {}
        for i, r in enumerate(records):
            label = _series_label(source if len(sources) > 1 or not r.get("side") else "ours", r)
            if len(sources) > 1 and r.get("side"):
                label = f"{source}: {label}"
            base[i] = label
        labels = _bench_labels(base, records)
        for i, r in enumerate(records):
            label = labels[i]
            x = r.get("length") if r["kind"] == "prefill" else r.get("batch")
            if x is None:
                continue
            groups.setdefault((r["kind"], label), {}).setdefault(int(x), []).append(float(r["tok_s"]))
        for (kind, label), points in sorted(groups.items()):
            xs = sorted(points)
            ax = ax_pre if kind == "prefill" else ax_dec
            color, marker = style(label)
            ax.plot(xs, [statistics.median(points[x]) for x in xs], "-", marker=marker, ms=4, color=color, label=label)
    ax_pre.set(title="prefill", xlabel="prompt length (tokens)", ylabel="tokens/s", xscale="log")
    ax_dec.set(title="decode", xlabel="batch size", ylabel="tokens/s", xscale="log")
    for ax in (ax_pre, ax_dec):
        if ax.lines:
            ax.legend(fontsize=7)
            ys = [y for line in ax.lines for y in line.get_ydata() if y > 0]
            if ys and max(ys) / min(ys) > 50:  # e.g. a CPU beside a GPU
                ax.set_yscale("log")
    fig.suptitle(title or "benchmarks: " + ", ".join(Path(f).name for f in sources), fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ dispatch
def plot_inputs(inputs: list[str | os.PathLike], title: str | None = None) -> Figure:
    """One figure for inputs of one kind (tune: one directory; training runs; bench files)."""
    if not inputs:
        raise PlotError("nothing to plot")
    kinds = {classify(p) for p in inputs}
    if len(kinds) > 1:
        raise PlotError(f"inputs mix kinds ({', '.join(sorted(kinds))}); plot each kind separately")
    kind = kinds.pop()
    seen: dict[Path, str] = {}  # the file each input is read from -> the input that named it first
    for raw in inputs:
        path = Path(raw)
        source = (path / ("trials.jsonl" if kind == "tune" else "metrics.jsonl") if path.is_dir() else path).resolve()
        if source in seen:  # (a run and its metrics.jsonl are one input) it would be drawn twice
            raise PlotError(f"{raw} is {seen[source]} again (both read {source}): give each input once")
        seen[source] = str(raw)
    if kind == "tune":
        if len(inputs) > 1:
            raise PlotError("plot one tune directory at a time")
        return plot_tune(inputs[0], title)
    if kind == "train":
        return plot_training(inputs, title)
    return plot_bench(inputs, title)


def save_figure(fig: Figure, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``fig`` to ``out`` (.png, .svg or .pdf) through a temporary file."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise PlotError(f"--out must end in .png, .svg or .pdf, got {out.name}")
    if out.exists() and not overwrite:
        raise PlotError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=out.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, format=out.suffix[1:].lower())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out


__all__ = ["PlotError", "classify", "plot_bench", "plot_inputs", "plot_training", "plot_tune", "read_bench",
           "save_figure"]
