"""HyperProfiles: named, versioned JSON files of everything that decides numerics and speed.

A profile fixes the weight dtype, the recurrent-state dtype, the mLSTM kernels and chunk sizes,
the prompt piece length, eps values and soft caps (``null``: keep the model's), whether the
projections are fused, OpenBLAS threads on CPUs, the gate initialisation used when training from
scratch, and its tolerance contract: the largest relative error against the float32 reference
(``max|a - b| / max|b|`` over each block's output and the logits) that ``xlstm-metal profile
check`` accepts. Shipped profiles live beside this file (``exact-fp32``, ``fast-bf16``,
``nxai-parity``); ``xlstm-metal tune --objective speed`` writes tuned ones to the user profile
directory (``$XLSTM_METAL_PROFILES``, else ``~/.config/xlstm_metal/profiles``)::

    profile = load_profile("fast-bf16")          # a name or a .json path
    model = apply_profile(model, profile)        # in place; an xLSTMConfig gives a new config
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
_DTYPES = ("float32", "bfloat16", "float16")
_KERNEL_KINDS = ("chunkwise", "sequence", "step")


class ProfileError(ValueError):
    """A profile that cannot be found, read or applied; the message names the problem."""


@dataclass(frozen=True)
class HyperProfile:
    """One profile (see the module docstring). ``kernels`` maps chunkwise / sequence / step to
    kernel names (ours or NX-AI's); ``init`` holds igate_bias, fgate_bias [low, high] and
    gate_weight_std; ``tolerance`` holds max_rel_error."""

    name: str
    version: int
    description: str = ""
    dtype: str = "float32"
    state_dtype: str = "float32"
    kernels: dict[str, str] = field(default_factory=lambda: {"chunkwise": "chunkwise", "sequence": "sequence",
                                                              "step": "step"})
    chunk_size: int | None = None
    prefill_chunk: int | None = None
    fuse: bool = False
    eps: float | None = None
    norm_eps: float | None = None
    gate_soft_cap: float | None = None
    output_logit_soft_cap: float | None = None
    autocast_kernel_dtype: str | None = None
    blas_threads: int | None = None
    init: dict[str, Any] = field(default_factory=lambda: {"igate_bias": -10.0, "fgate_bias": [3.0, 6.0],
                                                           "gate_weight_std": 0.0})
    tolerance: dict[str, float] = field(default_factory=lambda: {"max_rel_error": 1e-4})
    #: Where a tuned profile was measured (environment() of xlstm_metal.benchmark); None: any.
    device: dict[str, Any] | None = None
    #: Where it was read from (not saved).
    source: str = field(default="", compare=False)

    @property
    def max_rel_error(self) -> float:
        return float(self.tolerance["max_rel_error"])

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    def replace(self, **changes: Any) -> "HyperProfile":
        """A validated copy with ``changes``."""
        return profile_from_dict({**self.to_dict(), **changes}, self.source)


# ------------------------------------------------------------------------------ reading
def _check(cond: bool, message: str, source: str) -> None:
    if not cond:
        raise ProfileError(f"profile {source}: {message}")


#: The largest chunk_size: `profile check` runs 2 x chunk_size + 7 tokens through L x L products per
#: chunk (on a CPU 2048 took 48 s and 2.1 GB, 8192 270 s and 13 GB; 100000 was killed). Tuned: 16-128.
MAX_CHUNK_SIZE = 4096
#: More threads than any machine's OpenBLAS build runs (it clamps to its own maximum, 64-512).
MAX_BLAS_THREADS = 4096


def _number(value: Any) -> bool:
    # Finite only: Python's JSON reads NaN and Infinity (a tolerance of Infinity passed every check).
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def profile_from_dict(data: dict[str, Any], source: str = "<dict>") -> HyperProfile:
    """Validate ``data`` (a profile's JSON object) and build the profile."""
    from ..kernels import resolve_kernel_name

    names = {f.name for f in dataclasses.fields(HyperProfile)} - {"source"}
    unknown = sorted(set(data) - names)
    _check(not unknown, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}", source)
    for required in ("name", "version"):
        _check(required in data, f"missing field '{required}'", source)
    d = dict(data)
    _check(isinstance(d["name"], str) and d["name"].strip() != "" and "/" not in d["name"],
           f"name must be a non-empty string without '/', got {d['name']!r}", source)
    _check(isinstance(d["version"], int) and not isinstance(d["version"], bool) and d["version"] >= 1,
           f"version must be an integer >= 1, got {d['version']!r}", source)
    for key in ("dtype", "state_dtype"):
        if key in d:
            _check(d[key] in _DTYPES, f"{key} must be one of {', '.join(_DTYPES)}, got {d[key]!r}", source)
    if d.get("autocast_kernel_dtype") is not None:
        _check(d["autocast_kernel_dtype"] in _DTYPES,
               f"autocast_kernel_dtype must be one of {', '.join(_DTYPES)}, got {d['autocast_kernel_dtype']!r}", source)
    if "kernels" in d:
        kernels = d["kernels"]
        _check(isinstance(kernels, dict) and set(kernels) <= set(_KERNEL_KINDS),
               f"kernels must map some of {', '.join(_KERNEL_KINDS)} to kernel names, got {kernels!r}", source)
        defaults = HyperProfile.__dataclass_fields__["kernels"].default_factory()
        d["kernels"] = {**defaults, **kernels}
        for kind, name in d["kernels"].items():
            try:
                resolved = resolve_kernel_name(name)
            except (KeyError, TypeError) as err:
                raise ProfileError(f"profile {source}: kernels.{kind}: {err.args[0]}") from None
            _check(kind == "step" or resolved not in ("step", "step_fused"),  # (it failed deep in the model)
                   f"kernels.{kind}: {name} runs one token at a time, not a prompt", source)
    for key in ("chunk_size", "prefill_chunk", "blas_threads"):
        value = d.get(key)
        _check(value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0),
               f"{key} must be a positive integer or null, got {value!r}", source)
    _check((d.get("chunk_size") or 0) <= MAX_CHUNK_SIZE,
           f"chunk_size must be at most {MAX_CHUNK_SIZE}, got {d.get('chunk_size')!r}", source)
    # OpenBLAS takes a C int: 2**32 + 2 threads became 2 without a word
    _check((d.get("blas_threads") or 0) <= MAX_BLAS_THREADS,
           f"blas_threads must be at most {MAX_BLAS_THREADS}, got {d.get('blas_threads')!r}", source)
    for key in ("eps", "norm_eps", "gate_soft_cap", "output_logit_soft_cap"):
        value = d.get(key)
        _check(value is None or (_number(value) and value > 0), f"{key} must be a number > 0 or null, got {value!r}",
               source)
    _check(isinstance(d.get("fuse", False), bool), f"fuse must be true or false, got {d.get('fuse')!r}", source)
    if "tolerance" in d:
        tol = d["tolerance"]
        _check(isinstance(tol, dict) and set(tol) == {"max_rel_error"} and _number(tol.get("max_rel_error"))
               and tol["max_rel_error"] > 0,
               f"tolerance must be {{\"max_rel_error\": number > 0}} (nothing else), got {tol!r}", source)
    if "init" in d:
        init = d["init"]
        defaults = HyperProfile.__dataclass_fields__["init"].default_factory()
        _check(isinstance(init, dict) and set(init) <= set(defaults),
               f"init must hold some of {', '.join(defaults)}, got {init!r}", source)
        init = {**defaults, **init}
        fb = init["fgate_bias"]
        _check(_number(init["igate_bias"]) and isinstance(fb, list) and len(fb) == 2 and all(map(_number, fb))
               and _number(init["gate_weight_std"]) and init["gate_weight_std"] >= 0,
               "init needs igate_bias (number), fgate_bias [low, high] and gate_weight_std >= 0", source)
        d["init"] = init
    _check(d.get("device") is None or isinstance(d["device"], dict), "device must be an object or null", source)
    _check(isinstance(d.get("description", ""), str), "description must be a string", source)
    return HyperProfile(**d, source=source)


def read_profile(path: str | os.PathLike) -> HyperProfile:
    """The profile in the JSON file ``path``."""
    from ..jsonfiles import read_json_object

    return profile_from_dict(read_json_object(path, ProfileError), str(path))


def user_profile_dir() -> Path:
    """Where tuned profiles are saved: $XLSTM_METAL_PROFILES, else ~/.config/xlstm_metal/profiles."""
    env = os.environ.get("XLSTM_METAL_PROFILES")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "xlstm_metal" / "profiles"


def profile_files() -> dict[str, Path]:
    """Name (what ``--profile`` takes) -> file: shipped profiles, then the user directory's
    (shipped names win)."""
    files: dict[str, Path] = {}
    user = user_profile_dir()
    if user.is_dir():
        files.update({p.stem: p for p in sorted(user.glob("*.json"))})
    files.update({p.stem: p for p in sorted(PACKAGE_DIR.glob("*.json"))})
    return files


def shipped_profile_names() -> list[str]:
    return sorted(p.stem for p in PACKAGE_DIR.glob("*.json"))


def list_profiles() -> list[HyperProfile]:
    """Every profile known by name (shipped and user), sorted by name. An unreadable user file
    raises ProfileError naming it."""
    return [read_profile(path) for _, path in sorted(profile_files().items())]


def load_profile(spec: str | os.PathLike | HyperProfile) -> HyperProfile:
    """A profile by name (shipped or saved by ``tune``), or from a JSON file path."""
    if isinstance(spec, HyperProfile):
        return spec
    text = str(spec)
    path = Path(text).expanduser()
    if text.endswith(".json") or os.sep in text or path.is_file():
        return read_profile(path)
    files = profile_files()
    if text not in files:
        raise ProfileError(f"unknown profile {text!r}; known: {', '.join(sorted(files)) or 'none'} "
                           "(or give a .json file)")
    return read_profile(files[text])


def save_profile(profile: HyperProfile, path: str | os.PathLike | None = None, *, overwrite: bool = False) -> Path:
    """Write ``profile`` atomically to ``path`` (default: the user profile directory, as
    <name>.json). Refuses shipped names and, unless ``overwrite``, existing files."""
    if path is None:
        if profile.name in shipped_profile_names():
            raise ProfileError(f"{profile.name!r} is a shipped profile's name; choose another")
        path = user_profile_dir() / f"{profile.name}.json"
    path = Path(path)
    if path.exists() and not overwrite:
        raise ProfileError(f"profile file {path} exists; pass overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    from ..training.data import atomic_write_text

    atomic_write_text(path, json.dumps(profile.to_dict(), indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------ applying
def config_overrides(profile: HyperProfile) -> dict[str, Any]:
    """The xLSTMConfig fields ``profile`` sets (null fields keep the model's values)."""
    out: dict[str, Any] = {
        "chunkwise_kernel": profile.kernels["chunkwise"],
        "sequence_kernel": profile.kernels["sequence"],
        "step_kernel": profile.kernels["step"],
        "inference_state_dtype": profile.state_dtype,
    }
    optional = {"chunk_size": profile.chunk_size, "max_inference_chunksize": profile.prefill_chunk,
                "eps": profile.eps, "norm_eps": profile.norm_eps, "gate_soft_cap": profile.gate_soft_cap,
                "output_logit_soft_cap": profile.output_logit_soft_cap,
                "autocast_kernel_dtype": profile.autocast_kernel_dtype}
    out.update({k: v for k, v in optional.items() if v is not None})
    return out


def set_blas_threads(threads: int | None) -> None:
    """OpenBLAS threads of MLX's CPU matmuls (a no-op without the preloaded OpenBLAS)."""
    if threads is None:
        return
    import ctypes

    from .. import _blas

    for handle in _blas._HANDLES:
        if hasattr(handle, "openblas_set_num_threads"):
            handle.openblas_set_num_threads(ctypes.c_int(int(threads)))
    # The GEMV forwarder's row kernel runs OpenBLAS's one-row products with threads of its own (set
    # to OpenBLAS's at import): left there, a profile's count did not reach decoding's products.
    _blas.set_gemv_threads(int(threads))


#: MLX's switch for float32 matmuls on NVIDIA GPUs: TF32 (10-bit mantissas) unless it is "0". MLX
#: reads it once, at the process's first float32 GEMM on the GPU.
TF32_VARIABLE = "MLX_ENABLE_TF32"


def float32_math(profile: HyperProfile) -> bool:
    """Whether ``profile`` computes in float32 throughout: weights, state and kernel products."""
    return profile.dtype == "float32" and profile.state_dtype == "float32" \
        and profile.autocast_kernel_dtype in (None, "float32")


def request_float32_matmuls(profile: HyperProfile) -> None:
    """For a profile of float32 math, ask MLX for float32 GEMMs on NVIDIA GPUs (``MLX_ENABLE_TF32=0``)
    unless the environment says otherwise: with MLX's default, TF32, a float32 model's logits
    there differ from the float32 reference by ~1e-3, past exact-fp32's tolerance. MLX reads the
    setting at the process's first float32 GEMM on the GPU, so it holds where the profile is
    applied before the model first runs (the command line does); a no-op elsewhere."""
    if float32_math(profile):
        os.environ.setdefault(TF32_VARIABLE, "0")


def apply_process_settings(profile: HyperProfile) -> None:
    """The parts of ``profile`` that belong to the process rather than the model: OpenBLAS
    threads and, for float32 math, float32 GEMMs on NVIDIA GPUs (what :func:`apply_profile` sets
    beside the model; ``train --resume`` sets them again from the run's saved profile)."""
    request_float32_matmuls(profile)
    set_blas_threads(profile.blas_threads)


def apply_profile(target: Any, profile: HyperProfile | str | os.PathLike) -> Any:
    """Apply ``profile`` (or its name / file) to a model or a config.

    - ``xLSTMConfig``: returns a new config with the profile's kernels, chunk sizes, state
      dtype, eps values and soft caps.
    - an xLSTM-Large model (``xlstm_metal.models.xlstm_large.xLSTMLarge``): changes it in place
      and returns it: weights cast to the profile's dtype, every kernel cell's kernel, chunk
      size, eps and state dtype, norm eps, soft caps, fused or separate projections.
    - a 2024 xLSTM (``xLSTMLMModel``): dtype, the mLSTM sequence and step kernels and chunk size; fields
      that model cannot honour (state dtype other than float32, eps / soft-cap overrides) raise
      ProfileError rather than being ignored.

    Also sets OpenBLAS threads when the profile names them, and for a profile of float32 math
    asks for float32 GEMMs on NVIDIA GPUs (:func:`request_float32_matmuls`).
    """
    profile = load_profile(profile)
    request_float32_matmuls(profile)
    from ..config import ConfigError, xLSTMConfig

    if isinstance(target, xLSTMConfig):
        try:
            return dataclasses.replace(target, **config_overrides(profile))
        except ConfigError as err:
            raise ProfileError(f"profile {profile.name}: {err}") from None
    config = getattr(target, "config", None)
    if isinstance(config, xLSTMConfig):
        _apply_xlstm_large(target, profile)
    elif config is not None and type(target).__name__ == "xLSTMLMModel":
        _apply_xlstm_2024(target, profile)
    else:
        raise ProfileError(f"cannot apply a profile to {type(target).__name__}; give an xLSTM model or xLSTMConfig")
    set_blas_threads(profile.blas_threads)
    return target


def _cast_weights(model, dtype_name: str) -> None:
    import mlx.core as mx

    dtype = getattr(mx, dtype_name)
    if any(p.dtype != dtype for _, p in _float_params(model)):
        model.set_dtype(dtype)  # through update(): drops a stale fused projection first
        mx.eval(model.parameters())


def _float_params(model):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return [(k, p) for k, p in tree_flatten(model.parameters()) if mx.issubdtype(p.dtype, mx.floating)]


def _held_blocks(model) -> list:
    """The blocks this process holds: a pipeline-parallel split
    (:func:`xlstm_metal.distributed.pipeline_model`) leaves parameter-free
    :class:`~xlstm_metal.distributed.PipelineGap` placeholders for the other ranks' blocks, which
    have no layers to configure (each rank applies the profile to its own)."""
    from ..distributed.pipeline import PipelineGap

    return [block for block in model.blocks if not isinstance(block, PipelineGap)]


def _apply_xlstm_large(model, profile: HyperProfile) -> None:
    import mlx.core as mx

    from ..cells.norms import MultiHeadLayerNorm, RMSNorm
    from ..kernels import resolve_kernel_name
    from ..neurons.mlstm import mLSTMNeuron

    model.config = apply_profile(model.config, profile)
    cfg = model.config
    _cast_weights(model, profile.dtype)
    if profile.fuse:
        model.fuse_projections()
    else:
        model.unfuse_projections()
    for block in _held_blocks(model):
        # a user's wrapper around the layer: the neuron inside it (none: nothing of ours to set)
        layer = next((m for _, m in block.mlstm_layer.named_modules() if isinstance(m, mLSTMNeuron)), None)
        if layer is None:
            continue
        for cell in (layer.parallel_kernel_cell, layer.recurrent_kernel_cell):
            cell.eps, cell.chunk_size = cfg.eps, cfg.chunk_size
            cell.state_dtype = getattr(mx, cfg.inference_state_dtype)
        # After fuse_projections(), which would otherwise pick its own fast kernels.
        layer.parallel_kernel_cell.kernel = resolve_kernel_name(cfg.chunkwise_kernel)
        layer.recurrent_kernel_cell.step_kernel = resolve_kernel_name(cfg.step_kernel)
        layer.recurrent_kernel_cell.sequence_kernel = resolve_kernel_name(cfg.sequence_kernel)
        layer.projection_cell.gate_soft_cap = cfg.gate_soft_cap
    for _, module in model.named_modules():
        if isinstance(module, (RMSNorm, MultiHeadLayerNorm)):
            module.eps = cfg.norm_eps


def _apply_xlstm_2024(model, profile: HyperProfile) -> None:
    from ..kernels import resolve_kernel_name
    from ..neurons.mlstm_2024 import STEP_KERNELS

    unsupported = [k for k in ("eps", "norm_eps", "gate_soft_cap", "output_logit_soft_cap")
                   if getattr(profile, k) is not None]
    if profile.state_dtype != "float32":
        unsupported.append(f"state_dtype={profile.state_dtype}")
    step = resolve_kernel_name(profile.kernels["step"])
    if step not in STEP_KERNELS:
        unsupported.append(f"kernels.step={profile.kernels['step']} (the 2024 mLSTM steps with {', '.join(STEP_KERNELS)})")
    if unsupported:
        raise ProfileError(f"profile {profile.name}: the 2024 xLSTM cannot apply {', '.join(unsupported)}")
    _cast_weights(model, profile.dtype)
    name = resolve_kernel_name(profile.kernels["chunkwise"])
    for block in _held_blocks(model):
        layer = getattr(block, "xlstm", None) or getattr(block, "mlstm_layer", None)
        if layer is None or not hasattr(layer, "kernel_name"):
            continue
        layer.set_kernel(name)
        layer.step_kernel = step  # was left at "step": fast-bf16's step_fused never ran here
        if profile.chunk_size is not None:
            layer.chunk_size = profile.chunk_size


def init_gates(model, init: dict[str, Any], seed: int = 0) -> None:
    """Set an xLSTM-Large's gate initialisation from a profile's ``init``: input-gate biases,
    forget-gate biases spread linearly over [low, high] across heads, gate weights
    N(0, gate_weight_std) (zero when 0) drawn from ``seed`` (train's --seed: every seed drew
    the same gate weights)."""
    import mlx.core as mx

    # (mx.random has no fold_in: a std > 0 was an AttributeError traceback)
    keys = mx.random.split(mx.random.key(seed), 2 * len(model.blocks))
    for index, block in enumerate(model.blocks):
        layer = block.mlstm_layer
        nh = layer.igate_preact.bias.shape[0]
        layer.igate_preact.bias = mx.full((nh,), float(init["igate_bias"]))
        lo, hi = init["fgate_bias"]
        layer.fgate_preact.bias = mx.linspace(float(lo), float(hi), nh)
        std = float(init["gate_weight_std"])
        for j, gate in enumerate((layer.igate_preact, layer.fgate_preact)):
            w = gate.weight
            gate.weight = (mx.random.normal(w.shape, key=keys[2 * index + j]) * std if std > 0
                           else mx.zeros(w.shape)).astype(w.dtype)
    mx.eval(model.parameters())


__all__ = [
    "HyperProfile",
    "ProfileError",
    "apply_profile",
    "config_overrides",
    "init_gates",
    "list_profiles",
    "load_profile",
    "profile_files",
    "profile_from_dict",
    "read_profile",
    "save_profile",
    "shipped_profile_names",
    "user_profile_dir",
]
