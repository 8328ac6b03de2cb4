"""The sLSTM kernel cell (2024 xLSTM): recurrent kernel + gate biases, and the recurrence.

Parameters keep NX-AI's names and storage layout, which depends on the sLSTM backend the
checkpoint was written with (``slstm.backend`` in its config):

* "cuda" (NX-AI's default, what GPU-trained checkpoints hold):
  ``_recurrent_kernel_ [NH, DH, 4*DH]`` (R[h, j, g*DH + u]), ``_bias_ [NH*4*DH]`` ordered (NH, 4, DH);
* "vanilla": ``_recurrent_kernel_ [NH, 4*DH, DH]`` (R[h, g*DH + u, j]), ``_bias_`` ordered (4, NH, DH).

Gate order is i, f, z, o in both.
"""

from __future__ import annotations

import mlx.core as mx

from ..kernels.fast.slstm_fused import kernel_supported, slstm_recurrence
from ..kernels.slstm import SLSTMState, slstm_sequence, slstm_step, slstm_zero_state
from .xlstm_2024 import Module2024

LAYOUTS = ("cuda", "vanilla")
KERNELS = ("reference", "fused")


class sLSTMCell(Module2024):
    """sLSTM recurrence with block-diagonal recurrent weights per head.

    __call__(wx [B, S, NH, 4, DH] input-gate projections W x without bias, state (c, n, m, h)
    each [B, NH, DH] or None) -> (h [B, S, NH, DH], state).

    ``kernel``: "fused" (default: the CUDA kernels of :mod:`xlstm_metal.kernels.fast.slstm_fused`,
    with their own backward, on NVIDIA GPUs; elsewhere, and for head sizes they do not take,
    the reference runs) or "reference" (always the pure-ops recurrence of
    :mod:`xlstm_metal.kernels.slstm`).
    """

    _exposed_params = ("_recurrent_kernel_", "_bias_")

    def __init__(self, hidden_size: int, num_heads: int, layout: str = "cuda", kernel: str = "fused"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown sLSTM kernel {kernel!r}; choose from {KERNELS}")
        self.kernel = kernel
        if num_heads <= 0 or hidden_size % num_heads:
            raise ValueError(f"sLSTM hidden size {hidden_size} must be a multiple of num_heads {num_heads}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown sLSTM weight layout (backend) {layout!r}; choose from {LAYOUTS}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.layout = layout
        NH, DH = num_heads, self.head_dim
        shape = (NH, DH, 4 * DH) if layout == "cuda" else (NH, 4 * DH, DH)
        self._recurrent_kernel_ = mx.zeros(shape)
        self._bias_ = mx.zeros((4 * hidden_size,))

    # Layout conversion: one canonical compute form R [NH, DH, 4 DH], bias [NH, 4, DH].
    def recurrent_kernel(self) -> mx.array:
        """R in compute layout [NH, DH_in, 4 * DH_out]."""
        R = self._recurrent_kernel_
        if self.layout == "cuda":
            return R
        # vanilla [h, g*DH+u, j] -> [h, j, g*DH+u]
        return mx.swapaxes(R, 1, 2)

    def gate_bias(self) -> mx.array:
        """Bias in compute layout [NH, 4, DH]."""
        NH, DH = self.num_heads, self.head_dim
        if self.layout == "cuda":
            return self._bias_.reshape(NH, 4, DH)
        return mx.swapaxes(self._bias_.reshape(4, NH, DH), 0, 1)

    def set_from_compute_layout(self, R: mx.array, bias: mx.array) -> None:
        """Set the parameters from R [NH, DH, 4 DH] and bias [NH, 4, DH] (used by init)."""
        if self.layout == "cuda":
            self._recurrent_kernel_ = R
            self._bias_ = bias.reshape(-1)
        else:
            self._recurrent_kernel_ = mx.swapaxes(R, 1, 2)
            self._bias_ = mx.swapaxes(bias, 0, 1).reshape(-1)

    def zero_state(self, batch_size: int) -> SLSTMState:
        return slstm_zero_state(batch_size, self.num_heads, self.head_dim)

    def uses_fused_kernel(self) -> bool:
        """Whether calls run the fused CUDA kernels (kernel "fused" on a CUDA device)."""
        return self.kernel == "fused" and kernel_supported(self.num_heads, self.head_dim)

    def __call__(self, wx: mx.array, state: SLSTMState | None = None) -> tuple[mx.array, SLSTMState]:
        dtype = wx.dtype
        if self.uses_fused_kernel():
            # One launch per sequence (or decode step); the bias is added in the kernel.
            return slstm_recurrence(wx, self.recurrent_kernel(), state, bias=self.gate_bias(), backend="cuda")
        # Biases are added in float32 (NX-AI keeps sLSTM biases in float32 under mixed precision).
        wx = wx.astype(mx.float32) + self.gate_bias().astype(mx.float32)
        R = self.recurrent_kernel()
        if wx.shape[1] == 1:
            h, state = slstm_step(wx[:, 0], R, state)
            return h[:, None].astype(dtype), state
        h, state = slstm_sequence(wx, R, state)
        return h.astype(dtype), state


__all__ = ["sLSTMCell", "KERNELS", "LAYOUTS"]
