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
from ..kernels.fast.decode import gate_product_in_kernel
from ..kernels.mlstm import MLSTMState, settle_state


class mLSTMNeuron(nn.Module):
    """The mLSTM layer of an xLSTM-Large block. x [B, S, E] -> (y [B, S, E], (C, n, m)).

    The neuron holds the cells' parameter layers in the module tree under the checkpoint's names
    (``mlstm_layer.q``, ``mlstm_layer.out_proj`` ...), so a checkpoint loads by plain key
    mapping, and each call passes itself to the cells, which read their layers from it: there is
    no second reference to a layer, and a layer replaced in the tree (``nn.quantize``, a LoRA
    wrapper, ``update_modules``, ``load_weights``) is the one that runs. The cells themselves
    hold no arrays.

    Dispatch: the parallel kernel cell (chunkwise by default) for S > 1, the recurrent kernel
    cell (step) for S == 1, unless the config names other kernels.
    """

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        self.projection_cell = mLSTMProjectionCell(config)
        self.parallel_kernel_cell = mLSTMParallelKernelCell(config)
        self.recurrent_kernel_cell = mLSTMRecurrentKernelCell(config)
        self.output_cell = mLSTMOutputCell()
        for layers in (mLSTMProjectionCell.make_layers(config), mLSTMOutputCell.make_layers(config)):
            for name, layer in layers.items():
                setattr(self, name, layer)

    @property
    def cells(self) -> dict[str, nn.Module]:
        """The cells in wiring order."""
        return {
            "projection": self.projection_cell,
            "parallel_kernel": self.parallel_kernel_cell,
            "recurrent_kernel": self.recurrent_kernel_cell,
            "output": self.output_cell,
        }

    def fuse_projections(self) -> None:
        """Inference fast path: one matmul per group of q|k|v|o|i|f that computes alike (all
        float, or quantized alike), kept under a private key (``_fused_projection``)."""
        self.projection_cell.fusion.fuse(self)

    def unfuse_projections(self) -> None:
        self.projection_cell.fusion.unfuse(self)

    def project(self, x: mx.array):
        """x [B, S, E] -> q, k, v, o~, i~, f~ (see :class:`mLSTMProjectionCell`)."""
        return self.projection_cell(self, x)

    def output(self, h: mx.array, o_preact: mx.array) -> mx.array:
        """h [B, NH, S, DV], o~ [B, S, NH * DV] -> y [B, S, E] (see :class:`mLSTMOutputCell`)."""
        return self.output_cell(self, h, o_preact)

    def __call__(self, x: mx.array, state: MLSTMState | None = None) -> tuple[mx.array, MLSTMState]:
        if x.shape[1] == 1 and self.recurrent_kernel_cell.takes_raw_gates:
            return self.step(x, state)
        # A deferred state (a decode's; see kernels.mlstm.mlstm_step_deferred) goes on as (C, n, m)
        # where the kernel is not the fused step: prefill, several tokens, another step kernel.
        state = settle_state(state, self.recurrent_kernel_cell.state_dtype)
        q, k, v, o_preact, i, f = self.project(x)
        kernel_cell = self.recurrent_kernel_cell if x.shape[1] == 1 else self.parallel_kernel_cell
        h, state = kernel_cell(q, k, v, i, f, state)
        if self.fused:  # inference fast path: norm and output gate in one launch on CUDA
            return self.output_cell.fused(self, h, o_preact), state
        return self.output(h, o_preact), state

    @property
    def fused(self) -> bool:
        """True between ``fuse_projections()`` and ``unfuse_projections()`` (or ``update()``): the
        inference fast path, whose fused kernels have no gradient."""
        return self.projection_cell.fusion.key in self

    def step(self, x: mx.array, state: MLSTMState | None = None) -> tuple[mx.array, MLSTMState]:
        """One token through the fused decode kernels (x [B, 1, E]): the gates' bias and soft cap
        inside the step kernel, the norm and output gate in one launch; the same math as
        :meth:`__call__` (and the same ops off CUDA)."""
        cell = self.projection_cell
        packed = cell.project_packed(self, x, defer_gates=gate_product_in_kernel(x))
        if packed is not None:  # q, k, v, the gates and o~ stay columns of one product
            y, columns, i_bias, f_bias, w_if = packed
            h, state = self.recurrent_kernel_cell.step_packed(
                y, columns, cell.num_heads, i_bias, f_bias, cell.gate_soft_cap, state, x=x, w_if=w_if)
            o0 = columns[3]  # o~ follows v and is as wide
            return self.output_cell.fused(self, h, y[..., o0: o0 + columns[3] - columns[2]]), state
        q, k, v, o_preact, i_raw, f_raw, i_bias, f_bias, w_if = cell.project_raw_gates(
            self, x, defer_gates=gate_product_in_kernel(x))
        h, state = self.recurrent_kernel_cell.step_raw_gates(
            q, k, v, i_raw, f_raw, i_bias, f_bias, self.projection_cell.gate_soft_cap, state, x=x, w_if=w_if)
        return self.output_cell.fused(self, h, o_preact), state
