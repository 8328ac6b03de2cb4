"""mLSTMNeuron: wires projection -> kernel -> output cells and dispatches the kernel."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cells.mlstm import (
    mLSTMOutputCell,
    mLSTMParallelKernelCell,
    mLSTMProjectionCell,
    mLSTMRecurrentKernelCell,
)
from ..config import xLSTMConfig
from ..kernels.mlstm import MLSTMState


class mLSTMNeuron(nn.Module):
    """The mLSTM layer of an xLSTM-Large block. x [B, S, E] -> (y [B, S, E], (C, n, m)).

    The cells own the parameters. The neuron registers their layers under the checkpoint's
    names (``mlstm_layer.q``, ``mlstm_layer.out_proj`` ...) so a checkpoint loads by plain key
    mapping; the cells themselves are kept outside the parameter tree (same objects, one copy).

    Dispatch: the parallel kernel cell (chunkwise by default) for S > 1, the recurrent kernel
    cell (step) for S == 1, unless the config names other kernels.
    """

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        cells = {
            "projection_cell": mLSTMProjectionCell(config),
            "parallel_kernel_cell": mLSTMParallelKernelCell(config),
            "recurrent_kernel_cell": mLSTMRecurrentKernelCell(config),
            "output_cell": mLSTMOutputCell(config),
        }
        for name, cell in cells.items():
            object.__setattr__(self, name, cell)
            for layer_name, layer in cell.children().items():
                setattr(self, layer_name, layer)

    @property
    def cells(self) -> dict[str, nn.Module]:
        """The cells in wiring order."""
        return {
            "projection": self.projection_cell,
            "parallel_kernel": self.parallel_kernel_cell,
            "recurrent_kernel": self.recurrent_kernel_cell,
            "output": self.output_cell,
        }

    def fuse(self) -> None:
        """Inference fast path: one matmul for q|k|v|o|i|f, kept under a private key."""
        self._fused_projection = self.projection_cell.fuse()

    def unfuse(self) -> None:
        if self.pop("_fused_projection", None) is not None:
            self.projection_cell.unfuse()

    def __call__(self, x: mx.array, state: MLSTMState | None = None) -> tuple[mx.array, MLSTMState]:
        fused = self["_fused_projection"] if "_fused_projection" in self else None
        q, k, v, o_preact, i, f = self.projection_cell(x, fused)
        kernel_cell = self.recurrent_kernel_cell if x.shape[1] == 1 else self.parallel_kernel_cell
        h, state = kernel_cell(q, k, v, i, f, state)
        return self.output_cell(h, o_preact), state
