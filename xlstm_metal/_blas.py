"""Load an optimized BLAS before MLX on Linux CPUs.

MLX's Linux CPU wheel links the netlib reference BLAS (float32 GEMM ~6 GFLOP/s on a 2-core
x86 machine). Loading OpenBLAS (PyPI ``cmeel-openblas``) with ``RTLD_GLOBAL`` before ``mlx``
is first imported makes the dynamic linker resolve MLX's ``cblas_*`` symbols to it (~200
GFLOP/s). This module must be imported before anything imports ``mlx``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from pathlib import Path

#: Path of the BLAS library that was preloaded, or None.
LOADED: str | None = None


def _candidates() -> list[Path]:
    found = []
    for entry in sys.path:
        lib = Path(entry or ".") / "cmeel.prefix" / "lib"
        for name in ("libopenblas.so.0", "libopenblas.so"):
            if (lib / name).is_file():
                found.append(lib / name)
    return found


def preload() -> str | None:
    """Preload OpenBLAS globally on Linux; returns its path or None (with a warning)."""
    global LOADED
    if LOADED is not None or not sys.platform.startswith("linux"):
        return LOADED
    if os.environ.get("XLSTM_METAL_NO_OPENBLAS"):
        return None
    if "mlx.core" in sys.modules:
        warnings.warn(
            "xlstm_metal: mlx was imported before xlstm_metal, so its reference BLAS is already "
            "bound; import xlstm_metal first for fast CPU matmuls.",
            RuntimeWarning,
            stacklevel=3,
        )
    for path in _candidates():
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        LOADED = str(path)
        return LOADED
    warnings.warn(
        "xlstm_metal: OpenBLAS (pip package 'cmeel-openblas') could not be loaded; MLX's CPU "
        "backend falls back to the slow reference BLAS. `pip install cmeel-openblas` fixes it.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None
