"""Weight quantization of xLSTM models (MLX's quantization modes, mlx-lm's checkpoint format).

A quantized checkpoint's ``config.json`` carries ``quantization`` (and the same dict as
``quantization_config``) exactly as ``mlx_lm.utils`` writes and reads it::

    {"group_size": 64, "bits": 4, "mode": "affine",
     "backbone.embeddings": {"group_size": 64, "bits": 6, "mode": "affine"},   # per-layer override
     "backbone.blocks.0.mlstm_layer.igate_preact": false}                      # kept in float

and its safetensors hold each quantized layer as ``<path>.weight`` (packed uint32),
``<path>.scales`` and ``<path>.biases``. Besides ``affine`` (2-8 bits, groups of 32, 64 or 128,
float scales and biases) MLX has the microscaling float formats ``mxfp4`` (4 bits, groups of 32),
``mxfp8`` (8 bits, groups of 32) and ``nvfp4`` (4 bits, groups of 16): uint8 scales and no
biases (mlx-lm's ``convert --q-mode`` writes them; :data:`MODES`). Which layers are quantized and how is decided by a
:class:`Recipe`: uniform bits and group size, a named mixed recipe (``mixed-4-6``: 4-bit body,
embeddings and LM head at 6 bits), or a JSON file of per-layer overrides. By default the input
and forget gate projections (``igate_preact`` / ``fgate_preact``, the 2024 xLSTM's ``igate`` /
``fgate``) stay in float: they have only one output per head and drive exponential gates, so
their error is amplified, and they hold a negligible share of the weights.

On CPUs MLX's quantized matmul is slower than float32 through OpenBLAS (BENCHMARKS.md). An
xLSTM-Large model's decode step and prefill on Linux CPUs run in C instead
(:mod:`xlstm_metal.kernels.cpu`), reading the packed weights: there quantization saves time as
well (decode 1.8-2.0x float32 at the 125m shape). Elsewhere on CPUs it saves memory, not time;
:func:`dequantize_model` turns a quantized model back into float layers.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .checks import bad_token_ids, check_targets, is_integer
from .kernels.fast.quantized import MODES, use_fast_quantized_layers

#: Bit widths and group sizes of MLX's affine quantization.
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64
# MODES (imported above): MLX's quantization modes, None for affine (:data:`BITS`,
# :data:`GROUP_SIZES`) or a float format's one (bits, group size).
#: Named mixed recipes ``mixed-<body bits>-<embedding/head bits>`` (``mixed_4_6`` also accepted).
MIXED_RECIPE = re.compile(r"^mixed[-_]([2-8])[-_]([2-8])$")
#: Layers kept in float by default: the i/f gate projections (NH outputs, exponential gates).
FLOAT_GATES = re.compile(r"(^|\.)(igate_preact|fgate_preact|igate|fgate)$")
_QUANTIZED_TYPES = (nn.QuantizedLinear, nn.QuantizedEmbedding)
_TOP_KEYS = ("group_size", "bits", "mode")


class QuantizationError(ValueError):
    """A recipe or quantization config that cannot be applied; the message names the problem."""


def _check_mode(mode: Any, where: str) -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise QuantizationError(f"{where}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _mode_params(mode: str, bits: Any, group_size: Any, where: str) -> tuple[int, int]:
    """(bits, group size) of ``mode``: a format's fixed pair (None takes it; another value is an
    error), or affine's checked values (None takes the defaults)."""
    fixed = MODES[_check_mode(mode, where)]
    if fixed is None:
        return (_check_bits(DEFAULT_BITS if bits is None else bits, where),
                _check_group_size(DEFAULT_GROUP_SIZE if group_size is None else group_size, where))
    for name, value, want in (("bits", bits, fixed[0]), ("group_size", group_size, fixed[1])):
        if value is not None and (not is_integer(value) or value != want):
            raise QuantizationError(f"{where}: mode {mode} has {name} {want}, got {value!r}")
    return fixed


def _check_bits(bits: Any, where: str) -> int:
    if not is_integer(bits) or bits not in BITS:
        raise QuantizationError(f"{where}: bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    return int(bits)


def _check_group_size(group_size: Any, where: str) -> int:
    if not is_integer(group_size) or group_size not in GROUP_SIZES:
        raise QuantizationError(
            f"{where}: group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}"
        )
    return int(group_size)


def _check_model(model: Any, where: str) -> None:
    """Refuses a ``model`` that is not an nn.Module (a path string failed as an AttributeError)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an mlx.nn.Module (load a checkpoint first), "
                        f"got {type(model).__name__}")


@dataclass
class Recipe:
    """Which layers to quantize, and with which bits and group size.

    ``overrides`` maps a layer path (``backbone.blocks.0.ffn.proj_down``) or a glob pattern
    (``backbone.blocks.*.ffn.proj_down``) to ``False`` (keep in float), ``True`` (quantize
    with the defaults, even a layer kept in float by default) or a dict with ``bits`` and/or
    ``group_size``. Exact paths win over patterns; among patterns the first listed wins. The i/f
    gates kept in float take a pattern's override only where it ends in their name.
    """

    bits: int = DEFAULT_BITS
    group_size: int = DEFAULT_GROUP_SIZE
    overrides: dict[str, bool | dict[str, Any]] = field(default_factory=dict)
    name: str = "uniform"
    #: Keep the i/f gate projections in float unless an override names them.
    float_gates: bool = True
    #: Every override must name a layer (user recipes: a typo is an error, not a no-op).
    strict: bool = True
    #: MLX's quantization mode (:data:`MODES`); a float format fixes bits and group size.
    mode: str = "affine"

    def __post_init__(self) -> None:
        self.bits, self.group_size = _mode_params(self.mode, self.bits, self.group_size, f"recipe {self.name}")
        checked: dict[str, bool | dict[str, int]] = {}
        for key, value in self.overrides.items():
            if not isinstance(key, str) or not key:
                raise QuantizationError(f"recipe {self.name}: layer paths must be non-empty strings, got {key!r}")
            checked[key] = _check_override(value, f"recipe {self.name}, layer {key!r}")
        self.overrides = checked

    @classmethod
    def from_config(cls, quantization: dict[str, Any]) -> "Recipe":
        """The recipe that reproduces a checkpoint's ``quantization`` dict on a model of the same
        architecture (e.g. random weights for a benchmark)."""
        mode = _check_mode(quantization.get("mode", "affine"), "quantization entry")
        missing = [k for k in ("bits", "group_size") if k not in quantization]
        if missing and MODES[mode] is None:  # (was a bare KeyError: 'bits'); a float format fixes both
            raise QuantizationError(f"quantization entry lacks {' and '.join(missing)}: mlx-lm's form is "
                                    '{"group_size": G, "bits": B, ...}')
        layers = {k: v for k, v in quantization.items() if k not in _TOP_KEYS}
        return cls(quantization.get("bits"), quantization.get("group_size"), layers, name="checkpoint",
                   strict=False, mode=mode)

    def _override(self, path: str) -> bool | dict[str, int] | None:
        if path in self.overrides:
            return self.overrides[path]
        # {"backbone.blocks.1.*": 8} quantized block 1's i/f gates
        gate = self.float_gates and FLOAT_GATES.search(path)
        for pattern, value in self.overrides.items():
            if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(path, pattern) \
                    and (not gate or FLOAT_GATES.search(pattern)):
                return value
        return None

    def params_for(self, path: str, module: nn.Module) -> dict[str, Any] | bool:
        """``to_quantized`` arguments for the layer at ``path``, or False to keep it in float.

        Raises QuantizationError where an override asks for a group size the layer's input
        width is not a multiple of (a layer the defaults cannot group is kept in float)."""
        if not hasattr(module, "to_quantized") or isinstance(module, _QUANTIZED_TYPES):
            return False
        override = self._override(path)
        if override is False or (override is None and self.float_gates and FLOAT_GATES.search(path)):
            return False
        params = {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}
        if isinstance(override, dict):
            if override.get("mode", self.mode) != self.mode:  # another mode: its own defaults
                bits, group_size = _mode_params(override["mode"], override.get("bits"), override.get("group_size"),
                                                f"recipe {self.name}, layer {path!r}")
                params = {"group_size": group_size, "bits": bits, "mode": override["mode"]}
            else:
                params.update(override)
                # e.g. {"bits": 8} on an mxfp4 recipe: that format has no 8 bits
                _mode_params(params["mode"], params["bits"], params["group_size"], f"recipe {self.name}, layer {path!r}")
        width = module.weight.shape[-1]
        if width % params["group_size"]:
            if isinstance(override, dict) and "group_size" in override:
                raise QuantizationError(
                    f"layer {path}: input width {width} is not a multiple of group size {params['group_size']}"
                )
            return False
        return params

    def kept_by_width(self, path: str, module: nn.Module) -> bool:
        """True where :meth:`params_for` keeps a quantizable layer in float only because its
        input width is not a multiple of its group size (not by the recipe's say)."""
        if not hasattr(module, "to_quantized") or isinstance(module, _QUANTIZED_TYPES):
            return False
        override = self._override(path)
        if override is False or (override is None and self.float_gates and FLOAT_GATES.search(path)):
            return False
        return self.params_for(path, module) is False

    def unmatched(self, paths: Iterable[str]) -> list[str]:
        """Override keys that name no quantizable layer among ``paths`` (typos)."""
        paths = list(paths)
        return [
            key for key in self.overrides
            if key not in paths and not any(fnmatch.fnmatchcase(p, key) for p in paths)
        ]


def _check_override(value: Any, where: str) -> bool | dict[str, Any]:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return {"bits": _check_bits(value, where)}
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(_TOP_KEYS))
        if unknown:
            raise QuantizationError(f"{where}: unknown key(s) {unknown}; use bits, group_size, mode")
        out: dict[str, Any] = {}
        if "mode" in value:
            out["mode"] = _check_mode(value["mode"], where)
            if MODES[out["mode"]] is not None:  # a float format: its bits and group size (checked)
                out["bits"], out["group_size"] = _mode_params(out["mode"], value.get("bits"),
                                                              value.get("group_size"), where)
                return out
        if "bits" in value:
            out["bits"] = _check_bits(value["bits"], where)
        if "group_size" in value:
            out["group_size"] = _check_group_size(value["group_size"], where)
        return out
    raise QuantizationError(f"{where}: expected false, true, a bit width or an object, got {value!r}")


def make_recipe(spec: str | None = None, bits: int | None = None, group_size: int | None = None,
                mode: str | None = None) -> Recipe:
    """A recipe from a ``--q-recipe`` value and the ``--q-bits`` / ``--q-group-size`` /
    ``--q-mode`` flags.

    ``spec``: None (uniform), ``mixed-B-H`` (B-bit body, embeddings and LM head at H bits; affine),
    or the path of a JSON file: an object of per-layer overrides (see :class:`Recipe`; an override
    may name its own ``mode``), optionally with top-level ``bits`` / ``group_size`` / ``mode`` (the
    flags, where given, win) and ``"float_gates": false`` to quantize the i/f gate projections too.
    ``mode`` (:data:`MODES`, default affine): a float format fixes bits and group size.
    """
    if spec is None:
        mode = _check_mode(mode or "affine", "quantization")
        return Recipe(*_mode_params(mode, bits, group_size, f"mode {mode}"), mode=mode)
    match = MIXED_RECIPE.match(spec)
    if match and (mode or "affine") != "affine":
        raise QuantizationError(f"recipe {spec} is affine ({match.group(1)}- and {match.group(2)}-bit layers); "
                                f"for mode {mode} give a JSON recipe (its overrides may name their own mode)")
    if match:
        body, high = int(match.group(1)), int(match.group(2))
        if bits is not None and _check_bits(bits, f"recipe {spec}") != body:  # 4.0 is no bit width
            raise QuantizationError(f"recipe {spec} sets {body}-bit layers, but bits={bits} was also given")
        # Embeddings and LM head: large, and their error reaches every token's logits directly.
        # Both architectures' names; a tied LM head is the embedding.
        overrides = {name: {"bits": high} for name in ("backbone.embeddings", "token_embedding", "lm_head")}
        return Recipe(body, group_size or DEFAULT_GROUP_SIZE, overrides, name=spec, strict=False)
    path = Path(spec).expanduser()
    if spec.startswith("mixed") and not path.exists():
        raise QuantizationError(
            f"unknown recipe {spec!r}: named recipes are mixed-<body bits>-<embedding/head bits> "
            f"with bits in {', '.join(map(str, BITS))} (e.g. mixed-4-6), or give a JSON file"
        )
    if not path.is_file():
        raise QuantizationError(f"recipe {spec!r} is neither a named recipe (e.g. mixed-4-6) nor a JSON file")
    from .jsonfiles import read_json_object

    data = read_json_object(path, QuantizationError)
    float_gates = data.pop("float_gates", True)
    if not isinstance(float_gates, bool):
        raise QuantizationError(f"{path}: float_gates must be true or false, got {float_gates!r}")
    file_mode = data.pop("mode", None)
    file_bits, file_group = data.pop("bits", None), data.pop("group_size", None)
    if mode is not None and file_mode is not None and mode != file_mode:
        file_bits = file_group = None  # the flag's mode wins, and the file's bits were for its own
    mode = _check_mode(mode or file_mode or "affine", str(path))
    bits, group_size = _mode_params(mode, bits if bits is not None else file_bits,
                                    group_size if group_size is not None else file_group, str(path))
    return Recipe(bits, group_size, data, name=str(path), float_gates=float_gates, mode=mode)


def plan(model: nn.Module, recipe: Recipe) -> dict[str, dict[str, Any] | bool]:
    """Per quantizable layer path: its ``to_quantized`` arguments, or False (kept in float).

    Raises QuantizationError for overrides that match no layer."""
    decisions = {
        path: recipe.params_for(path, module)
        for path, module in model.named_modules()
        if hasattr(module, "to_quantized") and not isinstance(module, _QUANTIZED_TYPES)
    }
    typos = recipe.unmatched(decisions) if recipe.strict else []
    if typos:
        shown = ", ".join(sorted(decisions)[:6])
        raise QuantizationError(
            f"recipe {recipe.name}: {', '.join(map(repr, typos))} match(es) no quantizable layer "
            f"(layers are named like {shown}, ...)"
        )
    return decisions


def quantize_model(
    model: nn.Module,
    bits: int | None = None,
    group_size: int | None = None,
    recipe: Recipe | str | None = None,
    *,
    mode: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Quantize ``model`` in place (nn.QuantizedLinear / nn.QuantizedEmbedding in the module
    tree) and return its ``quantization`` dict in mlx-lm's config format.

    ``recipe`` is a :class:`Recipe` or a ``--q-recipe`` string (see :func:`make_recipe`);
    ``bits`` / ``group_size`` default to 4 / 64, ``mode`` to affine (:data:`MODES`). Layers are converted and evaluated one at a
    time (peak memory: the float model plus one layer); ``progress(path)`` is called after each.
    A model that is already quantized raises QuantizationError (dequantize it first).
    """
    _check_model(model, "quantize_model")
    if progress is not None and not callable(progress):  # (it failed after the first layer: half quantized)
        raise TypeError(f"progress must be a callable taking the layer path, got {type(progress).__name__}")
    if isinstance(recipe, os.PathLike):
        recipe = os.fspath(recipe)  # a JSON recipe's path
    if recipe is not None and not isinstance(recipe, (Recipe, str)):
        # a number reached re.match as "expected string or bytes-like object"
        raise TypeError(f"recipe must be a Recipe, a recipe name (e.g. mixed-4-6) or a JSON file path as str, "
                        f"got {type(recipe).__name__}")
    if not isinstance(recipe, Recipe):
        recipe = make_recipe(recipe, bits, group_size, mode)
    elif bits is not None or group_size is not None or mode is not None:
        raise QuantizationError("give bits/group_size/mode through the Recipe, not beside it")
    if quantization_config(model) is not None:
        raise QuantizationError("the model is already quantized; dequantize_model() it first")
    unfuse = getattr(model, "unfuse_projections", None)
    if callable(unfuse):
        unfuse()  # fused projections are views of the float weights being replaced
    decisions = plan(model, recipe)
    for path, params in decisions.items():
        if params is False:
            continue
        module = _get_module(model, path)
        quantized = module.to_quantized(**params)
        mx.eval(quantized.parameters())
        model.update_modules(tree_unflatten([(path, quantized)]))
        if progress is not None:
            progress(path)
    use_fast_quantized_layers(model)  # our dispatch: the CUDA kernels, and around MLX's faulty cases
    config = quantization_config(model)
    if config is None:
        raise QuantizationError(
            f"recipe {recipe.name}: no layer could be quantized (every input width must be a "
            f"multiple of the group size {recipe.group_size}, or the recipe keeps them all in float)"
        )
    return config


def _get_module(model: nn.Module, path: str) -> nn.Module:
    module: Any = model
    for part in path.split("."):
        module = module[int(part)] if isinstance(module, list) else module[part]
    return module


def quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """The ``quantization`` dict describing ``model``'s module tree (None if nothing is quantized).

    The most common (bits, group size) is the default; layers quantized otherwise get a per-layer
    entry, and quantizable layers left in float get ``false``, as mlx-lm reads them."""
    quantized: dict[str, tuple[int, int, str]] = {}
    floating: list[str] = []
    for path, module in model.named_modules():
        if isinstance(module, _QUANTIZED_TYPES):
            quantized[path] = (module.bits, module.group_size, getattr(module, "mode", "affine"))
        elif hasattr(module, "to_quantized") and path:
            floating.append(path)
    if not quantized:
        return None
    (bits, group_size, mode), _ = Counter(quantized.values()).most_common(1)[0]
    config: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": mode}
    for path in sorted(quantized):
        if quantized[path] != (bits, group_size, mode):
            b, g, m = quantized[path]
            config[path] = {"group_size": g, "bits": b, "mode": m}
    for path in sorted(floating):
        config[path] = False
    return config


def describe(quantization: dict[str, Any]) -> str:
    """A quantization entry's top-level setting as text: "4-bit, group 64", "mxfp4, 4-bit, group 32"."""
    mode = quantization.get("mode", "affine")
    return f"{'' if mode == 'affine' else mode + ', '}{quantization['bits']}-bit, group {quantization['group_size']}"


def describe_layers(quantization: dict[str, Any]) -> str:
    """The per-layer settings of a quantization entry, counted: "1 layer 6-bit, group 64; 8
    layers in float" ("" for none), so a mixed recipe does not read as its top-level setting."""
    counts: dict[str, int] = {}
    for key, value in quantization.items():
        if key in _TOP_KEYS or value is True:
            continue
        what = "in float" if value is False else describe({**quantization, **value}) if isinstance(value, dict) else None
        if what is not None:
            counts[what] = counts.get(what, 0) + 1
    return "; ".join(f"{n} layer{'s' * (n != 1)} {what}" for what, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def config_quantization(config_dict: dict[str, Any], source: str = "config.json") -> dict[str, Any] | None:
    """Pop ``quantization`` / ``quantization_config`` from a checkpoint's config dict and return
    the quantization dict (None for a float checkpoint).

    Raises QuantizationError for a quantization this package cannot load (another method such
    as GPTQ or bitsandbytes, a malformed entry)."""
    quantization = config_dict.pop("quantization", None)
    legacy = config_dict.pop("quantization_config", None)
    if quantization is None:
        quantization = legacy
    if quantization is None:
        return None
    if not isinstance(quantization, dict):
        raise QuantizationError(f"{source}: 'quantization' must be an object, got {quantization!r}")
    if "quant_method" in quantization:  # transformers' GPTQ, AWQ, bitsandbytes, ... (mlx-lm writes none)
        raise QuantizationError(
            f"{source}: quantization method {quantization['quant_method']!r} is not supported; "
            "this package loads MLX's quantization (affine, mxfp4, mxfp8, nvfp4; xlstm-metal convert -q writes it)"
        )
    _check_entry(quantization, f"{source} quantization")
    for key, value in quantization.items():
        if key not in _TOP_KEYS:
            if value is not False and value is not True:
                if not isinstance(value, dict):
                    raise QuantizationError(f"{source} quantization, layer {key!r}: expected an object or false")
                _check_entry(value, f"{source} quantization, layer {key!r}")
    return quantization


def _check_entry(entry: dict[str, Any], where: str) -> None:
    """A checkpoint's (bits, group size, mode), all three given as mlx-lm writes them (mode:
    affine where absent, as mlx-lm reads it)."""
    mode = _check_mode(entry.get("mode", "affine"), where)
    if MODES[mode] is None:
        _check_bits(entry.get("bits"), where)
        _check_group_size(entry.get("group_size"), where)
    else:
        _mode_params(mode, entry.get("bits"), entry.get("group_size"), where)


def apply_quantization(
    model: nn.Module, quantization: dict[str, Any] | None, weights: dict[str, mx.array]
) -> None:
    """Replace ``model``'s layers by quantized ones as a checkpoint describes, before its
    ``weights`` are loaded (the placeholder weights are replaced then).

    A layer named in ``quantization`` takes its entry (``false`` keeps it in float, ``true`` takes
    the top-level bits and group size, as mlx-lm reads it); any other
    quantizable layer whose ``.scales`` the checkpoint holds (mlx-lm's rule) is quantized with
    the bits and group size its packed weight and scales have (``quantization`` may be None:
    the shapes say it all), else where its ``.weight`` is packed (uint32) with the defaults, so
    a lost ``.scales`` is reported as missing.
    """
    quantization = quantization or {}

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if path in quantization:
            entry = quantization[path]
            if entry is True:  # mlx-lm: quantized with the top-level bits, group size and mode
                return _top_params(quantization)
            return dict(entry) if isinstance(entry, dict) else bool(entry)
        if not hasattr(module, "to_quantized"):
            return False
        weight, scales = weights.get(f"{path}.weight"), weights.get(f"{path}.scales")
        if weight is None or (scales is None and weight.dtype != mx.uint32):
            return False
        inferred = _infer_params(module.weight.shape[-1], weight, scales)
        if inferred is not None:
            return inferred
        if "bits" in quantization:
            return _top_params(quantization)
        return False  # the strict load lists the mis-shaped tensors

    nn.quantize(model, class_predicate=predicate)
    use_fast_quantized_layers(model)  # as quantize_model leaves them


def _top_params(quantization: dict[str, Any]) -> dict[str, Any]:
    # a float format's entry may leave out its fixed bits and group size (a KeyError)
    mode = quantization.get("mode", "affine")
    bits, group_size = _mode_params(mode, quantization.get("bits"), quantization.get("group_size"), "quantization")
    return {"group_size": group_size, "bits": bits, "mode": mode}


def _infer_params(width: int, weight: mx.array, scales: mx.array | None) -> dict[str, Any] | None:
    """Bits, group size and mode of a packed ``weight`` [out, width * bits / 32] with ``scales``
    [out, width / group_size], for a layer of input width ``width``: float scales are affine's,
    uint8 scales a float format's (each has one (bits, group size))."""
    if scales is None or weight.ndim != 2 or scales.ndim != 2 or not scales.shape[-1]:
        return None
    bits, group_size = weight.shape[-1] * 32 // width, width // scales.shape[-1]
    if weight.shape[-1] * 32 != bits * width or group_size * scales.shape[-1] != width:
        return None
    if scales.dtype == mx.uint8:
        mode = next((m for m, fixed in MODES.items() if fixed == (bits, group_size)), None)
        return None if mode is None else {"group_size": group_size, "bits": bits, "mode": mode}
    if bits not in BITS or group_size not in GROUP_SIZES:
        return None
    return {"group_size": group_size, "bits": bits, "mode": "affine"}


def dequantized_weight(module: nn.Module, format_dtype: mx.Dtype = mx.float32) -> mx.array:
    """A quantized layer's weight in float. Affine: in the dtype of its scales, ``scale * q +
    bias`` computed in float32 and rounded once (MLX's dequantize in bf16 rounds the product and
    the sum: 1-ulp errors in about half the weights). A float format (uint8 scales, no float
    dtype of its own): in ``format_dtype``, which holds its values exactly (at most 6
    significant bits)."""
    f32, mode = mx.float32, getattr(module, "mode", "affine")
    if mode != "affine":
        return mx.dequantize(module.weight, module.scales, None, module.group_size, module.bits, mode=mode,
                             dtype=format_dtype)
    weight = mx.dequantize(module.weight, module.scales.astype(f32), module.biases.astype(f32),
                           module.group_size, module.bits)
    return weight.astype(module.scales.dtype)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by a float one holding its dequantized weights (in the
    dtype of its scales), in place; returns the model. Forward results equal the quantized
    model's up to float round-off (:func:`dequantized_weight`); a float format's (mxfp4 and the
    like) become the dtype of the model's float weights (float32 where it has none)."""
    _check_model(model, "dequantize_model")
    replacements = []
    dtype = float_dtype(model)
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            weight = dequantized_weight(module, dtype)
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            layer.weight = weight
            if "bias" in module:
                layer.bias = module.bias
        elif isinstance(module, nn.QuantizedEmbedding):
            weight = dequantized_weight(module, dtype)
            layer = nn.Embedding(weight.shape[0], weight.shape[1])
            layer.weight = weight
        else:
            continue
        mx.eval(layer.parameters())
        replacements.append((path, layer))
    if replacements:
        unfuse = getattr(model, "unfuse_projections", None)
        if callable(unfuse):
            unfuse()
        model.update_modules(tree_unflatten(replacements))
    return model


def float_dtype(model: nn.Module) -> mx.Dtype:
    """The most common dtype of ``model``'s floating parameters outside its quantized layers
    (norms, float layers; float32 where there are none)."""
    quantized = {path for path, m in model.named_modules() if isinstance(m, _QUANTIZED_TYPES)}
    counts = Counter(value.dtype for key, value in tree_flatten(model.parameters())
                     if key.rpartition(".")[0] not in quantized and mx.issubdtype(value.dtype, mx.floating))
    return counts.most_common(1)[0][0] if counts else mx.float32


def represented_weights(model: nn.Module) -> dict[str, int]:
    """Parameter key -> the weights it represents: a quantized matrix its unpacked elements, its
    scales and biases none, any other array its elements. Quantized layers: MLX's, ours, and the
    sharded ones of a tensor-parallel split (none of MLX's quantized classes: a layer with an
    integer ``bits`` and ``scales``)."""
    bits = {path: m.bits for path, m in model.named_modules()
            if isinstance(m, _QUANTIZED_TYPES) or (isinstance(getattr(m, "bits", None), int) and "scales" in m)}
    counts = {}
    for key, value in tree_flatten(model.parameters()):
        owner, _, leaf = key.rpartition(".")
        if owner in bits and leaf == "weight":
            counts[key] = value.size * 32 // bits[owner]
        elif owner in bits and leaf in ("scales", "biases"):
            counts[key] = 0
        else:
            counts[key] = value.size
    return counts


def parameter_count(model: nn.Module) -> int:
    """Weights the model represents: a quantized matrix counts its unpacked elements, not its
    scales and biases (:func:`represented_weights`)."""
    return sum(represented_weights(model).values())


def bits_per_weight(model: nn.Module, stored_bytes: int | None = None) -> float:
    """Stored bits (weights, scales, biases, float layers) per represented weight; ``stored_bytes``
    counts other storage of the same model instead (e.g. the checkpoint it was loaded from)."""
    if stored_bytes is None:
        stored_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return 8.0 * stored_bytes / max(parameter_count(model), 1)


# ------------------------------------------------------------------------------ fidelity
def _log_probs(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def fidelity(
    reference: nn.Module,
    candidate: nn.Module,
    ids: list[int],
    *,
    greedy_tokens: int = 256,
    prompt_tokens: int = 32,
    piece: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """How closely ``candidate`` (e.g. quantized) follows ``reference`` on the token ids ``ids``.

    Both models read ``ids`` in pieces of ``piece`` tokens, carrying their states (memory stays
    bounded for long texts). Returns ``tokens`` (predicted positions), ``ppl_reference``,
    ``ppl_candidate`` (perplexity of ``ids[1:]``), ``kl`` (mean KL(reference || candidate) of
    the next-token distributions, nats), ``top1`` (share of positions where both rank the same
    token first), and, from the first ``prompt_tokens`` ids, ``greedy_tokens`` tokens decoded
    greedily by each model: ``greedy_agree`` (positions holding the same token) and
    ``greedy_prefix`` (tokens identical before the first difference). ``progress(n)`` is
    called with the tokens done after each piece and each decode step.
    """
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to measure perplexity, got {len(ids)}")
    for name, value in (("greedy_tokens", greedy_tokens), ("prompt_tokens", prompt_tokens), ("piece", piece)):
        if not is_integer(value) or value < 1:  # piece=-1 scored nothing: perplexity 1.0
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    vocab = getattr(getattr(reference, "config", None), "vocab_size", None)
    bad = bad_token_ids(ids, vocab)
    if bad:  # past the vocabulary: OverflowError in math.exp
        raise ValueError(f"ids must be token ids in [0, {vocab}), got {bad[0]!r}")
    totals = {"nll_r": mx.array(0.0), "nll_c": mx.array(0.0), "kl": mx.array(0.0), "top1": mx.array(0)}
    state_r = state_c = None
    for start in range(0, len(ids) - 1, piece):
        stop = min(start + piece, len(ids) - 1)
        x = mx.array([ids[start:stop]])
        target = mx.array(ids[start + 1 : stop + 1])
        logits_r, state_r = reference(x, state_r)
        logits_c, state_c = candidate(x, state_c)
        for logits in (logits_r, logits_c):  # take_along_axis reads past the logits unchecked
            check_targets(ids[start + 1 : stop + 1], logits.shape[-1])
        lp_r, lp_c = _log_probs(logits_r[0]), _log_probs(logits_c[0])
        pick = target[:, None]
        totals["nll_r"] = totals["nll_r"] - mx.take_along_axis(lp_r, pick, axis=-1).sum()
        totals["nll_c"] = totals["nll_c"] - mx.take_along_axis(lp_c, pick, axis=-1).sum()
        totals["kl"] = totals["kl"] + (mx.exp(lp_r) * (lp_r - lp_c)).sum()
        totals["top1"] = totals["top1"] + (mx.argmax(lp_r, -1) == mx.argmax(lp_c, -1)).sum()
        mx.eval(totals, state_r, state_c)
        if progress is not None:
            progress(stop - start)
    count = len(ids) - 1
    out: dict[str, Any] = {
        "tokens": count,
        "ppl_reference": math.exp(totals["nll_r"].item() / count),
        "ppl_candidate": math.exp(totals["nll_c"].item() / count),
        "kl": totals["kl"].item() / count,
        "top1": totals["top1"].item() / count,
    }
    prompt = mx.array([ids[: max(1, min(prompt_tokens, len(ids)))]])
    runs = []
    for model in (reference, candidate):
        logits, state = model(prompt)
        token = mx.argmax(logits[:, -1], axis=-1)
        tokens = [token]
        for _ in range(greedy_tokens - 1):
            logits, state = model(token[:, None], state)
            token = mx.argmax(logits[:, -1], axis=-1)
            tokens.append(token)
            mx.async_eval(token)
        runs.append(mx.concatenate(tokens).tolist())
        if progress is not None:
            progress(greedy_tokens)
    same = [a == b for a, b in zip(*runs)]
    out["greedy_tokens"] = greedy_tokens
    out["greedy_agree"] = sum(same)
    out["greedy_prefix"] = same.index(False) if False in same else greedy_tokens
    return out


__all__ = [
    "BITS", "GROUP_SIZES", "QuantizationError", "Recipe", "make_recipe", "plan", "quantize_model",
    "quantization_config", "config_quantization", "apply_quantization", "dequantize_model",
    "parameter_count", "represented_weights", "bits_per_weight", "fidelity",
]
