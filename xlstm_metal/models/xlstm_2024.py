"""NX-AI's original (2024) xLSTM language model: mixed mLSTM / sLSTM block stacks.

    token_embedding -> [mLSTM | sLSTM blocks] -> post_blocks_norm -> lm_head (tied or not)

Parameter names equal ``xlstm.xLSTMLMModel.state_dict()`` keys, so an NX-AI checkpoint loads by
name (:func:`model_from_checkpoint`); which block stands where is read from the weight names.
The config mirrors NX-AI's nested ``xLSTMLMModelConfig`` (:class:`xLSTMLMConfig`).

Contract as for xLSTM-Large: ``model(input_ids [B, S] int, state=None) -> (logits [B, S, V],
state)``; the state is a list with one tuple per block: mLSTM ``(C [B, NH, DH, DH], n [B, NH, DH],
m [B, NH, 1], conv [B, K-1, inner])``, sLSTM ``(c, n, m, h [B, NH, DH] each[, conv [B, K-1, E]])``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..blocks.xlstm_2024 import mLSTMBlock2024, sLSTMBlock
from ..cells.slstm import LAYOUTS
from ..cells.xlstm_2024 import Module2024, round_up_dim
from ..config import ConfigError

ModelState = list[tuple[mx.array, ...]]


# ==================================================================================== config
@dataclass
class mLSTMLayerConfig:
    """NX-AI's mLSTMLayerConfig (embedding_dim, bias, dropout, context_length come from the top)."""

    conv1d_kernel_size: int = 4
    qkv_proj_blocksize: int = 4
    num_heads: int = 4
    proj_factor: float = 2.0
    round_proj_up_dim_up: bool = True
    round_proj_up_to_multiple_of: int = 64


@dataclass
class mLSTMBlockConfig:
    mlstm: mLSTMLayerConfig = field(default_factory=mLSTMLayerConfig)


@dataclass
class sLSTMLayerConfig:
    """NX-AI's sLSTMLayerConfig fields that shape the model (kernel/dtype fields are ignored).

    ``backend`` names the weight layout of ``_recurrent_kernel_`` / ``_bias_`` ("cuda" or
    "vanilla"); the computation is the same.
    """

    num_heads: int = 4
    conv1d_kernel_size: int = 4
    group_norm_weight: bool = True
    backend: str = "cuda"
    function: str = "slstm"
    bias_init: str = "powerlaw_blockdependent"
    recurrent_weight_init: str = "zeros"


@dataclass
class FeedForwardConfig:
    proj_factor: float = 1.3
    act_fn: str = "gelu"
    bias: bool = False
    dropout: float = 0.0
    ff_type: str = "ffn_gated"
    round_proj_up_dim_up: bool = True
    round_proj_up_to_multiple_of: int = 64


@dataclass
class sLSTMBlockConfig:
    slstm: sLSTMLayerConfig = field(default_factory=sLSTMLayerConfig)
    feedforward: FeedForwardConfig | None = field(default_factory=FeedForwardConfig)


@dataclass
class xLSTMLMConfig:
    """NX-AI's xLSTMLMModelConfig (nested). ``slstm_at`` lists the sLSTM positions ("all"
    allowed); without an ``mlstm_block`` every block is an sLSTM block, as in NX-AI's code."""

    vocab_size: int = -1
    embedding_dim: int = 128
    num_blocks: int = 1
    mlstm_block: mLSTMBlockConfig | None = None
    slstm_block: sLSTMBlockConfig | None = None
    slstm_at: list[int] | str = field(default_factory=list)
    context_length: int = -1
    add_post_blocks_norm: bool = True
    bias: bool = False
    dropout: float = 0.0
    tie_weights: bool = False
    weight_decay_on_embedding: bool = False
    add_embedding_dropout: bool = False

    def __post_init__(self):
        if self.mlstm_block is None:
            self.slstm_at = "all"
        if self.slstm_at == "all":
            self.slstm_at = list(range(self.num_blocks))
        if isinstance(self.slstm_at, str) or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.slstm_at):
            raise ConfigError(f"slstm_at must be a list of block indices or 'all', got {self.slstm_at!r}")
        self.slstm_at = sorted(self.slstm_at)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def block_map(self) -> list[str]:
        """"m" or "s" per block position."""
        return ["s" if i in self.slstm_at else "m" for i in range(self.num_blocks)]

    @property
    def mlstm_inner_dim(self) -> int:
        c = (self.mlstm_block or mLSTMBlockConfig()).mlstm
        return round_up_dim(self.embedding_dim, c.proj_factor, c.round_proj_up_to_multiple_of, c.round_proj_up_dim_up)

    @property
    def ffn_dim(self) -> int | None:
        ff = self.slstm_block.feedforward if self.slstm_block is not None else None
        if ff is None:
            return None
        return round_up_dim(self.embedding_dim, ff.proj_factor, ff.round_proj_up_to_multiple_of, ff.round_proj_up_dim_up)

    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot describe a model."""
        for name in ("embedding_dim", "num_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        bad = [i for i in self.slstm_at if not 0 <= i < self.num_blocks]
        if bad:
            raise ConfigError(f"slstm_at positions {bad} are outside the {self.num_blocks} blocks")
        if self.slstm_at and self.slstm_block is None:
            raise ConfigError(f"slstm_at {self.slstm_at} places sLSTM blocks but the config has no slstm_block")
        E = self.embedding_dim
        if self.slstm_at:
            s = self.slstm_block.slstm
            if s.num_heads <= 0 or E % s.num_heads:
                raise ConfigError(f"slstm_block.slstm.num_heads {s.num_heads} must divide embedding_dim {E}")
            if s.backend not in LAYOUTS:
                raise ConfigError(f"slstm_block.slstm.backend must be one of {LAYOUTS}, got {s.backend!r}")
            if s.function != "slstm":
                raise ConfigError(f"slstm_block.slstm.function {s.function!r}: only 'slstm' cells are supported")
        if self.slstm_at != list(range(self.num_blocks)):
            m = self.mlstm_block.mlstm
            inner = self.mlstm_inner_dim
            if m.num_heads <= 0 or inner % m.num_heads:
                raise ConfigError(f"mlstm_block.mlstm.num_heads {m.num_heads} must divide the inner width {inner}")
            if m.qkv_proj_blocksize <= 0 or inner % m.qkv_proj_blocksize:
                raise ConfigError(
                    f"mlstm_block.mlstm.qkv_proj_blocksize {m.qkv_proj_blocksize} must divide the inner width {inner}"
                )
            if m.conv1d_kernel_size < 1:
                raise ConfigError("mlstm_block.mlstm.conv1d_kernel_size must be >= 1")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Nested dict in NX-AI's ``dataclasses.asdict(xLSTMLMModelConfig)`` layout."""
        d = dataclasses.asdict(self)
        d["slstm_at"] = list(self.slstm_at)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "xLSTMLMConfig":
        """From ``dataclasses.asdict`` output, our :meth:`to_dict`, or NX-AI's example YAML
        layout (model fields at the top or under ``model:``). Unknown and derived fields
        (``_block_map``, ``_proj_up_dim``, dtypes ...) are ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"an xLSTM config must be a mapping, got {type(d).__name__}")
        d = _model_section(d)

        def build(klass, sub: Any, where: str):
            if sub is None:
                return None
            if not isinstance(sub, dict):
                raise ConfigError(f"{where} must be a mapping, got {sub!r}")
            kwargs = {}
            for f in dataclasses.fields(klass):
                if f.name not in sub:
                    continue
                value = sub[f.name]
                nested = _NESTED.get((klass, f.name))
                if nested is not None:
                    value = build(nested, value, f"{where}.{f.name}" if where else f.name)
                elif isinstance(value, str) and value.startswith("${"):
                    if klass is cls and f.name in _INFERABLE:
                        continue  # filled from the weights (vocab_size) or unused here (context_length)
                    raise ConfigError(f"{where + '.' if where else ''}{f.name}: unresolved interpolation {value!r}")
                kwargs[f.name] = value
            return klass(**kwargs)

        try:
            return build(cls, d, "")
        except TypeError as err:
            raise ConfigError(f"invalid xLSTM (2024) config: {err}") from None


_NESTED = {
    (xLSTMLMConfig, "mlstm_block"): mLSTMBlockConfig,
    (xLSTMLMConfig, "slstm_block"): sLSTMBlockConfig,
    (mLSTMBlockConfig, "mlstm"): mLSTMLayerConfig,
    (sLSTMBlockConfig, "slstm"): sLSTMLayerConfig,
    (sLSTMBlockConfig, "feedforward"): FeedForwardConfig,
}
_MARKERS = ("mlstm_block", "slstm_block", "slstm_at", "_block_map")
# Top-level fields an unresolved ``${...}`` may leave out: vocab_size is read from the weights
# when loading, context_length does not shape the model.
_INFERABLE = ("vocab_size", "context_length")


def _model_section(d: dict[str, Any]) -> dict[str, Any]:
    """NX-AI's experiment YAMLs keep the model config under ``model:`` beside training/dataset."""
    inner = d.get("model")
    if isinstance(inner, dict) and not any(k in d for k in _MARKERS) and any(k in inner for k in _MARKERS):
        return inner
    return d


def is_xlstm_2024_config(d: dict) -> bool:
    """True for NX-AI 2024 xLSTMLMModel configs (nested mlstm_block / slstm_block / slstm_at)."""
    return isinstance(d, dict) and any(k in _model_section(d) for k in _MARKERS)


_INTERP = re.compile(r"^\$\{([^}]+)\}$")


def _resolve_interpolations(node: Any, root: dict, parent: dict | None = None) -> Any:
    """Resolve OmegaConf-style whole-value references (``${dataset.kwargs.vocab_size}``,
    ``${.sibling}``) as NX-AI's example YAMLs use them; others are left as they are."""
    if isinstance(node, dict):
        return {k: _resolve_interpolations(v, root, node) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_interpolations(v, root, parent) for v in node]
    if isinstance(node, str):
        match = _INTERP.match(node.strip())
        if match:
            path = match.group(1).strip()
            cur: Any = parent if path.startswith(".") else root
            for part in path.lstrip(".").split("."):
                if not isinstance(cur, dict) or part not in cur:
                    return node  # left unresolved; from_dict names it if a model field needs it
                cur = cur[part]
            return _resolve_interpolations(cur, root, parent)
    return node


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The raw config dict of a 2024 xLSTM checkpoint: config.json, else config.yaml (the model
    section of NX-AI's experiment layout, with ``${...}`` references resolved)."""
    from ..loading import CheckpointError

    directory = Path(directory)
    json_path, yaml_path = directory / "config.json", directory / "config.yaml"
    if json_path.is_file():
        try:
            data = json.loads(json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{json_path} is not valid JSON: {err}") from None
        source = json_path
    elif yaml_path.is_file():
        import yaml

        try:
            data = yaml.safe_load(yaml_path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{yaml_path} is not valid YAML: {err}") from None
        source = yaml_path
    else:
        raise CheckpointError(f"no config.json or config.yaml in checkpoint directory {directory}")
    if not isinstance(data, dict):
        raise CheckpointError(f"{source} must hold a mapping, got {type(data).__name__}")
    data = _resolve_interpolations(data, data)
    return _model_section(data)


# ===================================================================================== model
class xLSTMBlockStack(Module2024):
    """blocks (mLSTMBlock2024 / sLSTMBlock per ``config.slstm_at``) + post_blocks_norm."""

    def __init__(self, config: xLSTMLMConfig, mlstm_kernel: str = "chunkwise", chunk_size: int = 64):
        super().__init__()
        from ..cells.xlstm_2024 import LayerNorm

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


class xLSTMLMModel(Module2024):
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
        activations, so they take the weights' dtype; the recurrent states are float32."""
        dtype = self.token_embedding.weight.dtype
        return [block.zero_state(batch_size, dtype) for block in self.blocks]

    def __call__(
        self, input_ids: mx.array, state: ModelState | None = None, *, last_only: bool = False
    ) -> tuple[mx.array, ModelState]:
        """``last_only=True`` returns logits [B, 1, V] of the last position only (prefill needs
        no more, and skips most of the lm_head work)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [B, S], got {tuple(input_ids.shape)}")
        x = self.token_embedding(input_ids)
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
        n_params = sum(v.size for _, v in _flatten(self.parameters()))
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
        """NX-AI's initialisation: small init (std sqrt(2/5E)) for embeddings and input
        projections, Wang init (std 2/(num_blocks sqrt(E))) for projections into the residual
        stream, zero norm weights (scale 1), mLSTM forget biases linspace(3, 6), input biases
        N(0, 0.1), sLSTM biases per ``bias_init``, recurrent kernel per ``recurrent_weight_init``."""
        cfg = self.config
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

        self.token_embedding.weight = normal(self.token_embedding.weight.shape, small)
        if "lm_head" in self:
            self.lm_head.weight = normal(self.lm_head.weight.shape, small)
        for idx, block in enumerate(self.blocks):
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
        mx.eval(self.parameters())


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


def _flatten(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def _describe_block(block) -> str:
    n = block.xlstm
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


# =============================================================================== checkpoints
_BLOCK_KEY = re.compile(r"^xlstm_block_stack\.blocks\.(\d+)\.(.+)$")


def detect_block_kinds(weights: dict[str, Any], source: str = "<weights>") -> list[str]:
    """"m" / "s" per block position, read from the weight names (``...blocks.{i}.xlstm.mlstm_cell.*``
    marks an mLSTM block, ``...xlstm.slstm_cell.*`` an sLSTM block)."""
    from ..loading import CheckpointError

    kinds: dict[int, set[str]] = {}
    for key in weights:
        match = _BLOCK_KEY.match(key)
        if not match:
            continue
        index, rest = int(match.group(1)), match.group(2)
        found = kinds.setdefault(index, set())
        if rest.startswith("xlstm.mlstm_cell."):
            found.add("m")
        elif rest.startswith("xlstm.slstm_cell."):
            found.add("s")
    if not kinds:
        raise CheckpointError(f"checkpoint {source} holds no xlstm_block_stack.blocks.* tensors")
    count = max(kinds) + 1
    problems = []
    absent = [i for i in range(count) if i not in kinds]
    if absent:
        problems.append(f"no tensors for blocks {absent}")
    unknown = [i for i, k in sorted(kinds.items()) if not k]
    if unknown:
        problems.append(f"blocks {unknown} have neither xlstm.mlstm_cell.* nor xlstm.slstm_cell.* tensors")
    both = [i for i, k in sorted(kinds.items()) if len(k) > 1]
    if both:
        problems.append(f"blocks {both} have both mLSTM and sLSTM cell tensors")
    if problems:
        raise CheckpointError(f"checkpoint {source}: cannot tell the block types: " + "; ".join(problems))
    return ["".join(kinds[i]) for i in range(count)]


def model_from_checkpoint(
    config_dict: dict[str, Any],
    weights: dict[str, mx.array],
    dtype: mx.Dtype | str | None = None,
    *,
    source: str | os.PathLike = "<weights>",
    mlstm_kernel: str = "chunkwise",
    chunk_size: int = 64,
) -> xLSTMLMModel:
    """Build the model a 2024 checkpoint describes and load its weights strictly.

    The block type at each position comes from the weight names (auto-wiring; the config's
    ``slstm_at`` is replaced by it), the sLSTM weight layout from the recurrent kernel's shape,
    and a missing vocab_size from ``token_embedding.weight``.
    Missing, unexpected and mis-shaped tensors are reported together in one CheckpointError.
    """
    from ..loading import CheckpointError, load_weights_strict

    try:
        config = xLSTMLMConfig.from_dict(config_dict)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None
    kinds = detect_block_kinds(weights, str(source))
    if len(kinds) != config.num_blocks:
        raise CheckpointError(
            f"checkpoint {source}: the weights hold {len(kinds)} blocks, the config says num_blocks={config.num_blocks}"
        )
    slstm_at = [i for i, k in enumerate(kinds) if k == "s"]
    if slstm_at and config.slstm_block is None:
        raise CheckpointError(f"checkpoint {source}: sLSTM blocks at {slstm_at} but the config has no slstm_block")
    mlstm_at = [i for i, k in enumerate(kinds) if k == "m"]
    if mlstm_at and config.mlstm_block is None:
        raise CheckpointError(f"checkpoint {source}: mLSTM blocks at {mlstm_at} but the config has no mlstm_block")
    if slstm_at:
        # "cuda" stores R as [NH, DH, 4 DH], "vanilla" as [NH, 4 DH, DH]: the shape says which.
        R = weights.get(f"xlstm_block_stack.blocks.{slstm_at[0]}.xlstm.slstm_cell._recurrent_kernel_")
        if R is not None and R.ndim == 3 and R.shape[1] != R.shape[2]:
            config.slstm_block.slstm.backend = "vanilla" if R.shape[1] == 4 * R.shape[2] else "cuda"
    config.slstm_at = slstm_at
    emb = weights.get("token_embedding.weight")
    if (isinstance(config.vocab_size, bool) or not isinstance(config.vocab_size, int) or config.vocab_size <= 0) \
            and emb is not None and emb.ndim == 2:
        config.vocab_size = int(emb.shape[0])  # NX-AI's block-stack YAMLs leave it to the caller
    try:
        config.validate()
        model = xLSTMLMModel(config, mlstm_kernel=mlstm_kernel, chunk_size=chunk_size, init=False)
    except (ConfigError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from None
    weights = dict(weights)
    if config.tie_weights:
        weights.pop("lm_head.weight", None)  # NX-AI's state_dict lists the tied tensor twice
    if dtype is not None:
        target = getattr(mx, dtype) if isinstance(dtype, str) else dtype
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    load_weights_strict(model, weights, source)
    mx.eval(model.parameters())
    model.eval()
    return model


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


# ========================================================================= 2024-style API
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
    if len(signature) != 2 or any(int(s) < 0 for s in signature) or sum(int(s) for s in signature) == 0:
        raise ValueError(f"signature must be (num_mlstm, num_slstm) with a positive sum, got {tuple(signature)}")
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


__all__ = [
    "xLSTMLMConfig",
    "mLSTMBlockConfig",
    "mLSTMLayerConfig",
    "sLSTMBlockConfig",
    "sLSTMLayerConfig",
    "FeedForwardConfig",
    "xLSTMBlockStack",
    "xLSTMLMModel",
    "is_xlstm_2024_config",
    "read_config",
    "model_from_checkpoint",
    "model_from_config",
    "detect_block_kinds",
    "create_xlstm_model",
]
