"""The optimized BLAS preload on Linux CPUs (xlstm_metal._blas).

Each measurement runs in a fresh interpreter: the preload only works before mlx is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU only")

# Best of several float32 GEMMs through MLX on the CPU, plus a correctness check against numpy.
# Timed in CPU time, not wall time: other jobs on the machine then do not change the ratio.
_PROBE = r"""
import json, time, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import xlstm_metal
    from xlstm_metal import _blas
import numpy as np
import mlx.core as mx
mx.set_default_device(mx.cpu)
rng = np.random.default_rng(0)
a_np = rng.standard_normal((512, 512), dtype=np.float32)
b_np = rng.standard_normal((512, 512), dtype=np.float32)
a, b = mx.array(a_np), mx.array(b_np)
err = float(np.abs(np.array(a @ b) - a_np @ b_np).max())
best = float("inf")
for _ in range(6):
    t = time.process_time(); mx.eval(a @ b); best = min(best, time.process_time() - t)
print(json.dumps({"gflops": 2 * 512**3 / best / 1e9, "err": err, "info": _blas.info(),
                  "warnings": [str(w.message) for w in caught]}))
"""


def _probe(**env) -> dict:
    # One BLAS thread: the comparison then holds on a busy 2-core machine too (OpenBLAS's
    # spinning worker threads lose most of their speed when cores are oversubscribed).
    full = {**os.environ, "OPENBLAS_NUM_THREADS": "1", **env}
    for key in ("XLSTM_METAL_NO_OPENBLAS", "XLSTM_METAL_BLAS"):
        if key not in env:
            full.pop(key, None)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=full, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_preload_makes_gemm_fast_and_correct():
    fast = _probe()
    assert fast["info"]["blas"] is not None, fast["info"]["reason"]
    assert fast["warnings"] == []
    slow = _probe(XLSTM_METAL_NO_OPENBLAS="1")
    assert slow["info"]["blas"] is None
    # Same numbers either way (float32 round-off of a 512-term dot product).
    assert fast["err"] < 1e-2 and slow["err"] < 1e-2
    # netlib's reference GEMM: ~3-6 GFLOP/s; OpenBLAS: 30-200 depending on the CPU (one thread,
    # per second of CPU time, so a loaded machine slows both alike).
    assert fast["gflops"] > 4 * slow["gflops"], (fast["gflops"], slow["gflops"])


def test_bad_user_blas_falls_back_to_openblas():
    res = _probe(XLSTM_METAL_BLAS="/nonexistent/libblas.so")
    assert res["info"]["blas"] is not None
    assert "nonexistent" not in res["info"]["blas"]


def test_missing_blas_warns_clearly():
    code = (
        "import warnings, sys\n"
        "from xlstm_metal import _blas\n"  # already preloaded once by the package import
        "_blas.LOADED = None\n"
        "_blas._openblas_candidates = lambda: []\n"
        "del sys.modules['mlx.core']\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert _blas.preload() is None\n"
        "msgs = [str(x.message) for x in w]\n"
        "assert any('no OpenBLAS package is installed' in m and 'pip install' in m for m in msgs), msgs\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLSTM_METAL_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_renamed_gfortran_has_standard_soname(tmp_path, monkeypatch):
    from xlstm_metal import _blas

    bundled = _blas._bundled_gfortran()
    exe = _blas._patchelf()
    if not bundled or exe is None:
        pytest.skip("no bundled libgfortran or patchelf on this machine")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    alias = _blas._renamed_gfortran(bundled[0])
    assert alias.name == "libgfortran.so.5" and str(alias).startswith(str(tmp_path))
    soname = subprocess.run([exe, "--print-soname", str(alias)], capture_output=True, text=True)
    assert soname.stdout.strip() == "libgfortran.so.5"
    rpath = subprocess.run([exe, "--print-rpath", str(alias)], capture_output=True, text=True)
    assert rpath.stdout.strip() == str(bundled[0].parent)
    # A second call reuses the cached copy.
    assert _blas._renamed_gfortran(bundled[0]) == alias


def test_preload_is_invisible_to_other_libraries():
    # Regression: a globally loaded OpenBLAS interposed its cblas_sgemm_batch on PyTorch's MKL
    # and every batched torch matmul segfaulted. The renamed copy is loaded RTLD_LOCAL.
    pytest.importorskip("torch")
    code = (
        "import xlstm_metal, ctypes\n"
        "from xlstm_metal import _blas\n"
        "assert _blas.LOADED is not None, _blas.REASON\n"
        "import torch, mlx.core as mx\n"
        "a = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(0))\n"
        "ref = torch.einsum('bij,bjk->bik', a.double(), a.double()).float()\n"
        "assert torch.allclose(a @ a, ref, atol=1e-3)\n"
        "x = mx.array(a.numpy())\n"
        "assert abs(float(mx.max(mx.abs((x @ x) - mx.array(ref.numpy()))))) < 1e-3\n"
        "main = ctypes.CDLL(None)\n"
        "assert not hasattr(main, 'openblas_get_corename'), 'OpenBLAS leaked into the global scope'\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLSTM_METAL_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


_THREADS = (
    "import os, xlstm_metal, json\n"
    "from xlstm_metal import _blas\n"
    "print(json.dumps({'threads': _blas.info()['threads'], 'reason': _blas.THREADS_REASON,\n"
    "                  'cpus': len(_blas._usable_cpus())}))\n"
)


def _threads(**env) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("XLSTM_METAL_", "OPENBLAS_"))}
    out = subprocess.run([sys.executable, "-c", _THREADS], env={**base, **env}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_blas_threads_override():
    got = _threads(XLSTM_METAL_BLAS_THREADS="3")
    assert (got["threads"], got["reason"]) == (3, "XLSTM_METAL_BLAS_THREADS")
    assert _threads(OPENBLAS_NUM_THREADS="2")["threads"] == 2


def test_default_threads_leave_a_busy_core_alone():
    # A process spinning on one core: the default must not put an OpenBLAS worker beside it
    # (spinning workers sharing a core stall every GEMM). Whatever else loads the machine only
    # lowers the count further.
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.5)
        got = _threads()
    finally:
        busy.kill()
        busy.wait()
    cpus = got["cpus"]
    assert got["reason"].startswith("idle cores at import: ") and got["reason"].endswith(f" of {cpus}")
    assert 1 <= got["threads"] <= max(1, cpus - 1), got
    idle = float(got["reason"].split(": ")[1].split(" of ")[0])
    from xlstm_metal._blas import threads_for_idle_cores

    assert got["threads"] == threads_for_idle_cores(idle, cpus)


def test_threads_for_idle_cores():
    from xlstm_metal._blas import threads_for_idle_cores

    assert threads_for_idle_cores(2.0, 2) == 2  # idle machine: every core
    assert threads_for_idle_cores(1.85, 2) == 2  # background noise is not a busy core
    assert threads_for_idle_cores(1.0, 2) == 1  # one core busy elsewhere
    assert threads_for_idle_cores(0.0, 2) == 1  # all busy: still one thread
    assert threads_for_idle_cores(13.9, 16) == 14 and threads_for_idle_cores(40.0, 16) == 16


def test_load_probe_measures_other_processes(monkeypatch):
    from xlstm_metal import _blas

    # Fake /proc/stat: two cpus over the window; 150 of 200 ticks busy, 50 of them this process's.
    ticks = iter([(1000.0, 4000.0), (1150.0, 4200.0)])
    own = iter([5.0, 5.5])  # 0.5 s of our own CPU time over a 1 s window
    clock = iter([0.0, 1.0, 1.0])
    monkeypatch.setattr(_blas, "_cpu_ticks", lambda cpus: next(ticks))
    monkeypatch.setattr(_blas, "_own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr(_blas, "_usable_cpus", lambda: [0, 1])
    monkeypatch.setattr(_blas.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(_blas.time, "sleep", lambda s: None)
    probe = _blas._LoadProbe()
    # busy share 0.75 of 2 cpus = 1.5 cores, minus our 0.5: others keep 1 core busy -> 1 idle.
    assert probe.idle_cores() == pytest.approx(1.0)


# Products with one row or one column (decoding) in every layout MLX hands to cblas_sgemm,
# batched, and with alpha/beta (addmm), against numpy in float64; then the same with the
# forwarder switched off at run time. Prints the GEMV calls counted in each phase.
_GEMV = r"""
import json, os
import numpy as np
import xlstm_metal
from xlstm_metal import _blas
import mlx.core as mx
mx.set_default_device(mx.cpu)
rng = np.random.default_rng(0)

def arr(x, transposed):
    # transposed: the same values stored column-major (MLX passes the transpose flag to BLAS)
    return mx.array(np.ascontiguousarray(x.T)).T if transposed else mx.array(x)

def worst():
    err = 0.0
    for M, N, K in [(1, 300, 200), (7, 1, 130), (1, 1, 9), (1, 50304 // 8, 96), (3, 5, 4)]:
        for ta in (False, True):
            for tb in (False, True):
                a = rng.standard_normal((M, K), dtype=np.float32)
                b = rng.standard_normal((K, N), dtype=np.float32)
                got = np.array(arr(a, ta) @ arr(b, tb))
                ref = a.astype(np.float64) @ b.astype(np.float64)
                err = max(err, float(np.abs(got - ref).max() / (np.abs(ref).max() + 1)))
    a = rng.standard_normal((4, 1, 64), dtype=np.float32)       # batched one-row products
    b = rng.standard_normal((4, 64, 33), dtype=np.float32)
    err = max(err, float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max()))
    c = rng.standard_normal((1, 40), dtype=np.float32)          # addmm: beta * c + alpha * x @ w
    x = rng.standard_normal((1, 24), dtype=np.float32)
    w = rng.standard_normal((24, 40), dtype=np.float32)
    got = np.array(mx.addmm(mx.array(c), mx.array(x), mx.array(w), alpha=0.5, beta=2.0))
    err = max(err, float(np.abs(got - (2.0 * c + 0.5 * x @ w)).max()))
    wt = rng.standard_normal((40, 24), dtype=np.float32)       # the same with w's rows contiguous
    got = np.array(mx.addmm(mx.array(c), mx.array(x), mx.array(wt).T, alpha=0.5, beta=2.0))
    err = max(err, float(np.abs(got - (2.0 * c + 0.5 * x @ wt.T)).max()))

    # x @ w[:, :K].T: rows of a wider matrix (MLX copies them first, or hands over ld > K)
    w = rng.standard_normal((70, 150), dtype=np.float32)
    x = rng.standard_normal((1, 100), dtype=np.float32)
    got = np.array(mx.array(x) @ mx.array(w)[:, :100].T)
    err = max(err, float(np.abs(got - x @ w[:, :100].T).max()))
    return err

def measured():
    calls, rows = _blas.gemv_forward_calls(), _blas.gemv_rows_calls()
    err = worst()
    return err, _blas.gemv_forward_calls() - calls, _blas.gemv_rows_calls() - rows

out = {"info": _blas.info()}
out["err_on"], out["calls_on"], out["rows_on"] = measured()
_blas.set_gemv_threads(2, parallel_min=1)   # every row-kernel product split over two threads
out["err_threads"], _, out["rows_threads"] = measured()
_blas.set_gemv_threads(1)
out["rows_previous"] = _blas.set_gemv_rows(False)
out["err_no_rows"], out["calls_no_rows"], out["rows_no_rows"] = measured()
out["previous"] = _blas.set_gemv_forward(False)
out["err_off"], out["calls_off"], out["rows_off"] = measured()
print(json.dumps(out))
"""


def _cc() -> str | None:
    from xlstm_metal._blas import _compiler

    return _compiler()


def _gemv(**env) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("XLSTM_METAL_", "CC"))}
    out = subprocess.run([sys.executable, "-c", _GEMV], env={**base, "OPENBLAS_NUM_THREADS": "1", **env},
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gemv_forward_matches_numpy_and_switches_off():
    got = _gemv()
    info = got["info"]
    assert info["blas"] is not None, info["reason"]
    if _cc() is None:
        pytest.skip("no C compiler: the forwarder is not built (covered by the next test)")
    assert info["gemv_forward"] is True and info["gemv_forward_reason"] is None, info
    # 5 shapes x 4 layouts with one row or column + 4 batched one-row products + 2 addmm + the
    # sliced weight; the 3 x 5 x 4 product goes to GEMM.
    assert got["calls_on"] == 4 * 4 + 4 + 2 + 1, got
    assert got["previous"] is True and got["calls_off"] == 0 and got["rows_off"] == 0
    # The row kernel takes the products of contiguous weight rows with a contiguous vector:
    # x @ W.T for the 1 x 300 x 200 and 1 x 6288 x 96 shapes and A @ x for 7 x 1 x 130, two
    # layouts each, and the addmm with w's rows contiguous (beta != 0); the rest stay with
    # OpenBLAS's sgemv.
    assert info["gemv_rows"] is True and got["rows_on"] == 7 and got["rows_threads"] == 7, got
    assert got["rows_previous"] is True and got["rows_no_rows"] == 0 and got["calls_no_rows"] == 23, got
    for key in ("err_on", "err_threads", "err_no_rows", "err_off"):
        assert got[key] < 1e-4, got


def test_gemv_forward_off_by_env_or_without_compiler():
    off = _gemv(XLSTM_METAL_GEMV_FORWARD="0")
    assert off["info"]["blas"] is not None and off["info"]["gemv_forward"] is False
    assert "XLSTM_METAL_GEMV_FORWARD" in off["info"]["gemv_forward_reason"]
    assert off["calls_on"] == 0 and off["err_on"] < 1e-4
    # The row kernel off by itself: every one-row product goes to OpenBLAS's sgemv.
    no_rows = _gemv(XLSTM_METAL_GEMV_ROWS="0")
    assert no_rows["info"]["gemv_forward"] is True and no_rows["info"]["gemv_rows"] is False
    assert no_rows["calls_on"] == 23 and no_rows["rows_on"] == 0 and no_rows["err_on"] < 1e-4
    # No compiler anywhere: OpenBLAS is still bound (plain GEMM), and info() says why not GEMV.
    no_cc = _gemv(PATH="/nonexistent", CC="/nonexistent/cc")
    assert no_cc["info"]["blas"] is not None and no_cc["info"]["gemv_forward"] is False
    assert "C compiler" in no_cc["info"]["gemv_forward_reason"]
    assert no_cc["err_on"] < 1e-4 and no_cc["calls_on"] == 0


# A fresh interpreter whose C libraries are built by ``CC`` into its own cache: the warnings of
# the build, the forwarder's row kernel, and why the C decode step and prefill would not run a
# tiny model (None: they would), with a one-row product checked against numpy.
_ONE_THREAD = r"""
import json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import xlstm_metal
    from xlstm_metal import _blas
    import numpy as np
    import mlx.core as mx
    mx.set_default_device(mx.cpu)
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_model
    from xlstm_metal.kernels.cpu import decode_step as ds, prefill as cp
    model = tiny_model(seed=1)
    step, prompt = ds.unsupported_reason(model), cp.unsupported_reason(model)
    lib = ds.library()
    tiles = cp.tiles_run(lib)
    from xlstm_metal.benchmark import environment
    env = {k: v for k, v in environment().items() if k.startswith(("cpu_", "gemv_rows")) and k != "cpu_name"}
x, w = np.ones((1, 300), np.float32), np.linspace(-1, 1, 300 * 200, dtype=np.float32).reshape(300, 200)
err = float(np.abs(np.array(mx.array(x) @ mx.array(w)) - x @ w).max())
print(json.dumps({"info": _blas.info(), "openmp": [_blas._FORWARD_HANDLE.xl_openmp(), lib.xl_openmp()],
                  "step": step, "prompt": prompt, "tiles": tiles, "err": err, "environment": env,
                  "warnings": [str(w.message) for w in caught]}))
"""


def test_a_one_thread_build_leaves_its_work_to_openblas(tmp_path):
    """A compiler without OpenMP (clang without libomp; here the system compiler refusing
    -fopenmp) builds one-thread libraries: the build says so and how to fix it, and where
    OpenBLAS runs two threads the row kernel and the C decode step stand aside (clang 14 on the
    2-core Xeon: 125m decode 19.8 -> 34-40 tok/s at one row), the C prefill too unless the AMX tiles run.
    With one thread, or XLSTM_METAL_GEMV_ROWS=1 for the row kernel, they run as before."""
    cc = _cc()
    if cc is None:
        pytest.skip("no C compiler: nothing is built")
    fake = tmp_path / "cc-without-openmp"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "no omp.h" >&2; exit 1; }; done\n'
                    f'exec {cc} "$@"\n')
    fake.chmod(0o755)
    tests = str(Path(__file__).parent)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("XLSTM_METAL_", "CC", "OPENBLAS_"))}

    def run(threads: int, **env) -> dict:
        full = {**base, "CC": str(fake), "XDG_CACHE_HOME": str(tmp_path / "cache"),
                "XLSTM_METAL_BLAS_THREADS": str(threads), **env}
        out = subprocess.run([sys.executable, "-c", _ONE_THREAD, tests], env=full, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    two = run(2)
    assert two["openmp"] == [0, 0] and two["info"]["threads"] == 2, two
    built = [m for m in two["warnings"] if "without OpenMP" in m]
    assert len(built) == 2 and all("libomp" in m and "CC=gcc" in m and "to rebuild" in m for m in built), built
    assert two["info"]["gemv_forward"] is True and two["info"]["gemv_rows"] is False, two["info"]
    reason = two["info"]["gemv_rows_reason"]
    assert "without OpenMP" in reason and "XLSTM_METAL_GEMV_ROWS=1" in reason, reason
    assert "row kernel is off" in two["step"] and "without OpenMP" in two["step"], two["step"]
    assert (two["prompt"] is None) == two["tiles"], two
    if not two["tiles"]:
        assert "without OpenMP" in two["prompt"] and "AMX" in two["prompt"], two["prompt"]
    assert two["err"] < 1e-3
    assert two["environment"] == {"gemv_rows": False, "gemv_rows_reason": reason, "cpu_openmp": False,
                                  "cpu_step": False, "cpu_prefill": two["tiles"], "cpu_prefill_amx": two["tiles"]}
    # the row kernel kept by the user's choice: the C step still stands aside, by its own check
    kept = run(2, XLSTM_METAL_GEMV_ROWS="1")
    assert kept["info"]["gemv_rows"] is True and kept["info"]["gemv_rows_reason"] is None
    assert kept["step"] is not None and kept["step"].startswith("the C step was built without OpenMP"), kept["step"]
    assert kept["warnings"] == [] and kept["err"] < 1e-3  # built once, into the same cache
    # one thread is all that runs: nothing to hand over
    one = run(1)
    assert one["info"]["gemv_rows"] is True and one["step"] is None and one["prompt"] is None, one
    assert one["environment"]["cpu_step"] is True and one["environment"]["cpu_prefill"] is True
    assert one["err"] < 1e-3
