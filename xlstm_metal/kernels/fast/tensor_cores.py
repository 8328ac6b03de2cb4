"""CUDA device helpers shared by the tensor-core kernels of this package (``mx.fast.cuda_kernel``
headers): the ``mma.sync`` m16n8k16 product with float32 accumulation for bf16 and fp16
operands, and reinterpreting a pair of 16-bit values as one 32-bit register.

Used by the fused dequantize + multiply kernel (:mod:`.quantized`) and the skinny bf16/fp16
product (:mod:`.skinny`); :func:`launch_bounds` by the chunkwise and decode kernels."""

from __future__ import annotations

import zlib


def compact_source(text: str) -> str:
    """CUDA source text without its comments, indentation, runs of spaces and blank lines: the
    same program in fewer characters (string and character literals kept as they are;
    preprocessor lines stay lines of their own).

    MLX 0.32 hashes a custom kernel's whole source text (its header, the signature it writes and
    the body) every time the kernel is evaluated (``CustomKernel::eval_gpu`` names the JIT module
    ``std::hash`` of it), host time that grows with the text: the decode kernels' sources are 10-19 KB,
    and a 7B decode step evaluates ~170 of them (benchmarks/NOTES.md, session 8)."""
    lines = []
    for line in text.splitlines():
        code = _code_of(line)
        if code:
            lines.append(code)
    return "\n".join(lines) + "\n"


#: Characters that never join a neighbour into another token: a blank beside one goes.
_SEPARATORS = set("{}()[];,=")


def _code_of(line: str) -> str:
    """One line of C++ without its ``//`` comment, leading and trailing blanks, and with runs
    of blanks outside literals as one space, none beside a separator (preprocessor lines keep
    their single spaces: ``#define F (x)`` is not ``#define F(x)``)."""
    directive = line.lstrip().startswith("#")
    out, quote, i, n = [], None, 0, len(line)
    while i < n:
        c = line[i]
        if quote:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(line[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
            out.append(c)
        elif c == "/" and line.startswith("//", i):
            break
        elif c in " \t":
            if out and out[-1] != " " and (directive or out[-1] not in _SEPARATORS):
                out.append(" ")
        else:
            if c in _SEPARATORS and out and out[-1] == " " and not directive:
                out.pop()
            out.append(c)
        i += 1
    return "".join(out).strip()


def launch_bounds(threads: int, blocks_per_sm: int) -> str:
    """Header text giving the kernel compiled with it ``__launch_bounds__(threads, blocks_per_sm)``
    (ptxas then caps its registers; "" for 0 blocks: no bounds). MLX writes the kernel's
    ``__global__`` signature itself, so the keyword (as CUDA's host_defines.h spells it) is
    redefined for the one kernel the header is compiled with."""
    if not blocks_per_sm:
        return ""
    return (f"\n#undef __global__\n#define __global__ __location__(global) "
            f"__launch_bounds__({int(threads)}, {int(blocks_per_sm)})\n")

#: ``as_u32`` / ``from_u32`` (a bf16x2 / half2 pair as one register and back) and
#: ``mma16816<T>(d, a, b0, b1)``: d[4] += A (16x16, row major, 4 registers) * B (16x8, column
#: major, 2 registers), T ``__nv_bfloat16`` or ``__half``. Fragment layout (lane = 4 g + tig):
#: a[0] row g, k 2tig..2tig+1; a[1] row g+8, same k; a[2] row g, k 2tig+8..9; a[3] row g+8, same;
#: b0 k 2tig..2tig+1 of column g, b1 k 2tig+8..9; d {(g, 2tig), (g, 2tig+1), (g+8, 2tig), (g+8, 2tig+1)}.
MMA_HEADER = """
template <typename T2> __device__ __forceinline__ uint32_t as_u32(T2 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}
template <typename T2> __device__ __forceinline__ T2 from_u32(uint32_t v) {
  return *reinterpret_cast<T2*>(&v);
}

// D += A (16x16, row) * B (16x8, col), float32 accumulators.
template <typename T> __device__ __forceinline__ void mma16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__half>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
"""


def kernel_tag(key) -> str:
    """A kernel name suffix from its cache key: the same in every process (MLX's on-disk kernel
    cache finds a kernel by its name and source; a counter would name it by creation order)."""
    return f"{zlib.crc32(repr(key).encode()):08x}"


def tile_sums_source(store: str) -> str:
    """CUDA statements adding the ``WARPS`` warps' partial sums of a 16-feature tile (``float
    red[WARPS * MT * 4 * 32]`` in shared memory, each warp's ``acc[t][c]`` at ``((warp * MT + t)
    * 4 + c) * 32 + lane``; synchronised before) and running ``store`` (one statement with
    ``float sum`` at feature ``n`` of tile ``cur``, row ``m``) where ``n < N`` and ``m < M``: the
    epilogue of the tensor-core kernels whose warps split K (:mod:`.quantized`, :mod:`.rows_mma`)."""
    return (_TILE_SUMS + store + "\n      }\n")


_TILE_SUMS = """      for (int e = threadIdx.x; e < MT * 4 * 32; e += WARPS * 32) {
        float sum = 0.0f;
        #pragma unroll
        for (int v = 0; v < WARPS; ++v) sum += red[v * MT * 4 * 32 + e];
        const int l = e & 31, c = (e >> 5) & 3, t = e >> 7;
        const int n = cur * 16 + (l >> 2) + ((c & 2) ? 8 : 0);
        const int m = t * 8 + 2 * (l & 3) + (c & 1);
        if (n < N && m < M) """
