"""Training checkpoints: a Hugging Face model directory plus what resuming needs.

Layout of ``<out>/checkpoint-<step>/``::

    config.json, model.safetensors       the model (float32 master weights), via save_model
    tokenizer.json, tokenizer_config.json
    optimizer.safetensors                optimizer state (flattened tree) and the MLX RNG key
    trainer_state.json                   step, schedule, data position, training settings

Each checkpoint is written to a temporary directory next to it and renamed into place, so a
``checkpoint-*`` directory is always complete; older ones beyond ``keep`` are then removed, except
the one of the best validation loss (``best_step`` of the trainer state).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..monitor import partial_output
from .data import atomic_write_text

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: save_checkpoint's temporary directories (``.checkpoint-<step>.<random>``).
PARTIAL_RE = re.compile(r"^\.checkpoint-\d+\.")
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
_RNG_KEY = "__mx_random_state__"


class ResumeError(ValueError):
    """No usable checkpoint to resume from; the message names the directory."""


def checkpoint_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories in ``out_dir``, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    out_dir: Path,
    step: int,
    model,
    optimizer,
    trainer_state: dict[str, Any],
    tokenizer_dir: Path,
    keep: int = 2,
    warned: set[str] | None = None,
) -> Path:
    """Write ``out_dir/checkpoint-<step>`` atomically; returns its path. Then only the ``keep``
    newest checkpoints stay (0: all), and the one at ``trainer_state["best_step"]`` (the lowest
    validation loss so far), which rotation never removes.

    What saving the model warns about (a shape transformers cannot run) concerns the model, not
    the temporary directory it is written to first: the warning names the final checkpoint, or,
    with ``warned`` (a set kept across a run's saves), the run's checkpoints, once per run."""

    out_dir.mkdir(parents=True, exist_ok=True)
    # A save cut short by SIGKILL or a crash leaves its temporary directory (the size of a whole
    # checkpoint, hidden by its dot): one process writes a run, so any found now is such a leftover.
    remove_partial_checkpoints(out_dir)
    final = out_dir / f"checkpoint-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".checkpoint-{step:07d}."))
    # Removed also when SIGTERM forces the process out while the main thread is stuck (monitor.job).
    with partial_output(tmp):
        try:
            caught = save_model_recording_warnings(
                model, tmp, tokenizer=tokenizer_dir if (tokenizer_dir / "tokenizer.json").is_file() else None)
            arrays = dict(tree_flatten(optimizer.state))
            for index, key in enumerate(mx.random.state):
                arrays[f"{_RNG_KEY}.{index}"] = key
            mx.save_safetensors(str(tmp / OPTIMIZER_FILE), arrays)
            atomic_write_text(tmp / STATE_FILE, json.dumps(trainer_state, indent=2))
            os.chmod(tmp, 0o755)  # mkdtemp directories are 0700
            if final.exists():  # a checkpoint of the same step (re-saved at the end): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    pass_on_save_warnings(caught, tmp, final, out_dir, warned)
    best = trainer_state.get("best_step")
    best_name = f"checkpoint-{best:07d}" if isinstance(best, int) else None
    for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
        if old.name != best_name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_model_recording_warnings(model, tmp: Path, **kwargs) -> list[warnings.WarningMessage]:
    """``save_model(model, tmp, **kwargs)`` into a temporary folder, its warnings recorded (they
    name ``tmp``, which is renamed next) for :func:`pass_on_save_warnings`."""
    from ..loading import save_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_model(model, tmp, **kwargs)
    return caught


def pass_on_save_warnings(caught: list[warnings.WarningMessage], tmp: Path, final: Path, out_dir: Path,
                          warned: set[str] | None) -> None:
    """Warn again what ``save_model`` warned while writing ``tmp``: a warning naming ``tmp`` (gone
    now) names ``final`` instead, or, with ``warned``, "the checkpoints in ``out_dir``" and only
    if ``warned`` does not hold it yet (it is added). Other warnings pass unchanged."""
    prefix = f"{tmp}: "
    for w in caught:
        text = str(w.message)
        if not text.startswith(prefix):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
            continue
        problem = text[len(prefix):]
        if warned is None:
            warnings.warn(f"{final}: {problem}", w.category, stacklevel=3)
        elif problem not in warned:
            warned.add(problem)
            warnings.warn(f"the checkpoints in {out_dir} (this warning is shown once per run): {problem}",
                          w.category, stacklevel=3)


def remove_partial_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary directories of checkpoint saves that never finished (a process killed
    while writing one) from ``out_dir``; returns the paths removed."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.is_dir() and not p.is_symlink() and PARTIAL_RE.match(p.name)]
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def latest_checkpoint(out_dir: str | os.PathLike) -> Path:
    found = checkpoint_dirs(out_dir)
    if not found:
        raise ResumeError(f"--resume: no checkpoint-* directory in {out_dir}")
    return found[-1]


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's trainer_state.json, checked field by field (ResumeError naming the file
    and the field otherwise)."""
    from ..jsonfiles import read_json_object

    path = checkpoint / STATE_FILE
    if not path.is_file() and not path.is_dir():
        raise ResumeError(f"{checkpoint} has no {STATE_FILE}: not a training checkpoint")
    state = read_json_object(path, ResumeError)

    def bad(field: str, rule: str) -> ResumeError:
        return ResumeError(f"{path}: '{field}' must be {rule}, got {state.get(field)!r} (corrupted file?)")

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    for field in ("step", "tokens"):
        if not is_int(state.get(field)):
            raise bad(field, "an integer >= 0")
    if state.get("total_steps") is not None and not is_int(state["total_steps"]):
        raise bad("total_steps", "an integer >= 0 or null")
    elapsed = state.get("elapsed")
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not elapsed >= 0:
        raise bad("elapsed", "a number >= 0")
    position = state.get("data_position")
    if not isinstance(position, dict) or set(position) != {"epoch", "batch"} or not all(
            is_int(v) for v in position.values()):
        raise bad("data_position", "an object {epoch, batch} of integers >= 0")
    window = state.get("log_window", [])
    if not isinstance(window, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in window):
        raise bad("log_window", "a list of numbers")
    best = state.get("best_val_loss")
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float))):
        raise bad("best_val_loss", "a number or null")
    if state.get("best_step") is not None and not is_int(state["best_step"]):
        raise bad("best_step", "an integer >= 0 or null")
    fraction = state.get("val_fraction", 0.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise bad("val_fraction", "a number in [0, 1)")
    if not isinstance(state.get("text_field", "text"), str) or not state.get("text_field", "text"):
        raise bad("text_field", "a non-empty string")
    if not isinstance(state.get("time_budget_spent", False), bool):
        raise bad("time_budget_spent", "true or false")
    if not isinstance(state.get("eval_pending", False), bool):
        raise bad("eval_pending", "true or false")
    if not isinstance(state.get("training_config"), dict):
        raise bad("training_config", "an object")
    from .trainer import TrainingConfig

    try:
        TrainingConfig(**state["training_config"]).validate()
    except (TypeError, ValueError) as err:
        raise ResumeError(f"{path}: bad 'training_config': {err}") from None
    return state


def rewrite_trainer_state(checkpoint: Path, trainer_state: dict[str, Any]) -> None:
    """Replace ``checkpoint``'s trainer_state.json (atomically), e.g. to mark the run finished
    when a time budget stops it at a step saved before (weights and optimizer are the same)."""
    atomic_write_text(checkpoint / STATE_FILE, json.dumps(trainer_state, indent=2))


def restore_optimizer(checkpoint: Path, optimizer, parameters: dict | None = None) -> None:
    """Set ``optimizer``'s state from ``checkpoint/optimizer.safetensors``.

    With ``parameters`` (the model's trainable parameters) the saved state must match the
    state the optimizer gives them: same names and shapes, all finite (ResumeError naming the
    file otherwise). The MLX RNG key saved beside it is informational: the trainer reseeds the
    RNG from (seed, step) before every step, so a resumed run draws the same random numbers
    anyway.
    """
    from ..loading import CheckpointError, _load_file, non_finite_tensors

    path = checkpoint / OPTIMIZER_FILE
    if not path.is_file():
        raise ResumeError(f"{checkpoint} has no {OPTIMIZER_FILE}")
    try:
        arrays = _load_file(path)
    except CheckpointError as err:
        raise ResumeError(str(err)) from None
    for key in [k for k in arrays if k.startswith(_RNG_KEY)]:
        arrays.pop(key)
    if parameters is not None:
        optimizer.init(parameters)
        expected = dict(tree_flatten(optimizer.state))
        missing = sorted(set(expected) - set(arrays))
        unexpected = sorted(set(arrays) - set(expected))
        misshaped = sorted(k for k in set(expected) & set(arrays) if arrays[k].shape != expected[k].shape)
        if missing or unexpected or misshaped:
            raise ResumeError(f"{path} does not match the model's optimizer state (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, mis-shaped {misshaped[:5]})")
        bad = non_finite_tensors(arrays)
        if bad:
            raise ResumeError(f"{path} holds NaN or infinite values in {', '.join(bad[:10])}")
    optimizer.state = tree_unflatten(list(arrays.items()))


def read_metrics(path: Path, error: type[Exception] = ResumeError) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl. A last line cut short (a write interrupted by a
    crash, or one under way in a live run) is dropped with a one-line warning naming the file;
    any other line that is not a JSON object is an ``error`` (default ResumeError) naming it.
    Shared by resuming and ``xlstm-metal plot``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"cannot read {path}: {err}") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
            if number == len(lines):  # no newline after it: the append was interrupted
                print(f"warning: dropping the incomplete last line of {path}", file=sys.stderr)
                continue
            raise error(f"{path} line {number} is not a metrics record (corrupted file?): {line[:80]!r}")
        records.append(record)
    return records
