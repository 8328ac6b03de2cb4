"""NX-AI's initialisation of the 2024 xLSTM (``xLSTMLMModel.reset_parameters`` there)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import mlx.core as mx

from ..blocks.xlstm_2024 import mLSTMBlock2024
from ..errors import ConfigError

if TYPE_CHECKING:
    from .xlstm_2024 import xLSTMLMModel


def reset_parameters(model: "xLSTMLMModel", seed: int = 0) -> None:
    """NX-AI's initialisation: small init (std sqrt(2/5E)) for embeddings and input
    projections, Wang init (std 2/(num_blocks sqrt(E))) for projections into the residual
    stream, zero norm weights (scale 1), mLSTM forget biases linspace(3, 6), input biases
    N(0, 0.1), sLSTM biases per ``bias_init``, recurrent kernel per ``recurrent_weight_init``."""
    cfg = model.config
    E, L = cfg.embedding_dim, cfg.num_blocks
    key = [mx.random.key(seed)]

    def nk():
        key[0], sub = mx.random.split(key[0])
        return sub

    small = math.sqrt(2 / (5 * E))
    wang = 2 / L / math.sqrt(E)

    def normal(shape, std):
        return mx.random.normal(shape, key=nk()) * std

    def uniform(shape, bound):
        return mx.random.uniform(-bound, bound, shape, key=nk())

    def init_conv(conv):
        bound = 1 / math.sqrt(conv.kernel_size)  # torch Conv1d default, fan_in = K (depthwise)
        conv.conv.weight = uniform(conv.conv.weight.shape, bound)
        if "bias" in conv.conv:
            conv.conv.bias = uniform(conv.conv.bias.shape, bound)

    def zero_bias(linear):
        if "bias" in linear:
            linear.bias = mx.zeros_like(linear.bias)

    model.token_embedding.weight = normal(model.token_embedding.weight.shape, small)
    if "lm_head" in model:
        model.lm_head.weight = normal(model.lm_head.weight.shape, small)
    for idx, block in enumerate(model.blocks):
        n = block.xlstm
        if isinstance(block, mLSTMBlock2024):
            n.proj_up.weight = normal(n.proj_up.weight.shape, small)
            n.proj_down.weight = normal(n.proj_down.weight.shape, wang)
            for lin in (n.proj_up, n.proj_down, n.q_proj, n.k_proj, n.v_proj):
                zero_bias(lin)
            for proj in (n.q_proj, n.k_proj, n.v_proj):
                proj.weight = normal(proj.weight.shape, small)
            init_conv(n.conv1d)
            c = n.mlstm_cell
            c.fgate.weight = mx.zeros_like(c.fgate.weight)
            c.fgate.bias = mx.linspace(3.0, 6.0, c.num_heads)
            c.igate.weight = mx.zeros_like(c.igate.weight)
            c.igate.bias = normal(c.igate.bias.shape, 0.1)
        else:
            s = cfg.slstm_block.slstm
            for proj in (n.fgate, n.igate, n.zgate, n.ogate):
                proj.weight = normal(proj.weight.shape, small)
            if n.conv1d_kernel_size > 0:
                init_conv(n.conv1d)
            cell = n.slstm_cell
            NH, DH = cell.num_heads, cell.head_dim
            R = (
                uniform((NH, DH, 4 * DH), 1 / math.sqrt(E))
                if s.recurrent_weight_init == "standard"
                else mx.zeros((NH, DH, 4 * DH))
            )
            cell.set_from_compute_layout(R, _slstm_bias_init(s.bias_init, NH, DH, E, idx, L, uniform))
            if "ffn" in block:
                block.ffn.proj_up.weight = normal(block.ffn.proj_up.weight.shape, small)
                block.ffn.proj_down.weight = normal(block.ffn.proj_down.weight.shape, wang)
                zero_bias(block.ffn.proj_up)
                zero_bias(block.ffn.proj_down)
    mx.eval(model.parameters())


def _slstm_bias_init(kind: str, NH: int, DH: int, E: int, block_idx: int, num_blocks: int, uniform) -> mx.array:
    """sLSTM gate biases [NH, 4, DH] (gate order i, f, z, o) as NX-AI's bias_init does."""
    bias = mx.zeros((NH, 4, DH))
    if kind == "powerlaw_blockdependent":
        ratio = block_idx / (num_blocks - 1) if num_blocks > 1 else 0.0
        ar = mx.arange(DH) / max(DH - 1, 1)
        f = -(-5.0 + 12.0 * ar ** (0.3 + 1.3 * ratio))
        bias[:, 1, :] = mx.broadcast_to(f, (NH, DH))
    elif kind == "small_init":
        bias[:, 1, :] = mx.broadcast_to(mx.linspace(3.0, 6.0, DH), (NH, DH))
    elif kind == "standard":
        bias = uniform((NH, 4, DH), 1 / math.sqrt(E))
    elif kind != "zeros":
        raise ConfigError(
            f"slstm bias_init {kind!r} unknown; choose powerlaw_blockdependent, small_init, standard or zeros"
        )
    return bias
