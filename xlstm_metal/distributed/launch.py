"""Command-line glue: `--parallel` for the inference commands under ``mlx.launch``."""

from __future__ import annotations

import os
import sys

import mlx.core as mx

from .comm import world
from .pipeline import pipeline_model
from .tensor import shard_model, tensor_parallel_supported

PARALLEL_MODES = ("tensor", "pipeline")


def add_parallel_argument(parser) -> None:
    """``--parallel {tensor,pipeline}`` (used under ``mlx.launch``)."""
    parser.add_argument(
        "--parallel", choices=PARALLEL_MODES, default=None,
        help="under mlx.launch -n N: split the model across the N processes, by heads and FFN width "
             "(tensor, the default for xLSTM-Large) or by consecutive blocks (pipeline, for models larger "
             "than one device; the default for the 2024 xLSTM). Give every process the same model, prompt and "
             "settings: they are checked, and different ones exit with code 2",
    )


def parallelize(model, mode: str | None, group: mx.distributed.Group | None = None):
    """Split ``model`` across ``group`` (default: the ``mlx.launch`` processes) with ``mode``
    ("tensor", "pipeline", or None: tensor where the model supports it, else pipeline); in a
    single process the model is returned as it is. Raises ValueError when ``mode`` is given
    without several processes, or the model cannot be split that way."""
    group = group or world()
    if group.size() == 1:
        if mode is not None:
            raise ValueError(f"--parallel {mode} splits the model across processes: start several with "
                             "mlx.launch -n N -- $(command -v xlstm-metal) ...")
        return model
    if mode is None:
        mode = "tensor" if tensor_parallel_supported(model) else "pipeline"
    return shard_model(model, group) if mode == "tensor" else pipeline_model(model, group)


def print_on_rank0_only(group: mx.distributed.Group | None = None) -> None:
    """Every rank computes the same tokens: only rank 0 writes them to stdout (the others' stdout
    goes to /dev/null; stderr stays, so every rank's errors are seen)."""
    group = group or world()
    if group.rank() != 0:
        sys.stdout.flush()
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)


def parallel_fields(model) -> dict:
    """``{"world_size": N, "parallel": "tensor" | "pipeline" | "none"}`` for reports."""
    split = getattr(model, "parallel", None)
    return {"world_size": split["size"] if split else 1, "parallel": split["mode"] if split else "none"}
