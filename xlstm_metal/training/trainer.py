"""The training loop: AdamW, warmup + cosine schedule, clipping, compiled step, eval, checkpoints.

Works for any model following the project contract ``model(input_ids [B, S]) -> (logits
[B, S, V], state)`` with a ``config`` attribute that ``save_model`` can write.

Mixed precision: parameters stay float32 (the optimizer's master copy); with
``compute_dtype="bfloat16"`` the loss function casts them for the forward/backward pass, so
gradients arrive in float32. MLX's half-precision matmul is a slow fallback on CPUs: use
float32 there.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import math
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_reduce, tree_unflatten

from ..cells.embedding import embed_tokens, ordered_embedding_grads, scatter_add_is_unordered
from ..distributed import DistributedError, agree, is_main, size_and_rank
from ..kernels.fast.train_rows import (
    cast_joined, cast_many, cast_many_enabled, cross_entropy_rows, cross_entropy_rows_supported, sum_of_squares,
    sum_of_squares_supported,
)
from ..kernels.fast.chunkwise_grad import product_terms
from ..monitor import current_job
from .checkpoint import read_metrics, read_trainer_state, restore_optimizer, rewrite_trainer_state, save_checkpoint
from .data import DataPosition, PackedBatches, atomic_write_text, validation_windows

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
#: What TrainingConfig.recompute may name.
RECOMPUTE = ("none", "head", "mlstm", "ffn", "blocks")
#: What TrainingConfig.head_loss may name.
HEAD_LOSSES = ("plain", "fused")
#: What TrainingConfig.mlstm_products may name -> bf16 terms per float32 operand of the fused
#: mLSTM kernels' products (None: each kernel's default, float32's precision).
MLSTM_PRODUCTS = {"float32": None, "bf16": 1}
#: Longest automatic warmup (steps); shorter runs warm up for a tenth of their steps.
AUTO_WARMUP_CAP = 100


@dataclass
class TrainingConfig:
    """Settings of one training run (saved in every checkpoint; a resumed run reuses them)."""

    seq_len: int = 512
    batch_size: int = 16
    steps: int | None = 1000            # total optimizer steps; None: set from max_time
    max_time: float | None = None       # seconds of training (incl. eval); sizes `steps` when None
    lr: float = 1e-3
    min_lr_ratio: float = 0.1           # cosine decays to lr * min_lr_ratio
    warmup: int | None = None           # None: min(100, steps // 10), see warmup_for
    weight_decay: float = 0.1
    grad_clip: float = 1.0              # global-norm clipping; 0 disables
    beta1: float = 0.9
    beta2: float = 0.95
    dtype: str = "float32"              # compute dtype: float32 | bfloat16 | float16
    eval_every: int = 200
    eval_batches: int = 16
    save_every: int = 500
    keep: int = 2                       # checkpoints kept
    log_every: int = 10
    seed: int = 0
    # Activations recomputed in the backward pass instead of kept: "none", "head" (LM head and
    # loss), "mlstm" / "ffn" (that half of every block, its pre-norm included, and the head) or
    # "blocks" (every block, and the head). Same numbers, less memory, more compute.
    recompute: str = "none"
    # The LM head + loss: "plain" (logits kept for the backward pass) or "fused"
    # (linear_cross_entropy: gradients computed in the forward, rows at a time; no logits kept).
    head_loss: str = "plain"
    # Layers reading the same input (q|k|v|o|i|f, FFN gate|up) as one matmul each in the traced
    # step (cells.fused.traced_fusion); the same math.
    fuse_projections: bool = False
    # How the fused CUDA mLSTM kernels multiply their float32 operands (states, weighted keys,
    # score matrices) on the tensor cores: "float32" (three bf16 terms each: float32's precision)
    # or "bf16" (rounded to bf16, as NX-AI's Triton kernels do: a third of the products).
    mlstm_products: str = "float32"
    probe_steps: int = 20               # steps timed to size a max_time run
    # From step ``reschedule_step`` the schedule starts at ``reschedule_lr`` (see make_schedule):
    # set for a resumed run given new --steps / --lr and for a time budget once it is sized.
    # 0: the plain schedule.
    reschedule_step: int = 0
    reschedule_lr: float | None = None

    def warmup_for(self, total_steps: int | None) -> int:
        """Warmup steps of a run of ``total_steps``: ``warmup`` when set, else min(100,
        total_steps // 10), so short runs leave warmup too. A time budget whose step count is
        not known yet ramps as if the warmup were twice the probe (2 + probe_steps steps, capped
        at 100) until the probe has sized the run; the ramp then continues to the peak at
        min(100, steps // 10), but not before that (unless the run is shorter than 4 probes)."""
        if self.warmup is not None:
            return self.warmup
        if total_steps is None:
            return min(AUTO_WARMUP_CAP, 2 * (self.probe_steps + 2))
        return min(AUTO_WARMUP_CAP, total_steps // 10)

    def validate(self, names: dict | None = None) -> None:
        """ValueError naming every bad field; ``names`` maps fields to what the caller calls them
        (the command line's flags)."""
        problems = []
        n = (names or {}).get
        if self.seq_len < 2:
            problems.append(f"sequence length must be >= 2, got {self.seq_len}")
        for name in ("batch_size", "eval_every", "eval_batches", "save_every", "log_every", "probe_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{n(name, name)} must be >= 1, got {getattr(self, name)}")
        if self.keep < 0:
            problems.append(f"{n('keep', 'keep')} must be >= 0 (0 keeps every checkpoint), got {self.keep}")
        if self.steps is None and self.max_time is None:
            problems.append("give the number of steps or a time budget (max_time)")
        if self.steps is not None and self.steps < 1:
            problems.append(f"{n('steps', 'steps')} must be >= 1, got {self.steps}")
        if self.max_time is not None and self.max_time <= 0:
            problems.append(f"{n('max_time', 'max_time')} must be > 0, got {self.max_time}")
        if self.warmup is not None and (
                self.warmup < 0 or (self.steps is not None and self.warmup >= self.steps and self.warmup > 1)):
            problems.append(f"{n('warmup', 'warmup')} ({self.warmup}) must be in [0, steps)")
        if self.max_time is not None and self.steps is None and self.warmup is not None \
                and self.warmup <= self.probe_steps:
            problems.append(f"with a time budget, warmup ({self.warmup}) must exceed the probe steps ({self.probe_steps})")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "max_time"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):  # NaN passes every comparison below
                problems.append(f"{n(name, name)} must be a finite number, got {value}")
        # One message per bad value, naming it (a joint message left the user to guess which).
        if not self.lr > 0:
            problems.append(f"{n('lr', 'lr')} must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"{n('min_lr_ratio', 'min_lr_ratio')} must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                problems.append(f"{n(name, name)} must be >= 0, got {getattr(self, name)}")
        if self.recompute not in RECOMPUTE:
            problems.append(f"recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")
        if self.head_loss not in HEAD_LOSSES:
            problems.append(f"head_loss must be one of {', '.join(HEAD_LOSSES)}, got {self.head_loss!r}")
        if self.mlstm_products not in MLSTM_PRODUCTS:
            problems.append(f"mlstm_products must be one of {', '.join(MLSTM_PRODUCTS)}, got {self.mlstm_products!r}")
        if self.dtype not in _DTYPES:
            problems.append(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if problems:
            raise ValueError("; ".join(problems))


def capped_perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50): a diverged loss past ~709 nats overflowed math.exp."""
    return math.exp(min(loss, 50))


# ------------------------------------------------------------------------------ model init
def init_xlstm_large(model, seed: int = 0) -> None:
    """Initialise a fresh xLSTM-Large for training from scratch.

    Projections: normal(0, sqrt(2 / (5 E))) ("small init"); the layers writing into the
    residual stream (out_proj, proj_down): normal(0, 2 / (num_blocks sqrt(E))). Gate weights
    start at zero, forget-gate biases spread over [3, 6] across heads (long memory first),
    input-gate biases at -10 (xLSTM 7B: keeps early training stable). Norm weights stay 1.
    """
    cfg = model.config
    E, NH = cfg.embedding_dim, cfg.num_heads
    small = math.sqrt(2 / (5 * E))
    wang = 2 / (cfg.num_blocks * math.sqrt(E))
    key = mx.random.key(seed)
    new = []
    for index, (name, p) in enumerate(tree_flatten(model.parameters())):
        k = mx.random.fold_in(key, index) if hasattr(mx.random, "fold_in") else mx.random.split(key, index + 2)[-1]
        if "norm" in name:
            value = mx.ones_like(p)
        elif name.endswith(("igate_preact.weight", "fgate_preact.weight")):
            value = mx.zeros_like(p)
        elif name.endswith("igate_preact.bias"):
            value = mx.full(p.shape, -10.0)
        elif name.endswith("fgate_preact.bias"):
            value = mx.linspace(3.0, 6.0, NH)
        elif name.endswith(".bias"):
            value = mx.zeros_like(p)
        elif name.endswith(("out_proj.weight", "proj_down.weight")):
            value = mx.random.normal(p.shape, key=k) * wang
        else:
            value = mx.random.normal(p.shape, key=k) * small
        new.append((name, value.astype(p.dtype)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def count_parameters(model) -> int:
    """Weights the model represents (a quantized matrix its unpacked elements, as convert and
    ``generate --info`` count them; :func:`~xlstm_metal.quantization.parameter_count`)."""
    from ..quantization import parameter_count

    return parameter_count(model)


# ------------------------------------------------------------------------------ pieces
def _no_decay(path: str, value: mx.array) -> bool:
    """Only matrices decay: vectors and scalars (norm weights, biases, whatever their name, e.g.
    an sLSTM cell's ``_bias_``) and embeddings do not (decay would pull norms to 0)."""
    return value.ndim < 2 or "norm" in path or path.endswith(".bias") or "embeddings" in path


def make_optimizer(cfg: TrainingConfig, model=None) -> optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only; the learning rate is set per step.
    Its AdamWs take the gradients' clip scale as ``grad_scale`` (:class:`ScaledAdamW`: one CUDA
    kernel per parameter on NVIDIA GPUs, MLX's ops elsewhere).

    A model with a ``decays(path) -> bool`` method (the 2024 xLSTM: NX-AI's split) chooses
    which parameters decay; otherwise only matrices do, embeddings and norms not (:func:`_no_decay`)."""
    from ..kernels.fast.adamw import ScaledAdamW, adamw_in_place_enabled

    # In place (CUDA): the trainer owns the parameters and replaces them every step.
    in_place = adamw_in_place_enabled()
    decayed = ScaledAdamW(learning_rate=cfg.lr, betas=[cfg.beta1, cfg.beta2], weight_decay=cfg.weight_decay,
                          in_place=in_place)
    plain = ScaledAdamW(learning_rate=cfg.lr, betas=[cfg.beta1, cfg.beta2], weight_decay=0.0, in_place=in_place)
    if model is not None and callable(getattr(model, "decays", None)):
        no_decay = lambda path, _value: not model.decays(path)  # noqa: E731
    else:
        no_decay = _no_decay
    return optim.MultiOptimizer([plain, decayed], [no_decay])


def make_schedule(cfg: TrainingConfig, total_steps: int | None) -> Callable[[int], mx.array | float]:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at the last step.

    ``total_steps=None`` (a time budget not sized yet): the warmup ramp alone. With
    ``cfg.reschedule_step`` (a resumed run given new --steps / --lr, or a time budget once
    sized) the schedule from that step starts at ``cfg.reschedule_lr``: a linear ramp to lr at
    the end of the warmup if it is not over yet, else straight into the cosine."""
    warmup = cfg.warmup_for(total_steps)
    if total_steps is None:
        return optim.linear_schedule(cfg.lr / max(warmup, 1), cfg.lr, max(warmup, 1))
    start = cfg.reschedule_step
    lr0 = cfg.reschedule_lr if start else cfg.lr / max(warmup, 1)
    floor = cfg.lr * cfg.min_lr_ratio
    if start < warmup:
        ramp = optim.linear_schedule(lr0, cfg.lr, warmup - start)
        peak_at, peak = warmup, cfg.lr
    else:
        ramp, peak_at, peak = None, start, lr0
    decay = optim.cosine_decay(peak, max(total_steps - 1 - peak_at, 1), floor)  # the last step runs at the floor

    def schedule(step: int):
        if step >= peak_at:
            return decay(step - peak_at)
        return ramp(max(step - start, 0))  # steps before `start` are never run again

    return schedule


#: MLX's CUDA command-buffer limits for training: (MLX_MAX_OPS_PER_BUFFER, MLX_MAX_MB_PER_BUFFER).
#: MLX keeps every op's inputs until the GPU has run the command buffer holding the op, and
#: evaluation runs up to 10 buffers ahead (MLX's defaults on sm_90: 100 ops / 1,000 MB each): a
#: train step's freed activations and gradients wait there. Smaller buffers free them sooner:
#: at the 1.3b shape (H200, GPU round S7R1) the step's peak fell 47.2 -> 40.3 GB for 183.1 ->
#: 190.1 ms per step with 20 ops / 256 MB; 40 / 512 is the middle ground (S8R2, bf16 products:
#: 175.4 ms at 38.8 GB against 178.2 ms at 36.9 GB with 20 / 256; S8R1: 30 / 384 no faster).
TRAIN_COMMAND_BUFFERS = (40, 512)


def limit_command_buffers() -> None:
    """Set :data:`TRAIN_COMMAND_BUFFERS` for this process on CUDA unless the environment already
    names either limit. MLX reads them once, at its first command buffer: call before the first
    GPU evaluation (``xlstm-metal train`` does, first thing)."""
    from ..kernels.fast.step import cuda_available

    if not cuda_available() or "MLX_MAX_OPS_PER_BUFFER" in os.environ or "MLX_MAX_MB_PER_BUFFER" in os.environ:
        return
    os.environ["MLX_MAX_OPS_PER_BUFFER"], os.environ["MLX_MAX_MB_PER_BUFFER"] = map(str, TRAIN_COMMAND_BUFFERS)


def build_thread_enabled() -> bool:
    """Whether a training loop builds the next step's graph on a second host thread while this
    step's command buffers are queued (:class:`StepBuilder`; ``XLSTM_METAL_TRAIN_BUILD_THREAD``
    1 on, 0 off; default on where MLX runs CUDA, off elsewhere).

    On CUDA it pays (H200, 1.3b, 4 x 2,048, one compiled step, blocks of 12 steps alternating
    the plain and the threaded loop; session 13, benchmarks/NOTES.md): 162.4 ms per step against
    171.8 (three pairs, S13R2), 163.8 against 179.6 (S13R1), 160.2 against 167.2 (S13R3). Not
    measured on Metal; on the CPU the host builds while it also computes, so there it stays off."""
    setting = os.environ.get("XLSTM_METAL_TRAIN_BUILD_THREAD", "")
    if setting in ("0", "1"):
        return setting == "1"
    from ..kernels.fast.step import cuda_available

    return cuda_available()


class StepBuilder:
    """Builds train steps' graphs (calls of the compiled step) on a background host thread while
    the calling thread queues the previous step's GPU work.

    ``mx.async_eval`` returns only once all but MLX's last ~10 command buffers of a step are
    queued (it releases the GIL meanwhile), and the next step's graph takes the host 8-20 ms to
    build (the compiled step's replay): built after async_eval, it shows as GPU idle time when it
    outlasts those buffers. Built here, it overlaps the queueing instead. Each build runs with the
    default device and stream the builder was made under, so the compiled step finds its cached
    trace (the cache is keyed by the default stream) and its ops go to the stream the caller
    evaluates.

    Every builder shares one daemon thread that lives as long as the process: with MLX 0.32.4 a
    process in which a thread that had built MLX graphs ended (a thread pool's, joined) aborted at
    exit now and then ("terminate called without an active exception": 3 of 20 runs of a small
    training loop on the CPU, and on CUDA after the H200 benchmark), never with the thread kept.

    The caller owns the ordering: it must not read or write the model's or optimizer's state
    while a build is running (the compiled step replaces their arrays), and it passes
    ``mx.async_eval`` the arrays of the step it queues (:func:`state_arrays`), not the state
    trees, which the build may already have advanced."""

    _queue: queue.SimpleQueue | None = None
    _lock = threading.Lock()

    def __init__(self):
        self._device = mx.default_device()
        self._stream = mx.default_stream(self._device)
        self._futures: list[Future] = []
        with StepBuilder._lock:
            if StepBuilder._queue is None:
                StepBuilder._queue = queue.SimpleQueue()
                threading.Thread(target=_serve_builds, args=(StepBuilder._queue,), name="xlstm-step-build",
                                 daemon=True).start()

    def submit(self, fn: Callable, *args) -> Future:
        """``fn(*args)`` on the builder thread: a ``concurrent.futures.Future``."""
        future: Future = Future()
        self._futures = [f for f in self._futures if not f.done()] + [future]
        StepBuilder._queue.put((future, self._device, self._stream, fn, args))
        return future

    def close(self) -> None:
        """Wait for the builds submitted to this builder (the thread stays for the next one)."""
        futures_wait(self._futures)
        self._futures = []


def _serve_builds(jobs: queue.SimpleQueue) -> None:
    """The builder thread's loop: each job runs under its builder's default device and stream."""
    while True:
        future, device, stream, fn, args = jobs.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            mx.set_default_device(device)
            mx.set_default_stream(stream)
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001  (handed to the caller through the future)
            future.set_exception(err)


def state_arrays(*trees) -> list[mx.array]:
    """The arrays among the leaves of ``trees`` (e.g. ``model.state``, ``optimizer.state``), as
    they are now."""
    return [v for tree in trees for _, v in tree_flatten(tree) if isinstance(v, mx.array)]


def _restore_leaves(tree, flat: list[tuple[str, Any]]) -> None:
    """Put the ``tree_flatten`` leaves ``flat`` back into ``tree`` in place (the containers
    themselves kept: a compiled step holds them as its state)."""
    for path, value in flat:
        keys = path.split(".")
        node = tree
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, (list, tuple)) else node[key]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value


def _progress_postfix(loss: float, tok_s: float, lr: float) -> str:
    """The progress bar's right-hand part: the training loss of the latest steps shown."""
    return f"loss {loss:.3f} | {tok_s:,.0f} tok/s | lr {lr:.2e}"


def _compiling_note() -> str:
    """The progress bar's label during the first step, which compiles it."""
    from ..kernels.fast.step import cuda_available

    if not cuda_available():
        return "train (compiling the step)"
    cache = os.environ.get("MLX_PTX_CACHE_DIR") or "MLX's temporary directory"
    return f"train (compiling the step's CUDA kernels: minutes the first time on a machine, then cached in {cache})"


def _as_float(value: mx.array | float) -> float:
    return float(value.item() if isinstance(value, mx.array) else value)


def cast_floating(params, dtype: mx.Dtype):
    """``params`` with every floating-point array cast to ``dtype`` (integer arrays as they are)."""
    return tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, params)


def clip_scale(grads, max_norm: float) -> tuple[mx.array, mx.array]:
    """(global norm, scale) of ``optim.clip_grad_norm`` for the gradients cast to float32 (the
    same numbers), gradients of any float dtype: the clipped gradients are ``g * scale`` in
    float32. The casts happen inside the kernels that read the gradients (the squares here, the
    optimizer's update), so float32 copies of all gradients are never held at once. On CUDA
    the squares are one kernel launch for all gradients
    (:func:`~xlstm_metal.kernels.fast.train_rows.sum_of_squares`; float32 round-off apart)."""
    leaves = [g for _, g in tree_flatten(grads)]
    if sum_of_squares_supported(leaves):
        total = mx.sqrt(sum_of_squares(leaves))
    else:
        total = mx.sqrt(tree_reduce(lambda acc, g: acc + mx.square(g.astype(mx.float32)).sum(), grads, 0.0))
    return total, mx.minimum(max_norm / (total + 1e-6), 1.0)


def _parts(optimizer) -> list:
    """The optimizers inside ``optimizer`` (a ``MultiOptimizer``'s parts, or itself)."""
    return list(getattr(optimizer, "optimizers", [optimizer]))


def _set_grad_scale(optimizer, scale: mx.array | None) -> bool:
    """Hand the clip scale to optimizers that apply it themselves (:class:`ScaledAdamW`);
    False (nothing set) if any does not."""
    from ..kernels.fast.adamw import ScaledAdamW

    subs = _parts(optimizer)
    if not all(isinstance(sub, ScaledAdamW) for sub in subs):
        return False
    for sub in subs:
        sub.grad_scale = scale
    return True


def _updates_in_place(optimizer) -> bool:
    """Whether any of the optimizer's AdamWs writes over the parameters (:class:`ScaledAdamW`
    with ``in_place`` on CUDA)."""
    from ..kernels.fast.adamw import ScaledAdamW, fused_adamw_enabled

    return fused_adamw_enabled() and any(isinstance(sub, ScaledAdamW) and sub.in_place for sub in _parts(optimizer))


def _set_learning_rate(optimizer, lr: mx.array) -> None:
    for sub in _parts(optimizer):
        sub.learning_rate = lr


@mx.custom_function
def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean next-token cross-entropy (float32) of logits [B, S, V] (any float dtype) and targets
    [B, S]: ``nn.losses.cross_entropy`` of the float32 logits, with a vjp that keeps only the
    logits themselves for the backward pass (autodiff would keep their float32 copy and the
    log-softmax: ~2 x 1.6 GB at 8,192 tokens and a 50k vocabulary)."""
    lf = logits.astype(mx.float32)
    picked = mx.take_along_axis(lf, targets[..., None], axis=-1)[..., 0]
    return mx.mean(mx.logsumexp(lf, axis=-1) - picked)


@cross_entropy.vjp
def _cross_entropy_vjp(primals, cotangent, _output):
    logits, targets = primals
    lf = logits.astype(mx.float32)
    probs = mx.exp(lf - mx.logsumexp(lf, axis=-1, keepdims=True))
    grad = (probs - (mx.arange(lf.shape[-1]) == targets[..., None])) * (cotangent / targets.size)
    return grad.astype(logits.dtype), mx.zeros_like(targets)


#: Rows (tokens) of logits that :func:`linear_cross_entropy` holds at a time (float32 ops).
HEAD_LOSS_ROWS = 2048
#: The same with its CUDA kernel, which holds no float32 logits (bf16 logits and gradient:
#: 2 x 824 MB at 8,192 tokens and a 50k vocabulary).
HEAD_KERNEL_ROWS = 8192
_linear_ce: dict[tuple[float | None, int], Callable] = {}


def linear_cross_entropy(x: mx.array, weight: mx.array, targets: mx.array, soft_cap: float | None = None,
                         rows: int = HEAD_LOSS_ROWS) -> mx.array:
    """Mean next-token cross-entropy (float32) of the logits ``soft_cap(x @ weight.T)`` without
    keeping them: x [T, E] (the normed hidden states), weight [V, E] (the LM head), targets [T].

    The forward computes the gradients too, ``rows`` tokens of logits at a time (float32 there,
    the gradient of the logits rounded to x's dtype), and keeps only d loss / dx [T, E] and
    d loss / d weight [V, E] for the backward, which scales them by the loss's cotangent. The
    plain head keeps the [T, V] logits (and the soft cap's input) from the forward to the
    backward and materialises their gradient at the backward's start, when every block's
    activations are still held: 2 x 0.8 GB at 8,192 tokens and a 50k vocabulary, plus float32
    temporaries. The logits are x @ weight.T in x's dtype as :class:`mlx.nn.Linear` computes
    them; the soft cap and the softmax run in float32 (on CUDA in one kernel per
    :data:`HEAD_KERNEL_ROWS` tokens, :func:`~xlstm_metal.kernels.fast.train_rows.cross_entropy_rows`)."""
    key = (None if soft_cap is None else float(soft_cap), int(rows))
    fn = _linear_ce.get(key)
    if fn is None:
        cap = key[0]

        @mx.custom_function
        def fn(x, weight, targets):
            T, V = x.shape[0], weight.shape[0]
            # On CUDA (bf16): the loss and gradient rows as one kernel reading the bf16 logits, up
            # to HEAD_KERNEL_ROWS tokens at a time (no float32 logits are held).
            kernel = weight.dtype == x.dtype and cross_entropy_rows_supported(x.dtype, V)
            step = max(rows, HEAD_KERNEL_ROWS) if kernel else rows
            total, grads = None, []
            for start in range(0, T, step):
                tc = targets[start : start + step]
                if kernel:
                    g, row_loss = cross_entropy_rows(x[start : start + step] @ weight.T, tc, cap)
                    part = mx.sum(row_loss)
                    total = part if total is None else total + part
                    grads.append(g)
                    continue
                z = (x[start : start + step] @ weight.T).astype(mx.float32)
                if cap is not None:
                    t = mx.tanh(z / cap)
                    z = cap * t
                lse = mx.logsumexp(z, axis=-1, keepdims=True)
                part = mx.sum(lse[:, 0] - mx.take_along_axis(z, tc[:, None], axis=-1)[:, 0])
                total = part if total is None else total + part
                g = mx.exp(z - lse) - (mx.arange(V) == tc[:, None])
                if cap is not None:
                    g = g * (1 - t * t)
                grads.append(g.astype(x.dtype))
            g = mx.concatenate(grads, axis=0) if len(grads) > 1 else grads[0]  # [T, V], x's dtype
            return total / T, (g @ weight) / T, (g.T @ x) / T

        @fn.vjp
        def fn_vjp(primals, cotangents, outputs):
            x, weight, targets = primals
            _, dx, dw = outputs
            c = cotangents[0]
            return (dx * c).astype(x.dtype), (dw * c).astype(weight.dtype), mx.zeros_like(targets)

        _linear_ce[key] = fn
    return fn(x, weight, targets)[0]


def fused_head_weight(model) -> mx.array | None:
    """The LM head's weight [V, E] when the head is a plain product (xLSTM-Large: an unbiased
    ``nn.Linear`` or the tied embeddings; a lab model of the large layout alike); None for anything
    else (quantized, adapted, other models)."""
    if not callable(getattr(model, "hidden", None)) or getattr(model, "backbone", None) is None:
        return None
    if model.config.tie_word_embeddings:
        emb = model.backbone.embeddings
        return emb.weight if type(emb) is nn.Embedding else None
    head = getattr(model, "lm_head", None)
    return head.weight if type(head) is nn.Linear and "bias" not in head else None


def _checkpointed(modules: list[nn.Module], fn: Callable) -> Callable:
    """``fn(*args)`` under ``mx.checkpoint``: only its inputs and the modules' parameters are
    kept for the backward pass, which recomputes the rest. The recomputation runs under the
    context settings the forward ran with (the mLSTM kernels' product terms, traced fusion, ...),
    not under whatever holds when the backward is built."""

    def inner(params, *args):
        for module, p in zip(modules, params):
            module.update(p)
        return fn(*args)

    def call(*args):
        context = contextvars.copy_context()
        run = mx.checkpoint(lambda params, *a: context.run(inner, params, *a))
        return run([m.trainable_parameters() for m in modules], *args)

    return call


def _block_runner(block: nn.Module, recompute: str) -> Callable:
    """x [B, S, E] -> the block's output, with the part ``recompute`` names under checkpoint."""
    from ..blocks.xlstm_large import _normed, mLSTMBlock

    halves = recompute in ("mlstm", "ffn")
    # (a user's module in mlstm_layer runs as it is: not fused)
    fused = getattr(block.mlstm_layer, "fused", False) if isinstance(block, mLSTMBlock) else True
    if recompute == "blocks" or (halves and fused):
        return _checkpointed([block], lambda x: block(x)[0])
    if not halves:
        return lambda x: block(x)[0]

    # mLSTMBlock.__call__'s unfused path (pre-norm mLSTM layer, residual, pre-norm FFN, residual;
    # training never fuses projections) with one half under checkpoint.
    def mlstm(x):
        return block.mlstm_layer(_normed(block.norm_mlstm(x), block.norm_mlstm))[0]

    def ffn(x):
        return block.ffn(_normed(block.norm_ffn(x), block.norm_ffn))

    if recompute == "mlstm":
        mlstm = _checkpointed([block.norm_mlstm, block.mlstm_layer], mlstm)
    else:
        ffn = _checkpointed([block.norm_ffn, block.ffn], ffn)

    def run(x):
        x = x + mlstm(x)
        return x + ffn(x)

    return run


def _block_runner_2024(block: nn.Module, recompute: str) -> Callable:
    """A 2024 xLSTM block (``_Block2024``: pre-norm mLSTM or sLSTM layer, residual, and for sLSTM
    blocks a pre-norm FFN, residual) with the part ``recompute`` names under checkpoint: "mlstm"
    is the sequence-mixing half of every block (its mLSTM or sLSTM layer), "ffn" the FFN half."""
    if recompute == "blocks":
        return _checkpointed([block], lambda x: block(x)[0])
    if recompute not in ("mlstm", "ffn"):
        return lambda x: block(x)[0]

    def mixer(x):
        return block.xlstm(block.xlstm_norm(x))[0]

    def ffn(x):
        return block.ffn(block.ffn_norm(x))

    if recompute == "mlstm":
        mixer = _checkpointed([block.xlstm_norm, block.xlstm], mixer)
    elif "ffn" in block:
        ffn = _checkpointed([block.ffn_norm, block.ffn], ffn)

    def run(x):
        x = x + mixer(x)
        return x + ffn(x) if "ffn" in block else x

    return run


def _recomputing_forward_2024(model, recompute: str) -> Callable:
    """:func:`_recomputing_forward` for the 2024 xLSTM (``xLSTMLMModel``)."""
    cfg = model.config
    ff = cfg.slstm_block.feedforward if cfg.slstm_block is not None else None
    dropout = max(cfg.dropout, ff.dropout if ff is not None else 0.0)
    if dropout > 0:
        # The backward re-runs a checkpointed part, which would draw new dropout masks.
        raise ValueError(f"recompute={recompute!r} needs dropout 0 (the model's is {dropout})")
    stack = model.xlstm_block_stack
    head_modules = [stack.post_blocks_norm] if "post_blocks_norm" in stack else []
    head_modules.append(model.lm_head if "lm_head" in model else model.token_embedding)

    def head(x, targets):
        if "post_blocks_norm" in stack:
            x = stack.post_blocks_norm(x)
        logits = model.lm_head(x) if "lm_head" in model else model.token_embedding.as_linear(x)
        return cross_entropy(logits, targets)

    return _forward_with(model.token_embedding, [_block_runner_2024(b, recompute) for b in model.blocks],
                         head_modules, head)


def _forward_with(embed: Callable, blocks: list[Callable], head_modules: list[nn.Module], head: Callable) -> Callable:
    """(inputs, targets) -> loss: embedding, the block runners, then the LM head + loss under
    checkpoint (its modules' parameters ``head_modules``)."""

    def forward(inputs, targets):
        x = embed_tokens(embed, inputs)
        for block in blocks:
            x = block(x)
        # targets (integers) are no input of the checkpoint: it differentiates every input.
        return _checkpointed(head_modules, lambda x: head(x, targets))(x)

    return forward


def _recomputing_forward(model, recompute: str) -> Callable | None:
    """(inputs [B, S], targets [B, S]) -> loss for an xLSTM-Large or a 2024 xLSTM with the LM
    head + loss and the parts of each block that ``recompute`` names under ``mx.checkpoint``;
    None for ``recompute="none"``: the plain forward. Other models (lab models) take only
    "none"; a ValueError names the problem otherwise."""
    if recompute == "none":
        return None
    if hasattr(model, "xlstm_block_stack"):
        return _recomputing_forward_2024(model, recompute)
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(model, "_logits"):
        raise ValueError(f"recompute={recompute!r} works for xLSTM-Large and the 2024 xLSTM, "
                         f"not for {type(model).__name__}")
    head_modules = [backbone.out_norm] if "out_norm" in backbone else []
    head_modules.append(backbone.embeddings if model.config.tie_word_embeddings else model.lm_head)

    def head(x, targets):
        if "out_norm" in backbone:
            x = backbone.out_norm(x)
        return cross_entropy(model._logits(x), targets)

    return _forward_with(backbone.embeddings, [_block_runner(b, recompute) for b in backbone.blocks],
                         head_modules, head)


def make_loss_fn(model, compute_dtype: mx.Dtype, recompute: str = "none", head_loss: str = "plain",
                 fuse_projections: bool = False, mlstm_products: str = "float32") -> Callable:
    """(params, inputs [B, S], targets [B, S]) -> mean next-token cross-entropy (float32).

    ``recompute`` (see :class:`TrainingConfig`): the same loss with activations recomputed
    in the backward pass (xLSTM-Large and the 2024 xLSTM; ValueError for other models). ``head_loss=
    "fused"``: the LM head and the loss as :func:`linear_cross_entropy` (xLSTM-Large with a
    plain head, no recompute; otherwise the plain head). ``fuse_projections``: layers that read
    the same input run as one matmul (:func:`~xlstm_metal.cells.fused.traced_fusion`).
    ``mlstm_products``: see :class:`TrainingConfig` (the fused CUDA mLSTM kernels only). On a GPU
    the embedding gradient sums each id's rows in one fixed order
    (:func:`~xlstm_metal.cells.embedding.ordered_embedding_grads`), so runs repeat bit for bit."""
    from ..cells.fused import traced_fusion
    from ..kernels.fast.chunkwise_grad import entering_states_kept, final_states_unread, keep_states_enabled
    from ..kernels.fast.train_rows import counting_ffns

    terms = MLSTM_PRODUCTS[mlstm_products]
    keep = keep_states_enabled()
    # A GPU's scatter-add sums repeated ids' rows in thread order: the embedding gradient (and
    # so the run) would differ in the last bits from one run to the next.
    ordered_grads = scatter_add_is_unordered()

    forward = _recomputing_forward(model, recompute)
    fused_head = head_loss == "fused" and forward is None and fused_head_weight(model) is not None

    def loss(inputs, targets):
        if forward is not None:
            return forward(inputs, targets)
        if fused_head:
            x, _ = model.hidden(inputs)
            E = x.shape[-1]
            return linear_cross_entropy(x.reshape(-1, E), fused_head_weight(model), targets.reshape(-1),
                                        model.config.output_logit_soft_cap)
        logits, _ = model(inputs)
        return cross_entropy(logits, targets)

    def loss_fn(params, inputs, targets):
        model.update(params if compute_dtype == mx.float32 else cast_floating(params, compute_dtype))
        # The loss reads the logits alone: no layer's final recurrent state carries a gradient.
        # The fused mLSTM kernels' forward keeps its entering states for the backward where
        # that is on (bf16 products; keep_states_enabled).
        with traced_fusion(fuse_projections), final_states_unread(), product_terms(terms), \
                entering_states_kept(keep), ordered_embedding_grads(ordered_grads), counting_ffns():
            return loss(inputs, targets)

    return loss_fn


def joined_weight_groups(model) -> list[tuple[nn.Module, list[list[str]]]]:
    """The modules whose projections the traced training step runs as one matmul per group
    (:func:`~xlstm_metal.cells.fused.traced_fusion`: each xLSTM-Large mLSTM layer's q|k|v|o|i|f,
    each FFN's gate|up), with the trainable parameter paths of each group's weights in group
    order. Modules fused for inference or with frozen or non-float32 members are left out (the
    step concatenates those in the traced graph as before)."""
    from ..cells.ffn import _GATE_UP, FeedForward
    from ..cells.fused import fusion_groups
    from ..neurons.mlstm import mLSTMNeuron

    trainable = dict(tree_flatten(model.trainable_parameters()))
    found = []
    for path, module in model.named_modules():
        if isinstance(module, mLSTMNeuron):
            fusion = module.projection_cell.fusion
        elif type(module) is FeedForward:
            fusion = _GATE_UP
        else:
            continue
        if fusion.key in module:
            continue
        groups = fusion_groups(fusion.layers(module))
        if not groups or any(kind[0] != "linear" for kind, _ in groups):
            continue
        prefix = f"{path}." if path else ""
        paths = [[f"{prefix}{fusion.names[j]}.weight" for j in members] for _, members in groups]
        if all(p in trainable and trainable[p].dtype == mx.float32 for group in paths for p in group):
            found.append((module, paths))
    return found


def _joined_loss(loss_fn: Callable, joined: list[tuple[nn.Module, list[list[str]]]]) -> Callable:
    """((compute copies without the joined groups' members, [per module: [joined weight per
    group]]), inputs, targets) -> ``loss_fn``'s loss, the groups running on the joined weights."""
    from ..cells.fused import joined_weights

    def loss(copies_and_joined, inputs, targets):
        copies, buffers = copies_and_joined
        with joined_weights({id(module): bufs for (module, _), bufs in zip(joined, buffers)}):
            return loss_fn(copies, inputs, targets)

    return loss


def _split_joined_grads(g_copies, g_buffers, joined, flat_params: dict[str, mx.array]):
    """The gradient tree of the parameters: ``g_copies``' entries and, for each joined group's
    members, row views of the group's gradient."""
    flat = dict(tree_flatten(g_copies))
    for (_, groups), bufs in zip(joined, g_buffers):
        for paths, g in zip(groups, bufs):
            start = 0
            for p in paths:
                rows = flat_params[p].shape[0]
                flat[p] = g[start : start + rows]
                start += rows
    return tree_unflatten(list(flat.items()))


def stream_fingerprint(stream: np.ndarray) -> str:
    """Identifies a token stream (to refuse resuming on different data)."""
    return f"{len(stream)}:{hashlib.sha1(np.ascontiguousarray(stream[:1_000_000]).tobytes()).hexdigest()[:16]}"


# ------------------------------------------------------------------------------ metrics
def plot_metrics(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Loss curve PNG (train loss per logged step, validation loss at each eval), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:  # markers where there are few points: a line through one point draws nothing
        ax.plot(*zip(*train), lw=1, label="train loss", color="tab:blue", marker="o" if len(train) < 50 else None,
                ms=3)
    if val:
        ax.plot(*zip(*val), "o-", ms=3, lw=1.5, label="validation loss", color="tab:orange")
        best = min(val, key=lambda sv: sv[1])
        ax.annotate(f"best {best[1]:.3f} (ppl {capped_perplexity(best[1]):.1f})", best, textcoords="offset points",
                    xytext=(0, 12), ha="center", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "xlstm-metal train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)  # mkstemp files are 0600
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------ divergence
class TrainingDiverged(Exception):
    """The run diverged: a loss the trainer reads on the host anyway (the per-step training losses
    at each log point, a validation loss), the gradient norm logged with them, or the weights about
    to be checkpointed are NaN or infinite. Raised on every rank (those values are all-reduced, the
    weights alike on every rank), before anything non-finite is logged, checkpointed or exported; the
    checkpoints written before stay.

    step: the step where it was seen; what: what was not finite ("the training loss is nan");
    checkpoint: the last complete checkpoint of the run's directory (None: none; always None on
    ranks other than 0)."""

    def __init__(self, step: int, what: str, checkpoint: Path | None, lr: float | None = None,
                 grad_clip: float | None = None):
        where = (f"the last checkpoint, written before, is {checkpoint}" if checkpoint is not None
                 else "no checkpoint was written")
        rate = f", {lr:g} in this run" if lr is not None else ""
        clip = ("" if grad_clip is None else ", off in this run" if grad_clip <= 0 else f", {grad_clip:g} in this run")
        super().__init__(
            f"training diverged at step {step}: {what}; stopped without saving these weights ({where}). "
            f"Lower the learning rate (--lr{rate}) or check the gradient clipping (--grad-clip{clip})")
        self.step, self.what, self.checkpoint, self.lr = step, what, checkpoint, lr


# ------------------------------------------------------------------------------ Ctrl-C
class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after a step, with a checkpoint that resumes it exactly.

    step: the last step run; checkpoint: its checkpoint (None on ranks other than 0)."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"training interrupted at step {step}")
        self.step, self.checkpoint = step, checkpoint


class StopOnCtrlC:
    """While active, the first SIGINT (Ctrl-C) only sets :attr:`requested`, which the training
    loop reads after each step, and puts the previous handler back, so a second Ctrl-C raises
    KeyboardInterrupt at once (no checkpoint). Active only in the main thread and where Python's
    own handler is installed (a caller's handler is left alone)."""

    def __init__(self, note: bool = True):
        self.requested = False
        #: Set once the last step has run: a Ctrl-C then lets the run's final evaluation and
        #: checkpoint finish (the same as stopping after a step), and says so.
        self.finishing = False
        self._note = note
        self._old: Any = None

    def __enter__(self) -> "StopOnCtrlC":
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, _signum, _frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._old)
        if self._note:  # os.write, not print: the handler may run inside a write to sys.stderr
            os.write(2, b"\nCtrl-C: the last step has run; finishing its evaluation and checkpoint (Ctrl-C again "
                        b"aborts without them)\n" if self.finishing else
                     b"\nCtrl-C: stopping after this step to save a checkpoint (Ctrl-C again aborts "
                     b"without one)\n")

    def __exit__(self, *_exc) -> None:
        if self._old is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._old)
        self._old = None


# ------------------------------------------------------------------------------ trainer
@dataclass
class TrainResult:
    step: int
    tokens: int
    elapsed: float
    losses: list[tuple[int, float]] = field(default_factory=list)   # (step, train loss) logged
    evals: list[tuple[int, float]] = field(default_factory=list)    # (step, validation loss)
    best_val_loss: float | None = None
    best_step: int | None = None
    checkpoint: Path | None = None



class _HostCopy:
    """An array's bits in host memory (numpy; bfloat16 read as uint16), sharing no buffer with it."""

    def __init__(self, value: mx.array):
        import numpy as np

        self.dtype = value.dtype
        self.bits = np.array(value.view(mx.uint16) if value.dtype == mx.bfloat16 else value, copy=True)

    def array(self) -> mx.array:
        out = mx.array(self.bits)
        return out.view(mx.bfloat16) if self.dtype == mx.bfloat16 else out

class Trainer:
    """Trains ``model`` on packed token streams.

    Args:
        model: the model (parameters float32).
        train_stream, val_stream: int32 token streams (see ``data.split_stream``). An empty
            ``val_stream`` (validation fraction 0) trains without validation: no evaluations,
            no best validation loss, checkpoints kept by step alone.
        cfg: the run's settings.
        out_dir: where checkpoints, metrics.jsonl and loss.png go.
        tokenizer_dir: a directory with tokenizer.json (+ tokenizer_config.json), copied into
            each checkpoint.
        progress: show a tqdm bar.
        group: an ``mx.distributed`` group for data-parallel training (``mlx.launch``). Every
            rank builds the same trainer (same model, streams and settings); each takes its
            ``batch_size / group.size()`` rows of every global batch, gradients are averaged
            across ranks inside the compiled step, and rank 0 alone writes checkpoints, metrics
            and plots. The weights after each step equal one process's with the same global batch.
    """

    def __init__(self, model, train_stream: np.ndarray, val_stream: np.ndarray, cfg: TrainingConfig,
                 out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, *, progress: bool = True,
                 extra_state: dict[str, Any] | None = None, group: mx.distributed.Group | None = None):
        cfg.validate()
        self.group = group if group is not None and group.size() > 1 else None
        self.world, self.rank = size_and_rank(self.group)
        if cfg.batch_size % self.world:
            raise ValueError(f"the batch size ({cfg.batch_size}) is the global batch and must be divisible by the "
                             f"number of processes ({self.world})")
        self.is_main = is_main(self.group)
        # This rank's rows of each global batch.
        rows = cfg.batch_size // self.world
        self.rows = slice(self.rank * rows, (self.rank + 1) * rows)
        self.model, self.cfg = model, cfg
        _recomputing_forward(model, cfg.recompute)  # a ValueError now if the model cannot take it
        self.out_dir, self.tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
        self.progress = progress and self.is_main
        self.extra_state = dict(extra_state or {})
        self.batches = PackedBatches(train_stream, cfg.seq_len, cfg.batch_size, cfg.seed)
        #: Whether the run has a validation split (an empty val_stream: none).
        self.validating = len(val_stream) > 0
        self.val = (validation_windows(val_stream, cfg.seq_len, cfg.eval_batches * cfg.batch_size)
                    if self.validating else np.zeros((0, cfg.seq_len + 1), np.int32))
        self.fingerprint = stream_fingerprint(train_stream)
        self.val_fingerprint = stream_fingerprint(val_stream)
        self.compute_dtype = _DTYPES[cfg.dtype]
        self.optimizer = make_optimizer(cfg, model)
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        #: A time budget stopped the run (spent, or too little of it left for one more step with
        #: its evaluation and checkpoint): the run is finished, as one at its last step.
        self.budget_spent = False
        #: The evaluation due at ``step`` has not run (the memory watchdog stopped the run right
        #: after the step): a resumed run runs it before its first step.
        self.eval_pending = False
        self.total_steps = cfg.steps
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        #: The parameters at ``best_step`` (:meth:`_keep_best_params`), for ``train --export``.
        self.best_params: dict | None = None
        self.records: list[dict[str, Any]] = []
        #: Losses of the steps since the last metrics.jsonl record (saved with checkpoints, so the
        #: first record after a resume averages the same steps as an uninterrupted run's).
        self.window_losses: list[mx.array] = []
        self._train_step = None
        self._eval_step = None
        #: What saving a checkpoint warned about (a model setting): said once per run, not at every save.
        self._save_warnings: set[str] = set()
        self._stepped = False  # a train step has run in this process (the first one compiles)
        #: Times the train step's Python ran: once per trace of the compiled step (each call eagerly).
        self.step_traces = 0
        #: Wall clock of the loop (seconds); replaceable, e.g. by a fake clock in tests.
        self.clock: Callable[[], float] = time.perf_counter

    # -------------------------------------------------------------- state
    def _keep_best_params(self) -> None:
        """Keep the parameters as they are now as :attr:`best_params`. MLX arrays are immutable,
        so holding them costs nothing, except where the optimizer updates in place (the CUDA
        AdamW kernel writes each step's parameters over the buffers of the last: held arrays
        would then change too, and ``--export`` would write the last step's weights as the best
        one's): there they are copied to host memory (no GPU memory held)."""
        params = dict(tree_flatten(self.model.parameters()))
        if _updates_in_place(self.optimizer):
            mx.eval(params)
            params = {key: _HostCopy(value) for key, value in params.items()}
        self._best_params = params

    @property
    def best_params(self) -> dict[str, mx.array] | None:
        """The parameters at ``best_step`` (None before any evaluation)."""
        if self._best_params is None:
            return None
        return {key: value.array() if isinstance(value, _HostCopy) else value for key, value in self._best_params.items()}

    @best_params.setter
    def best_params(self, params: dict[str, mx.array] | None) -> None:
        self._best_params = params

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "time_budget_spent": self.budget_spent,
            "eval_pending": self.eval_pending,
            "data_position": {"epoch": self.batches.position.epoch, "batch": self.batches.position.batch},
            "data_fingerprint": self.fingerprint,
            "val_fingerprint": self.val_fingerprint,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "log_window": mx.stack(self.window_losses).tolist() if self.window_losses else [],
            "training_config": asdict(self.cfg),
            **self.extra_state,
        }

    def resume_from(self, checkpoint: Path, *, steps: int | None = None, lr: float | None = None) -> None:
        """Continue from ``checkpoint``: weights must already be loaded into the model; this
        restores optimizer, RNG, step, schedule and data position.

        ``steps`` (the new total, beyond the checkpoint's step) and ``lr`` (the new peak) extend
        or re-rate the run. Past the warmup the cosine restarts at the checkpoint's step, from
        the learning rate the old schedule had there (``steps`` alone: no jump) or from ``lr``,
        and decays to ``lr * min_lr_ratio`` at the new last step. Inside the warmup the ramp
        continues (its length kept) and the cosine spans the new length. The changed settings
        are saved with the next checkpoints, so resuming again continues the new schedule.
        """
        state = read_trainer_state(checkpoint)
        now = self.fingerprint, self.val_fingerprint
        was = state.get("data_fingerprint"), state.get("val_fingerprint", now[1])  # (older: no val_fingerprint)
        if was != now:
            raise ValueError(f"{checkpoint} was trained on different data (token streams {was}, now {now}); resume "
                             "with the same data and tokenizer")
        metrics = self.out_dir / "metrics.jsonl"
        kept = read_metrics(metrics) if self.is_main and metrics.is_file() else None  # rank 0 owns it
        restore_optimizer(checkpoint, self.optimizer, self.model.trainable_parameters())
        self.step = int(state["step"])
        self.total_steps = state["total_steps"]
        if steps == self.total_steps and self.cfg.max_time is None:
            steps = None  # (a new cosine changed every later lr)
        if steps is not None or lr is not None:
            self._reschedule(steps, lr)
        self.tokens = int(state["tokens"])
        self.elapsed = float(state["elapsed"])
        self.budget_spent = bool(state.get("time_budget_spent", False))
        self.eval_pending = bool(state.get("eval_pending", False)) and self.validating
        self.batches.position = DataPosition(**state["data_position"])
        self.best_val_loss, self.best_step = state.get("best_val_loss"), state.get("best_step")
        self.window_losses = [mx.array(v, dtype=mx.float32) for v in state.get("log_window", [])]
        if kept is not None:  # metrics logged after the checkpoint belong to the abandoned run
            self.records = [r for r in kept if r.get("step", 0) <= self.step]
            atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in self.records))

    def _reschedule(self, steps: int | None, lr: float | None) -> None:
        cfg, step, old_total = self.cfg, self.step, self.total_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= step):
            raise ValueError(f"steps ({steps}) must be greater than the checkpoint's step ({step})")
        if lr is not None and not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        lr_now = _as_float(make_schedule(cfg, old_total)(step))
        # The ramp keeps its length unless the new total ends it sooner.
        warmup = cfg.warmup_for(old_total)
        cfg.warmup = warmup = warmup if steps is None else min(warmup, steps - 1)
        # Inside the warmup the ramp continues from where it is (to the new peak); past it the
        # cosine restarts from the rate reached (no jump) or from the new --lr.
        start_lr = lr if lr is not None and step >= warmup else lr_now
        if lr is not None:
            cfg.lr = lr
        if steps is not None:
            cfg.steps, cfg.max_time = steps, None  # a step count replaces a time budget
            self.budget_spent = False
        cfg.reschedule_step, cfg.reschedule_lr = step, start_lr
        cfg.validate()
        self.total_steps = steps if steps is not None else old_total

    # -------------------------------------------------------------- compiled steps
    def _build_steps(self, compiled: bool = True) -> None:
        """The train and eval steps; ``compiled=False``: the train step runs eagerly (the same
        ops, no kernel fusion; benchmarks use it where compiling costs too long)."""
        model, optimizer, cfg = self.model, self.optimizer, self.cfg
        loss_fn = make_loss_fn(model, self.compute_dtype, cfg.recompute, fuse_projections=cfg.fuse_projections)
        group = self.group
        # Half-precision compute on one process: differentiate with respect to the cast copies, so
        # the gradients stay in the compute dtype until the optimizer reads them (the float32
        # gradients of the float32 masters are exactly these, cast; autodiff of the cast would
        # materialise them all, 4 bytes per parameter, by the end of the backward pass).
        # Distributed: averaged in float32, as before.
        half = self.compute_dtype != mx.float32 and group is None
        # The fused head computes gradients in its forward: training only.
        grad_fn = mx.value_and_grad(make_loss_fn(model, mx.float32 if half else self.compute_dtype, cfg.recompute,
                                                 cfg.head_loss, cfg.fuse_projections, cfg.mlstm_products))
        optimizer.init(model.trainable_parameters())
        state = [model.state, optimizer.state, mx.random.state]
        dtype = self.compute_dtype

        # bf16 compute with fused projections: each group of projections the traced step runs as
        # one matmul gets its compute copy joined in one cast (no per-layer casts and concatenation)
        # and is differentiated as a whole (its layers' gradients are row views of the group's).
        joined = joined_weight_groups(model) if half and cfg.fuse_projections and cfg.recompute == "none" else []
        if joined:
            grad_joined = mx.value_and_grad(_joined_loss(make_loss_fn(
                model, mx.float32, cfg.recompute, cfg.head_loss, cfg.fuse_projections, cfg.mlstm_products), joined))

        def train_step(inputs, targets):
            self.step_traces += 1  # Python runs only while MLX traces the compiled step
            params = model.trainable_parameters()
            norm_tree = None
            if joined:
                flat = dict(tree_flatten(params))
                members = {p for _, groups in joined for paths in groups for p in paths}
                rest = [(k, v) for k, v in flat.items() if k not in members]
                if cast_many_enabled():  # the float32 masters' copies in a few launches
                    f32 = [j for j, (_, v) in enumerate(rest) if v.dtype == mx.float32]
                    cast = dict(zip(f32, cast_many([rest[j][1] for j in f32], dtype)))
                    rest = [(k, cast[j]) if j in cast else (k, v) for j, (k, v) in enumerate(rest)]
                copies = tree_unflatten([(k, v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
                                         for k, v in rest])
                buffers = [[cast_joined([flat[p] for p in paths], dtype) for paths in groups] for _, groups in joined]
                loss, (g_copies, g_buffers) = grad_joined((copies, buffers), inputs, targets)
                norm_tree = (g_copies, g_buffers)  # the same squares, fewer and larger reductions
                grads = _split_joined_grads(g_copies, g_buffers, joined, flat)
            elif half:
                loss, grads = grad_fn(cast_floating(params, dtype), inputs, targets)
            else:
                loss, grads = grad_fn(params, inputs, targets)
            model.update(params)  # the float32 masters back in place of the cast copies
            if group is not None:
                # Equal row counts per rank: the mean of the ranks' means is the global mean.
                grads = nn.average_gradients(grads, group=group)
                loss = mx.distributed.all_sum(loss, group=group) / group.size()
            grad_norm, scale = clip_scale(grads if norm_tree is None else norm_tree, cfg.grad_clip)
            if cfg.grad_clip <= 0:
                # No clipping: the norm is only reported. An AdamW writing over the weights still
                # waits for it, i.e. for every gradient and so for every use of the old weights.
                scale = None
                if _updates_in_place(optimizer):
                    scale = mx.depends([mx.array(1.0, mx.float32)], [grad_norm])[0]
            if not _set_grad_scale(optimizer, scale):  # an optimizer of the caller's: clipped float32 gradients
                grads = tree_map(lambda g: (g if scale is None else g * scale).astype(mx.float32), grads)
            optimizer.update(model, grads)
            return loss, grad_norm

        if compiled:
            train_step = mx.compile(train_step, inputs=state, outputs=state)

        @partial(mx.compile, inputs=[model.state], outputs=[model.state])
        def eval_step(inputs, targets):
            params = model.trainable_parameters()
            loss = loss_fn(params, inputs, targets)
            model.update(params)
            return loss

        self._train_step, self._eval_step = train_step, eval_step

    def evaluate(self) -> float:
        """Mean validation cross-entropy over the held-out windows (nats/token)."""
        if not self.validating:
            raise ValueError("this run has no validation split (its validation stream is empty)")
        if self._eval_step is None:
            self._build_steps()
        total, count = mx.array(0.0), 0
        for start in range(0, len(self.val), self.cfg.batch_size):
            rows = self.val[start : start + self.cfg.batch_size]
            # Each rank evaluates its share of the rows (a share may be empty at the end).
            rows = np.array_split(rows, self.world)[self.rank]
            if len(rows) == 0:
                continue
            window = mx.array(rows)
            loss = self._eval_step(window[:, :-1], window[:, 1:])
            total = total + loss * window.shape[0]
            count += window.shape[0]
            mx.eval(total)
        if self.group is not None:
            sums = mx.distributed.all_sum(mx.stack([total, mx.array(float(count))]), group=self.group)
            total, count = sums[0], sums[1]
        return (total / count).item()

    # -------------------------------------------------------------- loop
    def _log(self, record: dict[str, Any]) -> None:
        record["world_size"] = self.world
        self.records.append(record)
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _plot(self) -> None:
        if not self.is_main:
            return
        plot_metrics(self.records, self.out_dir / "loss.png",
                     title=f"xlstm-metal train: {count_parameters(self.model) / 1e6:.2f}M params")

    def _diverged(self, what: str, step: int | None = None) -> TrainingDiverged:
        from .checkpoint import checkpoint_dirs

        done = checkpoint_dirs(self.out_dir) if self.is_main else []
        return TrainingDiverged(self.step if step is None else step, what, done[-1] if done else None,
                                self.cfg.lr, self.cfg.grad_clip)

    def _check_weights(self) -> None:
        """TrainingDiverged when the weights or the optimizer state hold NaN or inf (one reduction
        per tensor and a single host sync, at checkpoint time only). Every rank checks its own
        copy: the ranks apply the same all-reduced update to the same weights, so all raise
        alike, with no collective of its own (one more collective per save was one more place
        for a rank to wait on a peer that had died)."""
        from ..loading import non_finite_tensors

        arrays = {**{f"model.{k}": v for k, v in tree_flatten(self.model.parameters())},
                  **{f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state) if isinstance(v, mx.array)}}
        bad = non_finite_tensors(arrays)
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise self._diverged(f"the weights hold NaN or infinite values ({shown})")

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0 only; the others return None). TrainingDiverged, on every
        rank and with nothing written, when the weights or optimizer state are not finite."""
        self._check_weights()
        if not self.is_main:
            return None
        return save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, self.trainer_state(),
                               self.tokenizer_dir, keep=self.cfg.keep, warned=self._save_warnings)

    def _check_losses(self, losses: list[float], first: int, grad_norm: float | None = None) -> None:
        """TrainingDiverged when a training loss of the steps ``first``, ``first + 1``, ... (read on
        the host at a log point) or the last step's gradient norm is NaN or infinite. Distributed,
        both are all-reduced in the step: every rank sees the same values and stops alike."""
        bad = next((j for j, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is not None:
            raise self._diverged(f"the training loss is {losses[bad]}", first + bad)
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise self._diverged(f"the gradient norm is {grad_norm}, so the update left the weights non-finite")

    def _record_evaluation(self, result: TrainResult, t_start: float | None = None) -> tuple[float, float]:
        """Evaluate at ``self.step``: the loss joins ``result.evals`` and metrics.jsonl (its
        ``elapsed_s`` by the clock since ``t_start``, else :attr:`elapsed`) and, the best so
        far, sets the best step and its parameters. Returns (validation loss, elapsed_s); a
        non-finite loss raises the divergence error."""
        val_loss = self.evaluate()
        if not math.isfinite(val_loss):
            raise self._diverged(f"the validation loss is {val_loss}")
        result.evals.append((self.step, val_loss))
        elapsed_s = self.elapsed if t_start is None else self.clock() - t_start
        self._log({"kind": "eval", "step": self.step, "val_loss": val_loss, "val_ppl": capped_perplexity(val_loss),
                   "tokens": self.tokens, "elapsed_s": elapsed_s})
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss, self.best_step = val_loss, self.step
            self._keep_best_params()
        return val_loss, elapsed_s

    def _pending_evaluation(self, result: TrainResult) -> None:
        """The evaluation of step ``self.step`` that the memory watchdog's stop left undone (the
        checkpoint it saved holds this step's weights): logged and scored for the best validation
        loss as the run would have done at that step, and the checkpoint's state rewritten to
        say so (best step included), as if saved after it."""
        val_loss, _ = self._record_evaluation(result)
        self.eval_pending = False
        if self.is_main:
            print(f"step {self.step} ({self.tokens:,} tokens): validation loss {val_loss:.4f}, perplexity "
                  f"{capped_perplexity(val_loss):.2f} (the evaluation the stopped run left undone)",
                  file=sys.stderr)
            checkpoint = self.out_dir / f"checkpoint-{self.step:07d}"
            if checkpoint.is_dir():
                rewrite_trainer_state(checkpoint, self.trainer_state())
        self._plot()

    def _size_from_time(self, step_time: float, start_step: int, spent: float, save_time: float = 0.0) -> int:
        """Total steps that fit the time budget, eval passes (~1/3 of a step per batch) and
        checkpoint saves (``save_time`` s each: one every ``save_every`` steps and the run's last)
        included."""
        cfg = self.cfg
        eval_cost = len(self.val) / cfg.batch_size * step_time / 3
        per_step = step_time + eval_cost / cfg.eval_every + save_time / cfg.save_every
        remaining = cfg.max_time - spent - save_time
        fit = max(start_step + int(0.97 * remaining / per_step), start_step + 1)
        # An explicit warmup keeps its slope; the budget still ends the run (inside it: warned).
        if cfg.warmup is not None and cfg.warmup >= fit and self.is_main:
            print(f"warning: the time budget fits about {fit} steps, fewer than the warmup ({cfg.warmup}): the run "
                  "will end inside it (no peak lr, no cosine decay)", file=sys.stderr)
        return max(fit, cfg.warmup + 1 if cfg.warmup is not None else 0)

    def _time_a_save(self) -> float:
        """Seconds a checkpoint save takes: one written whole into a temporary directory beside
        the run's checkpoints, then removed (a time budget's sizing counts the run's saves, which
        take seconds at small shapes and minutes at 7B, and its look ahead the last one).
        Distributed: rank 0's time, on every rank."""
        t0 = self.clock()
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # Named like a save's temporary directory: one left by a killed process goes at the next save.
            where = Path(tempfile.mkdtemp(dir=self.out_dir, prefix=f".checkpoint-{self.step:07d}.timing."))
            try:
                with warnings.catch_warnings():  # the run's first real save gives them
                    warnings.simplefilter("ignore")
                    save_checkpoint(where, self.step, self.model, self.optimizer, self.trainer_state(),
                                    self.tokenizer_dir, keep=0)
            finally:
                shutil.rmtree(where, ignore_errors=True)
        took = self.clock() - t0
        return agree(took, self.group)  # rank 0's, the longest

    def train(self) -> TrainResult:
        """Run to ``total_steps`` (or the time budget); returns losses and evals.

        Ctrl-C (SIGINT, in the main thread) stops the run after the current step and saves a
        checkpoint that resumes it exactly, then raises :class:`TrainingInterrupted` (a
        KeyboardInterrupt) naming it; a second Ctrl-C aborts at once.

        Distributed: a failed collective (another process died or hung up) raises
        :class:`~xlstm_metal.distributed.DistributedError` naming the step and the last complete
        checkpoint; checkpoints are written whole or not at all, so that one resumes.
        """
        if self.group is None:
            with StopOnCtrlC(note=self.is_main) as ctrl_c:
                return self._train(ctrl_c)
        try:
            with StopOnCtrlC(note=self.is_main) as ctrl_c:
                return self._train(ctrl_c)
        except RuntimeError as err:
            from .checkpoint import checkpoint_dirs

            if not self.is_main:
                where = "rank 0 holds the checkpoints"
            elif done := checkpoint_dirs(self.out_dir):
                where = f"the last complete checkpoint is {done[-1]}: continue with --resume (any number of processes)"
            else:
                where = "no checkpoint was written"
            raise DistributedError(
                f"rank {self.rank} of {self.world}: training stopped at step {self.step + 1}: a collective "
                f"operation failed ({err}); another process has probably died; {where}"
            ) from None

    def _train(self, ctrl_c: StopOnCtrlC | None = None) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        job = current_job()  # status record for `xlstm-metal top`, memory watchdog
        job.update(phase="train", unit="steps")
        if self._train_step is None:
            self._build_steps()
        tokens_per_step = cfg.batch_size * cfg.seq_len
        result = TrainResult(step=self.step, tokens=self.tokens, elapsed=self.elapsed)
        if self.eval_pending:
            self._pending_evaluation(result)
        if (self.total_steps is not None and self.step >= self.total_steps) or (
                cfg.max_time is not None and (self.elapsed >= cfg.max_time or self.budget_spent)):  # finished
            result.best_val_loss, result.best_step = self.best_val_loss, self.best_step
            return result
        # A time budget's step count is known after the probe; until then the bar counts to its end.
        probe_end = self.step + 2 + cfg.probe_steps
        bar = tqdm(total=self.total_steps or probe_end, initial=self.step, unit="step", disable=not self.progress,
                   dynamic_ncols=True, desc="train" if self.total_steps else "train (timing steps)")
        t_start = self.clock() - self.elapsed
        window_losses = self.window_losses  # a resumed run's: the steps before its checkpoint
        t_window, steps_window = self.clock(), 0
        probe_t0 = None
        pending: list[mx.array] | None = None  # the previous step's loss and norm (pipelined steps)
        schedule = make_schedule(cfg, self.total_steps) if self.total_steps else None
        last_saved = self.step
        # A time budget's look ahead: the last plain step's time, the last evaluation's and the
        # last checkpoint save's (None: none timed yet; the first step and evaluation, which
        # compile, are not timed).
        step_time = eval_time = save_time = None
        evals = 0
        t_top, paused, timed = None, 0.0, False  # the last loop top, eval + save time since, a plain step

        # XLSTM_METAL_TRAIN_BUILD_THREAD: every step's graph built on a second host thread, the
        # next one while this one is queued (one process only: ranks agree on every step).
        builder = StepBuilder() if build_thread_enabled() and self.group is None else None
        ahead = None  # (the next step's build on the builder thread, the state it started from)

        def build(step: int, schedule):
            if self.total_steps is None:
                lr = make_schedule(cfg, None)(step)  # the warmup ramp: the total is not needed yet
            else:
                lr = schedule(step)
            _set_learning_rate(self.optimizer, lr)
            # RNG a function of (seed, step): a resumed run draws what an uninterrupted one would.
            mx.random.seed((cfg.seed * 1_000_003 + step) % (1 << 63))
            x, y = self.batches.next()
            x, y = x[self.rows], y[self.rows]  # this rank's share of the global batch
            loss, grad_norm = self._train_step(mx.array(x), mx.array(y))
            if builder is None:
                return loss, grad_norm, lr, None
            # On the builder thread, off the queueing thread's path: the state this step leaves
            # (what the step built after it starts from) and the data position.
            after = (tree_flatten(self.model.state), tree_flatten(self.optimizer.state),
                     DataPosition(self.batches.position.epoch, self.batches.position.batch))
            return loss, grad_norm, lr, after

        def drop_ahead():
            """Undo the step built ahead (never evaluated): the state and data position it
            started from back in place."""
            nonlocal ahead
            if ahead is not None:
                future, (model_leaves, optimizer_leaves, position) = ahead
                ahead = None
                future.result()
                _restore_leaves(self.model.state, model_leaves)
                _restore_leaves(self.optimizer.state, optimizer_leaves)
                self.batches.position = position

        try:
            while self.total_steps is None or self.step < self.total_steps:
                if cfg.max_time is not None:
                    now = self.clock()
                    if t_top is not None and timed:
                        step_time = now - t_top - paused
                    t_top, paused = now, 0.0
                    # Stop where the budget ran out (eval costs more than estimated) or where one
                    # more step with what follows it, an evaluation and a checkpoint (due at that
                    # step or ending the run), would not fit in it: a checkpoint takes seconds to
                    # minutes, and one too many overran --max-time by that much.
                    ahead_s = 0.0 if step_time is None else (
                        step_time + (eval_time or 0.0) * self.validating + (save_time or 0.0))
                    # Every rank stops at the same step: rank clocks differ a little.
                    if agree(float(now - t_start + ahead_s > cfg.max_time), self.group):
                        drop_ahead()
                        self.budget_spent = True
                        break
                first = not self._stepped
                timed = not first
                if first:  # MLX compiles the step's kernels now: on a fresh CUDA machine that takes minutes
                    job.update(phase="compile")
                    bar.set_description_str(_compiling_note())
                if ahead is not None:
                    loss, grad_norm, lr, after = ahead[0].result()
                    ahead = None
                elif builder is not None:
                    loss, grad_norm, lr, after = builder.submit(build, self.step, schedule).result()
                else:
                    loss, grad_norm, lr, after = build(self.step, schedule)
                if first:
                    mx.eval(loss, grad_norm, self.model.state, self.optimizer.state)
                else:
                    # Pipelined: the GPU runs this step while the host builds the next one's graph
                    # (a compiled step's ~2,500 ops at the 1.3b shape take MLX ~10 ms to build);
                    # the host waits here for the previous step. async_eval itself returns only
                    # once all but MLX's last ~10 command buffers are queued, so built after it the
                    # next step overlaps only those buffers' GPU time (S8R1, H200, 1.3b: ~175 ms per
                    # step back to back against ~180 ms evaluated one at a time). With the builder
                    # thread the next step is built while this one is queued, when nothing after
                    # this step reads the state (an evaluation, a checkpoint: the step is undone
                    # for those that come unplanned, a time budget's end or the memory watchdog).
                    nxt = self.step + 1
                    if builder is not None and self.total_steps is not None and nxt < self.total_steps \
                            and nxt % cfg.eval_every != 0 and nxt % cfg.save_every != 0:
                        model_leaves, optimizer_leaves, _ = after
                        queued = [loss, grad_norm] + [v for _, v in model_leaves + optimizer_leaves
                                                      if isinstance(v, mx.array)]
                        ahead = (builder.submit(build, nxt, schedule), after)
                        mx.async_eval(queued)
                    else:
                        mx.async_eval(loss, grad_norm, self.model.state, self.optimizer.state)
                    if pending is not None:
                        mx.eval(pending)
                pending = [loss, grad_norm]
                if first:
                    self._stepped = True
                    bar.set_description_str("train" if self.total_steps else "train (timing steps)")
                self.step += 1
                self.tokens += tokens_per_step
                steps_window += 1
                window_losses.append(loss)
                bar.update(1)
                job.update(phase="train", step=self.step, done=self.step, total=self.total_steps, tokens=self.tokens)
                # Memory watchdog's hard limit (2) or Ctrl-C (1), on any rank (all stop at the same
                # step): save a checkpoint that resumes exactly, stop. The watchdog stops after this
                # step's log record (a host read of the losses), before its evaluation, which the
                # resumed run runs first (eval_pending); Ctrl-C after this step's log, evaluation and
                # checkpoint, as if the run ended here.
                stop = 2.0 * job.stopping() + float(ctrl_c is not None and ctrl_c.requested)
                stop = stop if self.group is None else agree(stop, self.group)

                # Time budget: time steps 3..3+probe (after compilation) and size the run.
                if self.total_steps is None:
                    if self.step == result.step + 2:
                        probe_t0 = self.clock()
                    elif probe_t0 is not None and self.step == result.step + 2 + cfg.probe_steps:
                        probe_time = (self.clock() - probe_t0) / cfg.probe_steps  # saves in it included
                        if save_time is None:
                            job.update(phase="save")
                            bar.set_description_str("train (timing a checkpoint save)")
                            save_time = self._time_a_save()
                            t_window += save_time  # not training throughput
                            paused += save_time
                        total = self._size_from_time(probe_time, self.step, self.clock() - t_start, save_time)
                        self.total_steps = int(agree(float(total), self.group, op="min"))  # one count for all ranks
                        if cfg.warmup is None:
                            # The ramp continues from where the probe left it to the peak at a tenth
                            # of the sized run, not earlier than the probe's own ramp would have.
                            ramp_lr = _as_float(make_schedule(cfg, None)(self.step))
                            total = self.total_steps
                            cfg.warmup = max(min(cfg.warmup_for(None), total // 2), cfg.warmup_for(total), self.step + 1)
                            cfg.reschedule_step, cfg.reschedule_lr = self.step, ramp_lr
                        schedule = make_schedule(cfg, self.total_steps)
                        bar.total = self.total_steps
                        bar.set_description_str("train")
                        bar.refresh()

                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    now = self.clock()
                    losses = mx.stack(window_losses).tolist()  # one host sync per log window
                    tok_s = steps_window * tokens_per_step / max(now - t_window, 1e-9)
                    self.elapsed = now - t_start
                    lr_value = float(lr.item()) if isinstance(lr, mx.array) else float(lr)
                    first = self.step - len(losses) + 1
                    norm_value = float(grad_norm.item())
                    self._check_losses(losses, first, norm_value)
                    result.losses.extend((first + j, v) for j, v in enumerate(losses) if first + j > result.step)
                    self._log({"kind": "train", "step": self.step, "loss": float(np.mean(losses)), "lr": lr_value,
                               "grad_norm": norm_value, "tokens": self.tokens,
                               "tokens_per_s": tok_s, "elapsed_s": self.elapsed})
                    bar.set_postfix_str(_progress_postfix(float(np.mean(losses)), tok_s, lr_value))
                    job.update(loss=float(np.mean(losses)), lr=lr_value)
                    window_losses, t_window, steps_window = [], now, 0
                    self.window_losses = window_losses

                done = self.total_steps is not None and self.step >= self.total_steps
                if stop >= 2:
                    drop_ahead()
                    self.elapsed = self.clock() - t_start
                    bar.close()
                    # This step's evaluation (if due) has not run: the resumed run runs it first.
                    self.eval_pending = self.validating and (self.step % cfg.eval_every == 0 or done)
                    saved = self.save()  # rank 0's; every rank stops once it is written
                    where = f"checkpoint {saved}" if saved else "rank 0 wrote the checkpoint"
                    job.check_all(note=f"{where} (continue with --resume)", group=self.group)
                if done and ctrl_c is not None:
                    ctrl_c.finishing = True  # what follows is the run's last evaluation and save
                if self.validating and (self.step % cfg.eval_every == 0 or done):
                    job.update(phase="eval")
                    t_eval = self.clock()
                    if window_losses:
                        # Steps since the last log point: the line shows their loss and throughput
                        # (the latest), not the log point's, and so does the progress bar.
                        train_now = float(np.mean(mx.stack(window_losses).tolist()))
                        tok_s_now = steps_window * tokens_per_step / max(t_eval - t_window, 1e-9)
                        lr_now = float(lr.item()) if isinstance(lr, mx.array) else float(lr)
                        bar.set_postfix_str(_progress_postfix(train_now, tok_s_now, lr_now))
                    else:  # this step's log record (or none yet: a resumed run's first step)
                        last = next((r for r in reversed(self.records) if r["kind"] == "train"), None)
                        train_now, tok_s_now = (last["loss"], last["tokens_per_s"]) if last else (None, None)
                    val_loss, elapsed_s = self._record_evaluation(result, t_start)
                    train_part = f"train loss {train_now:.4f}, {tok_s_now:,.0f} tok/s, " if train_now is not None else ""
                    if self.is_main:
                        bar.write(f"step {self.step} ({self.tokens:,} tokens, {elapsed_s:.0f} s): "
                                  f"{train_part}validation loss {val_loss:.4f}, perplexity {capped_perplexity(val_loss):.2f}")
                    self._plot()
                    # Eval time is not training throughput: the window's clock skips it (the steps
                    # before it stay in the window; a reset clock counted them in no time at all).
                    took = self.clock() - t_eval
                    t_window += took
                    paused += took
                    eval_time, evals = (took if evals else None), evals + 1
                if self.step % cfg.save_every == 0 and not done:
                    t_save = self.clock()
                    self.elapsed = t_save - t_start
                    self.save()
                    last_saved = self.step
                    save_time = self.clock() - t_save
                    t_window += save_time  # nor is checkpoint time
                    paused += save_time
                if stop == 1 and not done:  # Ctrl-C (the last step finishes the run as usual)
                    drop_ahead()
                    self.elapsed = self.clock() - t_start
                    bar.close()
                    if last_saved != self.step:
                        raise TrainingInterrupted(self.step, self.save())
                    raise TrainingInterrupted(self.step, self.out_dir / f"checkpoint-{self.step:07d}"
                                              if self.is_main else None)
        finally:
            if builder is not None:
                try:
                    drop_ahead()  # a step built ahead of an exception: the state as the last step left it
                finally:
                    builder.close()
        bar.close()
        if ctrl_c is not None:
            ctrl_c.finishing = True
        mx.eval(self.model.state, self.optimizer.state)  # the last (pipelined) step

        self.elapsed = self.clock() - t_start
        if window_losses:  # stopped by the time budget between log points
            losses = mx.stack(window_losses).tolist()
            first = self.step - len(losses) + 1
            self._check_losses(losses, first)
            result.losses.extend((first + j, v) for j, v in enumerate(losses) if first + j > result.step)
            # and their record, as at a log point (metrics.jsonl and loss.png ended at the last one)
            self._log({"kind": "train", "step": self.step, "loss": float(np.mean(losses)),
                       "lr": float(lr.item()) if isinstance(lr, mx.array) else float(lr),
                       "grad_norm": float(grad_norm.item()), "tokens": self.tokens,
                       "tokens_per_s": steps_window * tokens_per_step / max(self.clock() - t_window, 1e-9),
                       "elapsed_s": self.elapsed})
        if self.validating and (not result.evals or result.evals[-1][0] != self.step):
            self._record_evaluation(result)
        if self.step != last_saved or not (self.out_dir / f"checkpoint-{self.step:07d}").is_dir():
            result.checkpoint = self.save()
        elif self.budget_spent and self.is_main:  # saved at this step before the budget stopped it:
            rewrite_trainer_state(self.out_dir / f"checkpoint-{self.step:07d}", self.trainer_state())  # now finished
        self._plot()
        result.step, result.tokens, result.elapsed = self.step, self.tokens, self.elapsed
        result.best_val_loss, result.best_step = self.best_val_loss, self.best_step
        return result
