"""Training checkpoints: a Hugging Face model directory plus what resuming needs.

Layout of ``<out>/checkpoint-<step>/``::

    config.json, model.safetensors       the model (float32 master weights), via save_model
    tokenizer.json, tokenizer_config.json
    optimizer.safetensors                optimizer state (flattened tree) and the MLX RNG key
    trainer_state.json                   step, schedule, data position, training settings

Each checkpoint is written to a temporary directory next to it and renamed into place, so a
``checkpoint-*`` directory is always complete; older ones beyond ``keep`` are then removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .data import atomic_write_text

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
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
) -> Path:
    """Write ``out_dir/checkpoint-<step>`` atomically; returns its path."""
    from ..loading import save_model

    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"checkpoint-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".checkpoint-{step:07d}."))
    try:
        save_model(model, tmp)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / name)
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
    for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | os.PathLike) -> Path:
    found = checkpoint_dirs(out_dir)
    if not found:
        raise ResumeError(f"--resume: no checkpoint-* directory in {out_dir}")
    return found[-1]


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ResumeError(f"{checkpoint} has no {STATE_FILE}: not a training checkpoint") from None
    except json.JSONDecodeError as err:
        raise ResumeError(f"{path} is not valid JSON: {err}") from None


def restore_optimizer(checkpoint: Path, optimizer) -> None:
    """Set ``optimizer``'s state from ``checkpoint/optimizer.safetensors``.

    The MLX RNG key saved beside it is informational: the trainer reseeds the RNG from
    (seed, step) before every step, so a resumed run draws the same random numbers anyway.
    """
    path = checkpoint / OPTIMIZER_FILE
    if not path.is_file():
        raise ResumeError(f"{checkpoint} has no {OPTIMIZER_FILE}")
    arrays = mx.load(str(path))
    for key in [k for k in arrays if k.startswith(_RNG_KEY)]:
        arrays.pop(key)
    optimizer.state = tree_unflatten(list(arrays.items()))
