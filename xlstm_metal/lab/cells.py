"""The cell registry of the architecture lab: LIV-style primitives with declared ports.

Every cell is an MLX module. It declares its input and output ports (name -> feature size) and,
where it has one, its own recurrent state. Every port carries ``[B, S, size]`` arrays; heads,
when a cell has them, live inside the cell. The call contract is::

    outputs, state = cell(inputs, state)    # inputs/outputs: {port: [B, S, size]}

``state=None`` means the cell's zero state; stateless cells return ``None``. The recurrence math
is the project's: matrix memory runs the mLSTM kernels of ``xlstm_metal.kernels``, scalar memory
is the sLSTM cell of ``xlstm_metal.cells.slstm``, norms and projections are the cells the
hand-written blocks use, so a wiring of these cells computes what those blocks compute.

Users add cells with :func:`register_cell` (a :class:`LabCell` subclass, or any class with the
same interface).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from ..cells.activations import sigmoid, silu
from ..cells.norms import MultiHeadLayerNorm as _LargeMultiHeadNorm
from ..cells.norms import RMSNorm as _RMSNorm
from ..cells.norms import soft_cap
from ..cells.slstm import sLSTMCell
from ..cells.xlstm_2024 import CausalConv1d, LinearHeadwise, Module2024, _ConvWeights
from ..cells.xlstm_2024 import LayerNorm as _LayerNorm2024
from ..cells.xlstm_2024 import MultiHeadLayerNorm as _GroupNorm2024
from ..kernels import get_mlstm_kernel, resolve_kernel_name
from ..kernels.mlstm import zero_state as _mlstm_zero_state

Ports = dict[str, int]
CellState = tuple | None


class CellError(ValueError):
    """A cell that cannot be built from its parameters (the message names the parameter)."""


ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "identity": lambda x: x,
    "silu": silu,
    "gelu": nn.gelu,
    "relu": nn.relu,
    "sigmoid": sigmoid,
    "tanh": mx.tanh,
}


def _activation(name: str) -> Callable[[mx.array], mx.array]:
    if name not in ACTIVATIONS:
        raise CellError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


#: The largest size a cell takes: MLX's array dimensions are 32-bit (3,000,000,000 failed inside MLX
#: with an OverflowError traceback).
MAX_SIZE = 2**31 - 1


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CellError(f"parameter '{name}' must be a positive integer, got {value!r}")
    if value > MAX_SIZE:
        raise CellError(f"parameter '{name}' is {value:,}: a size is at most {MAX_SIZE:,}")
    return value


def _positive_real(name: str, value: Any) -> float:
    # a cap or eps <= 0 gave NaN or sign-flipped outputs
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise CellError(f"parameter '{name}' must be a finite number > 0, got {value!r}")
    return float(value)


def _finite(name: str, value: Any) -> float:
    # NaN or infinity passed through to NaN outputs (or a ValueError traceback in int())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CellError(f"parameter '{name}' must be a finite number, got {value!r}")
    return float(value)


def _divides(what: str, size: int, heads: int) -> None:
    if size % heads:
        raise CellError(f"{what} {size} is not divisible by the number of heads {heads}")


class LabCell(Module2024):
    """Base class of lab cells. Subclasses set their ports in ``__init__`` with
    :meth:`set_ports` and implement ``__call__(inputs, state) -> (outputs, state)``.

    ``stateful`` cells also implement ``zero_state(batch_size) -> tuple of arrays``; a cycle in
    a wiring must pass through one of them (their input arrives one step late).
    """

    stateful = False
    #: Sharing featurizers applies to cells that have a ``weight`` [out, in].
    shareable = False

    def set_ports(self, inputs: Ports, outputs: Ports) -> None:
        # Outside the parameter tree: plain Python metadata.
        object.__setattr__(self, "input_ports", dict(inputs))
        object.__setattr__(self, "output_ports", dict(outputs))

    def zero_state(self, batch_size: int) -> tuple:
        return ()

    def describe(self) -> str:
        ins = ", ".join(f"{k}[{v}]" for k, v in self.input_ports.items())
        outs = ", ".join(f"{k}[{v}]" for k, v in self.output_ports.items())
        return f"({ins}) -> ({outs})" + (" stateful" if self.stateful else "")


# --------------------------------------------------------------------------------- projections
class LinearProjection(LabCell):
    """y = x W^T (+ b). Ports x [in] -> y [out]. ``heads > 1``: block-diagonal per head (weight
    [heads, out/heads, in/heads], the 2024 xLSTM's headwise projections).

    Sharing: a projection may take its weight from another (``shared_weight``, the whole array)
    or its first rows (partial sharing), so the shared featurizer is one parameter array.
    """

    shareable = True

    def __init__(self, dim: int | None = None, *, input_size: int | None = None, output_size: int | None = None,
                 bias: bool = False, heads: int = 1, shared_rows: int = 0, init_std: float | None = None,
                 bias_init: float | list[float] = 0.0):
        super().__init__()
        in_f = _positive_int("in", input_size if input_size is not None else dim)
        out_f = _positive_int("out", output_size if output_size is not None else dim)
        heads = _positive_int("heads", heads)
        self.heads = self.num_heads = heads
        self.shared_rows = shared_rows
        if heads > 1:
            _divides("input size", in_f, heads)
            _divides("output size", out_f, heads)
        if not 0 <= shared_rows <= out_f:
            raise CellError(f"partial sharing of {shared_rows} rows outside the {out_f} outputs")
        if init_std is not None and _finite("init_std", init_std) < 0:  # 0: a zero start
            raise CellError(f"parameter 'init_std' must be >= 0, got {init_std!r}")
        if isinstance(bias_init, (list, tuple)):
            if len(bias_init) != 2:  # [low, high]: three numbers failed in float() as a traceback
                raise CellError(f"parameter 'bias_init' must be a number or [low, high], got {bias_init!r}")
            bias_init = [_finite("bias_init", v) for v in bias_init]
        else:
            bias_init = _finite("bias_init", bias_init)
        std = init_std if init_std is not None else in_f**-0.5 / (heads**0.5 if heads > 1 else 1)
        own = out_f - shared_rows
        if heads > 1:
            self.weight = mx.random.normal((heads, out_f // heads, in_f // heads)) * std
        elif own:
            self.weight = mx.random.normal((own, in_f)) * std
        if bias:
            # A constant, or [low, high] spread over the outputs (xLSTM's forget gates: 3..6).
            if isinstance(bias_init, (list, tuple)) and len(bias_init) == 2:
                self.bias = mx.linspace(float(bias_init[0]), float(bias_init[1]), out_f)
            else:
                self.bias = mx.full((out_f,), float(bias_init))
        self.set_ports({"x": in_f}, {"y": out_f})

    def __call__(self, inputs, state=None, shared_weight: mx.array | None = None):
        x = inputs["x"]
        if self.heads > 1:
            # The 2024 cells' block-diagonal product (same math, same names as LinearHeadwise).
            return {"y": LinearHeadwise.__call__(self, x)}, None
        if shared_weight is None:
            w = self.weight
        elif self.shared_rows and "weight" in self:
            w = mx.concatenate([shared_weight[: self.shared_rows], self.weight], axis=0)
        else:
            w = shared_weight[: self.output_ports["y"]]
        y = x @ w.T
        if "bias" in self:
            y = y + self.bias
        return {"y": y}, None

    def featurizer(self) -> mx.array:
        """The weight [out, in] the projections that share this one read."""
        return self.weight

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                     quantize_input: bool = False) -> LabCell:
        """``nn.quantize``'s hook: this projection with its weight quantized (MLX's layout, per
        head for a headwise one). A projection that reads another's weight (sharing) stays as it
        is: the weight is the other's, quantized there."""
        if quantize_input:
            raise ValueError("quantize_input is not supported by the lab's projections (weights only)")
        if "weight" not in self or self.shared_rows:
            return self
        return QuantizedLinearProjection(self, group_size, bits, mode)


class QuantizedLinearProjection(LabCell):
    """:class:`LinearProjection` with a quantized weight (what ``nn.quantize`` makes of one): the
    same ports, bias and checkpoint keys, plus ``scales`` / ``biases`` as MLX's
    ``QuantizedLinear`` has them; a headwise weight is quantized head by head
    ([heads, out/heads, packed])."""

    shareable = True

    def __init__(self, source: LinearProjection, group_size: int | None = None, bits: int | None = None,
                 mode: str = "affine"):
        super().__init__()
        w = source.weight
        flat = nn.Linear(w.shape[-1], 1, bias=False)
        flat.weight = w.reshape(-1, w.shape[-1])  # rows are quantized one by one: heads stack exactly
        q = nn.QuantizedLinear.from_linear(flat, group_size, bits, mode=mode)
        self.heads = self.num_heads = source.heads
        self.shared_rows = 0
        self.group_size, self.bits, self.mode = q.group_size, q.bits, q.mode
        self.weight = q.weight.reshape(*w.shape[:-1], -1)
        self.scales = q.scales.reshape(*w.shape[:-1], -1)
        if q.biases is not None:
            self.biases = q.biases.reshape(*w.shape[:-1], -1)
        if "bias" in source:
            self.bias = source.bias
        self.set_ports(source.input_ports, source.output_ports)
        self.freeze(keys=["weight", "scales", "biases"], strict=False)  # as MLX's quantized layers

    def _product(self, x: mx.array) -> mx.array:
        return mx.quantized_matmul(x, self.weight, self.scales, self.get("biases"), transpose=True,
                                   group_size=self.group_size, bits=self.bits, mode=self.mode)

    def __call__(self, inputs, state=None, shared_weight: mx.array | None = None):
        x = inputs["x"]
        if self.heads > 1:
            lead, d = x.shape[:-1], x.shape[-1] // self.heads
            xh = mx.swapaxes(x.reshape(-1, self.heads, d), 0, 1)  # [heads, tokens, in/heads]
            y = mx.swapaxes(self._product(xh), 0, 1).reshape(*lead, -1)
        else:
            y = self._product(x)
        if "bias" in self:
            y = y + self.bias
        return {"y": y}, None

    def featurizer(self) -> mx.array:
        return mx.dequantize(self.weight, self.scales, self.get("biases"), group_size=self.group_size,
                             bits=self.bits, mode=self.mode)


class GatedProjection(LabCell):
    """Gated feed-forward: y = down(act(gate(x)) * up(x)). Ports x [dim] -> y [out].

    ``layout="separate"`` (xLSTM-Large's SwiGLU): proj_up_gate, proj_up, proj_down;
    ``layout="fused"`` (the 2024 xLSTM's gated FFN): proj_up [2 * hidden] = [gate | up], proj_down.
    """

    def __init__(self, dim: int, hidden: int | None = None, *, output_size: int | None = None,
                 activation: str = "silu", layout: str = "separate", bias: bool = False, proj_factor: float = 2.0):
        super().__init__()
        dim = _positive_int("dim", dim)
        if hidden is None:
            hidden = int(round(dim * _positive_real("proj_factor", proj_factor)))
        hidden = _positive_int("hidden", hidden)
        out = _positive_int("out", output_size if output_size is not None else dim)
        if layout not in ("separate", "fused"):
            raise CellError(f"gated_projection layout must be 'separate' or 'fused', got {layout!r}")
        self.layout, self.hidden = layout, hidden
        object.__setattr__(self, "act", _activation(activation))
        if layout == "separate":
            self.proj_up_gate = nn.Linear(dim, hidden, bias=bias)
            self.proj_up = nn.Linear(dim, hidden, bias=bias)
        else:
            self.proj_up = nn.Linear(dim, 2 * hidden, bias=bias)
        self.proj_down = nn.Linear(hidden, out, bias=bias)
        self.set_ports({"x": dim}, {"y": out})

    def __call__(self, inputs, state=None):
        x = inputs["x"]
        if self.layout == "separate":
            gate, up = self.proj_up_gate(x), self.proj_up(x)
        else:
            both = self.proj_up(x)
            gate, up = both[..., : self.hidden], both[..., self.hidden :]
        return {"y": self.proj_down(self.act(gate) * up)}, None


# ------------------------------------------------------------------------------------- gates
class SigmoidGate(LabCell):
    """y = sigmoid(gate) * x. Ports x [dim], gate [dim] -> y [dim]."""

    def __init__(self, dim: int):
        super().__init__()
        dim = _positive_int("dim", dim)
        self.set_ports({"x": dim, "gate": dim}, {"y": dim})

    def __call__(self, inputs, state=None):
        return {"y": sigmoid(inputs["gate"]) * inputs["x"]}, None


class ExponentialGate(LabCell):
    """y = exp(min(gate, max_log)) * x: the unnormalised exponential gate of the xLSTM, capped so
    it cannot overflow. Ports x [dim], gate [dim] -> y [dim]."""

    def __init__(self, dim: int, max_log: float = 10.0):
        super().__init__()
        dim = _positive_int("dim", dim)
        self.max_log = _finite("max_log", max_log)
        self.set_ports({"x": dim, "gate": dim}, {"y": dim})

    def __call__(self, inputs, state=None):
        return {"y": mx.exp(mx.minimum(inputs["gate"], self.max_log)) * inputs["x"]}, None


class SoftCapGate(LabCell):
    """y = cap * tanh(x / cap) (xLSTM-Large's gate and logit soft cap). Ports x [dim] -> y [dim]."""

    def __init__(self, dim: int, cap: float | None = 15.0):
        super().__init__()
        dim = _positive_int("dim", dim)
        self.cap = None if cap is None else _positive_real("cap", cap)
        self.set_ports({"x": dim}, {"y": dim})

    def __call__(self, inputs, state=None):
        return {"y": soft_cap(inputs["x"], self.cap)}, None


class Activation(LabCell):
    """y = act(x). Ports x [dim] -> y [dim]."""

    def __init__(self, dim: int, activation: str = "silu"):
        super().__init__()
        dim = _positive_int("dim", dim)
        self.activation = activation
        object.__setattr__(self, "act", _activation(activation))
        self.set_ports({"x": dim}, {"y": dim})

    def __call__(self, inputs, state=None):
        return {"y": self.act(inputs["x"])}, None


class Sum(LabCell):
    """y = x: a junction. Several connections into ``x`` add up (residuals). Ports x -> y."""

    def __init__(self, dim: int):
        super().__init__()
        dim = _positive_int("dim", dim)
        self.set_ports({"x": dim}, {"y": dim})

    def __call__(self, inputs, state=None):
        return {"y": inputs["x"]}, None


# ------------------------------------------------------------------------------------- norms
class RMSNormCell(_RMSNorm, LabCell):
    """RMSNorm (xLSTM-Large's). Ports x [dim] -> y [dim]. Parameters ``weight`` (and ``bias``)."""

    def __init__(self, dim: int, eps: float = 1e-6, force_float32: bool = True, bias: bool = False):
        _RMSNorm.__init__(self, _positive_int("dim", dim), _positive_real("eps", eps), force_float32=force_float32)
        if bias:
            self.bias = mx.zeros((dim,))
        self.set_ports({"x": dim}, {"y": dim})

    def __call__(self, inputs, state=None):
        y = _RMSNorm.__call__(self, inputs["x"])
        return {"y": y + self.bias if "bias" in self else y}, None


class LayerNormCell(_LayerNorm2024, LabCell):
    """LayerNorm with scale (1 + weight) (the 2024 xLSTM's). Ports x [dim] -> y [dim]."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False):
        _LayerNorm2024.__init__(self, _positive_int("dim", dim), bias=bias, eps=_positive_real("eps", eps))
        self.set_ports({"x": dim}, {"y": dim})

    def __call__(self, inputs, state=None):
        return {"y": _LayerNorm2024.__call__(self, inputs["x"])}, None


class MultiHeadLayerNormCell(LabCell):
    """Layer norm per head. Ports x [dim] -> y [dim], dim = num_heads * head_dim.

    ``residual_weight=False``: xLSTM-Large's form (scale ``weight``, eps 1e-6);
    ``True``: the 2024 xLSTM's group norm (scale 1 + weight, eps 1e-5).
    """

    def __init__(self, dim: int, num_heads: int = 1, eps: float | None = None, residual_weight: bool = False,
                 weight: bool = True, force_float32: bool = True, bias: bool = False):
        super().__init__()
        dim, num_heads = _positive_int("dim", dim), _positive_int("num_heads", num_heads)
        _divides("dim", dim, num_heads)
        self.num_heads = num_heads
        self.residual_weight = residual_weight
        self.eps = (1e-5 if residual_weight else 1e-6) if eps is None else _positive_real("eps", eps)
        self.force_float32 = force_float32
        if weight:
            self.weight = mx.zeros((dim,)) if residual_weight else mx.ones((dim,))
        if bias:
            self.bias = mx.zeros((dim,))
        self.set_ports({"x": dim}, {"y": dim})

    def __call__(self, inputs, state=None):
        x = inputs["x"]
        B, S, D = x.shape
        x = x.reshape(B, S, self.num_heads, D // self.num_heads)
        # The hand-written norms' math on this module's own weight.
        if self.residual_weight:
            return {"y": _GroupNorm2024.__call__(self, x)}, None
        y = _LargeMultiHeadNorm.__call__(self, x) if "weight" in self else \
            mx.fast.layer_norm(x.astype(mx.float32) if self.force_float32 else x, None, None, self.eps) \
            .astype(x.dtype).reshape(B, S, D)
        return {"y": y + self.bias if "bias" in self else y}, None


# ---------------------------------------------------------------------------------- memories
def _to_heads(x: mx.array, heads: int) -> mx.array:
    B, S, D = x.shape
    return x.reshape(B, S, heads, D // heads).transpose(0, 2, 1, 3)


def _from_heads(x: mx.array) -> mx.array:
    B, NH, S, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, S, NH * D)


def _repeat_kv(x: mx.array, groups: int) -> mx.array:
    """[B, NHkv, S, D] -> [B, NHkv * groups, S, D]: each key/value head serves ``groups`` heads."""
    return x if groups == 1 else mx.repeat(x, groups, axis=1)


class MatrixMemory(LabCell):
    """The mLSTM matrix memory (C, n, m). Ports q, k [qk_dim], v [v_dim], i, f [num_heads]
    (gate pre-activations) -> h [v_dim]. State (C [B, NH, DQK, DV], n [B, NH, DQK], m [B, NH, 1]).

    The recurrence is a kernel of ``xlstm_metal.kernels``: ``kernel`` for S > 1 (chunkwise by
    default), ``step_kernel`` for S == 1. ``kv_heads`` < num_heads shares each key/value head
    among num_heads / kv_heads query heads (grouped like GQA): k, v ports then have
    kv_heads * head_dim features.
    """

    stateful = True

    def __init__(self, num_heads: int, qk_dim: int, v_dim: int, *, kv_heads: int | None = None,
                 kernel: str = "chunkwise", step_kernel: str = "step", chunk_size: int = 64, eps: float = 1e-6,
                 state_dtype: str = "float32"):
        super().__init__()
        NH = _positive_int("num_heads", num_heads)
        qk_dim, v_dim = _positive_int("qk_dim", qk_dim), _positive_int("v_dim", v_dim)
        _divides("qk_dim", qk_dim, NH)
        _divides("v_dim", v_dim, NH)
        kv = NH if kv_heads is None else _positive_int("kv_heads", kv_heads)
        if NH % kv:
            raise CellError(f"num_heads {NH} is not a multiple of kv_heads {kv}")
        try:
            self.kernel, self.step_kernel = resolve_kernel_name(kernel), resolve_kernel_name(step_kernel)
        except KeyError as err:
            raise CellError(err.args[0]) from None
        if state_dtype not in ("float32", "bfloat16", "float16"):
            raise CellError(f"state_dtype must be float32, bfloat16 or float16, got {state_dtype!r}")
        self.num_heads, self.kv_heads = NH, kv
        self.dqk, self.dv = qk_dim // NH, v_dim // NH
        self.chunk_size, self.eps = _positive_int("chunk_size", chunk_size), _positive_real("eps", eps)
        self.state_dtype = getattr(mx, state_dtype)
        self.set_ports({"q": qk_dim, "k": self.dqk * kv, "v": self.dv * kv, "i": NH, "f": NH}, {"h": v_dim})

    def zero_state(self, batch_size: int) -> tuple:
        return _mlstm_zero_state(batch_size, self.num_heads, self.dqk, self.dv, self.state_dtype)

    def __call__(self, inputs, state=None):
        NH, groups = self.num_heads, self.num_heads // self.kv_heads
        q = _to_heads(inputs["q"], NH)
        k = _repeat_kv(_to_heads(inputs["k"], self.kv_heads), groups)
        v = _repeat_kv(_to_heads(inputs["v"], self.kv_heads), groups)
        i, f = inputs["i"].transpose(0, 2, 1), inputs["f"].transpose(0, 2, 1)  # [B, NH, S]
        name = self.step_kernel if q.shape[2] == 1 else self.kernel
        h, state = get_mlstm_kernel(name)(q, k, v, i, f, state, eps=self.eps, chunk_size=self.chunk_size,
                                          state_dtype=self.state_dtype)
        return {"h": _from_heads(h)}, state


class ScalarMemory(sLSTMCell, LabCell):
    """The sLSTM scalar memory with block-diagonal recurrent weights (the 2024 xLSTM's sLSTM
    cell: parameters ``_recurrent_kernel_`` and ``_bias_`` in NX-AI's layout).

    Ports i, f, z, o [dim] (input projections W x, no bias) -> h [dim]. State (c, n, m, h), each
    [B, NH, DH].
    """

    stateful = True

    def __init__(self, dim: int, num_heads: int = 4, layout: str = "cuda"):
        dim, num_heads = _positive_int("dim", dim), _positive_int("num_heads", num_heads)
        try:
            sLSTMCell.__init__(self, dim, num_heads, layout)
        except ValueError as err:
            raise CellError(str(err)) from None
        self.set_ports({"i": dim, "f": dim, "z": dim, "o": dim}, {"h": dim})

    def zero_state(self, batch_size: int) -> tuple:
        return sLSTMCell.zero_state(self, batch_size)

    def __call__(self, inputs, state=None):
        i = inputs["i"]
        B, S, E = i.shape
        NH, DH = self.num_heads, self.head_dim
        wx = mx.stack([inputs[g].reshape(B, S, NH, DH) for g in ("i", "f", "z", "o")], axis=3)
        h, state = sLSTMCell.__call__(self, wx, state)
        return {"h": h.reshape(B, S, E)}, state


class LinearRecurrence(LabCell):
    """Diagonal gated linear recurrence: h_t = a_t * h_{t-1} + (1 - a_t) * x_t, a = sigmoid(decay).

    Ports x [dim], decay [dim] -> h [dim]. State h [B, dim] (float32). Sequences run in chunks:
    inside a chunk the recurrence is one masked matmul in log space, across chunks the state
    carries over.
    """

    stateful = True

    def __init__(self, dim: int, chunk_size: int = 32):
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.chunk_size = _positive_int("chunk_size", chunk_size)
        self.set_ports({"x": dim, "decay": dim}, {"h": dim})

    def zero_state(self, batch_size: int) -> tuple:
        return (mx.zeros((batch_size, self.dim), dtype=mx.float32),)

    def __call__(self, inputs, state=None):
        x, decay = inputs["x"], inputs["decay"]
        B, S, D = x.shape
        h = self.zero_state(B)[0] if state is None else state[0].astype(mx.float32)
        log_a = nn.log_sigmoid(decay.astype(mx.float32))  # [B, S, D], <= 0
        u = (1.0 - mx.exp(log_a)) * x.astype(mx.float32)
        outs = []
        for start in range(0, S, self.chunk_size):
            la, uc = log_a[:, start : start + self.chunk_size], u[:, start : start + self.chunk_size]
            L = mx.cumsum(la, axis=1)  # [B, C, D]
            C = la.shape[1]
            # weight of u_s in h_t: exp(L_t - L_s) for s <= t (differences only: no overflow)
            diff = L[:, :, None, :] - L[:, None, :, :]  # [B, t, s, D]
            causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))[None, :, :, None]
            w = mx.where(causal, mx.exp(mx.minimum(diff, 0.0)), 0.0)
            hc = (w * uc[:, None, :, :]).sum(axis=2) + mx.exp(L) * h[:, None, :]
            h = hc[:, -1]
            outs.append(hc)
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
        return {"h": out.astype(x.dtype)}, (h,)


class CausalConvolution(LabCell):
    """Depthwise causal convolution over time (the 2024 xLSTM's ``conv1d``: parameters
    ``conv.weight`` [dim, 1, K], ``conv.bias``), then ``activation``. Ports x [dim] -> y [dim].
    State: the last K-1 inputs [B, K-1, dim]."""

    stateful = True

    def __init__(self, dim: int, kernel_size: int = 4, activation: str = "identity", bias: bool = True):
        super().__init__()
        dim, K = _positive_int("dim", dim), _positive_int("kernel_size", kernel_size)
        self.dim, self.kernel_size = dim, K
        self.activation = activation
        object.__setattr__(self, "act", _activation(activation))
        self.conv = _ConvWeights(dim, K, bias)
        self.conv.weight = mx.random.normal((dim, 1, K)) * K**-0.5
        self.set_ports(*self._ports(dim))

    def _ports(self, dim: int) -> tuple[Ports, Ports]:
        return {"x": dim}, {"y": dim}

    def zero_state(self, batch_size: int) -> tuple:
        if self.kernel_size == 1:
            return ()
        return (mx.zeros((batch_size, self.kernel_size - 1, self.dim)),)

    def _conv(self, x: mx.array, state):
        window = state[0] if state else mx.zeros((x.shape[0], self.kernel_size - 1, self.dim), dtype=x.dtype)
        y, window = CausalConv1d.__call__(self, x, window)
        return y, (() if self.kernel_size == 1 else (window,))

    def __call__(self, inputs, state=None):
        y, state = self._conv(inputs["x"], state)
        return {"y": self.act(y)}, state


class GatedConvolution(CausalConvolution):
    """Short gated convolution (H3/Hyena-style): y = causal_conv(x) * act(gate).
    Ports x [dim], gate [dim] -> y [dim]. State: the last K-1 inputs."""

    def __init__(self, dim: int, kernel_size: int = 4, activation: str = "silu", bias: bool = True):
        super().__init__(dim, kernel_size, activation, bias)

    def _ports(self, dim: int) -> tuple[Ports, Ports]:
        return {"x": dim, "gate": dim}, {"y": dim}

    def __call__(self, inputs, state=None):
        y, state = self._conv(inputs["x"], state)
        return {"y": y * self.act(inputs["gate"])}, state


# --------------------------------------------------------------------------------- attention
class SoftmaxAttention(LabCell):
    """Causal multi-head softmax attention with rotary positions. Ports q [qk_dim],
    k, v [kv_heads * head_dim] -> y [v_dim]. State: the key/value cache
    (k [B, kv_heads, T, DQK], v [B, kv_heads, T, DV]), so prefill and step continue exactly.
    ``kv_heads`` < num_heads: grouped-query attention (each key/value head serves a group)."""

    stateful = True

    def __init__(self, num_heads: int, qk_dim: int, v_dim: int | None = None, *, kv_heads: int | None = None,
                 rope: bool = True, rope_base: float = 10000.0):
        super().__init__()
        NH = _positive_int("num_heads", num_heads)
        qk_dim = _positive_int("qk_dim", qk_dim)
        v_dim = _positive_int("v_dim", v_dim if v_dim is not None else qk_dim)
        _divides("qk_dim", qk_dim, NH)
        _divides("v_dim", v_dim, NH)
        kv = NH if kv_heads is None else _positive_int("kv_heads", kv_heads)
        if NH % kv:
            raise CellError(f"num_heads {NH} is not a multiple of kv_heads {kv}")
        self.num_heads, self.kv_heads, self.dqk, self.dv = NH, kv, qk_dim // NH, v_dim // NH
        self.rope, self.rope_base = rope, _positive_real("rope_base", rope_base)
        self.set_ports({"q": qk_dim, "k": self.dqk * kv, "v": self.dv * kv}, {"y": v_dim})

    def zero_state(self, batch_size: int) -> tuple:
        return (mx.zeros((batch_size, self.kv_heads, 0, self.dqk)), mx.zeros((batch_size, self.kv_heads, 0, self.dv)))

    def __call__(self, inputs, state=None):
        q = _to_heads(inputs["q"], self.num_heads)
        k = _to_heads(inputs["k"], self.kv_heads)
        v = _to_heads(inputs["v"], self.kv_heads)
        S = q.shape[2]
        T = 0 if state is None else state[0].shape[2]
        if self.rope:
            q = mx.fast.rope(q, self.dqk, traditional=False, base=self.rope_base, scale=1.0, offset=T)
            k = mx.fast.rope(k, self.dqk, traditional=False, base=self.rope_base, scale=1.0, offset=T)
        if T:
            k = mx.concatenate([state[0].astype(k.dtype), k], axis=2)
            v = mx.concatenate([state[1].astype(v.dtype), v], axis=2)
        # query t (absolute T + t) sees keys 0..T + t
        mask = mx.arange(T + S)[None, :] <= (T + mx.arange(S))[:, None]
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.dqk**-0.5, mask=mask)
        return {"y": _from_heads(y)}, (k, v)


class LinearAttention(LabCell):
    """Causal linear attention with the elu+1 feature map:
    y_t = phi(q_t) S_t / (phi(q_t) z_t), S_t = sum phi(k_s) v_s^T, z_t = sum phi(k_s).
    Ports q, k [qk_dim], v [v_dim] -> y [v_dim]. State (S [B, NH, DQK, DV], z [B, NH, DQK])."""

    stateful = True

    def __init__(self, num_heads: int, qk_dim: int, v_dim: int | None = None, *, kv_heads: int | None = None,
                 eps: float = 1e-6):
        super().__init__()
        NH = _positive_int("num_heads", num_heads)
        qk_dim = _positive_int("qk_dim", qk_dim)
        v_dim = _positive_int("v_dim", v_dim if v_dim is not None else qk_dim)
        _divides("qk_dim", qk_dim, NH)
        _divides("v_dim", v_dim, NH)
        kv = NH if kv_heads is None else _positive_int("kv_heads", kv_heads)
        if NH % kv:
            raise CellError(f"num_heads {NH} is not a multiple of kv_heads {kv}")
        self.num_heads, self.kv_heads, self.dqk, self.dv = NH, kv, qk_dim // NH, v_dim // NH
        self.eps = _positive_real("eps", eps)
        self.set_ports({"q": qk_dim, "k": self.dqk * kv, "v": self.dv * kv}, {"y": v_dim})

    def zero_state(self, batch_size: int) -> tuple:
        NH = self.num_heads
        return (mx.zeros((batch_size, NH, self.dqk, self.dv)), mx.zeros((batch_size, NH, self.dqk)))

    def __call__(self, inputs, state=None):
        groups = self.num_heads // self.kv_heads
        phi = lambda x: nn.elu(x.astype(mx.float32)) + 1.0  # noqa: E731
        q = phi(_to_heads(inputs["q"], self.num_heads))
        k = phi(_repeat_kv(_to_heads(inputs["k"], self.kv_heads), groups))
        v = _repeat_kv(_to_heads(inputs["v"], self.kv_heads), groups).astype(mx.float32)
        B, NH, S, _ = q.shape
        S0, z0 = self.zero_state(B) if state is None else state
        scores = mx.tril(q @ k.swapaxes(-1, -2))  # [B, NH, S, S], causal
        num = scores @ v + q @ S0
        den = scores.sum(axis=-1) + (q @ z0[..., None])[..., 0]
        y = num / (den[..., None] + self.eps)
        new_state = (S0 + k.swapaxes(-1, -2) @ v, z0 + k.sum(axis=2))
        return {"y": _from_heads(y.astype(inputs["q"].dtype))}, new_state


# ---------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type] = {}

#: Spec parameter names that differ from the constructor's (``in``/``out`` are Python keywords).
PARAM_ALIASES = {"in": "input_size", "out": "output_size"}


def register_cell(name: str, cls: type, *, overwrite: bool = False) -> None:
    """Make ``cls`` usable as ``type: name`` in wiring specs.

    ``cls(**params)`` must build a module with ``input_ports`` / ``output_ports`` (name -> size),
    ``stateful``, ``zero_state(batch_size)`` and ``__call__(inputs, state) -> (outputs, state)``;
    subclassing :class:`LabCell` gives all but the call.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise CellError(f"cell type name must be an identifier, got {name!r}")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not cls:
        raise CellError(f"cell type {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = cls


def cell_types() -> dict[str, type]:
    """Registered cell types by name."""
    return dict(_REGISTRY)


def build_cell(type_name: str, params: dict[str, Any]) -> nn.Module:
    """An instance of the registered cell ``type_name``; CellError naming what is wrong."""
    if type_name not in _REGISTRY:
        raise CellError(f"unknown cell type {type_name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    kwargs = {PARAM_ALIASES.get(k, k): v for k, v in params.items()}
    cls = _REGISTRY[type_name]
    try:
        defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    except (TypeError, ValueError):  # a class without a signature: its constructor checks
        defaults = {}
    for key, value in kwargs.items():  # a switch given "no" (a true string) was on
        if isinstance(defaults.get(key), bool) and not isinstance(value, bool):
            raise CellError(f"parameter {key!r} is a switch: give true or false, got {value!r}")
    try:
        cell = cls(**kwargs)
    except CellError:
        raise
    except (TypeError, ValueError, OverflowError) as err:  # were tracebacks (a float() of a string)
        raise CellError(f"bad parameters for a {type_name} cell: {err}") from None
    for attr in ("input_ports", "output_ports"):
        if not isinstance(getattr(cell, attr, None), dict):
            raise CellError(f"cell type {type_name!r} does not declare {attr}")
    return cell


for _name, _cls in {
    "linear_projection": LinearProjection,
    "gated_projection": GatedProjection,
    "exponential_gate": ExponentialGate,
    "sigmoid_gate": SigmoidGate,
    "soft_cap_gate": SoftCapGate,
    "matrix_memory": MatrixMemory,
    "scalar_memory": ScalarMemory,
    "multihead_layernorm": MultiHeadLayerNormCell,
    "rmsnorm": RMSNormCell,
    "layernorm": LayerNormCell,
    "linear_recurrence": LinearRecurrence,
    "gated_convolution": GatedConvolution,
    "causal_convolution": CausalConvolution,
    "softmax_attention": SoftmaxAttention,
    "linear_attention": LinearAttention,
    "activation": Activation,
    "sum": Sum,
}.items():
    register_cell(_name, _cls)

__all__ = ["LabCell", "CellError", "register_cell", "cell_types", "build_cell", "ACTIVATIONS"]
