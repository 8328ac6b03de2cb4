"""The xLSTM-Large block: pre-norm mLSTM layer and pre-norm SwiGLU FFN, each with a residual."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn

from ..cells.ffn import _GATE_UP, FeedForward, swiglu
from ..cells.fused import fusion_groups, traced_fusion_active
from ..cells.norms import RMSNorm, rms_norm
from ..config import xLSTMConfig
from ..kernels.fast import decode_chain as chain
from ..kernels.fast.decode import add_rms_norm, gate_product_in_kernel
from ..kernels.fast.skinny import inference_products
from ..kernels.fast.train_rows import residual_into_output, residual_norm, residual_norm_supported
from ..kernels.mlstm import MLSTMState, is_deferred
from ..neurons.mlstm import mLSTMNeuron


class mLSTMBlock(nn.Module):
    """x [B, S, E], state (C, n, m) | None -> (x' [B, S, E], new state)."""

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        norm = dict(bias=config.use_bias, eps=config.norm_eps, force_float32=config.norm_reduction_force_float32)
        self.norm_mlstm = rms_norm(config.embedding_dim, **norm)
        self.mlstm_layer = mLSTMNeuron(config)
        self.norm_ffn = rms_norm(config.embedding_dim, **norm)
        self.ffn = FeedForward(config)

    def __call__(self, x: mx.array, state: MLSTMState | None = None) -> tuple[mx.array, MLSTMState]:
        """x: the residual stream, in the weights' dtype or (see ``xLSTMLarge.residual_dtype``)
        float32; the layers compute in the norms' dtype and their outputs add into x's."""
        if self.fused_step(x):
            x, y, state = self.step(x, None, state)
            return x + y, state
        # In the training step (XLSTM_METAL_TRAIN_ADDMM=1) the branch's last GEMM may add x itself.
        x, xn = _pre_norm(x, self.norm_mlstm)
        with residual_into_output(x) as res:
            y, state = self.mlstm_layer(_normed(xn, self.norm_mlstm), state)
        if self.neuron is not None and self.neuron.fused:  # inference: the add inside the norm's launch
            x, xn = add_rms_norm(x, y, self.norm_ffn)
            return x + self.ffn(_normed(xn, self.norm_ffn)), state
        x = y if res.taken else x + y
        x, xn = _pre_norm(x, self.norm_ffn)
        with residual_into_output(x) as res:
            z = self.ffn(_normed(xn, self.norm_ffn))
        return (z if res.taken else x + z), state

    @property
    def neuron(self) -> mLSTMNeuron | None:
        layer = self.mlstm_layer
        return layer if isinstance(layer, mLSTMNeuron) else None

    def fused_step(self, x: mx.array) -> bool:
        """True for one token once ``fuse_projections()`` selected the fused step kernel: then
        :meth:`step` runs (fewer CUDA launches, the same math)."""
        return x.shape[1] == 1 and self.neuron is not None and self.neuron.recurrent_kernel_cell.takes_raw_gates

    def step(self, x: mx.array, pending: mx.array | None, state: MLSTMState | None = None):
        """One token, the block's input being ``x + pending`` ([B, 1, E]; ``pending`` the previous
        block's FFN output, or None) -> (x', ffn output, state): the block's output is
        ``x' + ffn output``. Each residual add runs with the RMSNorm that reads it
        (:func:`~xlstm_metal.kernels.fast.decode.add_rms_norm`: one CUDA launch), so a chain of
        blocks leaves each FFN residual to the next block's norm.

        On CUDA at a few rows (quantized projections; float ones at one row) the step runs as five
        launches (:mod:`~xlstm_metal.kernels.fast.decode_chain`: the norms, gates and residual
        adds inside the products), each stage falling back to the modules of the tree where they
        are not what its kernel expects."""
        if chain.chain_applies(x) and not is_deferred(state):  # the chain's step kernels take (C, n, m)
            return self._chain_step(x, pending, state)
        with inference_products():  # no gradient here (the step kernel has none): products without vjp nodes
            if pending is None:
                xn = self.norm_mlstm(x)
            else:
                x, xn = add_rms_norm(x, pending, self.norm_mlstm)
            y, state = self.mlstm_layer(_normed(xn, self.norm_mlstm), state)
            x, xn = add_rms_norm(x, y, self.norm_ffn)
            return x, self.ffn(_normed(xn, self.norm_ffn)), state

    def _chain_step(self, x: mx.array, pending: mx.array | None, state: MLSTMState | None):
        """:meth:`step` through the decode chain, stage by stage (see the module docstring of
        :mod:`~xlstm_metal.kernels.fast.decode_chain`)."""
        layer = self.mlstm_layer
        ffn_arrays = self._chain_ffn_arrays(x)
        plan = _projection_plan(layer, self.norm_mlstm, x, pending)
        args = self._chain_block_args(x, pending, state, plan, ffn_arrays)
        if args is not None:  # the whole block in one launch
            return chain.block_quantized_matmul(*args)
        projected = None if plan is None else _chain_projections(layer, self.norm_mlstm, x, pending, plan)
        if projected is None:  # the reference stage: add + norm, the projections as the tree holds them
            if pending is None:
                xn = self.norm_mlstm(x)
            else:
                x, xn = add_rms_norm(x, pending, self.norm_mlstm)
            xn = _normed(xn, self.norm_mlstm)
            h, o_preact, state = _mlstm_kernel(layer, *layer.projection_cell.project_raw_gates(
                layer, xn, defer_gates=gate_product_in_kernel(xn)), state, x=xn)
            o_src, o_offset = o_preact, 0
        else:
            x, (y, columns, i_bias, f_bias, w_if, xn), (o_src, o_offset) = projected
            o_preact = o_src[..., o_offset: o_offset + layer.ogate_preact.weight.shape[0]]
            cell = layer.projection_cell
            h, state = layer.recurrent_kernel_cell.step_packed(
                y, columns, cell.num_heads, i_bias, f_bias, cell.gate_soft_cap, state, x=xn, w_if=w_if)
        out_arrays = chain.quantized_arrays(layer.out_proj, x.shape[0])
        if ffn_arrays is not None and chain.merge_mode(ffn_arrays[4], x.shape[0]) in (4, 5):  # stages 3-5 in one launch
            down = chain.quantized_arrays(self.ffn.proj_down, x.shape[0])
            if chain.tail_merge_supported(h, o_src, o_offset, layer.multihead_norm, x, out_arrays, self.norm_ffn,
                                          ffn_arrays, down):
                x, y = chain.tail_quantized_matmul(h, o_src, o_offset, layer.multihead_norm, x, out_arrays,
                                                   self.norm_ffn, ffn_arrays, down)
                return x, y, state
        if chain.gate_chain_supported(h, o_src, o_offset, layer.multihead_norm, x, out_arrays):
            w, scales, biases, group_size, bits = out_arrays
            x = chain.gate_norm_quantized_matmul(h, o_src, o_offset, layer.multihead_norm, x, w, scales, biases,
                                                 group_size=group_size, bits=bits)
            xn = None if ffn_arrays is not None else _normed(self.norm_ffn(x), self.norm_ffn)
        elif ffn_arrays is not None:
            x, xn = x + layer.output_cell.fused(layer, h, o_preact), None
        else:  # as :meth:`step`: the residual add inside the norm's launch
            x, xn = add_rms_norm(x, layer.output_cell.fused(layer, h, o_preact), self.norm_ffn)
            xn = _normed(xn, self.norm_ffn)
        return x, self._chain_ffn(x, xn, ffn_arrays), state

    def _chain_block_args(self, x: mx.array, pending, state, plan=None, ffn_arrays=None):
        """:func:`~xlstm_metal.kernels.fast.decode_chain.block_quantized_matmul`'s arguments for
        this block's step (``decode_chain.CHAIN_MERGE`` 5, every stage applying), else None;
        ``plan`` and ``ffn_arrays`` as :meth:`_chain_step` found them (or found here)."""
        if ffn_arrays is None:
            ffn_arrays = self._chain_ffn_arrays(x)
        if ffn_arrays is None or chain.merge_mode(ffn_arrays[4], x.shape[0]) != 5:
            return None
        layer = self.mlstm_layer
        plan = plan or _projection_plan(layer, self.norm_mlstm, x, pending)
        if plan is None:
            return None
        cell = layer.projection_cell
        args = (x, pending, self.norm_mlstm, *plan, layer.recurrent_kernel_cell, cell.num_heads, cell.gate_soft_cap,
                state, layer.multihead_norm, chain.quantized_arrays(layer.out_proj, x.shape[0]), self.norm_ffn,
                ffn_arrays, chain.quantized_arrays(self.ffn.proj_down, x.shape[0]))
        return args if chain.block_merge_supported(*args) else None

    def _chain_ffn_arrays(self, x: mx.array):
        """The arrays of the FFN's fused gate|up group (:func:`~xlstm_metal.kernels.fast.decode_chain.group_arrays`)
        when stage 4 of the chain (its RMSNorm in the product's prologue) applies to residual
        stream x, else None."""
        ffn = self.ffn
        if type(ffn) is not FeedForward:
            return None
        layers, fused = _GATE_UP._current(ffn)
        if fused is None or "bias" in layers[0] or "bias" in layers[1]:
            return None
        for (kind, members), group in zip(fusion_groups(layers), fused):
            if members == [0, 1]:
                arrays = chain.group_arrays(kind, group, x.shape[0])
                return arrays if chain.norm_chain_supported(x, None, self.norm_ffn, arrays) else None
        return None

    def _chain_ffn(self, x: mx.array, xn: mx.array | None, arrays) -> mx.array:
        """The FFN's output: RMSNorm of x -> gate|up (one launch, ``arrays`` from
        :meth:`_chain_ffn_arrays`; or the tree's layers on ``xn``, the normed x), then SwiGLU ->
        down (one launch where proj_down is a plain quantized layer; with
        ``decode_chain.CHAIN_MERGE`` 1-3 both stages in one launch where they can)."""
        ffn = self.ffn
        if type(ffn) is not FeedForward:
            return ffn(xn)
        if arrays is not None:
            down = chain.quantized_arrays(ffn.proj_down, x.shape[0])
            if chain.ffn_rows_supported(x, self.norm_ffn, arrays, down):  # SwiGLU in gate|up's epilogue
                return chain.ffn_rows_matmul(x, self.norm_ffn, arrays, down)
            if chain.ffn_merge_supported(x, self.norm_ffn, arrays, down):  # both stages in one launch
                return chain.ffn_quantized_matmul(x, self.norm_ffn, arrays, down)
            w, scales, biases, group_size, bits = arrays
            _, _, gate_up = chain.norm_quantized_matmul(x, None, self.norm_ffn, w, scales, biases,
                                                        group_size=group_size, bits=bits)
            if chain.swiglu_chain_supported(gate_up, down):
                w, scales, biases, group_size, bits = down
                return chain.swiglu_quantized_matmul(gate_up, w, scales, biases, group_size=group_size, bits=bits)
            F = ffn.proj_up_gate.weight.shape[0]
            gate, up = gate_up[..., :F], gate_up[..., F:]
        else:
            gate, up = _GATE_UP.outputs(ffn, xn)
        return ffn.proj_down(swiglu(gate, up))


def _mlstm_kernel(layer: mLSTMNeuron, q, k, v, o_preact, i_raw, f_raw, i_bias, f_bias, w_if, state, *, x):
    """The gated step kernel on the projections (q, k, v [B, 1, NH * D] or already [B, NH, 1, D]);
    returns h, o~ and the new state."""
    cell = layer.projection_cell
    if q.ndim == 3:  # one token: [B, 1, NH * D] is [B, NH, 1, D] in memory (one reshape, no transpose)
        B, NH = q.shape[0], cell.num_heads
        q, k, v = (a.reshape(B, NH, 1, a.shape[-1] // NH) for a in (q, k, v))
    h, state = layer.recurrent_kernel_cell.step_raw_gates(
        q, k, v, i_raw, f_raw, i_bias, f_bias, cell.gate_soft_cap, state,
        x=x if w_if is not None else None, w_if=w_if)
    return h, o_preact, state


def _projection_plan(layer: mLSTMNeuron, norm: nn.Module, x: mx.array, pending: mx.array | None):
    """Whether stage 1 of the chain applies (:func:`_chain_projections`): (the fused group's arrays,
    the step's columns of its output (q, k, v, v end[, i~, f~]), i bias, f bias, w_if), or None."""
    cell = layer.projection_cell
    layers, fused = cell.fusion._current(layer)
    if fused is None:
        return None
    groups = list(zip(fusion_groups(layers), fused))
    arrays, w_if, members = None, None, None
    for (kind, group_members), group in groups:
        if group_members[:4] == [0, 1, 2, 3]:
            arrays, members = chain.group_arrays(kind, group, x.shape[0]), group_members
        elif group_members == [4, 5] and kind[0] == "linear":
            w_if = group["weight"]
    if arrays is None or any("bias" in layers[j] for j in range(4)):
        return None
    gates_quantized = members == [0, 1, 2, 3, 4, 5]
    if not gates_quantized and (members != [0, 1, 2, 3] or w_if is None):
        return None
    i_bias = layers[4].bias if "bias" in layers[4] else None
    f_bias = layers[5].bias if "bias" in layers[5] else None
    if (i_bias is None) != (f_bias is None) or not chain.norm_chain_supported(x, pending, norm, arrays):
        return None
    starts, start = [], 0
    for j in members:
        starts.append(start)
        start += layers[j].weight.shape[0]
    # q, k, v (and i~, f~) stay columns of y: the step kernel reads them there (no slices)
    columns = tuple(starts[:4]) + (tuple(starts[4:6]) if gates_quantized else ())
    return arrays, columns, i_bias, f_bias, None if gates_quantized else w_if


def _chain_projections(layer: mLSTMNeuron, norm: nn.Module, x: mx.array, pending: mx.array | None, plan):
    """Stage 1 of the chain: [x + pending ->] RMSNorm -> the fused q|k|v|o(|i|f) product in one
    launch, when q, k, v, o form one quantized group (no biases) and i, f are in it too or form
    the float group the step kernel multiplies itself (``plan``: :func:`_projection_plan`'s).
    Returns (x + pending, (the product's output, the step's columns of it, i bias, f bias, w_if,
    normed x (None without w_if)), (the product's output, o~'s column offset in it))."""
    arrays, columns, i_bias, f_bias, w_if = plan
    w, scales, biases, group_size, bits = arrays
    s, xn, y = chain.norm_quantized_matmul(x, pending, norm, w, scales, biases, group_size=group_size, bits=bits,
                                           write_xn=w_if is not None)
    # o~ follows q, k, v: columns[3] is where it starts
    return s, (y, columns, i_bias, f_bias, w_if, xn), (y, columns[3])


def _pre_norm(x: mx.array, norm: RMSNorm) -> tuple[mx.array, mx.array]:
    """(x, norm(x)) for a block half whose input feeds its norm and its residual: in the traced
    training step on CUDA (XLSTM_METAL_TRAIN_NORM_RESIDUAL=1) as
    :func:`~xlstm_metal.kernels.fast.train_rows.residual_norm` (the two cotangents of x summed
    in the norm's backward kernel; the same forward)."""
    # The kernel has no bias: a biased norm (BiasedRMSNorm) runs as its module.
    if type(norm) is RMSNorm and traced_fusion_active() and residual_norm_supported(x, norm.weight):
        return residual_norm(x, norm.weight, norm.eps)
    return x, norm(x)


def _normed(out: mx.array, norm: RMSNorm) -> mx.array:
    """A norm's output in its weight's dtype: a float32 residual stream under bf16 weights is
    normalised in float32 and rounded once, and the projections then run in bf16 (a float32
    input would promote their matmuls to float32). A norm without a weight array (a user's
    module: nn.LayerNorm(affine=False), nn.Identity, a wrapper) leaves its output as it is."""
    weight = norm.get("weight") if isinstance(norm, nn.Module) else None
    if not isinstance(weight, mx.array) or out.dtype == weight.dtype:
        return out
    return out.astype(weight.dtype)


def stacked_step(blocks: list, x: mx.array, pending: mx.array | None, states: list):
    """Up to ``decode_chain.CHAIN_STACK`` consecutive ``blocks`` stepped in one launch
    (:func:`~xlstm_metal.kernels.fast.decode_chain.stack_quantized_matmul`): (x', pending', their
    new states), the values of :meth:`mLSTMBlock.step` block after block; None where fewer than
    two of them run so (then each block steps on its own)."""
    if chain.CHAIN_STACK < 2 or len(blocks) < 2 or not chain.chain_applies(x) or any(map(is_deferred, states)):
        return None
    later = pending
    group = []
    for index, block in enumerate(blocks[: chain.CHAIN_STACK]):
        if not isinstance(block, mLSTMBlock) or not block.fused_step(x):
            break
        if index and later is None:  # the blocks after the first take a pending FFN output (its shape, T)
            weight = block.norm_mlstm.get("weight")
            if not isinstance(weight, mx.array):  # a user's norm module: this block steps on its own
                break
            later = SimpleNamespace(shape=x.shape, dtype=weight.dtype)
        args = block._chain_block_args(x, pending if index == 0 else later, states[index])
        if args is None or (group and not chain.stack_compatible(group[0], args)):
            break
        group.append(args)
    if len(group) < 2:
        return None
    results = chain.stack_quantized_matmul(group)
    return results[-1][0], results[-1][1], [state for _, _, state in results]
