"""A persistent default for MLX's cache of compiled CUDA kernels (``MLX_PTX_CACHE_DIR``).

MLX's CUDA back-end compiles each fused elementwise kernel of an ``mx.compile``d graph with NVRTC
the first time it runs (about 1.3 s per kernel module on an H200 machine's CPU; the compiled
train step of the 1.3b shape took ~190 s before its first step ended) and keeps the result in
``MLX_PTX_CACHE_DIR``, which it reads once, lazily, at its first compilation. MLX's default,
``<tmp>/mlx/<version>/ptx``, is lost with the temporary directory (a reboot, a fresh container).
Unless the user has set the variable, importing xlstm_metal on Linux points it at
``$XDG_CACHE_HOME/xlstm_metal/ptx/mlx-<version>`` (``~/.cache`` without XDG_CACHE_HOME), so later
runs load the compiled kernels instead of compiling them again. Nothing is created here: MLX
creates the directory when it first writes to it (CUDA only), and uses no disk cache if it
cannot. Kernels made with ``mx.fast.cuda_kernel`` are never cached on disk by MLX 0.32.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from importlib import metadata
from pathlib import Path

VARIABLE = "MLX_PTX_CACHE_DIR"


def default_ptx_cache_dir(environ: MutableMapping[str, str] | None = None) -> Path:
    """Where xlstm-metal keeps MLX's compiled CUDA kernels unless ``MLX_PTX_CACHE_DIR`` is set:
    one directory per MLX version (its kernel sources change between versions)."""
    environ = os.environ if environ is None else environ
    base = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    try:
        version = metadata.version("mlx")
    except metadata.PackageNotFoundError:  # an MLX built from source and not installed as a package
        version = "unknown"
    return base / "xlstm_metal" / "ptx" / f"mlx-{version}"


def configure_ptx_cache(environ: MutableMapping[str, str] | None = None, platform: str | None = None) -> str | None:
    """Set ``MLX_PTX_CACHE_DIR`` to :func:`default_ptx_cache_dir` on Linux (where MLX's CUDA
    back-end runs) unless it is set already; returns the value in effect (None elsewhere)."""
    environ = os.environ if environ is None else environ
    if (platform or sys.platform) != "linux":
        return environ.get(VARIABLE)
    if not environ.get(VARIABLE):
        try:
            environ[VARIABLE] = str(default_ptx_cache_dir(environ))
        except RuntimeError:  # no home directory to resolve: keep MLX's own default
            return None
    return environ[VARIABLE]


GRAPH_CACHE_VARIABLE = "MLX_CUDA_GRAPH_CACHE_SIZE"
#: CUDA graphs MLX keeps for reuse. A decode step of the 7B shape is ~17 graphs of MLX's 20
#: kernels each, and a deferred decode state (kernels.mlstm.mlstm_step_deferred) cycles through R
#: forms of the step whose graph boundaries shift: more distinct graphs than MLX's default cache
#: holds, so graphs were instantiated again mid-decode (S19R4 on an H200: 64 rows 6,950-8,060
#: tok/s with MLX's default, 7,840-8,049 with 2,000).
GRAPH_CACHE_SIZE = 1000


def configure_graph_cache(environ: MutableMapping[str, str] | None = None) -> str:
    """Set ``MLX_CUDA_GRAPH_CACHE_SIZE`` to :data:`GRAPH_CACHE_SIZE` unless it is set already (MLX
    reads it at its first CUDA graph); returns the value in effect."""
    environ = os.environ if environ is None else environ
    if not environ.get(GRAPH_CACHE_VARIABLE):
        environ[GRAPH_CACHE_VARIABLE] = str(GRAPH_CACHE_SIZE)
    return environ[GRAPH_CACHE_VARIABLE]
