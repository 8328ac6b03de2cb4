"""MLX's CUDA command-buffer settings for processes that decode (``xlstm-metal generate``, ``chat``,
``serve``, ``bench``).

MLX's CUDA back-end records the kernels of an evaluation into CUDA graphs and commits a graph
after ``MLX_MAX_OPS_PER_BUFFER`` kernels or ``MLX_MAX_MB_PER_BUFFER`` MB of kernel inputs (sm_90:
100 kernels / 1,000 MB); ``MLX_USE_CUDA_GRAPHS=0`` launches the kernels one by one instead. It
reads these once per process, when it first sets up a GPU stream, so they are set before anything
runs on the GPU. A decode step of a 7B model reads every weight once (4 GB at 4 bits, 7 GB at 8,
14 GB in bf16): MLX's 1,000 MB limit cuts it into one graph per ~1 GB of weights, and evaluation
keeps at most 10 committed graphs queued ahead of the GPU.

:func:`decode_command_buffers` applies :data:`DECODE_COMMAND_BUFFERS` on CUDA unless the
environment sets any of the three variables (the user's values stand: set, e.g.,
``MLX_MAX_MB_PER_BUFFER=1000`` to keep MLX's defaults). Training sets its own
(``training.trainer.limit_command_buffers``) and is not affected: it runs in its own process.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: The MLX environment variables that decide how a CUDA evaluation is committed.
VARIABLES = ("MLX_MAX_OPS_PER_BUFFER", "MLX_MAX_MB_PER_BUFFER", "MLX_USE_CUDA_GRAPHS")

#: What decoding processes set on CUDA (see the module docstring and benchmarks/NOTES.md).
DECODE_COMMAND_BUFFERS: dict[str, str] = {}


def decode_command_buffers(environ: MutableMapping[str, str] | None = None,
                           cuda: bool | None = None) -> dict[str, str]:
    """Set :data:`DECODE_COMMAND_BUFFERS` in ``environ`` (default ``os.environ``) on CUDA unless it
    names any of :data:`VARIABLES`; returns what was set (empty when nothing was). Call before the
    first GPU evaluation of the process (MLX reads the values once)."""
    environ = os.environ if environ is None else environ
    if cuda is None:
        from ..kernels.fast.step import cuda_available

        cuda = cuda_available()
    if not cuda or any(name in environ for name in VARIABLES):
        return {}
    environ.update(DECODE_COMMAND_BUFFERS)
    return dict(DECODE_COMMAND_BUFFERS)
