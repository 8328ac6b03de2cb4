"""One ``mx.compile`` for all blocks of the same structure.

A model's blocks are alike: the same module types, the same settings, arrays of the same shapes.
Compiling each block's forward on its own traces every block again at each new input shape (32
traces for a 7B prompt of a new length: 34-47 ms for a 512-640-token prompt's first prefill on an
H200 machine against 14-17 ms once traced, S22R6). Here blocks that are alike share one compiled
function that takes the block's arrays as its first argument (``mx.compile`` flattens a Module's
tree in C++ and rebuilds it as plain dicts and lists for the trace): one trace per new input
signature, replayed for every block with its own arrays, so weight updates are seen as before. The trace runs the first block's own method with that block's arrays swapped
for the tracers for the duration of the trace (put back afterwards, also on errors), so it is
that block's code, fused layers included.

Blocks are alike when :func:`module_signature` says so: module types and paths, their settings
(plain attributes: numbers, strings, dtypes, tuples of them), which fused projection groups are
current, and the shapes and dtypes of their arrays. Any attribute it cannot compare makes a block
unlike every other, so it is compiled on its own, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ..cells.fused import FusedLayers

_PLAIN = (int, float, str, bool, type(None), mx.Dtype)


def _attribute(module: nn.Module, name: str, value: Any) -> Any:
    """A comparable stand-in for one of ``module``'s attributes (outside its tree)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value):
        if name.endswith("_ids"):
            # ids of fused layers (cells.fused.FusedLayers): the fusion is current while they are
            # this module's children; the names they have stand in for them (None: one was replaced)
            children = {id(child): key for key, child in module.items() if isinstance(child, nn.Module)}
            return tuple(children.get(i) for i in value)
        return value
    if isinstance(value, FusedLayers):
        return ("FusedLayers", value.key, value.names)
    return ("unique", id(value))  # not comparable across blocks: this block stays on its own


def _arrays(tree: Any, path: str, out: list) -> None:
    if isinstance(tree, mx.array):
        out.append((path, tree.shape, tree.dtype))
    elif isinstance(tree, nn.Module):
        return
    elif isinstance(tree, dict):
        for key, value in tree.items():
            _arrays(value, f"{path}.{key}", out)
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            _arrays(value, f"{path}.{i}", out)


def module_signature(module: nn.Module) -> tuple:
    """What a trace of ``module``'s forward depends on besides its inputs' shapes: per submodule
    its path, type and attributes (:func:`_attribute`), and the paths, shapes and dtypes of the
    arrays it holds (fused groups included). Equal signatures: one trace serves both modules."""
    parts: list = []
    stack: list[tuple[str, nn.Module]] = [("", module)]
    while stack:
        path, m = stack.pop()
        attrs = tuple(sorted((k, _attribute(m, k, v)) for k, v in vars(m).items() if k not in ("_no_grad", "_training")))
        arrays: list = []
        for key, value in m.items():
            if isinstance(value, nn.Module):
                stack.append((f"{path}.{key}", value))
            elif isinstance(value, (list, tuple)) and any(isinstance(v, nn.Module) for v in value):
                stack.extend((f"{path}.{key}.{i}", v) for i, v in enumerate(value) if isinstance(v, nn.Module))
                _arrays([v for v in value if not isinstance(v, nn.Module)], f"{path}.{key}", arrays)
            else:
                _arrays(value, f"{path}.{key}", arrays)
        parts.append((path, type(m), attrs, tuple(arrays)))
    return tuple(parts)


class _Shared:
    """One compiled forward for the modules of one signature: traced with ``template``'s code
    (any module of the signature: they are alike) and the called module's arrays."""

    def __init__(self, template: nn.Module, method: str):
        self.template, self.method = template, method
        self.compiled = mx.compile(self._traced)

    def _traced(self, arrays: dict, *args):
        # ``arrays``: the called module's tree as mx.compile rebuilds it (plain dicts and lists of tracers)
        template = self.template
        own = tree_map(lambda leaf: leaf, template)  # its own arrays, in plain dicts and lists
        template.update(arrays, strict=True)
        try:
            return getattr(template, self.method)(*args)
        finally:
            template.update(own, strict=True)


def compile_alike(modules: Sequence[nn.Module], method: str, cache: dict) -> list[Callable]:
    """A compiled ``module.<method>(*args)`` per module of ``modules``: the modules of one
    :func:`module_signature` share one ``mx.compile`` (one trace per new input shape for all of
    them), kept in ``cache`` by signature so that a caller's cache keeps the traces across calls.

    Each module's signature is taken at its callable's first call (a module replaced or changed
    since the last list was made is seen), not here: on a GPU the first block's kernels then run
    while the host takes the later blocks' signatures (~0.1 ms each at the 7B shape; all 32 up
    front held a 2,048-token H200 prefill's first kernel back by 3-5 ms)."""
    return [_bound_at_first_call(module, method, cache) for module in modules]


def _bound_at_first_call(module: nn.Module, method: str, cache: dict) -> Callable:
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            signature = module_signature(module)
            shared = cache.get(signature)
            if shared is None:
                shared = cache[signature] = _Shared(module, method)
            # this module has the signature now, so a trace with its code is the signature's trace
            # (an earlier template may have changed or left the model since)
            shared.template = module
            compiled = shared.compiled
        return compiled(module, *args)

    return call


def signature_count(modules: Sequence[nn.Module]) -> int:
    """How many distinct :func:`module_signature` s ``modules`` have (traces per new input shape)."""
    return len({module_signature(module) for module in modules})
