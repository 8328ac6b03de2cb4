"""Fused projections: several layers that read the same input, run as one matmul per group.

Fusing is an inference fast path. It never replaces the layers in the module tree: each layer's
arrays become row views of the fused arrays (no extra memory, checkpoint names unchanged), and
the owner keeps the fused arrays in its module state under a private key (``_fused_...``), so
``mx.compile(..., inputs=model.state)`` takes them as inputs and ``parameters()`` skips them.

Layers are grouped by how they compute: plain ``nn.Linear`` layers form one group, quantized
layers with equal (bits, group size, mode) another (their packed weights, scales and biases
concatenate along the output axis like float weights). Any other module (a LoRA wrapper, a
user's own layer) is called as it stands. The groups are derived from the tree on every call,
and a fused copy is used only while the tree still holds the very layers that were fused:
whatever replaced a layer since (``update_modules``, ``nn.quantize``, assignment) is what runs.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from .. import _blas
from ..kernels.fast.quantized import quantized_matmul
from ..kernels.fast.skinny import linear_product, plain_products_vjp
from ..kernels.fast.train_rows import join_columns_supported, split_columns

FusedGroup = dict[str, mx.array]


def _plain_call(layer: nn.Module, base: type) -> bool:
    return isinstance(layer, base) and getattr(type(layer).__call__, "computes_as", type(layer).__call__) is base.__call__


def fusion_kind(layer: nn.Module) -> tuple | None:
    """How ``layer`` computes, as a grouping key; None for a layer that cannot be fused.

    A subclass is fused only when its ``__call__`` is the base class's, or declares
    ``__call__.computes_as = <base>.__call__`` (a faster kernel for the same math)."""
    if _plain_call(layer, nn.Linear):
        return ("linear", layer.weight.dtype)
    if _plain_call(layer, nn.QuantizedLinear):
        return ("quantized", layer.group_size, layer.bits, layer.mode, layer.get("biases") is not None)
    return None


def fusion_groups(layers: Sequence[nn.Module]) -> list[tuple[tuple, list[int]]]:
    """Indices of ``layers`` grouped by :func:`fusion_kind` (groups of two or more only), in
    order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for index, layer in enumerate(layers):
        kind = fusion_kind(layer)
        if kind is not None:
            groups.setdefault(kind, []).append(index)
    return [(kind, members) for kind, members in groups.items() if len(members) > 1]


def _array_names(kind: tuple) -> tuple[str, ...]:
    if kind[0] == "linear":
        return ("weight",)
    return ("weight", "scales", "biases") if kind[4] else ("weight", "scales")


def fuse_layers(layers: Sequence[nn.Module]) -> list[FusedGroup]:
    """Concatenate each group's arrays along the output axis; the layers' arrays become row views
    of them. Returns one dict of arrays per group of :func:`fusion_groups`."""
    fused = []
    for kind, members in fusion_groups(layers):
        group: FusedGroup = {}
        for name in _array_names(kind):
            joined = mx.concatenate([layers[j][name] for j in members], axis=0)
            if name == "weight" and kind[0] == "linear":
                joined = gemv_layout(joined)
            mx.eval(joined)
            start = 0
            for j in members:
                rows = layers[j][name].shape[0]
                layers[j][name] = joined[start : start + rows]
                start += rows
            group[name] = joined
        fused.append(group)
    mx.eval([layer.parameters() for layer in layers])
    return fused


def unfuse_layers(layers: Sequence[nn.Module]) -> None:
    """Give each fused layer its own contiguous arrays again: as views into a fused matrix (column
    slices of it on the CPU) the separate matmuls would copy them on every call."""
    for kind, members in fusion_groups(layers):
        for j in members:
            for name in _array_names(kind):
                layers[j][name] = mx.contiguous(layers[j][name])
    mx.eval([layer.parameters() for layer in layers])


def layer_ids(layers: Sequence[nn.Module]) -> tuple[int, ...]:
    return tuple(id(layer) for layer in layers)


def fused_outputs_unbiased(
    x: mx.array, fused: list[FusedGroup] | None, layers: Sequence[nn.Module], defer: Sequence[int] = ()
) -> tuple[list[mx.array | None], list[mx.array | None], mx.array | None]:
    """:func:`fused_outputs` with the biases of the fused layers left out: (outputs, biases,
    deferred), ``biases[j]`` the bias still to add to ``outputs[j]`` (None where there is none or
    the layer was called as it stands). A fused kernel that reads the raw outputs adds them itself.

    ``defer``: indices of layers whose product a kernel computes itself when they form exactly one
    float group: their outputs are None and ``deferred`` is that group's fused weight [out, in]
    (None, and every output computed, otherwise)."""
    outs: list[mx.array | None] = [None] * len(layers)
    biases: list[mx.array | None] = [None] * len(layers)
    deferred = None
    done = [False] * len(layers)
    if fused is not None:
        for (kind, members), group in zip(fusion_groups(layers), fused):
            for j in members:
                biases[j] = layers[j].bias if "bias" in layers[j] else None
                done[j] = True
            if defer and kind[0] == "linear" and list(members) == list(defer):
                deferred = group["weight"]
                continue
            y = group_product(x, kind, group)
            bounds, start = [], 0
            for j in members[:-1]:
                start += layers[j].weight.shape[0]
                bounds.append(start)
            widths = tuple(layers[j].weight.shape[0] for j in members)
            if _TRACED_FUSION.get() and join_columns_supported(y.dtype, widths):
                pieces = split_columns(y, bounds)  # the backward joins the pieces in one kernel
            else:
                pieces = mx.split(y, bounds, axis=-1)
            for j, out in zip(members, pieces):
                outs[j] = out
    return [layer(x) if not fused_j else out for layer, out, fused_j in zip(layers, outs, done)], biases, deferred


def group_product(x: mx.array, kind: tuple, group: FusedGroup) -> mx.array:
    """One fused group's product for x [..., in] -> [..., sum of its layers' outs] (``kind`` its
    :func:`fusion_kind`): x @ w.T through the skinny CUDA kernel when switched on (in the traced
    training step the product whose weight gradient comes out row-major: see
    :func:`linear_rows_grad`), or the quantized product."""
    if kind[0] == "linear":
        return linear_rows_grad(x, group["weight"]) if _TRACED_FUSION.get() else linear_product(x, group["weight"])
    return quantized_matmul(x, group["weight"], group["scales"], group.get("biases"),
                            group_size=kind[1], bits=kind[2], mode=kind[3])


def fused_outputs(x: mx.array, fused: list[FusedGroup] | None, layers: Sequence[nn.Module]) -> list[mx.array]:
    """Each layer's output for input ``x`` [..., in]: one matmul per fused group, the other layers
    called as they are. ``fused=None`` calls every layer."""
    outs, biases, _ = fused_outputs_unbiased(x, fused, layers)
    # Biases are added per layer so each output keeps the dtype the separate layer gives.
    return [out if bias is None else out + bias for out, bias in zip(outs, biases)]


def gemv_layout(weight: mx.array) -> mx.array:
    """``weight`` [out, in], evaluated, in the layout one-row products (decoding) read fastest.
    On the CPU with OpenBLAS's GEMV, a contiguous [in, out] array returned as its transposed
    view (LM head 20.5 -> 11.8 ms, gate|up of 12 blocks 19.3 -> 12.8 ms, 125m shape); the
    BLAS forwarder's own row kernel (:func:`xlstm_metal._blas.gemv_rows`) and GPUs read the
    row-major layout faster, so it stays there."""
    if mx.default_device() == mx.cpu and not _blas.gemv_rows():
        weight = mx.contiguous(weight.T)
        mx.eval(weight)
        return weight.T
    mx.eval(weight)
    return weight


_TRACED_FUSION = contextvars.ContextVar("xlstm_metal_traced_fusion", default=False)
_JOINED_WEIGHTS: contextvars.ContextVar[dict[int, list[mx.array]] | None] = contextvars.ContextVar(
    "xlstm_metal_joined_weights", default=None)


@contextlib.contextmanager
def joined_weights(weights: dict[int, list[mx.array]]) -> Iterator[None]:
    """Inside (with :func:`traced_fusion`): the groups of the owner module ``m`` with
    ``id(m)`` in ``weights`` run on the given joined weights, one [sum of outs, in] array per
    group of :func:`fusion_groups` in order, instead of concatenating their layers' weights in
    the traced graph. The training step builds them in one kernel per group
    (:func:`~xlstm_metal.kernels.fast.train_rows.cast_joined`) from the float32 masters and
    differentiates with respect to them."""
    token = _JOINED_WEIGHTS.set(weights)
    try:
        yield
    finally:
        _JOINED_WEIGHTS.reset(token)


@contextlib.contextmanager
def traced_fusion(enabled: bool = True) -> Iterator[None]:
    """Inside: layers that :meth:`FusedLayers.outputs` would fuse and that are not fused already
    run as one matmul per group whose weight is concatenated from the layers' current arrays in
    the traced graph (differentiable: training's cast parameters flow through it). For training,
    where the weights change every step: one wide GEMM per group instead of one per layer (the
    gate projections have 4 outputs each), and one input gradient instead of a sum of six.
    Only when every group is plain ``nn.Linear`` layers; anything else runs as it stands.
    The groups' products and the plain bias-free layers called through :func:`linear_output`
    run as :func:`linear_rows_grad` (row-major weight gradients)."""
    token = _TRACED_FUSION.set(enabled)
    try:
        yield
    finally:
        _TRACED_FUSION.reset(token)


@mx.custom_function
def linear_rows_grad(x: mx.array, weight: mx.array) -> mx.array:
    """``x @ weight.T`` (x [..., in], weight [out, in]) whose weight gradient is computed as
    ``g.T @ x`` [out, in], row-major. Autodiff of ``x @ weight.T`` gives the transpose of
    ``x.T @ g`` instead: a column-major view, which every reader of the gradient then walks
    at a stride (the clip norm's squares) or copies first (the AdamW kernel): at the 1.3b
    shape 8 copies per block and strided squares, ~10 ms of a 228 ms H200 step (S5R3 trace).
    The same products; dx is autodiff's ``g @ weight``."""
    return x @ weight.T


linear_rows_grad.vjp(plain_products_vjp)


def traced_fusion_active() -> bool:
    """True inside :func:`traced_fusion` (the training step's fast path)."""
    return _TRACED_FUSION.get()


def plain_linear_weight(layer: nn.Module) -> mx.array | None:
    """The weight of a plain bias-free ``nn.Linear`` (or a subclass computing as one), else None."""
    kind = fusion_kind(layer)
    return layer.weight if kind is not None and kind[0] == "linear" and "bias" not in layer else None


def linear_output(layer: nn.Module, x: mx.array) -> mx.array:
    """``layer(x)``; inside :func:`traced_fusion` (the training step's fast path) a plain
    bias-free ``nn.Linear`` runs as :func:`linear_rows_grad` (row-major weight gradient)."""
    weight = plain_linear_weight(layer) if _TRACED_FUSION.get() else None
    return layer(x) if weight is None else linear_rows_grad(x, weight)


def traced_groups(layers: Sequence[nn.Module]) -> list[FusedGroup] | None:
    """The fused weights of :func:`fusion_groups` as lazy concatenations (no evaluation, no views
    put back into the layers); None unless every group is float ``nn.Linear`` layers."""
    groups = fusion_groups(layers)
    if not groups or any(kind[0] != "linear" for kind, _ in groups):
        return None
    return [{"weight": mx.concatenate([layers[j].weight for j in members], axis=0)} for _, members in groups]


class FusedLayers:
    """Fusing for a module that owns some layers by name (a neuron, the FFN): keeps the fused
    arrays under ``owner[key]`` and the ids of the fused layers outside the tree."""

    def __init__(self, key: str, names: Sequence[str]):
        self.key, self.names = key, tuple(names)

    def layers(self, owner: nn.Module) -> list[nn.Module]:
        return [owner[name] for name in self.names]

    def fuse(self, owner: nn.Module) -> None:
        self.unfuse(owner)
        layers = self.layers(owner)
        owner[self.key] = fuse_layers(layers)
        object.__setattr__(owner, self.key + "_ids", layer_ids(layers))

    def unfuse(self, owner: nn.Module) -> None:
        if owner.pop(self.key, None) is not None:
            unfuse_layers(self.layers(owner))
        owner.__dict__.pop(self.key + "_ids", None)

    def _current(self, owner: nn.Module) -> tuple[list[nn.Module], list[FusedGroup] | None]:
        layers = self.layers(owner)
        fused = owner.get(self.key) if self.key in owner else None
        if fused is not None and owner.__dict__.get(self.key + "_ids") != layer_ids(layers):
            fused = None  # a layer was replaced in the tree since fuse_projections(): run what the tree holds
        if fused is None and _TRACED_FUSION.get():
            given = (_JOINED_WEIGHTS.get() or {}).get(id(owner))
            fused = [{"weight": w} for w in given] if given is not None else traced_groups(layers)
        return layers, fused

    def outputs(self, owner: nn.Module, x: mx.array) -> list[mx.array]:
        """Each named layer's output for ``x``, through the fused arrays while they are current."""
        layers, fused = self._current(owner)
        return fused_outputs(x, fused, layers)

    def joined_product(self, owner: nn.Module, x: mx.array) -> mx.array | None:
        """Inside :func:`traced_fusion`: the product of all named layers as one matmul, their
        outputs side by side [..., sum of outs] (:func:`linear_rows_grad`), when they are plain
        bias-free ``nn.Linear`` layers of one group; None otherwise (or outside)."""
        if not _TRACED_FUSION.get() or owner.get(self.key) is not None:
            return None
        layers = self.layers(owner)
        groups = fusion_groups(layers)
        if len(groups) != 1 or groups[0][0][0] != "linear" or len(groups[0][1]) != len(layers) \
                or any("bias" in layer for layer in layers):
            return None
        given = (_JOINED_WEIGHTS.get() or {}).get(id(owner))
        weight = given[0] if given is not None else mx.concatenate([layer.weight for layer in layers], axis=0)
        return linear_rows_grad(x, weight)

    def outputs_unbiased(self, owner: nn.Module, x: mx.array, defer: Sequence[int] = ()):
        """:meth:`outputs` as (outputs, biases still to add, deferred group's weight) (see
        :func:`fused_outputs_unbiased`)."""
        layers, fused = self._current(owner)
        return fused_outputs_unbiased(x, fused, layers, defer)
