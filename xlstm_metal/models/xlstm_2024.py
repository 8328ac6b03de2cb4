"""NX-AI's original (2024) xLSTM language model: mixed mLSTM / sLSTM block stacks.

    token_embedding -> [mLSTM | sLSTM blocks] -> post_blocks_norm -> lm_head (tied or not)

Parameter names equal ``xlstm.xLSTMLMModel.state_dict()`` keys, so an NX-AI checkpoint loads by
name (:func:`xlstm_metal.loading.model_from_checkpoint`); which block stands where is read from the
weight names. The config mirrors NX-AI's nested ``xLSTMLMModelConfig``
(:class:`xlstm_metal.config_2024.xLSTMLMConfig`); the initialisation is in ``xlstm_2024_init``.

Contract as for xLSTM-Large: ``model(input_ids [B, S] int, state=None) -> (logits [B, S, V],
state)``; the state is a list with one tuple per block: mLSTM ``(C [B, NH, DH, DH], n [B, NH, DH],
m [B, NH, 1], conv [B, K-1, inner])``, sLSTM ``(c, n, m, h [B, NH, DH] each[, conv [B, K-1, E]])``.
"""

from __future__ import annotations

from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..blocks.xlstm_2024 import mLSTMBlock2024, sLSTMBlock
from ..cells.embedding import embed_tokens, rows_dtype
from ..cells.xlstm_2024 import LayerNorm, Module2024
from ..checks import is_integer
from ..config_2024 import (
    FeedForwardConfig,
    mLSTMBlockConfig,
    mLSTMLayerConfig,
    sLSTMBlockConfig,
    sLSTMLayerConfig,
    xLSTMLMConfig,
)
from ..errors import ConfigError
from ..kernels.fast.quantized import FastQuantizedTree
from .xlstm_2024_init import reset_parameters
from .xlstm_large import check_input_ids, check_state

ModelState = list[tuple[mx.array, ...]]


class xLSTMBlockStack(Module2024):
    """blocks (mLSTMBlock2024 / sLSTMBlock per ``config.slstm_at``) + post_blocks_norm."""

    def __init__(self, config: xLSTMLMConfig, mlstm_kernel: str = "chunkwise", chunk_size: int = 64):
        super().__init__()
        E = config.embedding_dim
        self.blocks = []
        for kind in config.block_map:
            if kind == "m":
                m = config.mlstm_block.mlstm
                self.blocks.append(
                    mLSTMBlock2024(
                        E, inner_dim=config.mlstm_inner_dim, num_heads=m.num_heads,
                        conv1d_kernel_size=m.conv1d_kernel_size, qkv_proj_blocksize=m.qkv_proj_blocksize,
                        bias=config.bias, dropout=config.dropout, kernel=mlstm_kernel, chunk_size=chunk_size,
                    )
                )
            else:
                s, ff = config.slstm_block.slstm, config.slstm_block.feedforward
                self.blocks.append(
                    sLSTMBlock(
                        E, ffn_hidden=config.ffn_dim,
                        ffn_act_fn=ff.act_fn if ff else "gelu", ffn_bias=ff.bias if ff else False,
                        ffn_dropout=ff.dropout if ff else 0.0,
                        num_heads=s.num_heads, conv1d_kernel_size=s.conv1d_kernel_size,
                        group_norm_weight=s.group_norm_weight, dropout=config.dropout, layout=s.backend,
                    )
                )
        if config.add_post_blocks_norm:
            self.post_blocks_norm = LayerNorm(E)

    def __call__(self, x: mx.array, state: ModelState | None = None) -> tuple[mx.array, ModelState]:
        if state is not None and len(state) != len(self.blocks):
            raise ValueError(f"state has {len(state)} entries, the model has {len(self.blocks)} blocks")
        new_state = []
        for index, block in enumerate(self.blocks):
            x, block_state = block(x, None if state is None else state[index])
            new_state.append(block_state)
        if "post_blocks_norm" in self:
            x = self.post_blocks_norm(x)
        return x, new_state


class xLSTMLMModel(FastQuantizedTree, Module2024):
    """NX-AI's 2024 xLSTM LM. input_ids [B, S] int, state | None -> (logits [B, S, V], state).

    Args:
        config: the nested config.
        mlstm_kernel: mLSTM kernel for sequences (S > 1): "chunkwise" (default), "parallel",
            "sequence" or any registered name; single tokens always use the recurrent step.
        chunk_size: chunk length of the chunkwise kernel.
        init: initialise weights as NX-AI's ``reset_parameters`` does (seeded by ``seed``);
            False leaves placeholders for loading.
    """

    def __init__(
        self,
        config: xLSTMLMConfig,
        *,
        mlstm_kernel: str = "chunkwise",
        chunk_size: int = 64,
        init: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        if isinstance(config.vocab_size, bool) or not isinstance(config.vocab_size, int) or config.vocab_size <= 0:
            raise ConfigError(f"vocab_size must be a positive integer, got {config.vocab_size!r}")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        if config.add_embedding_dropout:
            self.emb_dropout = nn.Dropout(config.dropout)
        self.xlstm_block_stack = xLSTMBlockStack(config, mlstm_kernel, chunk_size)
        if not config.tie_weights:
            self.lm_head = nn.Linear(config.embedding_dim, config.vocab_size, bias=False)
        if init:
            self.reset_parameters(seed)

    @property
    def args(self) -> xLSTMLMConfig:
        return self.config

    @property
    def blocks(self) -> list:
        return self.xlstm_block_stack.blocks

    def make_state(self, batch_size: int = 1) -> ModelState:
        """The zero state for ``batch_size`` rows (equal to ``state=None``). Conv windows hold
        activations, so they take the dtype of the embedding's rows (:func:`rows_dtype`: a
        quantized embedding's packed weight is uint32); the recurrent states are float32."""
        if not is_integer(batch_size):  # a float reached mx.zeros as "std::bad_cast"
            raise TypeError(f"batch_size must be an integer, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        dtype = rows_dtype(self.token_embedding, self)
        return [block.zero_state(int(batch_size), dtype) for block in self.blocks]

    def _state_shapes(self, index: int) -> tuple | None:
        """The shapes of block ``index``'s state arrays after the batch axis (None: a block this
        process does not hold). Read from a lazy zero state: nothing is computed."""
        block = self.blocks[index]
        zero = block.zero_state(1) if isinstance(block, (mLSTMBlock2024, sLSTMBlock)) else None
        return None if zero is None else tuple(tuple(a.shape[1:]) for a in zero)

    def __call__(
        self, input_ids: mx.array, state: ModelState | None = None, *, last_only: bool = False
    ) -> tuple[mx.array, ModelState]:
        """``last_only=True`` returns logits [B, 1, V] of the last position only (prefill needs
        no more, and skips most of the lm_head work)."""
        # As xLSTM-Large's: lists, float or empty ids and a state for another batch size failed
        # deep inside (in the gather, a reshape, a concatenate) with messages naming neither.
        check_input_ids(input_ids)
        if isinstance(state, (list, tuple)):  # a block's entry may be None (its zero state)
            # each entry's shapes as this model's blocks make them: another model's state failed in
            # an MLX broadcast or concatenate deep inside a block
            # read once per block kind: every mLSTM (sLSTM) block has the stack's one mLSTM (sLSTM)
            # config, and a lazy zero state per block cost ~5% of an eager decode step (mlx-lm's)
            by_kind: dict[type, tuple | None] = {}
            shapes = []
            for index, s in enumerate(state):
                if s is None or index >= len(self.blocks):
                    shapes.append(None)
                    continue
                kind = type(self.blocks[index])
                if kind not in by_kind:
                    by_kind[kind] = self._state_shapes(index)
                shapes.append(by_kind[kind])
            check_state([() if s is None else s for s in state], input_ids.shape[0], len(self.blocks), shapes)
        elif state is not None:
            check_state(state, input_ids.shape[0], len(self.blocks))
        x = embed_tokens(self.token_embedding, input_ids, self)
        if "emb_dropout" in self:
            x = self.emb_dropout(x)
        x, state = self.xlstm_block_stack(x, state)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x) if "lm_head" in self else self.token_embedding.as_linear(x)
        return logits, state

    # ------------------------------------------------------------------ description
    def wiring(self) -> str:
        """Text: the block at each position and each block kind's cells (for --show-wiring)."""
        cfg = self.config
        E = cfg.embedding_dim
        n_params = sum(v.size for _, v in tree_flatten(self.parameters()))
        lines = [
            f"xLSTMLMModel (NX-AI 2024 xLSTM): vocab {cfg.vocab_size}, embedding_dim {E}, "
            f"{cfg.num_blocks} blocks, slstm_at {cfg.slstm_at}, tie_weights {cfg.tie_weights}, "
            f"{n_params:,} parameters",
            f"  token_embedding: Embedding [{cfg.vocab_size}, {E}]",
        ]
        runs: list[tuple[int, int, str]] = []
        for i, kind in enumerate(cfg.block_map):
            if runs and runs[-1][2] == kind:
                runs[-1] = (runs[-1][0], i, kind)
            else:
                runs.append((i, i, kind))
        names = {"m": "mLSTM", "s": "sLSTM"}
        for first, last, kind in runs:
            where = f"blocks.{first}" if first == last else f"blocks.{first}-{last}"
            lines.append(f"  xlstm_block_stack.{where}: {names[kind]} block")
        for kind in ("m", "s"):  # each block kind's cells once (all blocks of a kind are alike)
            at = [i for i, k in enumerate(cfg.block_map) if k == kind]
            if at:
                lines.append(f"  {names[kind]} block (at {at}): {_describe_block(self.blocks[at[0]])}")
        if "post_blocks_norm" in self.xlstm_block_stack:
            lines.append(f"  xlstm_block_stack.post_blocks_norm: LayerNorm({E}, scale 1+w)")
        lines.append(
            f"  lm_head: {'tied to token_embedding' if cfg.tie_weights else f'Linear {E} -> {cfg.vocab_size}'}"
        )
        return "\n".join(lines)

    describe = wiring

    def decays(self, path: str) -> bool:
        """NX-AI's weight-decay split for a parameter path: decay names holding "weight" but not
        "norm" (so no biases, norms, ``_recurrent_kernel_``, ``learnable_skip``); the token
        embedding only with ``config.weight_decay_on_embedding``."""
        if path.startswith("token_embedding."):
            return bool(self.config.weight_decay_on_embedding)
        return "weight" in path and "norm" not in path

    # ------------------------------------------------------------------ initialisation

    def reset_parameters(self, seed: int = 0) -> None:
        """NX-AI's initialisation (see :func:`xlstm_metal.models.xlstm_2024_init.reset_parameters`)."""
        reset_parameters(self, seed)


def _describe_block(block) -> str:
    n = block.xlstm
    if not hasattr(n, "zero_state"):  # a user's module
        return type(n).__name__
    if isinstance(block, mLSTMBlock2024):
        c = n.mlstm_cell
        qb = n.q_proj.weight.shape[-1]
        return (
            f"x + xlstm(xlstm_norm(x))\n"
            f"      xlstm_norm: LayerNorm({n.proj_up.weight.shape[1]})\n"
            f"      xlstm (mLSTMNeuron2024): proj_up Linear {n.proj_up.weight.shape[1]} -> 2x{n.inner_dim} [x_m | z]\n"
            f"        conv1d: CausalConv1d({n.inner_dim}, k={n.conv1d.kernel_size}) + SiLU -> x_c\n"
            f"        q_proj, k_proj (from x_c), v_proj (from x_m): LinearHeadwise {n.inner_dim}, blocks of {qb}\n"
            f"        mlstm_cell (mLSTMCell2024): igate, fgate Linear {3 * n.inner_dim} -> {c.num_heads} on [q|k|v]; "
            f"mLSTM NH={c.num_heads} DH={c.head_dim} kernel {n.kernel_name} (step for S=1); "
            f"outnorm MultiHeadLayerNorm\n"
            f"        learnable_skip [{n.inner_dim}] * x_c; * silu(z); proj_down Linear {n.inner_dim} -> "
            f"{n.proj_down.weight.shape[0]}"
        )
    cell = n.slstm_cell
    E = cell.num_heads * cell.head_dim
    conv = f"conv1d: CausalConv1d({E}, k={n.conv1d_kernel_size}) + SiLU -> x_c; " if n.conv1d_kernel_size else ""
    text = (
        f"x + xlstm(xlstm_norm(x)){' ; x + ffn(ffn_norm(x))' if 'ffn' in block else ''}\n"
        f"      xlstm_norm: LayerNorm({E})\n"
        f"      xlstm (sLSTMNeuron): {conv}gates LinearHeadwise {E} per head: fgate->i~, igate->f~ (from "
        f"{'x_c' if conv else 'x'}), zgate->z~, ogate->o~ (from x)\n"
        f"        slstm_cell (sLSTMCell): NH={cell.num_heads} DH={cell.head_dim}, block-diagonal R, "
        f"weight layout {cell.layout}; group_norm MultiHeadLayerNorm"
    )
    if "ffn" in block:
        ffn = block.ffn
        text += (
            f"\n      ffn_norm: LayerNorm({E}); ffn (GatedFeedForward): proj_up Linear {E} -> 2x{ffn.hidden}, "
            f"{ffn.act_fn}(gate) * up, proj_down Linear {ffn.hidden} -> {E}"
        )
    return text


def model_from_config(
    config: dict[str, Any] | xLSTMLMConfig,
    *,
    seed: int | None = None,
    mlstm_kernel: str = "chunkwise",
    chunk_size: int = 64,
) -> xLSTMLMModel:
    """A freshly initialised model (NX-AI's init) from a config dict or object, for training.
    ``seed=None`` draws the init seed from MLX's global generator (``mx.random.seed``)."""
    cfg = config if isinstance(config, xLSTMLMConfig) else xLSTMLMConfig.from_dict(config)
    if seed is None:
        seed = int(mx.random.randint(0, 2**31 - 1, ()).item())
    return xLSTMLMModel(cfg, mlstm_kernel=mlstm_kernel, chunk_size=chunk_size, seed=seed)


def create_xlstm_model(
    vocab_size: int,
    num_layers: int,
    signature: Sequence[int] = (1, 1),
    inp_dim: int = 128,
    head_dim: int = 32,
    head_num: int = 4,
    p_factor: Sequence[float] = (2.0, 4 / 3),
    ker_size: int = 4,
    dropout: float = 0.0,
    *,
    seed: int = 0,
    slstm_backend: str = "cuda",
) -> xLSTMLMModel:
    """A fresh 2024 xLSTM from the compact 2024-style arguments.

    ``signature = (m, s)``: m mLSTM blocks then s sLSTM blocks, cycled over ``num_layers``.
    ``inp_dim`` is the embedding width; both block kinds use ``head_num`` heads. As in NX-AI's
    architecture the sLSTM runs at the embedding width, so ``head_dim * head_num`` must equal
    ``inp_dim``. ``p_factor = (mLSTM up-projection factor, sLSTM FFN factor)``; ``ker_size`` is
    the causal conv width of both. ``slstm_backend`` picks the saved sLSTM weight layout.
    """
    ints = dict(vocab_size=vocab_size, num_layers=num_layers, inp_dim=inp_dim, head_dim=head_dim, head_num=head_num)
    for name, value in ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    # whole counts only: int() made (1.5, 1) one mLSTM block, and a bare 3 failed in len()
    if not isinstance(signature, Sequence) or len(signature) != 2 \
            or not all(is_integer(s) and s >= 0 for s in signature) or sum(signature) == 0:
        raise ValueError(f"signature must be (num_mlstm, num_slstm) counts with a positive sum, got {signature!r}")
    if head_dim * head_num != inp_dim:
        raise ValueError(
            f"head_dim * head_num = {head_dim * head_num} must equal inp_dim = {inp_dim}: the sLSTM runs at "
            f"the embedding width (the mLSTM head size is then round_up({p_factor[0]} * inp_dim, 64) / head_num)"
        )
    if len(p_factor) != 2:
        raise ValueError(f"p_factor must be (mlstm_factor, slstm_ffn_factor), got {tuple(p_factor)}")
    m_num, s_num = int(signature[0]), int(signature[1])
    pattern = ["m"] * m_num + ["s"] * s_num
    kinds = [pattern[i % len(pattern)] for i in range(num_layers)]
    slstm_at = [i for i, k in enumerate(kinds) if k == "s"]
    mlstm_block = None
    if "m" in kinds:
        mlstm_block = mLSTMBlockConfig(
            mLSTMLayerConfig(conv1d_kernel_size=ker_size, num_heads=head_num, proj_factor=float(p_factor[0]))
        )
    slstm_block = sLSTMBlockConfig(
        sLSTMLayerConfig(num_heads=head_num, conv1d_kernel_size=ker_size, backend=slstm_backend),
        FeedForwardConfig(proj_factor=float(p_factor[1]), dropout=dropout),
    )
    try:
        config = xLSTMLMConfig(
            vocab_size=vocab_size, embedding_dim=inp_dim, num_blocks=num_layers, mlstm_block=mlstm_block,
            slstm_block=slstm_block, slstm_at=slstm_at, dropout=dropout,
        )
    except ConfigError as err:
        raise ValueError(str(err)) from None
    return xLSTMLMModel(config, seed=seed)


__all__ = ["xLSTMBlockStack", "xLSTMLMModel", "create_xlstm_model", "model_from_config"]
