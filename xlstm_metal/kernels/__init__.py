"""Kernel registry: recurrence implementations selectable by name from the config.

Names are ours ("chunkwise", "parallel", "sequence", "step", plus fast kernels registered by
``xlstm_metal.kernels.fast``) or NX-AI's (``chunkwise--triton_limit_chunk``,
``native_sequence__native``, ``native``/``triton`` ...), which map onto the MLX kernel of the
same form, since NX-AI's Triton/CUDA kernels do not exist here (``triton``, their fused step,
maps onto our fused step kernel, which is the reference step off CUDA).
"""

from __future__ import annotations

from typing import Callable

from .mlstm import mlstm_chunkwise, mlstm_parallel, mlstm_sequence, mlstm_step

MLSTMKernel = Callable[..., tuple]

_MLSTM_KERNELS: dict[str, MLSTMKernel] = {
    "chunkwise": mlstm_chunkwise,
    "parallel": mlstm_parallel,
    "sequence": mlstm_sequence,
    "step": mlstm_step,
}


def register_mlstm_kernel(name: str, fn: MLSTMKernel) -> None:
    """Make ``fn`` selectable as ``name`` (same signature as :func:`mlstm_chunkwise`)."""
    _MLSTM_KERNELS[name] = fn


def resolve_kernel_name(name: str) -> str:
    """Our kernel name for ``name`` (ours or NX-AI's); KeyError naming the choices if unknown."""
    if name in _MLSTM_KERNELS:
        return name
    if name.startswith("chunkwise--"):
        return "chunkwise"
    if name.startswith("parallel--"):
        return "parallel"
    if name.startswith("native_sequence__"):
        return "sequence"
    if name == "native":
        return "step"
    if name == "triton":  # NX-AI's fused step kernel: ours is the CUDA one (the reference elsewhere)
        return "step_fused"
    raise KeyError(f"unknown mLSTM kernel {name!r}; available: {', '.join(sorted(_MLSTM_KERNELS))}")


def get_mlstm_kernel(name: str) -> MLSTMKernel:
    """The kernel function registered under ``name`` (after :func:`resolve_kernel_name`)."""
    return _MLSTM_KERNELS[resolve_kernel_name(name)]


def available_mlstm_kernels() -> list[str]:
    return sorted(_MLSTM_KERNELS)


__all__ = [
    "get_mlstm_kernel",
    "register_mlstm_kernel",
    "resolve_kernel_name",
    "available_mlstm_kernels",
    "mlstm_chunkwise",
    "mlstm_parallel",
    "mlstm_sequence",
    "mlstm_step",
]

# Registers the fast kernels (chunkwise_scan, ...) so any config can name them.
from . import fast  # noqa: E402,F401
