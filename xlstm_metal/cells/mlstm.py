"""The cells of an xLSTM-Large mLSTM layer: projection -> kernel -> output.

Projection and output cells declare the parameter layers (named as in Hugging Face checkpoints)
that the neuron holds in the module tree, and run them from there; the kernel cells hold none
and are the only place the recurrence is computed, so kernels swap freely.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import xLSTMConfig
from ..kernels import get_mlstm_kernel, resolve_kernel_name
from ..kernels.fast.decode import (
    fused_decode_enabled, mlstm_step_gated, mlstm_step_gated_packed, output_norm_gate, unpack_step_columns,
)
from ..kernels.fast.train_rows import (
    linear_residual, norm_gate_linear, norm_gate_train, norm_gate_train_supported, train_cell_recompute_enabled,
    train_recompute_enabled,
)
from ..kernels.fast.skinny import FastLinear, norm_gate_linear_product, uses_norm_gate_product
from ..kernels.mlstm import MLSTMState, zero_state
from .activations import sigmoid
from .fused import FusedLayers, fusion_groups, group_product, linear_output, plain_linear_weight, traced_fusion_active
from .norms import MultiHeadLayerNorm, multi_head_layer_norm, soft_cap


def state_dtype_of(config: xLSTMConfig) -> mx.Dtype:
    return getattr(mx, config.inference_state_dtype)


class mLSTMProjectionCell(nn.Module):
    """x [B, S, E] -> q, k [B, NH, S, DQK], v [B, NH, S, DV], o~ [B, S, NH * DV],
    i~, f~ [B, NH, S] (soft-capped gate pre-activations).

    The cell declares its layers (:meth:`make_layers`); they live in the module tree of the neuron
    that wires it, under the checkpoint's names, and the cell reads them from there on every call
    (``layers``: the module holding them), so whatever the tree holds (a quantized layer, a LoRA
    wrapper, a user's module) is what runs.
    """

    LAYER_NAMES = ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact")

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.gate_soft_cap = config.gate_soft_cap
        self.fusion = FusedLayers("_fused_projection", self.LAYER_NAMES)

    @staticmethod
    def make_layers(config: xLSTMConfig) -> dict[str, nn.Module]:
        E, NH, bias = config.embedding_dim, config.num_heads, config.use_bias
        return {
            "q": nn.Linear(E, config.qk_dim, bias=bias),
            "k": nn.Linear(E, config.qk_dim, bias=bias),
            "v": nn.Linear(E, config.v_dim, bias=bias),
            "ogate_preact": nn.Linear(E, config.v_dim, bias=bias),
            # Gate projections always carry a bias: it sets how open the gates start.
            "igate_preact": nn.Linear(E, NH, bias=True),
            "fgate_preact": nn.Linear(E, NH, bias=True),
        }

    def _heads(self, x: mx.array) -> mx.array:
        B, S, _ = x.shape
        return x.reshape(B, S, self.num_heads, -1).transpose(0, 2, 1, 3)

    def project_raw_gates(self, layers: nn.Module, x: mx.array, defer_gates: bool = False):
        """As :meth:`__call__`, for kernels that take the gates raw (the fused decode step):
        q, k, v, o~ and i, f [B, NH, S] *before* their bias and soft cap, with the biases still
        to add ([NH] each, or None for both when the projections added them), and ``w_if``.

        ``defer_gates``: when i and f form a float group of their own (quantized models keep the
        gate projections in float), leave their product to the kernel: i, f are None and ``w_if``
        [2 NH, E] is their fused weight (otherwise ``w_if`` is None)."""
        (q, k, v, o_preact, i, f), biases, w_if = self.fusion.outputs_unbiased(
            layers, x, defer=(4, 5) if defer_gates else ())
        q, k, v, o_preact = (out if bias is None else out + bias
                             for out, bias in zip((q, k, v, o_preact), biases))
        i_bias, f_bias = biases[4:]
        if w_if is None and (i_bias is None) != (f_bias is None):
            i = i if i_bias is None else i + i_bias
            f = f if f_bias is None else f + f_bias
            i_bias = f_bias = None
        if w_if is not None:
            return self._heads(q), self._heads(k), self._heads(v), o_preact, None, None, i_bias, f_bias, w_if
        return (self._heads(q), self._heads(k), self._heads(v), o_preact,
                i.transpose(0, 2, 1), f.transpose(0, 2, 1), i_bias, f_bias, None)

    def project_packed(self, layers: nn.Module, x: mx.array, defer_gates: bool = False):
        """For the fused decode step, where q, k, v, o~ (no biases) form one fused group and i, f
        are in it or (``defer_gates``: see :meth:`project_raw_gates`) form a float group the step
        kernel multiplies itself: (y [B, S, W] that group's product, the columns of y (q, k, v
        start, v end = o~'s start[, i~, f~ start]), i bias, f bias, w_if or None). The kernel reads
        q, k, v and the gates in y (:meth:`mLSTMRecurrentKernelCell.step_packed`), so the graph
        holds no split, slices or transposes of it. None where the tree's layers are otherwise."""
        current, fused = self.fusion._current(layers)
        if fused is None or any("bias" in current[j] for j in range(4)):
            return None
        groups = list(zip(fusion_groups(current), fused))
        main = [(kind, members, group) for (kind, members), group in groups if members[:4] == [0, 1, 2, 3]]
        if not main:
            return None
        kind, members, group = main[0]
        w_if = None
        if members != [0, 1, 2, 3, 4, 5]:
            gates = [g for (k, m), g in groups if m == [4, 5] and k[0] == "linear"]
            if members != [0, 1, 2, 3] or not defer_gates or not gates:
                return None
            w_if = gates[0]["weight"]
        i_bias = current[4].bias if "bias" in current[4] else None
        f_bias = current[5].bias if "bias" in current[5] else None
        if (i_bias is None) != (f_bias is None):
            return None
        starts, start = [], 0
        for j in members:
            starts.append(start)
            start += current[j].weight.shape[0]
        return group_product(x, kind, group), tuple(starts), i_bias, f_bias, w_if

    def __call__(self, layers: nn.Module, x: mx.array):
        q, k, v, o_preact, i, f = self.fusion.outputs(layers, x)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        i = soft_cap(i, self.gate_soft_cap).transpose(0, 2, 1)
        f = soft_cap(f, self.gate_soft_cap).transpose(0, 2, 1)
        return q, k, v, o_preact, i, f


class _KernelCell(nn.Module):
    """Holds kernel settings, no parameters: (q, k, v, i, f, state) -> (h, new_state)."""

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        self.eps = config.eps
        self.chunk_size = config.chunk_size
        self.state_dtype = state_dtype_of(config)

    def _run(self, kernel_name: str, q, k, v, i, f, state):
        kernel = get_mlstm_kernel(kernel_name)
        return kernel(q, k, v, i, f, state, eps=self.eps, chunk_size=self.chunk_size, state_dtype=self.state_dtype)


class mLSTMParallelKernelCell(_KernelCell):
    """Chunkwise or parallel (quadratic) kernel: prefill and training.

    q, k: [B, NH, S, DQK]; v: [B, NH, S, DV]; i, f: [B, NH, S]; state: (C, n, m) or None.
    Returns h [B, NH, S, DV] and (C [B, NH, DQK, DV], n [B, NH, DQK], m [B, NH, 1]).
    """

    def __init__(self, config: xLSTMConfig, kernel: str | None = None):
        super().__init__(config)
        self.kernel = resolve_kernel_name(kernel or config.chunkwise_kernel)

    def __call__(self, q, k, v, i, f, state: MLSTMState | None = None):
        return self._run(self.kernel, q, k, v, i, f, state)


class mLSTMRecurrentKernelCell(_KernelCell):
    """Step kernel for one token, sequence kernel (a loop of steps) for several.

    Same shapes as :class:`mLSTMParallelKernelCell`.
    """

    def __init__(self, config: xLSTMConfig):
        super().__init__(config)
        self.step_kernel = resolve_kernel_name(config.step_kernel)
        self.sequence_kernel = resolve_kernel_name(config.sequence_kernel)

    def __call__(self, q, k, v, i, f, state: MLSTMState | None = None):
        name = self.step_kernel if q.shape[2] == 1 else self.sequence_kernel
        return self._run(name, q, k, v, i, f, state)

    @property
    def takes_raw_gates(self) -> bool:
        """True when the step kernel is the fused one (``fuse_projections()`` selects it), which
        also runs the gates' bias and soft cap: :meth:`step_raw_gates`."""
        return self.step_kernel == "step_fused" and fused_decode_enabled()

    def step_raw_gates(self, q, k, v, i_raw, f_raw, i_bias, f_bias, gate_soft_cap, state=None, x=None, w_if=None):
        """One step from raw gate projections, or from x and the gates' weight ``w_if``
        (:func:`~xlstm_metal.kernels.fast.decode.mlstm_step_gated`: one CUDA launch for gates and
        step; the reference ops elsewhere)."""
        return mlstm_step_gated(q, k, v, i_raw, f_raw, i_bias, f_bias, state, gate_soft_cap=gate_soft_cap,
                                eps=self.eps, state_dtype=self.state_dtype, x=x, w_if=w_if)

    def step_packed(self, y, columns, num_heads, i_bias, f_bias, gate_soft_cap, state=None, x=None, w_if=None):
        """:meth:`step_raw_gates` with q, k, v (and the raw gates) as columns of the fused
        projections' output y [B, 1, W]
        (:func:`~xlstm_metal.kernels.fast.decode.mlstm_step_gated_packed`: no slices of y in the
        graph). A subclass that overrides :meth:`step_raw_gates` gets that method, on slices."""
        if type(self).step_raw_gates is not mLSTMRecurrentKernelCell.step_raw_gates:
            q, k, v, i_raw, f_raw = unpack_step_columns(y, columns, num_heads)
            return self.step_raw_gates(q, k, v, i_raw, f_raw, i_bias, f_bias, gate_soft_cap, state, x=x, w_if=w_if)
        return mlstm_step_gated_packed(y, columns, num_heads, i_bias, f_bias, state, gate_soft_cap=gate_soft_cap,
                                       eps=self.eps, state_dtype=self.state_dtype, x=x, w_if=w_if)


class mLSTMOutputCell(nn.Module):
    """h [B, NH, S, DV], o~ [B, S, NH * DV] -> out_proj(sigmoid(o~) * MultiHeadLayerNorm(h)) [B, S, E].

    Its layers (``multihead_norm``, ``out_proj``) live in the neuron's tree, as for
    :class:`mLSTMProjectionCell`.
    """

    @staticmethod
    def make_layers(config: xLSTMConfig) -> dict[str, nn.Module]:
        return {
            "multihead_norm": multi_head_layer_norm(
                config.num_heads, config.v_head_dim, bias=config.use_bias, eps=config.norm_eps,
                force_float32=config.norm_reduction_force_float32,
            ),
            "out_proj": nn.Linear(config.v_dim, config.embedding_dim, bias=config.use_bias),
        }

    def __call__(self, layers: nn.Module, h: mx.array, o_preact: mx.array) -> mx.array:
        norm = layers.multihead_norm
        if traced_fusion_active() and type(norm) is MultiHeadLayerNorm and norm.force_float32 \
                and norm_gate_train_supported(h, o_preact, norm.weight):
            # the training step on CUDA: norm and gate in one kernel each way (with out_proj, the
            # cell's output recomputed in the backward instead of kept)
            w_out = plain_linear_weight(layers.out_proj)
            if w_out is not None and train_recompute_enabled():
                if train_cell_recompute_enabled():
                    return norm_gate_linear(h, o_preact, norm.weight, w_out, norm.eps)
                # the cell's output kept (XLSTM_METAL_TRAIN_RECOMPUTE_CELL=0), out_proj on it
                return linear_residual(norm_gate_train(h, o_preact, norm.weight, norm.eps), w_out)
            return linear_output(layers.out_proj, norm_gate_train(h, o_preact, norm.weight, norm.eps))
        h_norm = layers.multihead_norm(h.transpose(0, 2, 1, 3))
        return linear_output(layers.out_proj, sigmoid(o_preact) * h_norm)

    def fused(self, layers: nn.Module, h: mx.array, o_preact: mx.array) -> mx.array:
        """:meth:`__call__` with the norm and output gate as one CUDA launch
        (:func:`~xlstm_metal.kernels.fast.decode.output_norm_gate`; the same ops elsewhere).
        Inference only (no gradient through the kernel). Where out_proj runs the wgmma product's
        stream-K schedule, norm and gate happen inside out_proj's launch
        (:func:`~xlstm_metal.kernels.fast.skinny.norm_gate_linear_product`)."""
        out_proj, norm = layers.out_proj, layers.multihead_norm
        w = plain_linear_weight(out_proj) if type(out_proj) is FastLinear else None
        if w is not None and uses_norm_gate_product(h, o_preact, norm, w):
            return norm_gate_linear_product(h, o_preact, norm, w)
        return out_proj(output_norm_gate(h, o_preact, norm))


def mlstm_zero_state(config: xLSTMConfig, batch_size: int) -> MLSTMState:
    """Zero (C, n, m) for one mLSTM layer of ``config``."""
    return zero_state(batch_size, config.num_heads, config.qk_head_dim, config.v_head_dim, state_dtype_of(config))
