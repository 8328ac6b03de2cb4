"""The CUDA kernels of one decode step, compiled on a machine without a GPU: registers, spills and
SASS instruction counts per kernel.

    python benchmarks/cuda_compile_check.py --shape 7b --blocks 1 --q-bits 4 --rows 1 --out k.jsonl
    XLSTM_METAL_FLOAT_FORMAT_DECODE=1 python benchmarks/cuda_compile_check.py --q-mode mxfp4 --rows 16
        (a float format's decode kernel: opt-in, see kernels/fast/quantized.py)

MLX's CUDA back-end compiles each ``mx.fast.cuda_kernel`` with NVRTC when it first runs. Here a
recorder stands in for ``mx.fast.cuda_kernel``, the package's CUDA checks answer yes, and one greedy
decode step of a model of the named shape (``--blocks`` blocks, random weights, ``--q-bits``
quantized, ``--rows`` rows) runs on the CPU; each recorded launch returns zeros, so dispatch that
reads values takes the zero path. Every distinct launch (kernel, template arguments, input types)
is written out as MLX writes a custom kernel (the header, then a ``__global__`` function of the
inputs, with ``name_shape`` / ``name_strides`` / ``name_ndim`` where the body reads them, and the
outputs, under the template), compiled with NVRTC for ``--arch`` and disassembled: a kernel edit's
effect on registers, spills and instructions, seen before a GPU runs it (benchmarks/NOTES.md,
session 36). The figures are the compiler's, not a timing.

Needs NVRTC and the CUDA headers (``pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12``),
CCCL's headers (``--cccl``: MLX's CUDA wheel has them under ``mlx/include/cccl``) and, for the SASS
counts, ``nvdisasm`` (``--nvdisasm``; the ``nvidia-cuda-nvdisasm`` wheel; without it registers and
spills only).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import xlstm_metal  # noqa: E402,F401  (first: BLAS preload on Linux CPUs)
import mlx.core as mx  # noqa: E402

#: C++ names of MLX's dtypes in a custom kernel's signature.
CTYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.float32: "float", mx.uint32: "uint32_t",
          mx.int32: "int32_t", mx.uint8: "uint8_t", mx.bool_: "bool", mx.int64: "int64_t", mx.uint64: "uint64_t"}
#: What MLX's own custom-kernel header brings that the kernels here use (a stand-in for its
#: device headers, which its wheel keeps inside the library).
PREAMBLE = """#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/cstdint>
#include <cuda/std/array>
#include <cuda/std/limits>
using uint32_t = unsigned int; using int32_t = int; using uint64_t = unsigned long long; using int64_t = long long;
using uint8_t = unsigned char;
#define inf cuda::std::numeric_limits<float>::infinity()
struct Sigmoid { template <typename T> __device__ T operator()(T x) { return T(1.0f / (1.0f + expf(-float(x)))); } };
"""


class Launch:
    """One launch of a recorded kernel: its sources, argument names and what it was given."""

    def __init__(self, kernel, inputs, outputs, template):
        self.kernel, self.inputs, self.outputs, self.template = kernel, inputs, outputs, template

    @property
    def key(self) -> tuple:
        return (self.kernel.name, repr(self.template), repr(self.inputs))

    def source(self) -> str:
        """The kernel as one CUDA translation unit, instantiated at this launch's template arguments."""
        k = self.kernel
        params = []
        for name, (dtype, ndim) in zip(k.input_names, self.inputs):
            params.append(f"const {CTYPES[dtype]}* {name}")
            if f"{name}_shape" in k.source:
                params.append(f"const cuda::std::array<int32_t, {max(ndim, 1)}> {name}_shape")
            if f"{name}_strides" in k.source:
                params.append(f"const cuda::std::array<int64_t, {max(ndim, 1)}> {name}_strides")
            if f"{name}_ndim" in k.source:
                params.append(f"const int {name}_ndim")
        for name, dtype in zip(k.output_names, self.outputs):
            params.append(f"{CTYPES[dtype]}* {name}")
        tparams, targs = [], []
        for tname, value in self.template:
            if isinstance(value, mx.Dtype):
                tparams.append(f"typename {tname}")
                targs.append(CTYPES[value])
            elif isinstance(value, bool):
                tparams.append(f"bool {tname}")
                targs.append("true" if value else "false")
            else:
                tparams.append(f"int {tname}")
                targs.append(str(int(value)))
        head = f"template <{', '.join(tparams)}>\n" if tparams else ""
        text = PREAMBLE + k.header + "\n" + head + f"__global__ void {k.name}({', '.join(params)}) {{\n{k.source}\n}}\n"
        if tparams:
            types = ", ".join(p.rsplit(" ", 1)[0] for p in params)
            text += f"template __global__ void {k.name}<{', '.join(targs)}>({types});\n"
        return text


def pretend_cuda(sms: int = 132, hopper: bool = True) -> None:
    """Make the package take its CUDA paths in this process on any machine: its CUDA checks answer
    yes, the merged decode kernels plan for ``sms`` SMs and the skinny products for a Hopper GPU
    (``hopper``) or not. ``mx.fast.cuda_kernel`` is the caller's to replace (a real kernel cannot
    run here). For good: nothing undoes it."""
    from xlstm_metal.kernels.fast import decode_chain, skinny  # noqa: PLC0415  (loaded, so patched below)
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("xlstm_metal") and hasattr(module, "cuda_available"):
            module.cuda_available = lambda: True
    decode_chain._device_sms = lambda: sms
    skinny._hopper[:] = [hopper]


def record_launches(shape: str, blocks: int, q_bits: int, group_size: int, rows: int, dtype: str, sms: int,
                    hopper: bool = True, q_mode: str = "affine") -> list[Launch]:
    """The distinct kernel launches of one greedy decode step, in launch order (see the module's
    docstring); ``sms`` and ``hopper`` stand for the device the dispatch asks about. Patches this
    process's CUDA checks and ``mx.fast.cuda_kernel`` for good."""
    launches: dict[tuple, Launch] = {}

    class Recorder:
        def __init__(self, name, input_names, output_names, source, header="", **_):
            self.name, self.input_names, self.output_names = name, list(input_names), list(output_names)
            self.source, self.header = source, header

        def __call__(self, inputs, output_shapes, output_dtypes, template=None, **_):
            launch = Launch(self, [(a.dtype, a.ndim) for a in inputs], list(output_dtypes), list(template or []))
            launches.setdefault(launch.key, launch)
            return [mx.zeros(tuple(s), dtype=d) for s, d in zip(output_shapes, output_dtypes)]

    pretend_cuda(sms, hopper)
    mx.fast.cuda_kernel = Recorder

    from xlstm_metal import benchmark as bm
    from xlstm_metal.quantization import quantize_model
    config = bm.shape_config(shape, chunkwise_kernel="chunkwise_fused", num_blocks=blocks)
    model = bm.random_model(config, dtype=dtype)
    if q_mode != "affine":  # a float format: its own bits and group size
        quantize_model(model, mode=q_mode)
    elif q_bits:
        quantize_model(model, bits=q_bits, group_size=group_size)
    model.fuse_projections()
    step = bm.make_decode_step(model, compiled=False)
    tokens = mx.full((rows, 1), 11, dtype=mx.int32)
    mx.eval(step(tokens, model.make_state(batch_size=rows)))
    return list(launches.values())


def _find(pattern: str) -> str | None:
    for base in sys.path:
        hits = sorted(glob.glob(str(Path(base) / pattern)))
        if hits:
            return hits[-1]
    return None


class Nvrtc:
    """NVRTC through ctypes: source -> (ok, log, cubin)."""

    def __init__(self, library: str, options: list[str]):
        self.lib = ctypes.CDLL(library)
        self.options = options

    def compile(self, source: str) -> tuple[bool, str, bytes]:
        lib, prog = self.lib, ctypes.c_void_p()
        if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None) != 0:
            return False, "nvrtcCreateProgram failed", b""
        opts = (ctypes.c_char_p * len(self.options))(*[o.encode() for o in self.options])
        ok = lib.nvrtcCompileProgram(prog, len(self.options), opts) == 0
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        cubin = b""
        if ok:
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetCUBIN(prog, buf)
            cubin = buf.raw
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        return ok, log.value.decode(errors="replace"), cubin


_OPCODE = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def sass_opcodes(cubin: bytes, nvdisasm: str, scratch: Path) -> collections.Counter:
    """Opcode counts of a cubin's SASS (every instruction of every function it holds)."""
    path = scratch / "kernel.cubin"
    path.write_bytes(cubin)
    text = subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True, check=True).stdout
    return collections.Counter(m.group(1) for line in text.splitlines() if (m := _OPCODE.match(line)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="7b", help="a named shape (7b, 1.3b, 125m) or a config file")
    p.add_argument("--blocks", type=int, default=1, help="blocks of the model (the kernels are per block; default 1)")
    p.add_argument("--q-bits", type=int, default=4, help="quantized weights (4 or 8 bits; 0: the dtype's)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--q-mode", default="affine", choices=("affine", "mxfp4", "nvfp4", "mxfp8"),
                   help="quantization mode (a float format takes its own bits and group size)")
    p.add_argument("--rows", type=int, default=1, help="rows of the decode step")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--sms", type=int, default=132, help="SMs the merged kernels plan for (H100/H200: 132)")
    p.add_argument("--arch", default="sm_90a")
    p.add_argument("--nvrtc", help="libnvrtc.so (default: pip's nvidia-cuda-nvrtc-cu12)")
    p.add_argument("--cuda-include", help="the CUDA headers (default: pip's nvidia-cuda-runtime-cu12)")
    p.add_argument("--cccl", help="CCCL's headers (cuda/std/...), e.g. MLX's CUDA wheel's mlx/include/cccl")
    p.add_argument("--nvdisasm", help="nvdisasm for the SASS counts (default: pip's nvidia-cuda-nvdisasm; none: skip)")
    p.add_argument("--keep", type=Path, help="write each kernel's source here")
    p.add_argument("--out", type=Path, help="JSON lines, one record per kernel (default: stdout only)")
    args = p.parse_args(argv)
    if args.blocks < 1 or args.rows < 1 or args.q_bits not in (0, 4, 8):
        p.error("--blocks and --rows must be >= 1 and --q-bits 0, 4 or 8")
    nvrtc = args.nvrtc or _find("nvidia/cuda_nvrtc/lib/libnvrtc.so*[0-9]")
    include = args.cuda_include or _find("nvidia/cuda_runtime/include")
    if not nvrtc or not Path(nvrtc).is_file():
        p.error(f"no NVRTC library ({nvrtc or 'not found'}): pip install nvidia-cuda-nvrtc-cu12, or give --nvrtc")
    if not include or not (Path(include) / "cuda_bf16.h").is_file():
        p.error(f"no CUDA headers ({include or 'not found'}): pip install nvidia-cuda-runtime-cu12, or give --cuda-include")
    if not args.cccl or not (Path(args.cccl) / "cuda" / "std" / "array").is_file():
        p.error(f"no CCCL headers at --cccl {args.cccl!r} (a folder holding cuda/std/array, e.g. MLX's CUDA wheel's "
                "mlx/include/cccl)")
    nvdisasm = None if args.nvdisasm == "none" else (args.nvdisasm or _find("nvidia/cu*/bin/nvdisasm"))
    if args.out and args.out.exists():
        p.error(f"--out {args.out} exists")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    try:
        compiler = Nvrtc(nvrtc, [f"--gpu-architecture={args.arch}", f"-I{include}", f"-I{args.cccl}", "--std=c++17",
                                 "-Xptxas=-v", "-w"])
    except OSError as e:
        p.error(f"cannot load NVRTC {nvrtc}: {e}")
    try:
        launches = record_launches(args.shape, args.blocks, args.q_bits, args.group_size, args.rows, args.dtype, args.sms,
                                   args.arch.startswith("sm_90"), args.q_mode)
    except FileNotFoundError as e:
        p.error(str(e))
    scratch = Path(tempfile.mkdtemp(prefix="cuda_compile_check_"))
    records = []
    for i, launch in enumerate(launches):
        source = launch.source()
        if args.keep:
            (args.keep / f"{i:02d}_{launch.kernel.name}.cu").write_text(source)
        ok, log, cubin = compiler.compile(source)
        rec = {"kernel": launch.kernel.name, "template": {k: str(v) for k, v in launch.template}, "compiled": ok,
               "registers": [int(r) for r in re.findall(r"Used (\d+) registers", log)],
               "spill_stores": [int(b) for b in re.findall(r"(\d+) bytes spill stores", log)],
               "spill_loads": [int(b) for b in re.findall(r"(\d+) bytes spill loads", log)]}
        if not ok:
            rec["errors"] = [line for line in log.splitlines() if "error" in line][:5]
        elif nvdisasm:
            try:
                ops = sass_opcodes(cubin, nvdisasm, scratch)
                rec["sass"] = sum(ops.values())
                rec["opcodes"] = dict(ops.most_common())
            except (OSError, subprocess.CalledProcessError) as e:
                rec["sass_error"] = str(e)[:300]
        records.append(rec)
        brief = {k: rec[k] for k in ("registers", "spill_stores", "sass") if k in rec}
        print(f"{rec['kernel']}: {'compiled' if ok else 'FAILED'} {json.dumps(brief)}", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    if args.out:
        tmp = args.out.with_name(args.out.name + ".part")
        tmp.write_text("".join(json.dumps({"shape": args.shape, "blocks": args.blocks, "q_bits": args.q_bits,
                                           "q_mode": args.q_mode, "rows": args.rows, "arch": args.arch, **r}) + "\n" for r in records))
        tmp.replace(args.out)
    return 0 if all(r["compiled"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
