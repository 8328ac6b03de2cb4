"""Configuration of xLSTM-Large models (the NX-AI/xLSTM-7b architecture).

Field names and defaults follow Hugging Face's ``config.json`` for ``model_type: "xlstm"`` and
NX-AI's ``xLSTMLargeConfig``; ``hidden_size`` / ``num_hidden_layers`` are accepted as aliases
and unknown fields are ignored, so any checkpoint's config.json loads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_STATE_DTYPES = ("float32", "bfloat16", "float16")
_ALIASES = {"hidden_size": "embedding_dim", "num_hidden_layers": "num_blocks"}


class ConfigError(ValueError):
    """A config that cannot describe a model; the message names the field."""


def round_up(value: float, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return int(math.ceil(value / multiple) * multiple)


@dataclass
class xLSTMConfig:
    """xLSTM-Large hyper-parameters (see ../shared/docs/xlstm-reference.md section 1)."""

    embedding_dim: int
    num_heads: int
    num_blocks: int
    vocab_size: int
    use_bias: bool = False
    norm_eps: float = 1e-6
    norm_reduction_force_float32: bool = True
    add_out_norm: bool = True
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    # Kernel names: ours ("chunkwise", "parallel", "sequence", "step", ...) or NX-AI's
    # ("chunkwise--triton_limit_chunk", "native_sequence__native", "native", ...).
    chunkwise_kernel: str = "chunkwise--native_autograd"
    sequence_kernel: str = "native_sequence__native"
    step_kernel: str = "native"
    mode: str = "inference"
    chunk_size: int = 64
    return_last_states: bool = True
    autocast_kernel_dtype: str = "bfloat16"
    eps: float = 1e-6
    inference_state_dtype: str = "float32"
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    gate_soft_cap: float | None = 15.0
    output_logit_soft_cap: float | None = 30.0
    weight_mode: str = "single"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    pad_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    force_bos_token_insert: bool = True
    max_inference_chunksize: int = 16384
    #: Fields of the source config.json this class does not model (kept for saving).
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def qk_dim(self) -> int:
        return int(self.embedding_dim * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.embedding_dim * self.v_dim_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        return self.v_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return round_up(self.embedding_dim * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        for name in ("embedding_dim", "num_heads", "num_blocks", "vocab_size", "chunk_size",
                     "ffn_round_up_to_multiple_of", "max_inference_chunksize"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        for name in ("qk_dim_factor", "v_dim_factor", "ffn_proj_factor"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"config field '{name}' must be > 0, got {getattr(self, name)!r}")
        if self.qk_dim <= 0 or self.qk_dim % self.num_heads:
            raise ConfigError(
                f"qk_dim = int(embedding_dim * qk_dim_factor) = {self.qk_dim} is not divisible by "
                f"num_heads = {self.num_heads}"
            )
        if self.v_dim <= 0 or self.v_dim % self.num_heads:
            raise ConfigError(
                f"v_dim = int(embedding_dim * v_dim_factor) = {self.v_dim} is not divisible by "
                f"num_heads = {self.num_heads}"
            )
        if self.weight_mode not in ("single", "fused"):
            raise ConfigError(f"weight_mode must be 'single' or 'fused', got {self.weight_mode!r}")
        if self.inference_state_dtype not in _STATE_DTYPES:
            raise ConfigError(
                f"inference_state_dtype must be one of {_STATE_DTYPES}, got {self.inference_state_dtype!r}"
            )
        from .kernels import resolve_kernel_name

        for kind in ("chunkwise", "sequence", "step"):
            try:
                resolve_kernel_name(getattr(self, f"{kind}_kernel"))
            except KeyError as err:
                raise ConfigError(f"config field '{kind}_kernel': {err.args[0]}") from None

    # ----------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "xLSTMConfig":
        """Build from a Hugging Face / NX-AI config dict (aliases resolved, unknown keys kept aside)."""
        data = dict(data)
        for alias, name in _ALIASES.items():
            if alias in data:
                value = data.pop(alias)
                if data.get(name) is None:
                    data[name] = value
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [n for n in ("embedding_dim", "num_heads", "num_blocks", "vocab_size") if data.get(n) is None]
        if missing:
            raise ConfigError(f"config is missing required field(s): {', '.join(missing)}")
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    @classmethod
    def from_file(cls, path: str | Path) -> "xLSTMConfig":
        from .jsonfiles import read_json_object

        return cls.from_dict(read_json_object(path, ConfigError))

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` form (with both names of aliased fields)."""
        out = {k: v for k, v in self.extra.items() if k not in ("transformers_version",)}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        out["hidden_size"] = self.embedding_dim
        out["num_hidden_layers"] = self.num_blocks
        out["model_type"] = "xlstm"
        out.setdefault("architectures", ["xLSTMForCausalLM"])
        return out
