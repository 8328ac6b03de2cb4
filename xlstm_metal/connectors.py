"""Connectors: exact conversions of tensors, parameter trees and recurrent states between MLX,
PyTorch and NumPy.

A connector never changes a value: every conversion is a bit-for-bit copy or view. bfloat16
crosses without loss: MLX <-> PyTorch natively; NumPy has no bfloat16, so it arrives as
``ml_dtypes.bfloat16`` when that package is installed and otherwise as its raw uint16 bit
pattern (``to_numpy(x, bf16="bits")``; ``to_mlx(bits, dtype="bfloat16")`` reads it back);
``bf16="float32"`` widens, which is exact too. Where memory can be shared it is:

- MLX -> NumPy: the buffer protocol (a view of the evaluated array, bfloat16 included).
- MLX -> PyTorch: DLPack (a view).
- PyTorch -> NumPy: ``Tensor.numpy()`` (a view; bfloat16 through an int16 view).
- NumPy / PyTorch -> MLX: MLX cannot wrap foreign memory, so this copies (once).

Parameter trees convert leaf by leaf (nested dicts/lists/tuples or flat ``{"a.b": array}``);
:func:`nxai_state_dict` / :func:`from_nxai_state_dict` map an xLSTM-Large model to NX-AI's
native ``xLSTMLarge`` names. Recurrent states convert to NX-AI's layout with
:func:`state_to_nxai`: xLSTM-Large ``{block: (C, n, m)}`` as NX-AI's ``xLSTMLarge`` takes it; the
2024 xLSTM's mLSTM states rescaled by 1/sqrt(DH) (our kernels scale q where NX-AI's scale k;
exact when sqrt(DH) is a power of two, else within one rounding) and shaped as NX-AI's step
state.
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx
import numpy as np

Tree = Any

_MX_BY_NAME = {name: getattr(mx, name) for name in (
    "bool_", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "bfloat16", "float32", "float64", "complex64")}


def _torch():
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is in the test extra
        raise ImportError("this conversion needs PyTorch (pip install torch)") from err
    return torch


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _ml_bfloat16():
    try:
        import ml_dtypes
    except ImportError:
        return None
    return ml_dtypes.bfloat16


# ------------------------------------------------------------------------------ tensors
def to_numpy(x: Any, *, bf16: str = "auto") -> np.ndarray:
    """An MLX array or torch tensor as a NumPy array (a view where the memory can be shared).

    bfloat16: ``"auto"`` gives ``ml_dtypes.bfloat16`` if installed, else the uint16 bits;
    ``"bits"`` the uint16 bits; ``"float32"`` the exact float32 widening.
    """
    if bf16 not in ("auto", "bits", "float32"):
        raise ValueError(f"bf16 must be 'auto', 'bits' or 'float32', got {bf16!r}")
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, mx.array):
        if x.dtype == mx.bfloat16:
            if bf16 == "float32":
                return np.asarray(x.astype(mx.float32))
            bits = np.asarray(x.view(mx.uint16))
            ml = _ml_bfloat16() if bf16 == "auto" else None
            return bits.view(ml) if ml is not None else bits
        return np.asarray(x)
    if _is_torch(x):
        torch = _torch()
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            if bf16 == "float32":
                return t.float().numpy()
            bits = t.view(torch.int16).numpy().view(np.uint16)
            ml = _ml_bfloat16() if bf16 == "auto" else None
            return bits.view(ml) if ml is not None else bits
        return t.numpy()
    return np.asarray(x)


def to_mlx(x: Any, dtype: str | mx.Dtype | None = None) -> mx.array:
    """A NumPy array or torch tensor as an MLX array (a copy: MLX cannot wrap foreign memory).

    ``dtype="bfloat16"`` reads a uint16/int16 NumPy array as bfloat16 bits (see
    :func:`to_numpy`); any other ``dtype`` must equal the source's (connectors never cast).
    """
    if isinstance(dtype, str) and dtype not in _MX_BY_NAME:  # was a bare KeyError
        raise ValueError(f"to_mlx: unknown dtype {dtype!r}; choose from {', '.join(_MX_BY_NAME)}")
    want = _MX_BY_NAME[dtype] if isinstance(dtype, str) else dtype
    if isinstance(x, mx.array):
        out = x
    elif _is_torch(x):
        torch = _torch()
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        # bool, bfloat16 and every numeric dtype cross through DLPack (a single copy); x.conj() came as x
        t = t.resolve_conj().resolve_neg()
        out = mx.from_dlpack(t.contiguous()) if t.dtype != torch.bool else mx.array(t.numpy())
    else:
        a = np.asarray(x)
        ml = _ml_bfloat16()
        if ml is not None and a.dtype == ml:
            out = mx.array(a.view(np.uint16)).view(mx.bfloat16)
        elif want is not None and want == mx.bfloat16 and a.dtype in (np.uint16, np.int16):  # None == Dtype raised
            return mx.array(a).view(mx.bfloat16)
        elif a.dtype.kind not in "biufc":  # text or objects failed in MLX as std::bad_cast
            raise TypeError(f"to_mlx: an array of {a.dtype} holds no numbers")
        else:
            out = mx.array(a)
    if want is not None and out.dtype != want:
        raise TypeError(f"to_mlx: source dtype {out.dtype} differs from the requested {want}; connectors do not cast")
    return out


def to_torch(x: Any):
    """An MLX or NumPy array as a CPU torch tensor (a view where the memory can be shared:
    DLPack for MLX, ``torch.from_numpy`` for NumPy; ml_dtypes bfloat16 arrives as bfloat16)."""
    torch = _torch()
    if _is_torch(x):
        return x
    if isinstance(x, mx.array):
        mx.eval(x)
        try:
            return torch.from_dlpack(x)
        except (RuntimeError, TypeError, BufferError):  # e.g. a dtype DLPack lacks: copy via NumPy
            return torch.from_numpy(np.array(x))
    a = np.asarray(x)
    ml = _ml_bfloat16()
    if ml is not None and a.dtype == ml:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def bf16_bits_to_torch(bits: np.ndarray):
    """uint16 bfloat16 bit patterns (from ``to_numpy(..., bf16="bits")``) -> a bfloat16 tensor."""
    torch = _torch()
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)


# ------------------------------------------------------------------------------ trees
def tree_map_leaves(fn: Callable[[Any], Any], tree: Tree) -> Tree:
    """``fn`` on every array leaf of nested dicts / lists / tuples (structure kept; None kept)."""
    if isinstance(tree, dict):
        return {k: tree_map_leaves(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        out = [tree_map_leaves(fn, v) for v in tree]
        return type(tree)(out) if isinstance(tree, tuple) else out
    if tree is None:
        return None
    return fn(tree)


def tree_to_numpy(tree: Tree, *, bf16: str = "auto") -> Tree:
    return tree_map_leaves(lambda a: to_numpy(a, bf16=bf16), tree)


def tree_to_torch(tree: Tree) -> Tree:
    return tree_map_leaves(to_torch, tree)


def tree_to_mlx(tree: Tree) -> Tree:
    return tree_map_leaves(to_mlx, tree)


def flat_parameters(model) -> dict[str, mx.array]:
    """``{"backbone.blocks.0.mlstm_layer.q.weight": array, ...}``: the model's parameters under
    their checkpoint names."""
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.parameters()))


def torch_state_dict(model) -> dict[str, Any]:
    """The model's parameters as a flat dict of torch tensors (views), under our names."""
    return {k: to_torch(v) for k, v in flat_parameters(model).items()}


def nxai_state_dict(model) -> dict[str, Any]:
    """Parameters in NX-AI's native naming, as torch tensors: xLSTM-Large -> ``xLSTMLarge``
    (``weight_mode="single"``: ``embedding.weight`` for ``backbone.embeddings.weight``, other
    names equal, every bias of a ``use_bias`` model included); the 2024 xLSTM's names are NX-AI's
    already. NX-AI's ``use_bias`` out norm has a bias that a model built from such a config lacks
    (it follows transformers, whose out norm has none): zeros stand in, which compute the same."""
    out = {}
    for key, value in flat_parameters(model).items():
        if key == "backbone.embeddings.weight":
            key = "embedding.weight"
        out[key] = to_torch(value)
    for tied, embedding in (("tie_word_embeddings", "embedding.weight"), ("tie_weights", "token_embedding.weight")):
        if getattr(model.config, tied, False) and embedding in out:  # (2024: NX-AI's strict load missed it)
            out["lm_head.weight"] = out[embedding]
    norm = out.get("backbone.out_norm.weight")
    if getattr(model.config, "use_bias", False) and norm is not None and "backbone.out_norm.bias" not in out:
        out["backbone.out_norm.bias"] = _torch().zeros_like(norm)
    return out


def from_nxai_state_dict(state_dict: dict[str, Any], config, model=None) -> dict[str, mx.array]:
    """NX-AI ``xLSTMLarge`` state dict (single or fused weights, biases of ``use_bias`` too) ->
    our flat parameters. A ``use_bias`` one holds an out norm bias, which a model built from the
    config lacks (it follows transformers): pass that ``model`` and its out norm becomes the one
    the state dict holds (:func:`xlstm_metal.loading.fit_out_norm`), so the parameters load
    into it strictly."""
    from .loading import fit_out_norm, sanitize_xlstm_large

    params = sanitize_xlstm_large({k: to_mlx(v) for k, v in state_dict.items()}, config)
    if model is not None:
        fit_out_norm(model, params)
    return params


# ------------------------------------------------------------------------------ states
def _block_kinds(model) -> list[str]:
    kinds = []
    for block in model.blocks:
        kinds.append(getattr(block, "kind", "mLSTM-large"))
    return kinds


def _owned(t):
    # NX-AI's step kernels update state tensors in place; a view of an MLX buffer would let
    # them overwrite our (immutable, possibly still lazily referenced) arrays.
    return t.clone()


def state_to_nxai(model, state: list) -> Any:
    """Our state (one entry per block) -> NX-AI's layout, as torch tensors.

    xLSTM-Large: ``{block_index: (C, n, m)}`` (the dict NX-AI's ``xLSTMLarge.forward`` takes).
    2024 xLSTM: ``{"block_i": {"mlstm_state": (C, n, m), "conv_state": (conv,)}}`` for mLSTM
    blocks (C, n scaled by 1/sqrt(DH), n [B,NH,DH,1], m [B,NH,1,1]) and
    ``{"slstm_state": stack(h, c, n, m) [4, B, NH*DH], "conv_state": (conv,)}`` for sLSTM blocks,
    as NX-AI's ``xLSTMLMModel.step`` takes it. NX-AI's conv windows hold K inputs, ours the K - 1
    the next step reads: the oldest slot (shifted out unread) is zero, so ours -> NX-AI's -> ours
    is exact.
    """
    kinds = _block_kinds(model)
    torch = _torch()
    if all(k == "mLSTM-large" for k in kinds):
        return {i: tuple(_owned(to_torch(t)) for t in s) for i, s in enumerate(state)}

    def conv_to(conv: mx.array):
        # NX-AI keeps K inputs, the oldest of which the next step shifts out unread; ours
        # keeps the K - 1 that matter, so the oldest slot is zero.
        return (torch.cat([torch.zeros_like(to_torch(conv[:, :1])), to_torch(conv)], dim=1),)

    out = {}
    for i, (block, kind, s) in enumerate(zip(model.blocks, kinds, state)):
        if kind == "mLSTM":
            C, n, m, conv = s
            C, n, m = block.xlstm.mlstm_cell.state_to_nxai((C, n, m))
            mx.eval(C, n, m)
            out[f"block_{i}"] = {"mlstm_state": (_owned(to_torch(C)), _owned(to_torch(n)), _owned(to_torch(m))),
                                 "conv_state": conv_to(conv)}
        else:
            c, n, m, h = s[:4]
            flat = [to_torch(t).reshape(t.shape[0], -1) for t in (h, c, n, m)]
            entry = {"slstm_state": torch.stack(flat)}
            if len(s) > 4:
                entry["conv_state"] = conv_to(s[4])
            out[f"block_{i}"] = entry
    return out


def state_from_nxai(model, state: Any) -> list:
    """Inverse of :func:`state_to_nxai` (MLX arrays)."""
    kinds = _block_kinds(model)
    if all(k == "mLSTM-large" for k in kinds):
        return [tuple(to_mlx(t) for t in state[i]) for i in range(len(kinds))]
    out = []
    for i, (block, kind, ours) in enumerate(zip(model.blocks, kinds, model.make_state(1))):
        entry = state[f"block_{i}"]
        if kind == "mLSTM":
            C, n, m = block.xlstm.mlstm_cell.state_from_nxai(tuple(to_mlx(t) for t in entry["mlstm_state"]))
            out.append((C, n, m, to_mlx(entry["conv_state"][0])[:, 1:]))
        else:
            shape = ours[0].shape[1:]
            h, c, n, m = (to_mlx(t).reshape(t.shape[0], *shape) for t in entry["slstm_state"])
            s = (c, n, m, h)
            if "conv_state" in entry:
                s = s + (to_mlx(entry["conv_state"][0])[:, 1:],)
            out.append(s)
    return out


__all__ = [
    "bf16_bits_to_torch",
    "flat_parameters",
    "from_nxai_state_dict",
    "nxai_state_dict",
    "state_from_nxai",
    "state_to_nxai",
    "to_mlx",
    "to_numpy",
    "to_torch",
    "torch_state_dict",
    "tree_map_leaves",
    "tree_to_mlx",
    "tree_to_numpy",
    "tree_to_torch",
]
