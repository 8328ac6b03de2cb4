"""Configuration of xLSTM-Large models (the NX-AI/xLSTM-7b architecture).

Field names and defaults follow Hugging Face's ``config.json`` for ``model_type: "xlstm"`` and
NX-AI's ``xLSTMLargeConfig``; ``hidden_size`` / ``num_hidden_layers`` are accepted as aliases.
Every field's type is checked (the error names the field). A field this class does not model
is an error naming the closest known field (a typo such as ``num_hedas`` would otherwise be
ignored), unless it is one of :data:`PASSTHROUGH_FIELDS` (Hugging Face's standard config keys
and keys other parts of this package read), which are kept aside and saved again.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: NX-AI's mLSTM backend modes (``config.json`` "mode"): accepted for their checkpoints; our kernels
#: take any sequence length in each (no padding to do), so the value does not change what runs.
_MODES = ("train", "train_with_padding", "inference")
_STATE_DTYPES = ("float32", "bfloat16", "float16")
_ALIASES = {"hidden_size": "embedding_dim", "num_hidden_layers": "num_blocks"}
#: config.json key holding our own kernel choice. The standard fields get NX-AI kernel names that
#: transformers' strict xLSTMConfig accepts (without the ``xlstm`` package it knows only these).
OUR_KEY = "xlstm_metal"
_KERNEL_FIELDS = ("chunkwise_kernel", "sequence_kernel", "step_kernel")
_FLOAT_FIELDS = ("norm_eps", "qk_dim_factor", "v_dim_factor", "eps", "ffn_proj_factor",
                 "gate_soft_cap", "output_logit_soft_cap")


def nxai_kernel_name(field_name: str, kernel: str) -> str:
    """The NX-AI kernel name config.json's ``field_name`` gets for our ``kernel``: the native
    PyTorch kernel of the same form (transformers checks these fields against NX-AI's names)."""
    if field_name == "sequence_kernel":
        return "native_sequence__native"
    if field_name == "step_kernel":
        return "native"
    from .kernels import resolve_kernel_name

    try:
        parallel = resolve_kernel_name(kernel) == "parallel"
    except KeyError:
        parallel = False
    return "parallel--native_autograd" if parallel else "chunkwise--native_autograd"

#: config.json keys that pass quietly without being xLSTMConfig fields (kept in ``extra`` and
#: written back by ``to_dict``). Add a key here when a feature stores its own setting in
#: config.json; keys starting with "_" (``_name_or_path``, ``_commit_hash``) always pass.
PASSTHROUGH_FIELDS: set[str] = {
    # Hugging Face PretrainedConfig (transformers 4.x and 5.x) and its generation leftovers
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "auto_map", "quantization", "quantization_config", "model_file", "sep_token_id",
    "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id", "output_hidden_states",
    "output_attentions", "return_dict", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "id2label", "label2id", "problem_type", "finetuning_task",
    "tokenizer_class", "prefix", "task_specific_params", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "initializer_range", "max_position_embeddings",
    "attn_implementation", "base_model_tp_plan", "base_model_pp_plan",
}
PASSTHROUGH_FIELDS.add(OUR_KEY)  # our kernel choice beside the NX-AI names (see to_dict)




#: The largest array dimension MLX takes (int32).
MAX_DIM = 2**31 - 1
#: config.json model_type values of an xLSTM-Large config (NX-AI's native one has none).
MODEL_TYPES = ("xlstm",)


def round_up(value: float, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return int(math.ceil(value / multiple) * multiple)


@dataclass
class xLSTMConfig:
    """xLSTM-Large hyper-parameters: the fields of Hugging Face's ``config.json`` for
    ``model_type: "xlstm"`` (NX-AI's ``xLSTMLargeConfig``).

    Derived sizes: ``qk_dim = int(embedding_dim * qk_dim_factor)`` and ``v_dim`` (likewise), split
    over ``num_heads`` into ``qk_head_dim`` / ``v_head_dim``; ``ffn_dim`` is
    ``embedding_dim * ffn_proj_factor`` rounded up to ``ffn_round_up_to_multiple_of``. Kernel
    fields take our names or NX-AI's. Every field is type-checked on construction
    (:class:`~xlstm_metal.errors.ConfigError` naming it); ``extra`` holds the config.json keys of
    :data:`PASSTHROUGH_FIELDS`, written back by :meth:`to_dict`.
    """

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
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.name != "extra" and not _matches(getattr(self, f.name), hints[f.name]):
                value = getattr(self, f.name)
                raise ConfigError(f"config field '{f.name}' must be {_describe(hints[f.name])}, got {value!r} "
                                  f"({_json_kind(value)})")
        for name in ("embedding_dim", "num_heads", "num_blocks", "vocab_size", "chunk_size",
                     "ffn_round_up_to_multiple_of", "max_inference_chunksize"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        for name in ("qk_dim_factor", "v_dim_factor", "ffn_proj_factor", "norm_eps", "eps"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"config field '{name}' must be a finite number > 0, got {value!r}")
        # MLX takes a dimension up to 2**31 - 1 (a larger one was an OverflowError or TypeError from
        # MLX as the model was built).
        for name, value in (("embedding_dim", self.embedding_dim), ("vocab_size", self.vocab_size),
                            ("qk_dim = int(embedding_dim * qk_dim_factor)", self.qk_dim),
                            ("v_dim = int(embedding_dim * v_dim_factor)", self.v_dim),
                            ("ffn_dim = embedding_dim * ffn_proj_factor rounded up to ffn_round_up_to_multiple_of",
                             self.ffn_dim)):
            if value > MAX_DIM:
                raise ConfigError(f"config {name} is {value}: MLX's array dimensions stop at {MAX_DIM}")
        for name in ("gate_soft_cap", "output_logit_soft_cap"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"config field '{name}' must be a finite number > 0 or null, got {value!r}")
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
        if self.mode not in _MODES:  # NX-AI's backend modes; ours runs any length in each
            raise ConfigError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if self.inference_state_dtype not in _STATE_DTYPES:
            raise ConfigError(
                f"inference_state_dtype must be one of {_STATE_DTYPES}, got {self.inference_state_dtype!r}"
            )
        from .kernels import resolve_kernel_name
        from .kernels.mlstm import ONE_TOKEN_KERNELS

        for kind in ("chunkwise", "sequence", "step"):
            name = getattr(self, f"{kind}_kernel")
            try:
                resolved = resolve_kernel_name(name)
            except KeyError as err:
                raise ConfigError(f"config field '{kind}_kernel': {err.args[0]}") from None
            if kind != "step" and resolved in ONE_TOKEN_KERNELS:  # (failed at the first prompt)
                raise ConfigError(f"config field '{kind}_kernel': {name!r} runs one token at a time, not a prompt")

    # ----------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "xLSTMConfig":
        """Build from a Hugging Face / NX-AI config dict (aliases resolved; the keys of
        :data:`PASSTHROUGH_FIELDS` and those starting with ``_`` are kept aside in ``extra``; any
        other unknown key is a :class:`~xlstm_metal.errors.ConfigError` naming the closest field)."""
        data = dict(data)
        model_type = data.get("model_type")
        if model_type is not None and model_type not in MODEL_TYPES:  # a Llama's config read as xLSTM's
            raise ConfigError(f"config field 'model_type' is {model_type!r}, not an xLSTM model "
                              f"({' or '.join(map(repr, MODEL_TYPES))})")
        ours = data.get(OUR_KEY)
        if isinstance(ours, dict):
            # Our kernel choice wins over the NX-AI name written beside it, unless that field was
            # edited since (then it no longer is the name to_dict derives from ours).
            for name in _KERNEL_FIELDS:
                value = ours.get(name)
                if isinstance(value, str) and data.get(name) in (None, nxai_kernel_name(name, value)):
                    data[name] = value
        for alias, name in _ALIASES.items():
            if alias in data:
                value = data.pop(alias)
                if data.get(name) is None:
                    data[name] = value
                elif value is not None and value != data[name]:  # (transformers reads the alias)
                    raise ConfigError(f"config fields '{alias}' ({value!r}) and '{name}' ({data[name]!r}) differ")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = [k for k in data if k not in names and k not in PASSTHROUGH_FIELDS and not str(k).startswith("_")]
        if unknown:
            candidates = sorted(names | set(_ALIASES))
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), candidates, n=1, cutoff=0.6)
                hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise ConfigError(f"unknown config field(s): {', '.join(hints)}")
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
        """The Hugging Face ``config.json`` form (with both names of aliased fields), valid for
        transformers' ``xLSTMConfig``: kernel fields hold NX-AI names, our own kernel choice is
        kept under ``"xlstm_metal"`` (read back by :meth:`from_dict`)."""
        out = {k: v for k, v in self.extra.items() if k not in ("transformers_version",)}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        out[OUR_KEY] = {**(out.get(OUR_KEY) or {}), **{name: out[name] for name in _KERNEL_FIELDS}}
        for name in _KERNEL_FIELDS:
            out[name] = nxai_kernel_name(name, out[name])
        for name in _FLOAT_FIELDS:  # transformers rejects an int where it declares a float
            if isinstance(out[name], int) and not isinstance(out[name], bool):
                out[name] = float(out[name])
        # The layout of the weights this package holds and writes: NX-AI's fused q|k|v|o, i|f and
        # gate|up tensors are split as they load, and transformers builds the layout named here.
        out["weight_mode"] = "single"
        out["hidden_size"] = self.embedding_dim
        out["num_hidden_layers"] = self.num_blocks
        out["model_type"] = "xlstm"
        out.setdefault("architectures", ["xLSTMForCausalLM"])
        return out


# ---------------------------------------------------------------------- type checks
def _matches(value: Any, hint: Any) -> bool:
    """Whether a config value has the annotated type (JSON's view: true is not a number, 3 is
    a float, 3.0 is not an int)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    return {type(None): "null", bool: "a boolean (true/false)", int: "an integer", float: "a number",
            str: "a string"}.get(hint, str(hint))


def _json_kind(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)
