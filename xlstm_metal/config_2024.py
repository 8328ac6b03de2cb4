"""The config of NX-AI's original (2024) xLSTM: the nested ``xLSTMLMModelConfig`` (mLSTM and
sLSTM block configs, ``slstm_at``), read from config.json or NX-AI's config.yaml."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cells.slstm import LAYOUTS
from .cells.xlstm_2024 import _ACTIVATIONS, round_up_dim
from .config import MAX_DIM, _describe, _matches
from .errors import CheckpointError, ConfigError
from .jsonfiles import read_json_object

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
        at = self.slstm_at
        if not isinstance(at, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in at):
            raise ConfigError(f"slstm_at must be a list of block indices or 'all', got {self.slstm_at!r}")
        self.slstm_at = sorted(self.slstm_at)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def _all_slstm(self) -> bool:
        """Whether every block is an sLSTM block (without listing num_blocks positions)."""
        return len(self.slstm_at) == self.num_blocks and self.slstm_at == list(range(self.num_blocks))

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
        for name in ("embedding_dim", "vocab_size"):  # an OverflowError from MLX as the model was built
            value = getattr(self, name)
            if isinstance(value, int) and value > MAX_DIM:
                raise ConfigError(f"{name} is {value}: MLX's array dimensions stop at {MAX_DIM}")
        _check_fields(self, "")
        m = self.mlstm_block.mlstm if self.mlstm_block is not None else None
        ff = self.slstm_block.feedforward if self.slstm_block is not None else None
        for where, c in (("mlstm_block.mlstm", m), ("slstm_block.feedforward", ff)):
            # -1 failed in MLX ("Negative dimensions"), 0 as ZeroDivisionError
            if c is not None and not (0 < c.proj_factor < math.inf and c.round_proj_up_to_multiple_of > 0):
                raise ConfigError(f"{where}: proj_factor and round_proj_up_to_multiple_of must be > 0, "
                                  f"got {c.proj_factor!r}, {c.round_proj_up_to_multiple_of!r}")
        if not (0 <= self.dropout < 1 and 0 <= (ff.dropout if ff else 0) < 1):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r} (feedforward: {ff and ff.dropout!r})")
        if ff is not None and ff.ff_type != "ffn_gated":  # others were ignored
            raise ConfigError(f"slstm_block.feedforward.ff_type {ff.ff_type!r}: only 'ffn_gated' is supported")
        if ff is not None and ff.act_fn not in _ACTIVATIONS:  # a ValueError when the model was built
            raise ConfigError(f"slstm_block.feedforward.act_fn {ff.act_fn!r}: choose from {sorted(_ACTIVATIONS)}")
        # Rounded down, a small proj_factor gave width 0: a ZeroDivisionError (feed-forward) or a
        # LinearHeadwise ValueError (mLSTM) when the model was built.
        has_m, has_s = not self._all_slstm, bool(self.slstm_at)
        for where, c, width in (("mlstm_block.mlstm", has_m and m, has_m and m and self.mlstm_inner_dim),
                                ("slstm_block.feedforward", has_s and ff, has_s and ff and self.ffn_dim)):
            if c and width < 1:
                raise ConfigError(f"{where}: proj_factor {c.proj_factor!r} x embedding_dim {self.embedding_dim} "
                                  f"rounded to round_proj_up_to_multiple_of {c.round_proj_up_to_multiple_of} "
                                  f"is width {width}: the width must be >= 1")
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
            if s.conv1d_kernel_size < 0:  # 0: no conv (NX-AI); a negative one ran as 0
                raise ConfigError(f"slstm_block.slstm.conv1d_kernel_size must be >= 0, got {s.conv1d_kernel_size}")
            if s.backend not in LAYOUTS:
                raise ConfigError(f"slstm_block.slstm.backend must be one of {LAYOUTS}, got {s.backend!r}")
            if s.function != "slstm":
                raise ConfigError(f"slstm_block.slstm.function {s.function!r}: only 'slstm' cells are supported")
        if not self._all_slstm:
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


def _check_fields(config: Any, where: str) -> None:
    # nested fields' types too: a "4" or 2.0 failed deep in MLX (std::bad_cast)
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and not isinstance(value, hint):
            # mlstm_block.mlstm / slstm_block.slstm: null was an AttributeError
            raise ConfigError(f"{where}{f.name} must be a mapping of {hint.__name__} fields, got {value!r}")
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{where}{f.name}.")
        elif not _matches(value, hints[f.name]):
            raise ConfigError(f"{where}{f.name} must be {_describe(hints[f.name])}, got {value!r}")


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
    directory = Path(directory)
    json_path, yaml_path = directory / "config.json", directory / "config.yaml"
    if json_path.is_file():
        data, source = read_json_object(json_path, CheckpointError), json_path
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
