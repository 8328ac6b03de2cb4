"""Speed benchmarks of xLSTM-Large models with random weights (no download needed).

Measures prefill tokens/s and time to first token at several prompt lengths, decode tokens/s at
several batch sizes, and peak memory of each. Used by ``xlstm-metal bench`` and the side-by-side
scripts under ``benchmarks/``.

Prefill is :meth:`xLSTMLarge.prefill`: pieces of ``prefill_chunk`` tokens carrying the recurrent
state, evaluated layer by layer, and the LM head on the last position only, so memory stays
bounded for any prompt length (the logits of a 131,072-token prompt alone would take 13 GB).
Decode runs one compiled greedy step (all blocks, LM head, argmax) per token, scheduled with
``mx.async_eval`` so the host builds step t+1 while the device computes step t.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import kernels as _kernels  # noqa: F401
from .config import xLSTMConfig
from .kernels import fast as _fast_kernels  # noqa: F401  (registers chunkwise_scan)
from .kernels.cpu import decode_step as cpu_decode_step
from .kernels.cpu import prefill as cpu_prefill
from .kernels.mlstm import deferred_terms
from .models.xlstm_large import xLSTMLarge

#: Named model shapes (xLSTM-Large architecture; vocab 50304 as NX-AI's tokenizer).
SHAPES: dict[str, dict[str, int]] = {
    "7b": dict(embedding_dim=4096, num_heads=8, num_blocks=32, vocab_size=50304),
    "1.3b": dict(embedding_dim=2048, num_heads=4, num_blocks=24, vocab_size=50304),
    "125m": dict(embedding_dim=768, num_heads=4, num_blocks=12, vocab_size=50304),
}

_DTYPES = ("float32", "bfloat16", "float16")
_GIB = 2**30


def default_dtype() -> str:
    """bfloat16 on a GPU; float32 on the CPU (MLX's CPU half-precision matmul is a slow fallback)."""
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


def shape_config(shape: str | Path, **overrides: Any) -> xLSTMConfig:
    """A named shape ("7b", "1.3b", "125m"), a config.json file or a checkpoint directory."""
    if str(shape).lower() in SHAPES:
        fields: dict[str, Any] = dict(SHAPES[str(shape).lower()])
        fields.update(overrides)
        return xLSTMConfig(**fields)
    path = Path(shape)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{shape!r} is neither a named shape ({', '.join(SHAPES)}) nor a config file"
        )
    config = xLSTMConfig.from_file(path)
    return dataclasses.replace(config, **overrides) if overrides else config


def count_parameters(model: nn.Module) -> int:
    """Weights the model represents (a 4-bit matrix its unpacked elements, not the packed words)."""
    from .training.trainer import count_parameters as count

    return count(model)


def config_recipe(config: xLSTMConfig) -> Any:
    """The :class:`~xlstm_metal.quantization.Recipe` of a quantized checkpoint's config (its
    ``quantization`` entry), so random weights of its shape are measured as the checkpoint runs;
    None for a float config. ValueError naming what is wrong with the entry."""
    entry = config.extra.get("quantization") or config.extra.get("quantization_config")
    if not entry:
        return None
    if not isinstance(entry, dict):  # ("quantization": "yes" was an AttributeError traceback)
        raise ValueError(f"its quantization entry must be an object (bits, group_size, ...), got {entry!r}")
    from .quantization import QuantizationError, Recipe  # noqa: PLC0415

    try:
        return Recipe.from_config(entry)
    except QuantizationError as err:
        raise ValueError(f"cannot apply its quantization entry: {err!s}") from None


def random_model(config: xLSTMConfig, dtype: str = "float32", seed: int = 0, lazy: bool = False) -> xLSTMLarge:
    """An xLSTM-Large model with random weights drawn directly in ``dtype``.

    The module's own float32 initialisers stay lazy and are never evaluated: each parameter is
    replaced by one drawn in the target dtype, and blocks are evaluated one at a time, so a 7B
    model in bfloat16 peaks near its 14 GB rather than the 28 GB a float32 copy would take.
    ``lazy``: the draws are left unevaluated too, for a caller that quantizes the model layer by
    layer (``quantization.quantize_model``): a 7B model then never holds its float weights at once.
    Scales follow NX-AI's initialisation (weights ~ N(0, 1/fan_in), input-gate bias -10,
    forget-gate biases from 3 to 6) so activations and gates look like a trained model's.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    target = getattr(mx, dtype)
    model = xLSTMLarge(config)
    key = mx.random.key(seed)
    E = config.embedding_dim

    def draw(name: str, p: mx.array, index: int) -> mx.array:
        k = mx.random.fold_in(key, index) if hasattr(mx.random, "fold_in") else mx.random.key(seed * 100003 + index)
        if name.endswith("igate_preact.bias"):
            return mx.full(p.shape, -10.0, dtype=target)
        if name.endswith("fgate_preact.bias"):
            return mx.linspace(3.0, 6.0, p.shape[0]).astype(target)
        if name.endswith(".bias"):
            return mx.zeros(p.shape, dtype=target)
        if "norm" in name:
            return mx.ones(p.shape, dtype=target)
        if name.endswith("embeddings.weight"):
            return mx.random.normal(p.shape, dtype=target, key=k) * math.sqrt(2.0 / (5 * E))
        return mx.random.normal(p.shape, dtype=target, key=k) * (p.shape[-1] ** -0.5)

    flat = tree_flatten(model.parameters())
    new = []
    for index, (name, p) in enumerate(flat):
        # One array at a time: the transient (random bits, float32 draw) never exceeds the
        # largest single matrix (the embedding), so peak ~ final size + that.
        value = draw(name, p, index)
        if not lazy:
            mx.eval(value)
        new.append((name, value))
    del flat
    model.update(tree_unflatten(new))
    return model


# ------------------------------------------------------------------------------------ forward
def prefill(
    model: xLSTMLarge, input_ids: mx.array, state: list | None = None, chunk: int | None = None
) -> tuple[mx.array, list]:
    """Prompt [B, S] -> (logits of the last position [B, V], state): :meth:`xLSTMLarge.prefill`,
    pieces of ``chunk`` tokens evaluated layer by layer (bounded memory for any length)."""
    return model.prefill(input_ids, state, chunk_size=chunk)


def cpu_float32_model(shape: str | Path, checkpoint: str | Path | None = None) -> tuple[xLSTMLarge, str]:
    """(model, name) for the CPU benchmarks: the checkpoint directory loaded in float32 (quantized
    ones dequantized), else random weights of ``shape``; projections fused."""
    if checkpoint is not None:
        from .loading import load_model  # noqa: PLC0415
        from .quantization import dequantize_model, quantization_config  # noqa: PLC0415

        model, name = load_model(checkpoint, dtype="float32"), str(checkpoint)
        if quantization_config(model) is not None:
            dequantize_model(model)
    else:
        model, name = random_model(shape_config(shape), dtype="float32"), str(shape)
    model.fuse_projections()
    return model, name


def make_decode_step(model: xLSTMLarge, compiled: bool = True) -> Callable:
    """(tokens [B, 1] int32, state) -> (next tokens [B, 1] int32, state): one greedy step."""

    def step(tokens: mx.array, state: list) -> tuple[mx.array, list]:
        logits, state = model(tokens, state)
        return mx.argmax(logits[:, -1, :], axis=-1, keepdims=True).astype(mx.int32), state

    graph_step = mx.compile(step, inputs=model.state) if compiled else step
    if cpu_decode_step.unsupported_reason(model) is not None:
        return graph_step

    def cpu_step(tokens: mx.array, state: list) -> tuple[mx.array, list]:
        # 1 to 8 rows on a CPU: the step as one C call (kernels/cpu/decode_step.py), else the graph
        out = cpu_decode_step.decode_step(model, tokens, state)
        if out is None:
            return graph_step(tokens, state)
        return mx.argmax(out[0][:, -1, :], axis=-1, keepdims=True).astype(mx.int32), out[1]

    return cpu_step


# ------------------------------------------------------------------------------- measurements
def _sync() -> None:
    mx.synchronize() if hasattr(mx, "synchronize") else None


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of evaluating ``fn()`` (synchronised), after one warm-up call."""
    mx.eval(fn())
    times = []
    for _ in range(max(1, repeats)):
        _sync()
        t0 = time.perf_counter()
        mx.eval(fn())
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_gib(model: nn.Module | None = None) -> float:
    """MLX's peak memory, plus the buffers the CPU's C step and prefill keep with ``model``
    (NumPy memory, which MLX does not count)."""
    held = cpu_decode_step.held_bytes(model) if model is not None else 0
    return (mx.get_peak_memory() + held) / _GIB


def measure_prefill(
    model: xLSTMLarge,
    length: int,
    batch: int = 1,
    chunk: int | None = None,
    repeats: int = 1,
    warmup: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Prefill ``batch`` x ``length`` random tokens; best of ``repeats``.

    Returns kind, batch, length, seconds, tok_s, ttft_s (prefill plus the first greedy token)
    and peak_mem_gb (GiB, peak since the measurement started, weights included).
    """
    V = model.config.vocab_size
    ids = mx.random.randint(0, V, (batch, length), key=mx.random.key(seed)).astype(mx.int32)
    mx.eval(ids)
    chunk = chunk or model.config.max_inference_chunksize
    if warmup:
        # Shapes up to one chunk: compiles/caches the kernels the timed run uses.
        w = ids[:, : min(length, chunk)]
        logits, state = prefill(model, w, chunk=chunk)
        mx.eval(logits, state)
        if length > chunk and length % chunk:
            logits, state = prefill(model, ids[:, : length % chunk], chunk=chunk)
            mx.eval(logits, state)
        del logits, state
    mx.clear_cache()
    mx.reset_peak_memory()
    best = math.inf
    for _ in range(max(1, repeats)):
        _sync()
        t0 = time.perf_counter()
        logits, state = prefill(model, ids, chunk=chunk)
        first = mx.argmax(logits, axis=-1)
        mx.eval(first, state)
        best = min(best, time.perf_counter() - t0)
        del logits, state, first
    return {
        "kind": "prefill",
        "batch": batch,
        "length": length,
        "seconds": best,
        "tok_s": batch * length / best,
        "ttft_s": best,
        "peak_mem_gb": _peak_gib(model),
        "chunk": chunk,
    }


def start_decode(model: xLSTMLarge, step: Callable, tok: mx.array, warmup: int = 1) -> tuple[mx.array, list]:
    """The start of a timed decode loop: the zero state for ``tok``'s rows as a generation loop
    decodes it (deferred where the device says so: :meth:`xLSTMLarge.defer_state`), then
    ``warmup`` steps or, for a deferred state, at least one per pending-term count, so every
    traced form of the compiled ``step`` exists before the timing. Returns (tok, state) after them."""
    state = model.defer_state(model.make_state(tok.shape[0]))
    mx.eval(tok, state)
    for _ in range(max(1, warmup, deferred_terms(state[0]))):
        tok, state = step(tok, state)
        mx.eval(tok, state)
    return tok, state


def measure_decode(
    model: xLSTMLarge,
    batch: int,
    tokens: int = 64,
    compiled: bool = True,
    warmup: int = 4,
    seed: int = 0,
    ahead: int | None = None,
) -> dict[str, Any]:
    """Greedy decode of ``tokens`` steps for ``batch`` rows from a zero state.

    The mLSTM state has a fixed size, so a step costs the same at any context length.
    ``ahead``: queue at most that many steps beyond the newest one whose token has been read
    back (as ``xLSTMRunner`` does with its ``lookahead``); None queues every step at once.
    Returns kind, batch, length (= tokens), seconds, tok_s (batch * tokens / seconds),
    ms_per_step and peak_mem_gb.
    """
    step = make_decode_step(model, compiled=compiled)
    V = model.config.vocab_size
    tok = mx.random.randint(0, V, (batch, 1), key=mx.random.key(seed)).astype(mx.int32)
    tok, state = start_decode(model, step, tok, warmup)
    mx.clear_cache()
    mx.reset_peak_memory()
    _sync()
    t0 = time.perf_counter()
    queued: list[mx.array] = []
    for _ in range(tokens):
        tok, state = step(tok, state)
        mx.async_eval(tok, state)
        if ahead is not None:
            queued.append(tok)
            if len(queued) > ahead:
                queued.pop(0).tolist()  # read a token back, as a generation loop does
    mx.eval(tok, state)
    seconds = time.perf_counter() - t0
    return {
        "kind": "decode",
        "batch": batch,
        "length": tokens,
        "seconds": seconds,
        "tok_s": batch * tokens / seconds,
        "ms_per_step": 1000 * seconds / tokens,
        "peak_mem_gb": _peak_gib(model),
        "compiled": compiled,
        **({"ahead": ahead} if ahead is not None else {}),
    }


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; macOS: sysctl), else platform.processor():
    CPU figures differ by model, and one machine name can stand for several."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Device, versions and BLAS: what every reported figure needs beside it."""
    from . import __version__, _blas

    info: dict[str, Any] = {
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "xlstm_metal": __version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_name": cpu_name(),
    }
    try:
        info["device_name"] = mx.device_info().get("device_name") if mx.default_device() == mx.gpu else None
    except Exception:  # device_info is missing on some backends
        info["device_name"] = None
    if mx.default_device() == mx.cpu:
        blas = _blas.info()
        info["blas"] = blas["blas"]
        info["blas_core"] = blas["core"]
        info["blas_threads"] = blas["threads"]
        info["gemv_forward"] = blas["gemv_forward"]
        info["gemv_rows"] = blas["gemv_rows"]
        info["gemv_rows_reason"] = blas["gemv_rows_reason"]
        lib = cpu_decode_step.library()
        # a compiler without OpenMP (clang without libomp) builds the C code's one-thread form,
        # which leaves the work to OpenBLAS where it runs more threads (_blas.one_thread_reason)
        info["cpu_openmp"] = bool(lib.xl_openmp()) if lib is not None else None
        threaded = lib is not None and _blas.one_thread_reason(lib, "the C code") is None
        # decode steps of 1 to 8 rows as one C call (kernels/cpu/decode_step.py) where a model allows
        info["cpu_step"] = cpu_decode_step.ENABLED and blas["gemv_rows"] and threaded
        # prompts as one C call per piece (kernels/cpu/prefill.py) where a model allows
        info["cpu_prefill"] = cpu_prefill.ENABLED and _blas.openblas_sgemm() is not None and lib is not None \
            and cpu_prefill.library_reason(lib) is None
        # its products on AMX tiles (kernels/cpu/amx_gemm.c) where the CPU has them
        info["cpu_prefill_amx"] = info["cpu_prefill"] and cpu_prefill.tiles_run(lib)
    return info


def run_suite(
    config: xLSTMConfig,
    *,
    dtype: str,
    prefill_lengths: Iterable[int] = (),
    decode_batches: Iterable[int] = (),
    decode_tokens: int = 64,
    prefill_batch: int = 1,
    prefill_chunk: int | None = None,
    repeats: int = 1,
    compiled: bool = True,
    seed: int = 0,
    model: xLSTMLarge | None = None,
) -> Iterator[dict[str, Any]]:
    """Build a random model once, then yield one record per measurement (prefill first)."""
    if model is None:
        model = random_model(config, dtype=dtype, seed=seed)
    common = {
        "dtype": dtype,
        "state_dtype": config.inference_state_dtype,
        "params": count_parameters(model),
        "weights_gb": sum(p.nbytes for _, p in tree_flatten(model.parameters())) / 1e9,
        "embedding_dim": config.embedding_dim,
        "num_blocks": config.num_blocks,
        "kernel": config.chunkwise_kernel,  # the prefill kernel (records predate the others)
        "step_kernel": config.step_kernel,  # what decode records ran
        "chunk_size": config.chunk_size,
    }
    for length in prefill_lengths:
        yield {**measure_prefill(model, length, batch=prefill_batch, chunk=prefill_chunk,
                                 repeats=repeats, seed=seed), **common}
    for batch in decode_batches:
        yield {**measure_decode(model, batch, tokens=decode_tokens, compiled=compiled, seed=seed), **common}
