"""Faster kernels, each beside the pure-ops reference it is tested against.

Importing this package registers them with the kernel registry under their own names, so a
config selects one by name (``chunkwise_kernel="chunkwise_scan"``); the references stay the
default.
"""

from __future__ import annotations

from .. import register_mlstm_kernel
from .chunkwise import mlstm_chunkwise_scan
from .chunkwise_fused import mlstm_chunkwise_fused
from .step import mlstm_step_fused

register_mlstm_kernel("chunkwise_scan", mlstm_chunkwise_scan)
register_mlstm_kernel("chunkwise_fused", mlstm_chunkwise_fused)
register_mlstm_kernel("step_fused", mlstm_step_fused)

__all__ = ["mlstm_chunkwise_fused", "mlstm_chunkwise_scan", "mlstm_step_fused"]
