"""Lab models: token embedding -> a sequence of wired blocks -> norm -> LM head.

Blocks are wiring specs (mLSTM, sLSTM, attention, SwiGLU, gated convolution, any user spec), so
hybrids are lists of different specs. The whole architecture travels in ``config.json``
(``model_type: "xlstm_lab"``, every block spec inlined), so ``xlstm_metal.load_model`` rebuilds it.

Parameter-name layouts: ``"large"`` (``backbone.embeddings``, ``backbone.blocks.N``,
``backbone.out_norm``, ``lm_head``: xLSTM-Large's checkpoint keys) and ``"2024"``
(``token_embedding``, ``xlstm_block_stack.blocks.N``, ``xlstm_block_stack.post_blocks_norm``,
``lm_head``: NX-AI's 2024 xLSTMLMModel keys), so a wired model loads the hand-written models'
checkpoints unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..cells.embedding import embed_tokens
from ..cells.norms import RMSNorm, soft_cap
from ..cells.xlstm_2024 import LayerNorm as LayerNorm2024
from ..cells.xlstm_2024 import Module2024
from ..kernels.fast.quantized import FastQuantizedTree
from ..checks import check_chunk_size
from ..models.xlstm_large import check_state
from .library import load_arch
from .spec import WiringError, WiringSpec, declared_params
from .wiring import WiredBlock, _Container

MODEL_TYPE = "xlstm_lab"
LAYOUTS = {
    "large": {"embedding": "backbone.embeddings", "blocks": "backbone.blocks", "out_norm": "backbone.out_norm"},
    "2024": {"embedding": "token_embedding", "blocks": "xlstm_block_stack.blocks",
             "out_norm": "xlstm_block_stack.post_blocks_norm"},
}


@dataclass
class LabConfig:
    """A lab model. ``blocks``: ``[{"spec": spec dict, "params": {...}}]`` (see
    :func:`~xlstm_metal.lab.library.load_arch`); each block gets ``dim`` = ``embedding_dim``."""

    vocab_size: int
    embedding_dim: int
    blocks: list[dict[str, Any]]
    name: str = "lab"
    out_norm: str | None = "rmsnorm"  # "rmsnorm", "layernorm" (scale 1 + weight) or None
    norm_eps: float | None = None
    tie_word_embeddings: bool = False
    output_logit_soft_cap: float | None = None
    layout: str = "large"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("vocab_size", "embedding_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise WiringError(f"{key} must be a positive integer, got {value!r}")
        if self.layout not in LAYOUTS:
            raise WiringError(f"layout must be one of {sorted(LAYOUTS)}, got {self.layout!r}")
        if self.out_norm not in ("rmsnorm", "layernorm", None):
            raise WiringError(f"out_norm must be rmsnorm, layernorm or null, got {self.out_norm!r}")
        if not isinstance(self.blocks, list) or not self.blocks:
            raise WiringError("a lab model needs at least one block")
        # spec objects as their dict form: config.json could not hold them (save_model's ConfigError)
        self.blocks = [{**b, "spec": {"name": b["spec"].name, **b["spec"].to_dict()}}
                       if isinstance(b, dict) and isinstance(b.get("spec"), WiringSpec) else b for b in self.blocks]
        # "no" tied the head, eps -1 / cap 0 gave NaN / zero logits
        if not isinstance(self.tie_word_embeddings, bool):
            raise WiringError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        for key in ("norm_eps", "output_logit_soft_cap"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < math.inf):
                raise WiringError(f"{key} must be a finite number > 0 or null, got {value!r}")

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @classmethod
    def from_arch(cls, arch: str | dict, *, vocab_size: int, embedding_dim: int,
                  block_defaults: dict[str, Any] | None = None, **kwargs: Any) -> "LabConfig":
        """From an architecture name, file or dict (see :func:`load_arch`). ``block_defaults``
        (e.g. ``{"num_heads": 4}``) go to every block whose entry does not set them."""
        data = load_arch(arch)
        for entry in data["blocks"]:  # a default goes where the block's spec declares it (a conv has no heads)
            declared = declared_params(entry["spec"])
            defaults = {k: v for k, v in (block_defaults or {}).items() if k in declared}
            entry["params"] = {**defaults, **entry["params"]}
        options = {k: data[k] for k in ("out_norm", "norm_eps", "tie_word_embeddings", "output_logit_soft_cap",
                                         "layout") if k in data}
        options.update(kwargs)
        return cls(vocab_size=vocab_size, embedding_dim=embedding_dim, blocks=data["blocks"],
                   name=str(data.get("name", "lab")), **options)

    def to_arch(self) -> dict[str, Any]:
        """The architecture (blocks and model options, no sizes) that :meth:`from_arch` builds
        at any ``vocab_size`` / ``embedding_dim``."""
        return {"name": self.name, "blocks": [dict(b) for b in self.blocks], "out_norm": self.out_norm,
                "norm_eps": self.norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
                "output_logit_soft_cap": self.output_logit_soft_cap, "layout": self.layout}

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.extra.items()}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        out["model_type"] = MODEL_TYPE
        out["architectures"] = ["xLSTMLabModel"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LabConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [k for k in ("vocab_size", "embedding_dim", "blocks") if k not in data]
        if missing:
            raise WiringError(f"lab config is missing {', '.join(missing)}")
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k not in ("model_type", "architectures")}
        return cls(**known, extra=extra)


def is_lab_config(data: dict) -> bool:
    return isinstance(data, dict) and data.get("model_type") == MODEL_TYPE


def _place(root: nn.Module, path: str, value) -> None:
    node = root
    parts = path.split(".")
    for part in parts[:-1]:
        if part not in node:
            setattr(node, part, _Container())
        node = node[part]
    setattr(node, parts[-1], value)


def _get(root: nn.Module, path: str):
    node = root
    for part in path.split("."):
        node = node[part]
    return node


class LabModel(FastQuantizedTree, Module2024):
    """input_ids [B, S] int, state | None -> (logits [B, S, V], state); ``state`` is a list with
    one flat tuple per block (that block's cells' states, see :class:`WiredBlock`)."""

    def __init__(self, config: LabConfig):
        super().__init__()
        self.config = config
        names = LAYOUTS[config.layout]
        object.__setattr__(self, "_names", names)
        E = config.embedding_dim
        _place(self, names["embedding"], nn.Embedding(config.vocab_size, E))
        blocks = []
        for index, entry in enumerate(config.blocks):
            spec = entry["spec"]
            # dim where the spec declares it (a spec of fixed sizes has none; the port check below holds it to E)
            params = {**({"dim": E} if "dim" in (spec.get("params") or {}) else {}), **(entry.get("params") or {})}
            try:
                block = WiredBlock(entry["spec"], params)
            except WiringError as err:
                raise WiringError(f"block {index}: {err}") from None
            if block.input_ports != {next(iter(block.input_ports)): E} or list(block.output_ports.values()) != [E]:
                raise WiringError(f"block {index} ({block.resolved.name}) must map one input of size {E} to one "
                                  f"output of size {E}; it has inputs {block.input_ports}, outputs {block.output_ports}")
            blocks.append(block)
        _place(self, names["blocks"], blocks)
        if config.out_norm == "rmsnorm":
            _place(self, names["out_norm"], RMSNorm(E, eps=config.norm_eps or 1e-6))
        elif config.out_norm == "layernorm":
            _place(self, names["out_norm"], LayerNorm2024(E, eps=config.norm_eps or 1e-5))
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(E, config.vocab_size, bias=False)

    @property
    def args(self) -> LabConfig:
        return self.config

    @property
    def blocks(self) -> list[WiredBlock]:
        return _get(self, self._names["blocks"])

    def make_state(self, batch_size: int = 1) -> list[tuple]:
        return [block.make_state(batch_size) for block in self.blocks]

    def hidden(self, input_ids: mx.array, state: list | None = None) -> tuple[mx.array, list]:
        """Normed hidden states [B, S, E] after the blocks, and the new state."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [B, S], got {tuple(input_ids.shape)}")
        blocks = self.blocks
        if isinstance(state, (list, tuple)):  # as the other models': a block's entry may be None (its zero state)
            check_state([() if s is None else s for s in state], input_ids.shape[0], len(blocks))
        elif state is not None:
            check_state(state, input_ids.shape[0], len(blocks))
        x = embed_tokens(_get(self, self._names["embedding"]), input_ids, self)
        new_state = []
        for index, block in enumerate(blocks):
            x, block_state = block(x, None if state is None else state[index])
            new_state.append(block_state)
        if self.config.out_norm is not None:
            x = _get(self, self._names["out_norm"])(x)
        return x, new_state

    def _logits(self, x: mx.array) -> mx.array:
        if self.config.tie_word_embeddings:
            logits = _get(self, self._names["embedding"]).as_linear(x)
        else:
            logits = self.lm_head(x)
        return soft_cap(logits, self.config.output_logit_soft_cap)

    def __call__(self, input_ids: mx.array, state: list | None = None, *, last_only: bool = False):
        x, state = self.hidden(input_ids, state)
        if last_only:
            x = x[:, -1:]
        return self._logits(x), state

    def prefill(self, input_ids: mx.array, state: list | None = None, *, chunk_size: int | None = None):
        """Feed a prompt in pieces (bounded memory): -> (logits of the last position [B, V], state)."""
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [B, S] with S >= 1, got {tuple(input_ids.shape)}")
        check_chunk_size(chunk_size)
        chunk_size = chunk_size or 4096
        logits = None
        for start in range(0, input_ids.shape[1], chunk_size):
            logits, state = self(input_ids[:, start : start + chunk_size], state, last_only=True)
            mx.eval(logits, state)
        return logits[:, 0], state

    def num_parameters(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.trainable_parameters()))

    def wiring(self) -> str:
        """The blocks and, once per distinct wiring, its cells and connections, as text."""
        c = self.config
        lines = [f"LabModel {c.name}: {c.num_blocks} blocks, E={c.embedding_dim}, vocab={c.vocab_size}, "
                 f"{self.num_parameters():,} trainable parameters, layout {c.layout}"]
        seen: dict[str, int] = {}
        for index, block in enumerate(self.blocks):
            text = block.describe()
            if text in seen:
                lines.append(f"  {self._names['blocks']}.{index}: {block.resolved.name} (as block {seen[text]})")
                continue
            seen[text] = index
            lines.append(f"  {self._names['blocks']}.{index}: " + text.replace("\n", "\n    "))
        lines.append(f"  out_norm: {c.out_norm}; lm_head: {'tied' if c.tie_word_embeddings else 'Linear'}"
                     + (f" -> soft cap {c.output_logit_soft_cap}" if c.output_logit_soft_cap else ""))
        return "\n".join(lines)


def init_lab_model(model: LabModel, seed: int = 0) -> None:
    """Seeded init of a fresh model: embeddings and LM head normal(0, 0.02) (as MAD's models);
    cells keep their own initialisation (drawn when built under ``mx.random.seed(seed)``)."""
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    emb = _get(model, model._names["embedding"])
    emb.weight = mx.random.normal(emb.weight.shape, key=k1) * 0.02
    if "lm_head" in model:
        model.lm_head.weight = mx.random.normal(model.lm_head.weight.shape, key=k2) * 0.02
    mx.eval(model.parameters())


def build_model(arch: str | dict | LabConfig, *, vocab_size: int | None = None, embedding_dim: int | None = None,
                seed: int = 0, **kwargs: Any) -> LabModel:
    """A freshly initialised lab model from an arch name/file/dict or a LabConfig (seeded). A
    LabConfig fixes its sizes: other ``vocab_size`` / ``embedding_dim`` or options are refused
    (they were ignored; ``config.to_arch()`` builds its architecture at other sizes)."""
    if isinstance(arch, LabConfig):
        differ = [f"{k}={v!r}" for k, v in (("vocab_size", vocab_size), ("embedding_dim", embedding_dim))
                  if v is not None and v != getattr(arch, k)] + [f"{k}=..." for k in kwargs]
        if differ:
            raise ValueError(f"build_model: a LabConfig fixes the model (vocab_size {arch.vocab_size}, "
                             f"embedding_dim {arch.embedding_dim}); {', '.join(differ)} would be ignored: pass "
                             "config.to_arch() to build its architecture with them")
        config = arch
    else:
        config = LabConfig.from_arch(arch, vocab_size=vocab_size, embedding_dim=embedding_dim, **kwargs)
    mx.random.seed(seed)
    model = LabModel(config)
    init_lab_model(model, seed)
    return model


def model_from_checkpoint(config_dict: dict[str, Any], weights: dict[str, mx.array], source="<weights>") -> LabModel:
    """Rebuild a lab model from its config.json dict and load ``weights`` strictly."""
    from ..loading import CheckpointError, load_weights_strict

    try:
        model = LabModel(LabConfig.from_dict(config_dict))
    except (WiringError, TypeError) as err:
        raise CheckpointError(f"{source}: {err}") from None
    _quantize_headwise(model, weights)
    load_weights_strict(model, weights, source)
    mx.eval(model.parameters())
    model.eval()
    return model


def _quantize_headwise(model: LabModel, weights: dict[str, mx.array]) -> None:
    """Headwise projections ``weights`` hold quantized (the loader reads 2-D ones only)."""
    from ..quantization import _infer_params

    def predicate(path: str, module) -> bool | dict:
        w, s = weights.get(f"{path}.weight"), weights.get(f"{path}.scales")
        if getattr(module, "heads", 1) == 1 or w is None or s is None or w.ndim != 3 or s.ndim != 3:
            return False
        return _infer_params(module.weight.shape[-1], w.reshape(-1, w.shape[-1]), s.reshape(-1, s.shape[-1])) or False

    nn.quantize(model, class_predicate=predicate)


def training_model(arch: str | dict, vocab_size: int, seed: int = 0) -> LabModel:
    """A fresh model of ``arch`` for ``xlstm-metal train --arch``: the arch's ``embedding_dim``
    (default 128) and ``vocab_size`` (default: ``vocab_size`` rounded up to a multiple of 64)."""
    data = load_arch(arch)
    dim = data.get("embedding_dim", 128)
    vocab = data.get("vocab_size")  # (0 fell back to the default: `or`)
    vocab = -(-vocab_size // 64) * 64 if vocab is None else vocab
    return build_model(data, vocab_size=vocab, embedding_dim=dim, seed=seed)


# ------------------------------------------------------------------ the hand-written models
def config_from_xlstm_large(cfg) -> LabConfig:
    """The wired equivalent of an xLSTM-Large config (``xlstm_large_block`` spec)."""
    from ..kernels import resolve_kernel_name
    from .library import load_spec

    params = {
        "num_heads": cfg.num_heads, "qk_dim_factor": cfg.qk_dim_factor, "v_dim_factor": cfg.v_dim_factor,
        "ffn_proj_factor": cfg.ffn_proj_factor, "ffn_round_up_to_multiple_of": cfg.ffn_round_up_to_multiple_of,
        "use_bias": cfg.use_bias, "norm_eps": cfg.norm_eps,
        "norm_reduction_force_float32": cfg.norm_reduction_force_float32, "gate_soft_cap": cfg.gate_soft_cap,
        "eps": cfg.eps, "chunk_size": cfg.chunk_size, "kernel": resolve_kernel_name(cfg.chunkwise_kernel),
        "step_kernel": resolve_kernel_name(cfg.step_kernel), "inference_state_dtype": cfg.inference_state_dtype,
    }
    spec = load_spec("xlstm_large_block").to_dict()
    return LabConfig(
        vocab_size=cfg.vocab_size, embedding_dim=cfg.embedding_dim,
        blocks=[{"spec": spec, "params": params} for _ in range(cfg.num_blocks)], name="xlstm_large",
        out_norm="rmsnorm" if cfg.add_out_norm else None, norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, output_logit_soft_cap=cfg.output_logit_soft_cap,
        layout="large", bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id if not isinstance(cfg.eos_token_id, list) else cfg.eos_token_id[0],
    )


def config_from_xlstm_2024(cfg) -> LabConfig:
    """The wired equivalent of a 2024 xLSTM config whose blocks are sLSTM blocks
    (``slstm_2024_block`` spec)."""
    from .library import load_spec

    kinds = cfg.block_map
    if "m" in kinds:
        raise WiringError("the 2024 xLSTM's mLSTM blocks have no shipped wiring spec; only sLSTM stacks convert "
                          f"(block map {''.join(kinds)})")
    s, ff = cfg.slstm_block.slstm, cfg.slstm_block.feedforward
    params = {"num_heads": s.num_heads, "conv1d_kernel_size": s.conv1d_kernel_size,
              "group_norm_weight": s.group_norm_weight, "layout": s.backend, "feedforward": ff is not None}
    if ff is not None:
        params.update(ffn_proj_factor=ff.proj_factor, ffn_round_up_to_multiple_of=ff.round_proj_up_to_multiple_of,
                      ffn_act_fn=ff.act_fn, ffn_bias=ff.bias)
        if not ff.round_proj_up_dim_up:
            raise WiringError("feed-forward widths rounded down are not expressible in slstm_2024_block")
    spec = load_spec("slstm_2024_block").to_dict()
    return LabConfig(
        vocab_size=cfg.vocab_size, embedding_dim=cfg.embedding_dim,
        blocks=[{"spec": spec, "params": params} for _ in kinds], name="xlstm_2024_slstm",
        out_norm="layernorm" if cfg.add_post_blocks_norm else None, tie_word_embeddings=cfg.tie_weights,
        layout="2024",
    )


def wired_equivalent(model) -> LabModel:
    """A LabModel built from wiring specs that computes what the hand-written ``model``
    (xLSTMLarge, or a 2024 sLSTM stack) computes, holding the same weights (shared arrays).

    A quantized layer's weight is held dequantized (in its scales' dtype: the wiring's
    projection cells multiply float weights), so the wired model of a quantized model gives its
    logits up to float round-off."""
    from ..loading import load_weights_strict
    from ..quantization import dequantized_weight

    config = _equivalent_config(model.config)
    wired = LabModel(config)
    weights = dict(tree_flatten(model.parameters()))
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weights[f"{path}.weight"] = dequantized_weight(module)
            weights.pop(f"{path}.scales")
            weights.pop(f"{path}.biases", None)
    load_weights_strict(wired, weights, f"<{type(model).__name__}>")
    wired.eval()
    return wired


def _equivalent_config(cfg) -> LabConfig:
    from ..config import xLSTMConfig

    if isinstance(cfg, xLSTMConfig):
        return config_from_xlstm_large(cfg)
    from ..config_2024 import xLSTMLMConfig

    if isinstance(cfg, xLSTMLMConfig):
        return config_from_xlstm_2024(cfg)
    raise WiringError(f"no wired equivalent for a {type(cfg).__name__}")


def load_wired(path, dtype: str | None = None) -> LabModel:
    """Load an xLSTM-Large or 2024 sLSTM checkpoint (the same files ``load_model`` reads, quantized
    ones too: see :func:`wired_equivalent`) into its wired equivalent. In float32 it gives
    ``load_model``'s logits to round-off; in bf16 they differ more, as ``load_model`` keeps
    xLSTM-Large's residual stream in float32 (``residual_dtype``) and the wiring does not."""
    from ..loading import load_model

    return wired_equivalent(load_model(path, dtype=dtype))


__all__ = ["LabConfig", "LabModel", "build_model", "init_lab_model", "wired_equivalent", "load_wired",
           "config_from_xlstm_large", "config_from_xlstm_2024", "is_lab_config", "MODEL_TYPE"]
