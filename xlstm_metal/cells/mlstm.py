"""The cells of an xLSTM-Large mLSTM layer: projection -> kernel -> output.

Projection and output cells hold parameters (named as in Hugging Face checkpoints); the kernel
cells hold none and are the only place the recurrence is computed, so kernels swap freely.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import xLSTMConfig
from ..kernels import get_mlstm_kernel, resolve_kernel_name
from ..kernels.mlstm import MLSTMState, zero_state
from .activations import sigmoid
from .norms import MultiHeadLayerNorm, soft_cap


def state_dtype_of(config: xLSTMConfig) -> mx.Dtype:
    return getattr(mx, config.inference_state_dtype)


class mLSTMProjectionCell(nn.Module):
    """x [B, S, E] -> q, k [B, NH, S, DQK], v [B, NH, S, DV], o~ [B, S, NH * DV],
    i~, f~ [B, NH, S] (soft-capped gate pre-activations)."""

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        E, NH, bias = config.embedding_dim, config.num_heads, config.use_bias
        self.num_heads = NH
        self.gate_soft_cap = config.gate_soft_cap
        self.q = nn.Linear(E, config.qk_dim, bias=bias)
        self.k = nn.Linear(E, config.qk_dim, bias=bias)
        self.v = nn.Linear(E, config.v_dim, bias=bias)
        self.ogate_preact = nn.Linear(E, config.v_dim, bias=bias)
        # Gate projections always carry a bias: it sets how open the gates start.
        self.igate_preact = nn.Linear(E, NH, bias=True)
        self.fgate_preact = nn.Linear(E, NH, bias=True)

    def _heads(self, x: mx.array) -> mx.array:
        B, S, _ = x.shape
        return x.reshape(B, S, self.num_heads, -1).transpose(0, 2, 1, 3)

    def _layers(self) -> list[nn.Linear]:
        return [self.q, self.k, self.v, self.ogate_preact, self.igate_preact, self.fgate_preact]

    def fuse(self) -> mx.array:
        """One [sum(out), E] matrix for q|k|v|o|i|f (see :func:`fuse_linears`); the owner (the
        neuron) keeps it and passes it back to each call."""
        return fuse_linears(self._layers())

    def unfuse(self) -> None:
        unfuse_linears(self._layers())

    def __call__(self, x: mx.array, fused_weight: mx.array | None = None):
        if fused_weight is None:
            outs = [layer(x) for layer in self._layers()]
        else:
            outs = fused_linear_outputs(x, fused_weight, self._layers())
        q, k, v, o_preact, i, f = outs
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        i = soft_cap(i, self.gate_soft_cap).transpose(0, 2, 1)
        f = soft_cap(f, self.gate_soft_cap).transpose(0, 2, 1)
        return q, k, v, o_preact, i, f


def fuse_linears(layers: list[nn.Linear]) -> mx.array:
    """Concatenate the weights of ``layers`` (same input) into one [sum(out), in] matrix.

    The layers' weights become row views of it, so memory does not grow and the parameter names
    (checkpoint keys) stay as they are. The caller stores the matrix in its module under a
    private key (``_fused_...``): part of ``module.state``, so ``mx.compile(..., inputs=
    model.state)`` takes it as an input rather than a constant, and not of ``parameters()``, so it
    is neither saved nor trained. :meth:`xLSTMLarge.update` drops it when weights are replaced.
    """
    weight = gemv_layout(mx.concatenate([layer.weight for layer in layers], axis=0))
    start = 0
    for layer in layers:
        rows = layer.weight.shape[0]
        layer.weight = weight[start : start + rows]
        start += rows
    mx.eval([layer.weight for layer in layers])
    return weight


def unfuse_linears(layers: list[nn.Linear]) -> None:
    """Give ``layers`` their own row-major weights again. As views into a fused matrix (column
    slices of it on the CPU) the separate matmuls would copy them on every call."""
    for layer in layers:
        layer.weight = mx.contiguous(layer.weight)
    mx.eval([layer.weight for layer in layers])


def gemv_layout(weight: mx.array) -> mx.array:
    """``weight`` [out, in], evaluated; on the CPU stored as a contiguous [in, out] array and
    returned as its transposed view. MLX's CPU matmul with one row (decoding) reads a
    column-major weight 1.4-1.7x faster (x @ W with W [in, out] contiguous: LM head 20.5 ->
    11.8 ms, gate|up of 12 blocks 19.3 -> 12.8 ms, 125m shape); GPUs read the row-major layout
    faster, so it stays there."""
    if mx.default_device() == mx.cpu:
        weight = mx.contiguous(weight.T)
        mx.eval(weight)
        return weight.T
    mx.eval(weight)
    return weight


def fused_linear_outputs(x: mx.array, weight: mx.array, layers: list[nn.Linear]) -> list[mx.array]:
    """Each of ``layers``' outputs from one matmul with their fused ``weight``."""
    bounds, start = [], 0
    for layer in layers[:-1]:
        start += layer.weight.shape[0]
        bounds.append(start)
    outs = mx.split(x @ weight.T, bounds, axis=-1)
    # Biases are added per layer so each output keeps the dtype the separate layer gives.
    return [out + layer.bias if "bias" in layer else out for out, layer in zip(outs, layers)]


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


class mLSTMOutputCell(nn.Module):
    """h [B, NH, S, DV], o~ [B, S, NH * DV] -> out_proj(sigmoid(o~) * MultiHeadLayerNorm(h)) [B, S, E]."""

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        self.multihead_norm = MultiHeadLayerNorm(
            config.num_heads, config.v_head_dim, eps=config.norm_eps,
            force_float32=config.norm_reduction_force_float32,
        )
        self.out_proj = nn.Linear(config.v_dim, config.embedding_dim, bias=config.use_bias)

    def __call__(self, h: mx.array, o_preact: mx.array) -> mx.array:
        h_norm = self.multihead_norm(h.transpose(0, 2, 1, 3))
        return self.out_proj(sigmoid(o_preact) * h_norm)


def mlstm_zero_state(config: xLSTMConfig, batch_size: int) -> MLSTMState:
    """Zero (C, n, m) for one mLSTM layer of ``config``."""
    return zero_state(batch_size, config.num_heads, config.qk_head_dim, config.v_head_dim, state_dtype_of(config))
