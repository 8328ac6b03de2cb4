"""``profile check``: run a model under a profile beside the float32 reference and compare.

The reference is the same weights in float32 with the reference kernels (chunkwise for the
prompt, step for decoding), float32 state and the checkpoint's own eps and soft caps: either our
MLX model (``reference="mlx"``) or NX-AI's PyTorch ``xLSTMLarge`` with its native kernels
(``reference="nxai"``, weights handed over by :mod:`xlstm_metal.connectors`; ``"auto"`` uses it
when the ``xlstm`` package is installed and the model is an xLSTM-Large). Both runs see the same
prompt (two rows, 2 * chunk + 7 tokens) and then the same decode tokens; each block's output,
its final state and the logits are compared by ``max|a - b| / max|b|``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import HyperProfile, apply_profile, load_profile

REFERENCE_KERNELS = {"chunkwise_kernel": "chunkwise", "sequence_kernel": "sequence", "step_kernel": "step"}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b| in float64 (0 when both are zero; inf on a shape or NaN mismatch)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    if not np.isfinite(diff):
        return float("inf")
    return diff / scale if scale > 0 else diff


@dataclass
class CheckResult:
    """Errors of one ``profile check``: per block (output and final state) and the logits."""

    profile: HyperProfile
    reference: str
    block_output_errors: list[float]
    block_state_errors: list[float]
    logits_error: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def tolerance(self) -> float:
        return self.profile.max_rel_error

    @property
    def max_error(self) -> float:
        return max([self.logits_error, *self.block_output_errors, *self.block_state_errors])

    @property
    def passed(self) -> bool:
        return self.max_error <= self.tolerance

    def rows(self) -> list[tuple[str, float, float | None]]:
        rows = [(f"block {i}", o, s) for i, (o, s) in enumerate(zip(self.block_output_errors, self.block_state_errors))]
        return rows + [("logits", self.logits_error, None)]

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.name, "reference": self.reference, "tolerance": self.tolerance,
                "passed": self.passed, "max_error": self.max_error, "logits_error": self.logits_error,
                "block_output_errors": self.block_output_errors, "block_state_errors": self.block_state_errors,
                **self.details}


# ------------------------------------------------------------------------------ our side
def _parts(model):
    """(embed, blocks, head) of an xLSTM-Large or 2024 model: x = embed(ids); x, s = block(x, s)
    for each block; logits = head(x)."""
    from ..cells.embedding import embed_tokens
    from ..cells.norms import soft_cap
    from ..models.xlstm_large import to_residual

    if hasattr(model, "backbone"):
        bb = model.backbone
        residual = getattr(model, "residual_dtype", None)  # xLSTM-Large: as its own forward runs
        dtypes = []

        def embed(ids):
            x = embed_tokens(bb.embeddings, ids, bb)
            dtypes.append(x.dtype)
            return to_residual(x, residual)

        def head(x):
            if hasattr(bb, "finish"):
                x = bb.finish(x, dtypes[-1])
            elif "out_norm" in bb:
                x = bb.out_norm(x)
            return model._logits(x) if hasattr(model, "_logits") else soft_cap(model.lm_head(x), model.config.output_logit_soft_cap)

        return embed, bb.blocks, head
    stack = model.xlstm_block_stack

    def head2024(x):
        if "post_blocks_norm" in stack:
            x = stack.post_blocks_norm(x)
        return model.lm_head(x) if "lm_head" in model else model.token_embedding.as_linear(x)

    return model.token_embedding, stack.blocks, head2024


def run_blocks(model, ids: np.ndarray, state: list | None) -> tuple[list[np.ndarray], np.ndarray, list]:
    """Feed ``ids`` [B, S]; each block's output [B, S, E] (float32 NumPy), logits [B, S, V] and the
    new state."""
    embed, blocks, head = _parts(model)
    x = embed(mx.array(ids.astype(np.int32)))
    outs, new_state = [], []
    for i, block in enumerate(blocks):
        x, s = block(x, None if state is None else state[i])
        mx.eval(x, s)
        outs.append(np.array(x.astype(mx.float32)))
        new_state.append(s)
    logits = head(x)
    return outs, np.array(logits.astype(mx.float32)), new_state


def _state_arrays(state: list) -> list[list[np.ndarray]]:
    return [[np.array(t.astype(mx.float32)) for t in s] for s in state]


def _run_ours(model, prompt: np.ndarray, decode: np.ndarray):
    """(block outputs over prompt + decode steps, logits, final state) for our model."""
    outs, logits, state = run_blocks(model, prompt, None)
    all_outs, all_logits = [[o] for o in outs], [logits]
    for t in range(decode.shape[1]):
        outs, logits, state = run_blocks(model, decode[:, t : t + 1], state)
        for acc, o in zip(all_outs, outs):
            acc.append(o)
        all_logits.append(logits)
    return ([np.concatenate(a, axis=1) for a in all_outs], np.concatenate(all_logits, axis=1), _state_arrays(state))


# ------------------------------------------------------------------------------ NX-AI's side
def nxai_available() -> bool:
    import importlib

    try:
        importlib.import_module("xlstm.xlstm_large.model")
    except Exception:
        return False
    return True


def _run_nxai(model, prompt: np.ndarray, decode: np.ndarray):
    """The same runs through NX-AI's PyTorch xLSTMLarge (native kernels, float32)."""
    import torch
    from xlstm.xlstm_large.model import xLSTMLarge as TorchLarge
    from xlstm.xlstm_large.model import xLSTMLargeConfig

    from ..connectors import nxai_state_dict, to_numpy

    c = model.config
    names = {f.name for f in dataclasses.fields(xLSTMLargeConfig)}
    fields = {k: v for k, v in dataclasses.asdict(c).items() if k in names}
    fields.update(chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
                  step_kernel="native", mode="inference", return_last_states=True, autocast_kernel_dtype="float32",
                  inference_state_dtype="float32", weight_mode="single")
    theirs = TorchLarge(xLSTMLargeConfig(**fields)).eval()
    sd = {k: v.float() for k, v in nxai_state_dict(model).items()}
    theirs.load_state_dict(sd, strict=not c.tie_word_embeddings)
    captured: list[Any] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: captured.append(out[0])) for b in theirs.backbone.blocks]
    all_outs: list[list[np.ndarray]] = [[] for _ in theirs.backbone.blocks]
    all_logits = []
    try:
        with torch.no_grad():
            state = None
            for piece in [prompt] + [decode[:, t : t + 1] for t in range(decode.shape[1])]:
                captured.clear()
                logits, state = theirs(torch.tensor(piece.astype(np.int64)), state)
                for acc, out in zip(all_outs, captured):
                    acc.append(to_numpy(out.float()))
                all_logits.append(to_numpy(logits.float()))
    finally:
        for h in hooks:
            h.remove()
    states = [[to_numpy(t.float()) for t in state[i]] for i in range(len(theirs.backbone.blocks))]
    return [np.concatenate(a, axis=1) for a in all_outs], np.concatenate(all_logits, axis=1), states


# ------------------------------------------------------------------------------ check
def _load_float32(source) -> Any:
    """A checkpoint in float32; a quantized one dequantized (profiles compare kernels and
    numerics on float weights, and NX-AI's reference takes no packed weights)."""
    from ..loading import load_model
    from ..quantization import dequantize_model

    if isinstance(source, (str, Path)):
        return dequantize_model(load_model(source, dtype="float32"))
    return source


def copy_model(model, dtype: str = "float32"):
    """A new model of the same class and config holding ``model``'s weights in ``dtype`` (a
    quantized model's copy is quantized alike: packed weights kept, scales and biases cast)."""
    from mlx.utils import tree_flatten

    from ..quantization import apply_quantization, quantization_config

    config = dataclasses.replace(model.config) if dataclasses.is_dataclass(model.config) else model.config
    if hasattr(model, "backbone"):
        new = type(model)(config)
    else:
        new = type(model)(config, init=False)
    target = getattr(mx, dtype)
    weights = [(k, v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v)
               for k, v in tree_flatten(model.parameters())]
    quantization = quantization_config(model)
    if quantization is not None:
        apply_quantization(new, quantization, dict(weights))
    new.load_weights(weights)
    mx.eval(new.parameters())
    return new


def reference_model(model):
    """Float32 copy with the reference kernels and float32 state (the checkpoint's eps/caps)."""
    from ..config import xLSTMConfig

    ref = copy_model(model)
    if isinstance(ref.config, xLSTMConfig):
        from . import HyperProfile as _P

        exact = _P(name="reference", version=1, dtype="float32", state_dtype="float32",
                   kernels={"chunkwise": "chunkwise", "sequence": "sequence", "step": "step"})
        apply_profile(ref, exact)
    return ref


def check_profile(
    model_or_path: Any,
    profile: HyperProfile | str,
    *,
    reference: str = "auto",
    decode_steps: int = 4,
    batch: int = 2,
    seed: int = 0,
    reference_cache: dict | None = None,
    subject: Any = None,
) -> CheckResult:
    """Compare ``profile`` on this model with the float32 reference (see the module docstring).

    ``model_or_path``: a checkpoint directory or a model (not modified; its weights are taken
    as float32). ``reference``: "auto", "mlx" or "nxai". ``reference_cache``: a dict kept across
    calls on the same model, so the reference runs once per input shape (``tune`` checks every
    trial). ``subject``: the model already under ``profile`` to check (default: a copy of the
    base model with the profile applied), so a caller can check the very model it then runs.
    """
    from ..config import xLSTMConfig

    if reference not in ("auto", "mlx", "nxai"):
        raise ValueError(f"reference must be 'auto', 'mlx' or 'nxai', got {reference!r}")
    profile = load_profile(profile)
    base = _load_float32(model_or_path)
    large = isinstance(base.config, xLSTMConfig)
    if reference == "auto":
        reference = "nxai" if large and nxai_available() else "mlx"
    if reference == "nxai" and not large:
        raise ValueError("the NX-AI reference covers xLSTM-Large models; use reference='mlx'")
    if reference == "nxai" and not nxai_available():
        raise ValueError("reference 'nxai' needs NX-AI's xlstm package (pip install xlstm)")
    chunk = profile.chunk_size or getattr(base.config, "chunk_size", 64)
    vocab = base.config.vocab_size
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, vocab, size=(batch, 2 * chunk + 7))
    decode = rng.integers(0, vocab, size=(batch, decode_steps))

    if subject is None:
        subject = apply_profile(copy_model(base), profile)
    outs, logits, state = _run_ours(subject, prompt, decode)
    key = (reference, prompt.shape, decode.shape, seed)
    cached = None if reference_cache is None else reference_cache.get(key)
    if cached is None:
        if reference == "nxai":
            cached = _run_nxai(base, prompt, decode)
        else:
            cached = _run_ours(reference_model(base), prompt, decode)
        if reference_cache is not None:
            reference_cache[key] = cached
    ref_outs, ref_logits, ref_state = cached
    block_out = [rel_err(a, b) for a, b in zip(outs, ref_outs)]
    block_state = [max(rel_err(a, b) for a, b in zip(s, r)) for s, r in zip(state, ref_state)]
    return CheckResult(profile=profile, reference="nxai-torch-float32" if reference == "nxai" else "mlx-float32",
                       block_output_errors=block_out, block_state_errors=block_state,
                       logits_error=rel_err(logits, ref_logits),
                       details={"prompt_tokens": int(prompt.shape[1]), "decode_steps": decode_steps, "batch": batch})
