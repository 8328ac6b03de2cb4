"""Loading and saving checkpoints.

A checkpoint is a directory with ``config.json`` (or, for NX-AI's 2024 xLSTM, ``config.yaml``)
and ``model.safetensors``, or shards listed in ``model.safetensors.index.json``. Hugging Face key
names load as they are; NX-AI's native xLSTMLarge names (``embedding.weight``, fused
``qkv_opreact`` / ``ifgate_preact`` / ``proj_up_gate_z``) are mapped onto them. Loading is strict:
every missing, unexpected or mis-shaped tensor is listed in one error.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .cells.norms import rms_norm
from .config import xLSTMConfig
from .config_2024 import _model_section, is_xlstm_2024_config, read_config as read_config_2024, xLSTMLMConfig
from .errors import CheckpointError, ConfigError
from .jsonfiles import read_json_object
from .pathnames import file_present
from .models.xlstm_2024 import xLSTMLMModel
from .models.xlstm_large import xLSTMLarge

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
#: Above this many bytes, save_model writes shards plus an index.
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


# ------------------------------------------------------------------------------ locating
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a Hugging Face id downloaded through huggingface_hub."""
    if not isinstance(path_or_id, (str, os.PathLike)):  # else pathlib's TypeError names no argument
        raise TypeError(f"model path must be a str or os.PathLike (a checkpoint directory or Hugging Face id), "
                        f"got {type(path_or_id).__name__}")
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"model path {path} is a file; give the checkpoint directory")
    text = str(path_or_id)
    if not _HF_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"model directory not found: {path}")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            text, allow_patterns=["*.json", "*.safetensors", "*.yaml", "*.model", "*.txt"]
        )
    except Exception as err:  # offline, unknown repo, auth: all end the same way for the user
        raise CheckpointError(
            f"model directory not found: {path}, and downloading Hugging Face model {text!r} failed "
            f"({type(err).__name__}: {' '.join(str(err).split())}). Are you offline? Pass a local checkpoint "
            "directory."  # (the Hub's messages span lines: one line here)
        ) from None
    return Path(local)


# ------------------------------------------------------------------------------ reading
def read_config_dict(directory: Path) -> dict[str, Any]:
    """The checkpoint's config: config.json, else config.yaml (NX-AI's 2024 xLSTM)."""
    config_path = directory / CONFIG_NAME
    if is_checkpoint_file(config_path):
        return read_json_object(config_path, CheckpointError)
    if is_checkpoint_file(directory / "config.yaml"):
        return read_config_2024(directory)
    raise CheckpointError(f"no {CONFIG_NAME} in checkpoint directory {directory}")


def is_checkpoint_file(path: Path) -> bool:
    """Whether the checkpoint holds the file ``path`` (False when there is nothing by that name);
    CheckpointError for a directory or a broken symlink there (:func:`pathnames.file_present`)."""
    return file_present(path, CheckpointError)


def _load_file(path: Path) -> dict[str, mx.array]:
    """The tensors of one safetensors file; CheckpointError naming it if it is missing or corrupt.

    The header is validated by the ``safetensors`` library first (offsets inside the file,
    sizes matching shapes and dtypes): ``mx.load`` alone accepts some broken headers, such as
    negative shapes."""
    check_weight_file(path)
    try:
        return mx.load(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # MLX's RuntimeError: "corrupt"
        raise CheckpointError(f"cannot read weight file {path} (corrupted or truncated?): {err}") from None


def check_weight_file(path: Path) -> None:
    """CheckpointError naming safetensors file ``path`` if it is missing or its header is corrupt
    (reads the header only; `mlx-lm` checks a model's files with it before mlx-lm loads them)."""
    if not is_checkpoint_file(path):
        raise CheckpointError(f"weight file missing: {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            handle.keys()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # SafetensorError, a Rust panic: all mean "corrupt"
        raise CheckpointError(f"cannot read weight file {path} (corrupted or truncated?): {err}") from None


def _shard_names(index_path: Path) -> dict[str, str]:
    """The weight_map of a sharded checkpoint's index (tensor name -> shard file name)."""
    index = read_json_object(index_path, CheckpointError)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} is not a valid safetensors index: 'weight_map' must be a non-empty "
                              f"object mapping tensor names to shard files")
    # JSON keeps the last of a key given twice: a tensor mapped to two shards loaded from the
    # second without a word.
    twice: dict[str, set] = {}

    def pairs(items: list) -> dict:
        seen: dict = {}
        for key, value in items:
            if key in seen and seen[key] != value and isinstance(value, str):
                twice.setdefault(key, {seen[key]}).add(value)
            seen[key] = value
        return seen

    json.loads(index_path.read_text(encoding="utf-8"), object_pairs_hook=pairs)
    twice = {key: shards for key, shards in twice.items() if key in weight_map}
    if twice:
        key, shards = next(iter(twice.items()))
        raise CheckpointError(f"{index_path} maps {len(twice)} tensor(s) to more than one shard, e.g. {key!r} to "
                              f"{' and '.join(sorted(map(str, shards)))}: which one holds it?")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{index_path}: tensor {key!r} maps to {shard!r}, which is not a file name "
                                  f"in the checkpoint directory")
    return weight_map


def read_weights(directory: Path) -> dict[str, mx.array]:
    """All tensors of a checkpoint directory, single file or sharded."""
    index_path = directory / INDEX_NAME
    single = is_checkpoint_file(directory / WEIGHTS_NAME)
    if is_checkpoint_file(index_path):
        weight_map = _shard_names(index_path)
        if single and WEIGHTS_NAME not in weight_map.values():  # (mlx-lm's index lists its single file)
            raise CheckpointError(f"{directory} holds both {WEIGHTS_NAME} and shards listed in {INDEX_NAME}: "
                                  f"two sets of weights (the shards were read, the single file passed over); remove one")
        weights: dict[str, mx.array] = {}
        found_in: dict[str, str] = {}
        for shard in sorted(set(weight_map.values())):
            shard_weights = _load_file(directory / shard)
            listed = {k for k, v in weight_map.items() if v == shard}
            missing = sorted(listed - set(shard_weights))
            if missing:
                raise CheckpointError(f"shard {directory / shard} lacks tensors its index lists: {missing[:10]}")
            # A tensor in two shards: the copy the index names (the later shard's won, whatever the index said).
            for key, value in shard_weights.items():
                if weight_map.get(key, shard) != shard:
                    continue
                if key in found_in:
                    raise CheckpointError(f"tensor {key!r} is in both {found_in[key]} and {shard} of {directory}, "
                                          f"and {INDEX_NAME} names neither: which copy is the model's?")
                found_in[key] = shard
                weights[key] = value
        return weights
    if single:
        return _load_file(directory / WEIGHTS_NAME)
    torch_files = sorted(p.name for p in directory.glob("pytorch_model*.bin*"))  # older Hugging Face checkpoints
    if torch_files:
        raise CheckpointError(f"{directory} holds PyTorch .bin weights ({', '.join(torch_files[:2])}"
                              f"{', ...' if len(torch_files) > 2 else ''}), which xlstm-metal does not read (a pickle: "
                              "unsafe to load, and it needs torch); convert them to safetensors with transformers: "
                              "AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(OUT, safe_serialization=True)")
    raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in checkpoint directory {directory}")


def non_finite_tensors(arrays: dict[str, mx.array]) -> list[str]:
    """Names of the floating-point tensors holding NaN or +-inf.

    One all-finite reduction per tensor, stacked, and a single host sync for all of them: run
    once at load time, never in the forward pass."""
    names = [k for k, v in arrays.items() if mx.issubdtype(v.dtype, mx.inexact)]
    if not names:
        return []
    finite = mx.stack([mx.all(mx.isfinite(arrays[k])) for k in names]).tolist()
    return [k for k, ok in zip(names, finite) if not ok]


def check_finite(model: nn.Module, source: str | os.PathLike, cast: mx.Dtype | None = None) -> None:
    """CheckpointError naming every parameter of ``model`` that holds NaN or inf (``cast``: the
    dtype it was loaded in)."""
    bad = non_finite_tensors(dict(tree_flatten(model.parameters())))
    if bad:
        shown = bad[:20] + ([f"... and {len(bad) - 20} more"] if len(bad) > 20 else [])
        what = "NaN or infinite values"
        if cast is not None and not non_finite_tensors(read_weights(Path(source))):  # it blamed the checkpoint
            what = f"values past {_dtype_name(cast)}'s range (load it in another dtype)"
        raise CheckpointError(f"checkpoint {source} holds {what} in {len(bad)} tensor(s):\n    " + "\n    ".join(shown))


def sanitize_xlstm_large(weights: dict[str, mx.array], config: xLSTMConfig) -> dict[str, mx.array]:
    """Map NX-AI's native xLSTMLarge names and fused layouts onto Hugging Face names."""
    out: dict[str, mx.array] = {}
    qk, v, nh, ffn = config.qk_dim, config.v_dim, config.num_heads, config.ffn_dim

    def split(key: str, value: mx.array, names: list[str], sizes: list[int]) -> None:
        if value.shape[0] != sum(sizes):
            raise CheckpointError(
                f"fused tensor {key} has {value.shape[0]} rows, expected {sum(sizes)} ({'|'.join(names)})"
            )
        stem, leaf = key.rsplit(".", 2)[0], key.rsplit(".", 1)[1]
        offsets = [sum(sizes[:j]) for j in range(len(sizes) + 1)]
        for name, start, stop in zip(names, offsets, offsets[1:]):
            out[f"{stem}.{name}.{leaf}"] = value[start:stop]

    for key, value in weights.items():
        if key == "embedding.weight":
            out["backbone.embeddings.weight"] = value
        elif ".mlstm_layer.qkv_opreact." in key:
            split(key, value, ["q", "k", "v", "ogate_preact"], [qk, qk, v, v])
        elif ".mlstm_layer.ifgate_preact." in key:
            split(key, value, ["igate_preact", "fgate_preact"], [nh, nh])
        elif ".ffn.proj_up_gate_z." in key:
            split(key, value, ["proj_up_gate", "proj_up"], [ffn, ffn])
        else:
            out[key] = value
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


_LARGE_BLOCK_KEY = re.compile(r"^backbone\.blocks\.(\d+)\.")


def check_block_count(weights: dict[str, mx.array], config: xLSTMConfig, source: str | os.PathLike) -> None:
    """CheckpointError when ``config`` asks for more blocks than the weights hold, checked
    before the model is built (a num_blocks of 10**12 built blocks for hours; a few too many
    were listed as missing tensors, block by block)."""
    held = {int(match.group(1)) for key in weights if (match := _LARGE_BLOCK_KEY.match(key))}
    if config.num_blocks > len(held):
        raise CheckpointError(f"{Path(source) / CONFIG_NAME}: num_blocks is {config.num_blocks} but the weights hold "
                              f"{len(held)} block(s)")


def lm_head_trained_apart(weights: dict[str, mx.array], config: xLSTMConfig) -> bool:
    """True where ``config`` ties the LM head to the embeddings but the checkpoint holds an
    ``lm_head.weight`` of its own that differs from them.

    transformers' ``xLSTMForCausalLM`` never ties the two (it keeps ``tie_word_embeddings`` in
    its config but always multiplies by ``lm_head.weight``): a tied checkpoint fine-tuned there
    comes back with a head trained apart, and only an untied model gives its logits. Our tied
    checkpoints store the head as an exact copy of the embeddings (for transformers): equal.
    A quantized head (``lm_head.scales``) is always one of its own: a tied head is stored only
    beside float embeddings (:func:`~xlstm_metal.checkpoint_files.transformers_weights`), so it
    is such a head quantized (mlx-lm's ``convert -q`` of that transformers checkpoint, which
    then loaded nowhere: "unexpected lm_head.scales")."""
    if not config.tie_word_embeddings or "lm_head.weight" not in weights:
        return False
    if "lm_head.scales" in weights:
        return True
    head = weights["lm_head.weight"]
    embeddings = weights.get("backbone.embeddings.weight", weights.get("embedding.weight"))
    if embeddings is None or "backbone.embeddings.scales" in weights:
        return False
    return head.shape != embeddings.shape or not mx.array_equal(head, embeddings).item()


def fit_out_norm(model: xLSTMLarge, weights: dict[str, mx.array]) -> None:
    """Give ``model`` the out norm the checkpoint holds where its config says otherwise:
    transformers' ``xLSTMModel`` has one, and applies it, whatever ``add_out_norm`` says, with no
    bias even under ``use_bias``; NX-AI's native model follows both (a biased out norm with
    ``use_bias``). So the weights tell: ``backbone.out_norm.weight`` (a norm; ``add_out_norm``
    becomes true), ``backbone.out_norm.bias`` (its bias). Without them the model is left as it
    is (a config asking for a norm then lacks its weight: a strict load says so)."""
    if "backbone.out_norm.weight" not in weights:
        return
    bias = "backbone.out_norm.bias" in weights
    norm = model.backbone.get("out_norm")
    if norm is not None and ("bias" in norm) == bias:
        return
    c = model.config
    model.backbone.out_norm = rms_norm(c.embedding_dim, bias=bias, eps=c.norm_eps,
                                       force_float32=c.norm_reduction_force_float32)
    c.add_out_norm = True


def load_weights_strict(
    model: nn.Module, weights: dict[str, mx.array], source: str | os.PathLike,
    quantization: dict[str, Any] | None = None,
) -> None:
    """Set every parameter of ``model`` from ``weights`` (same names), or raise one
    CheckpointError listing all missing, unexpected and mis-shaped tensors.

    Layers the weights hold quantized (``.scales``, packed ``.weight``) are first replaced by
    quantized layers, following the checkpoint's ``quantization`` entry where given."""
    if quantization is not None or any(key.endswith(".scales") for key in weights):
        from .quantization import apply_quantization

        apply_quantization(model, quantization, weights)
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(weights[k].shape)}, model {tuple(expected[k].shape)}"
        for k in set(expected) & set(weights)
        if tuple(weights[k].shape) != tuple(expected[k].shape)
    )
    # A float parameter takes only float tensors (an int or bool one would load, cast, and change
    # the logits); a quantized layer's packed weight (uint32) or uint8 scales (mxfp4, nvfp4,
    # mxfp8) only its own dtype.
    mistyped = sorted(
        f"{k}: checkpoint {_dtype_name(weights[k].dtype)}, model {_dtype_name(expected[k].dtype)}"
        for k in set(expected) & set(weights)
        if (not mx.issubdtype(weights[k].dtype, mx.floating) if mx.issubdtype(expected[k].dtype, mx.floating)
            else weights[k].dtype != expected[k].dtype)
    )
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                         ("wrong-dtype", mistyped)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            problems.append(f"{len(items)} {title} tensor(s):\n    " + "\n    ".join(shown))
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match the model:\n  " + "\n  ".join(problems))
    model.update(tree_unflatten(list(weights.items())))


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def _cast(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    if dtype is None:
        return weights
    return {k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}


def _pop_quantization(config_dict: dict[str, Any], directory: Path) -> dict[str, Any] | None:
    """The checkpoint's ``quantization`` (or ``quantization_config``) entry, removed from the
    config dict (the module tree, not the config, describes a loaded model's quantization)."""
    from .quantization import QuantizationError, config_quantization

    try:
        return config_quantization(config_dict, str(directory / CONFIG_NAME))
    except QuantizationError as err:
        raise CheckpointError(str(err)) from None


_LOAD_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    if dtype is None:
        return None
    # An mx.Dtype is held to the same three: int weights load but the forward fails deep in MLX.
    if isinstance(dtype, mx.Dtype) and dtype in _LOAD_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _LOAD_DTYPES:
        return _LOAD_DTYPES[dtype]
    shown = _dtype_name(dtype) if isinstance(dtype, mx.Dtype) else repr(dtype)
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {shown}")


# ------------------------------------------------------------------------------ 2024 xLSTM
_BLOCK_KEY = re.compile(r"^xlstm_block_stack\.blocks\.(\d+)\.(.+)$")


def detect_block_kinds(weights: dict[str, Any], source: str = "<weights>") -> list[str]:
    """"m" / "s" per block position, read from the weight names (``...blocks.{i}.xlstm.mlstm_cell.*``
    marks an mLSTM block, ``...xlstm.slstm_cell.*`` an sLSTM block)."""
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


def wire_2024_config(config: xLSTMLMConfig, weights: dict[str, Any], source: str | os.PathLike = "<weights>") -> None:
    """Fit a 2024 ``config`` to the checkpoint's ``weights`` in place (auto-wiring): ``slstm_at``
    from the weight names (:func:`detect_block_kinds`), the sLSTM weight layout (``backend``) from
    the recurrent kernel's shape. CheckpointError where the config cannot hold them (block count,
    a block kind it has no config for)."""
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


def model_from_checkpoint(
    config_dict: dict[str, Any],
    weights: dict[str, mx.array],
    dtype: mx.Dtype | str | None = None,
    *,
    source: str | os.PathLike = "<weights>",
    mlstm_kernel: str = "chunkwise",
    chunk_size: int = 64,
    quantization: dict[str, Any] | None = None,
) -> xLSTMLMModel:
    """Build the NX-AI 2024 xLSTM a checkpoint describes and load its weights strictly
    (quantized as ``quantization``, the checkpoint's mlx-lm entry, and the weights say).

    The block type at each position comes from the weight names (auto-wiring; the config's
    ``slstm_at`` is replaced by it), the sLSTM weight layout from the recurrent kernel's shape
    (:func:`wire_2024_config`), and a missing vocab_size from ``token_embedding.weight``.
    Missing, unexpected and mis-shaped tensors are reported together in one CheckpointError.
    """
    # The block count before the config is built: num_blocks 10**12 listed 10**12 positions (a
    # MemoryError) before wire_2024_config compared it with the weights.
    num_blocks = _model_section(config_dict).get("num_blocks") if isinstance(config_dict, dict) else None
    if isinstance(num_blocks, int) and not isinstance(num_blocks, bool):
        held = len(detect_block_kinds(weights, str(source)))
        if num_blocks > held:
            raise CheckpointError(f"checkpoint {source}: the weights hold {held} blocks, the config says "
                                  f"num_blocks={num_blocks}")
    try:
        config = xLSTMLMConfig.from_dict(config_dict)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None
    wire_2024_config(config, weights, source)
    weights = dict(weights)
    if config.tie_weights:
        # NX-AI's state_dict lists the tied tensor twice; safetensors' save_model (the way to
        # save shared tensors) keeps one name of the two, the sorted first: lm_head.weight.
        head = weights.pop("lm_head.weight", None)
        if head is not None and "token_embedding.weight" not in weights:
            weights["token_embedding.weight"] = head
    emb = weights.get("token_embedding.weight")
    if (isinstance(config.vocab_size, bool) or not isinstance(config.vocab_size, int) or config.vocab_size <= 0) \
            and emb is not None and emb.ndim == 2:
        config.vocab_size = int(emb.shape[0])  # NX-AI's block-stack YAMLs leave it to the caller
    try:
        config.validate()
        model = xLSTMLMModel(config, mlstm_kernel=mlstm_kernel, chunk_size=chunk_size, init=False)
    except (ConfigError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from None
    if dtype is not None:
        target = getattr(mx, dtype) if isinstance(dtype, str) else dtype
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    load_weights_strict(model, weights, source, quantization)
    mx.eval(model.parameters())
    model.eval()
    return model


# ------------------------------------------------------------------------------ public API
def load_model(path: str | os.PathLike, dtype: str | mx.Dtype | None = None, *,
               check_finite_weights: bool = True,
               prepare: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """Load a checkpoint directory (or Hugging Face id) into an MLX model.

    Weights keep the checkpoint's dtype unless ``dtype`` ("float32", "bfloat16", "float16") is
    given (a quantized checkpoint's packed weights stay packed; their scales take ``dtype``).
    A config with a ``quantization`` entry (mlx-lm's format, as ``xlstm-metal convert -q``
    writes it) gives a model with the same layers quantized. The architecture (xLSTM-Large, or
    NX-AI's 2024 sLSTM/mLSTM xLSTM) is detected from the config and the weight names. Weights
    holding NaN or inf are a CheckpointError naming the tensors (one pass over the weights;
    ``check_finite_weights=False`` skips it). ``prepare(model) -> model`` runs on the model before
    its weights are read (xLSTM-Large; the others after): a split across processes
    (:mod:`xlstm_metal.distributed`) then reads only this process's part of the checkpoint.
    """
    directory = resolve_model_path(path)
    target = _parse_dtype(dtype)
    config_dict = read_config_dict(directory)
    quantization = _pop_quantization(config_dict, directory)
    # The config is checked before the (possibly large) weights are read.
    kind = "large"
    if config_dict.get("model_type") == "xlstm_lab":  # an architecture-lab model (xlstm_metal.lab)
        kind = "lab"
    elif is_xlstm_2024_config(config_dict):
        kind = "2024"
    if kind == "large":
        try:
            config = xLSTMConfig.from_dict(config_dict)
        except ConfigError as err:
            raise CheckpointError(f"{directory / CONFIG_NAME}: {err}") from None
    weights = read_weights(directory)
    if kind == "large":
        check_block_count(weights, config, directory)
    if kind == "large" and lm_head_trained_apart(weights, config):
        config.tie_word_embeddings = False  # as transformers computes it; see lm_head_trained_apart
    if kind == "lab":
        from .lab.model import model_from_checkpoint as lab_model_from_checkpoint

        model = lab_model_from_checkpoint(config_dict, _cast(weights, target), directory)
    elif kind == "2024":
        model = model_from_checkpoint(config_dict, _cast(weights, target), source=directory,
                                      quantization=quantization)
    else:
        model = xLSTMLarge(config)
        fit_out_norm(model, weights)
        load_weights_strict(model, _cast(sanitize_xlstm_large(weights, config), target), directory, quantization)
        if prepare is not None:  # the weights are still lazy: what it drops is never read
            model = prepare(model)
            prepare = None
        mx.eval(model.parameters())
        model.eval()
        model.residual_dtype = mx.float32  # inference: see xLSTMLarge.residual_dtype
    if prepare is not None:
        model = prepare(model)
    if check_finite_weights:
        check_finite(model, directory, target)
    return model


def load(path: str | os.PathLike, dtype: str | mx.Dtype | None = None, *,
         prepare: Callable[[nn.Module], nn.Module] | None = None):
    """(model, tokenizer) from a checkpoint directory; tokenizer is None where it has none.
    ``prepare``: see :func:`load_model`."""
    directory = resolve_model_path(path)
    model = load_model(directory, dtype=dtype, prepare=prepare)
    tokenizer = None
    try:
        from .generation.tokenizer import load_tokenizer
    except ImportError:
        return model, None
    tokenizer = load_tokenizer(directory)
    check_tokenizer_fits(tokenizer, getattr(getattr(model, "config", None), "vocab_size", None), directory)
    return model, tokenizer


def check_tokenizer_fits(tokenizer, vocab: Any, directory: Path) -> None:
    """CheckpointError when the tokenizer of checkpoint ``directory`` has more tokens than the
    model's vocabulary ``vocab`` (not checked unless a positive int; nor without a tokenizer):
    its token ids would fall outside the embedding."""
    if tokenizer is not None and isinstance(vocab, int) and 0 < vocab < tokenizer.vocab_size:
        raise CheckpointError(
            f"{Path(directory) / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but the model's vocabulary is "
            f"{vocab}: token ids would fall outside the embedding"
        )


# Plain writes: save_model writes into its own temporary folder and renames the files into place.
def _write_text(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o644)  # whatever the umask: a checkpoint is meant to be shared


def _write_safetensors(path: Path, arrays: dict[str, mx.array]) -> None:
    mx.save_safetensors(str(path), arrays, metadata={"format": "pt"})
    os.chmod(path, 0o644)


_SHARD_PATTERN = "model-*-of-*.safetensors"


def _check_save_args(model: Any, max_shard_bytes: Any, overwrite: Any) -> None:
    """TypeError / ValueError naming the save_model argument that cannot be used (checked before
    anything is created)."""
    if not isinstance(overwrite, bool):  # overwrite="no" must not replace a checkpoint
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if not isinstance(model, nn.Module) or not tree_flatten(model.parameters()):
        raise TypeError(f"model must be an mlx.nn.Module with parameters, got {type(model).__name__}")
    if not hasattr(model, "config") or not callable(getattr(model.config, "to_dict", None)):
        raise TypeError(f"model must carry a config with to_dict() (an xlstm_metal model), got {type(model).__name__}")
    if max_shard_bytes is not None:
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int):
            raise TypeError(f"max_shard_bytes must be a positive int or None, got {max_shard_bytes!r}")
        if max_shard_bytes <= 0:  # 0 wrote one shard per tensor
            raise ValueError(f"max_shard_bytes must be a positive int or None, got {max_shard_bytes}")


def _json_value(value: Any) -> Any:
    """json.dumps' fallback: numpy scalars (``config.norm_eps = np.float32(1e-6)``) as numbers."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON")


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint: ``config.json``, ``model.safetensors`` (shards + index above
    ``max_shard_bytes``; None: one file), the mlx-lm model file, and with ``tokenizer`` (our
    ``Tokenizer``, a ``tokenizers.Tokenizer`` or a directory holding ``tokenizer.json``)
    ``tokenizer.json`` + ``tokenizer_config.json``. The checkpoint opens in transformers
    (xLSTM-Large), mlx-lm (``trust_remote_code=True``) and here; see :mod:`xlstm_metal.checkpoint_files`.

    A folder holding any of the files the save writes or removes (``config.json``, the weights,
    the index, shards) is only written to with ``overwrite=True``. Everything is built and
    written into a temporary folder first and moved in at the end: a save that fails leaves an
    existing checkpoint as it was, and no half checkpoint in a new folder.
    """
    from .checkpoint_files import (
        MLX_LM_SHIM,
        mlx_lm_config,
        tokenizer_files,
        transformers_out_norm_problem,
        transformers_shape_problem,
        transformers_soft_cap_problem,
        transformers_weights,
        with_weights_dtype,
        write_shim,
    )
    from .quantization import quantization_config

    _check_save_args(model, max_shard_bytes, overwrite)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file; save_model writes a checkpoint directory")
    old_shards = sorted(directory.glob(_SHARD_PATTERN)) if directory.is_dir() else []
    existing = [n for n in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME) if (directory / n).exists()]
    existing += [p.name for p in old_shards]
    if existing and not overwrite:
        what = "a checkpoint" if (directory / CONFIG_NAME).exists() else "files save_model would replace"
        raise FileExistsError(f"{directory} already holds {what} ({', '.join(existing)}); pass overwrite=True")

    # Everything that can fail on the model's content runs before any file is written.
    tokenizer_texts = tokenizer_files(tokenizer, model.config) if tokenizer is not None else {}
    weights = dict(tree_flatten(model.parameters()))
    weights.update(transformers_weights(model.config, weights))
    mx.eval(weights)
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for key, value in weights.items():
        if shards[-1] and max_shard_bytes is not None and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    names = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{number:05d}-of-{len(shards):05d}.safetensors" for number in range(1, len(shards) + 1)])
    texts = dict(tokenizer_texts)
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": weight_map}
        texts[INDEX_NAME] = json.dumps(index, indent=2)
    config = mlx_lm_config(model.config.to_dict())
    if isinstance(model.config, xLSTMConfig):
        config = with_weights_dtype(config, weights)
    quantization = quantization_config(model)
    if quantization is not None:  # mlx-lm writes both names; transformers reads the second
        config["quantization"] = config["quantization_config"] = quantization
    try:
        config_text = json.dumps(config, indent=2, default=_json_value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"the model's config cannot be written to {CONFIG_NAME}: {err}") from None
    problems = (transformers_shape_problem(model.config), transformers_out_norm_problem(model.config, weights),
                transformers_soft_cap_problem(model.config))

    # Written into a unique temporary folder (beside a new directory, inside an existing one:
    # the same file system either way, so the moves below are renames).
    is_new = not directory.exists()
    created = [p for p in reversed(directory.parents) if not p.exists()]  # removed again on failure
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent if is_new else directory, prefix=f".{directory.name}.save-"))
    try:
        for name, shard in zip(names, shards):
            _write_safetensors(staging / name, shard)
        for name, text in texts.items():
            _write_text(staging / name, text)
        write_shim(staging, _write_text)
        _write_text(staging / CONFIG_NAME, config_text)  # last: the file that marks a checkpoint
        if is_new:
            os.chmod(staging, 0o755)  # mkdtemp creates 0700; a checkpoint is meant to be shared
            try:
                os.rename(staging, directory)
            except OSError:  # another process made it meanwhile: its files are not ours to replace
                raise FileExistsError(f"{directory} was created while saving; nothing was written") from None
        else:
            for name in [*names, *texts, MLX_LM_SHIM, CONFIG_NAME]:  # config.json last, as written
                os.replace(staging / name, directory / name)
            staging.rmdir()
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    # The overwritten checkpoint's files the new one does not have (without overwrite=True none of
    # these existed: the folder was refused above).
    stale = [directory / INDEX_NAME] if len(shards) == 1 else [directory / WEIGHTS_NAME]
    for old in [*stale, *(p for p in old_shards if p.name not in names)]:
        old.unlink(missing_ok=True)
    for problem in problems:
        if problem is not None:
            warnings.warn(f"{directory}: {problem}", UserWarning, stacklevel=2)
    return directory
