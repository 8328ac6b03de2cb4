"""The decode products of a 7B step at 1-2 rows, one kind of product at a time, GPU time per call.

    python benchmarks/decode_product.py --bits 4,8,16 --out $OUT/decode_product.jsonl

For each weight format (4 / 8 bits affine, group ``--group-size``; 16: bf16) and each product
shape of an xLSTM-7B decode step (q|k|v|o 12288 x 4096, out_proj 4096 x 4096, gate|up 21888 x
4096, down 4096 x 10944, the LM head 50304 x 4096), ``--layers`` different random weights
(so they come from HBM, not from the 50 MB L2) are multiplied in one evaluation by:

- ``copy``: a plain copy of the same bytes (weights, scales, biases), the streaming yardstick;
- ``mlx``: MLX's own product (``mx.quantized_matmul``; ``x @ w.T`` in bf16);
- ``ours <config>``: :func:`~xlstm_metal.kernels.fast.quantized.fused_quantized_matmul` at the
  shipped settings ('default') or those of ``--configs`` ('d2r3': a ring of 2 weight chunks in
  flight per thread, registers for 3 thread blocks per SM; see ``--help``); ``ours d<D> h<H>``
  (``--depths``, ``--hints``) and ``... blocks<B>`` (``--max-blocks``) vary one setting;
- ``rows <config>`` (``--rows-configs``, 4, 8 and 16 bits): the streaming GEMV of
  :mod:`xlstm_metal.kernels.fast.gemv` at those settings (loads in flight, features per warp,
  blocks per SM, register bound, load hint);
- ``chain <config>``: the decode chain's stage for that shape (RMSNorm -> q|k|v|o with the
  pending residual; head norm and output gate -> out_proj with the residual add; RMSNorm ->
  gate|up; SwiGLU -> down; the LM head is a plain product), its prologue included.

Each layer's product waits for the one before (its input takes a zero computed from the previous
output, as in a decode step; ``--overlap``: independent, so MLX may run them side by side). Each
record: wall time per evaluation (median of ``--repeats``, synchronised), and from a CUPTI trace
(PyTorch's profiler, when it attaches) the GPU time of the evaluation's kernels (busy: their
summed durations; span: first start to last end; product: the product's own kernels, the
dependency's tiny ones left out), GB/s of weights (and scales, biases) read per product-kernel
time, and the largest difference from the reference (MLX's product, relative to the largest
output; chain stages: their reference ops), which fails the run above ``--tol``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import xlstm_metal  # noqa: E402,F401  (first: BLAS preload on Linux CPUs)
import mlx.core as mx  # noqa: E402

from xlstm_metal import benchmark as bm  # noqa: E402
from xlstm_metal.cells.norms import MultiHeadLayerNorm, RMSNorm  # noqa: E402
from xlstm_metal.kernels.fast import decode as decode_kernels  # noqa: E402
from xlstm_metal.kernels.fast import decode_chain as chain  # noqa: E402
from xlstm_metal.kernels.fast import gemv  # noqa: E402
from xlstm_metal.kernels.fast import quantized  # noqa: E402
from xlstm_metal.kernels.fast import rows_mma  # noqa: E402

E, NH, DV, F, VOCAB = 4096, 8, 512, 10944, 50304
#: (name, N, K) of the 7B decode step's products with float i/f gates (the chain's q|k|v|o group).
SHAPES = [("qkvo", 3 * E, E), ("out_proj", E, NH * DV), ("gate_up", 2 * F, E), ("down", E, F), ("lm_head", VOCAB, E)]


def _weights(n: int, k: int, bits: int, group_size: int, seed: int):
    w = mx.random.normal((n, k), dtype=mx.bfloat16, key=mx.random.key(seed)) * (k ** -0.5)
    if bits == 16:
        mx.eval(w)
        return (w,)
    q = mx.quantize(w, group_size=group_size, bits=bits)
    mx.eval(q)
    return tuple(q)


def _rel(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.max(mx.abs(a - b)) / (mx.max(mx.abs(b)) + 1e-30)).item()


def _reference(fn, *args, **kwargs):
    on = decode_kernels._enabled
    decode_kernels.set_fused_decode(False)
    try:
        return fn(*args, **kwargs)
    finally:
        decode_kernels.set_fused_decode(on)


class _Stage:
    """The chain's stage for one product shape: ``run(arrays)`` its output (one array),
    ``reference(arrays)`` its ops."""

    def __init__(self, name: str, rows: int, n: int, k: int):
        key = mx.random.key(rows * 7 + n)
        k1, k2, k3, k4 = mx.random.split(key, 4)
        self.name = name
        self.x = mx.random.normal((rows, 1, E), key=k1)
        self.pending = mx.random.normal((rows, 1, E), key=k2).astype(mx.bfloat16)
        self.norm = RMSNorm(E)
        self.norm.weight = (1 + 0.1 * mx.random.normal((E,), key=k3)).astype(mx.bfloat16)
        self.mh = MultiHeadLayerNorm(NH, DV)
        self.mh.weight = (1 + 0.1 * mx.random.normal((NH * DV,), key=k4)).astype(mx.bfloat16)
        self.h = mx.random.normal((rows, NH, 1, DV), key=k2).astype(mx.bfloat16)
        self.proj = mx.random.normal((rows, 1, 3 * E), key=k3).astype(mx.bfloat16)
        self.gate_up = (2 * mx.random.normal((rows, 1, 2 * F), key=k4)).astype(mx.bfloat16)
        self.xb = mx.random.normal((rows, k), key=k1).astype(mx.bfloat16)
        mx.eval(self.x, self.pending, self.norm.weight, self.mh.weight, self.h, self.proj, self.gate_up, self.xb)

    def run(self, arrays, bits: int, group_size: int, dep: mx.array | None = None):
        """The stage on ``arrays``; ``dep`` ([rows, 1] zeros from the previous product) is added
        to its main input, so consecutive calls run one after another on the GPU."""
        w, s, b = (arrays * 3)[:3]
        kw = dict(group_size=group_size if bits != 16 else 32, bits=bits)
        if self.name == "qkvo":
            return chain.norm_quantized_matmul(_plus(self.x, dep), self.pending, self.norm, w, s, b, write_xn=True,
                                               **kw)[2]
        if self.name == "out_proj":
            return chain.gate_norm_quantized_matmul(_plus(self.h, dep), self.proj, 2 * E, self.mh, self.x, w, s, b, **kw)
        if self.name == "gate_up":
            return chain.norm_quantized_matmul(_plus(self.x, dep), None, self.norm, w, s, b, **kw)[2]
        if self.name == "down":
            return chain.swiglu_quantized_matmul(_plus(self.gate_up, dep), w, s, b, **kw)
        return quantized.fused_quantized_matmul(_plus(self.xb, dep), w, s, b, **kw)

    def reference(self, arrays, bits: int, group_size: int):
        if self.name == "lm_head":
            return _mlx(self.xb, arrays, bits, group_size)
        return _reference(self.run, arrays, bits, group_size)


def _plus(x: mx.array, dep: mx.array | None) -> mx.array:
    """x + dep (dep [rows, 1] broadcast over x's other axes), or x."""
    if dep is None:
        return x
    return x + dep.reshape(dep.shape[0], *([1] * (x.ndim - 1))).astype(x.dtype)


def _dep(out) -> mx.array:
    """[rows, 1] zeros computed from a product's output: the next product's input waits for it."""
    return out.reshape(out.shape[0], -1)[:, :1] * 0


def _mlx(x: mx.array, arrays, bits: int, group_size: int) -> mx.array:
    if bits == 16:
        return x @ arrays[0].T
    w, s, b = arrays
    return mx.quantized_matmul(x, w, scales=s, biases=b, transpose=True, group_size=group_size, bits=bits)


def _ours(x: mx.array, arrays, bits: int, group_size: int, depth: int, hint: int | None,
          max_blocks: int | None = None) -> mx.array:
    w, s, b = (arrays * 3)[:3]
    return quantized.fused_quantized_matmul(x, w, s, b, group_size=group_size if bits != 16 else 32, bits=bits,
                                            depth=depth, load_hint=hint, max_blocks=max_blocks)


def _skinny(kind: str, x: mx.array, w: mx.array) -> mx.array:
    from xlstm_metal.kernels.fast import skinny

    if kind == "wgmma":
        from xlstm_metal.kernels.fast.skinny_wgmma import wgmma_matmul
        return wgmma_matmul(x, w)
    return skinny.skinny_matmul(x, w)


def _parse_config(spec: str, bits: int) -> dict | None:
    """'default', 'int' (the shipped settings with the weights as exact integers where the chain
    can: quantized.INT_WEIGHTS) or 'd<depth>r<resident>[t][p1][i]' -> the module settings it
    stands for (None for anything else)."""
    if spec in ("default", "int"):
        return {} if spec == "default" else {"int": 1}
    m = re.fullmatch(r"d(\d+)r(\d+)(t?)(p1)?(i2|i)?", spec)
    if not m:
        return None
    depth, resident = int(m.group(1)), int(m.group(2))
    return {"depth": (bits, depth), "resident": resident,
            "chain_blocks": 0 if m.group(3) else resident * quantized.SMS, "prefetch": bool(m.group(4)),
            "int": {"i": 1, "i2": 2}.get(m.group(5), 0)}


def _parse_rows(spec: str) -> dict | None:
    """'u<unroll>[r<rows per warp>][b<blocks per SM>][x<resident>][h<hint>]' -> keyword arguments of
    :func:`~xlstm_metal.kernels.fast.gemv.rows_matmul` (None for anything else)."""
    m = re.fullmatch(r"u(\d+)(?:r(\d+))?(?:b(\d+))?(?:x(\d+))?(?:h(\d+))?", spec)
    if not m:
        return None
    out = {"unroll": int(m.group(1))}
    for key, g in (("rows_per_warp", 2), ("blocks", 3), ("resident", 4), ("load_hint", 5)):
        if m.group(g) is not None:
            out[key] = int(m.group(g))
    return out


def _with(conf: dict, fn):
    """fn() with the module settings of :func:`_parse_config` in place (kernels are built as the
    graph is, so the settings hold while it is)."""
    if not conf:
        return fn()
    saved_int = dict(quantized.INT_WEIGHTS)
    quantized.INT_WEIGHTS.update({4: int(conf.get("int", 0)), 8: int(conf.get("int", 0))})
    if "depth" not in conf:
        try:
            return fn()
        finally:
            quantized.INT_WEIGHTS.update(saved_int)
    bits, depth = conf["depth"]
    saved = quantized.DEPTH[bits], quantized.RESIDENT[bits], chain.CHAIN_BLOCKS, quantized.PREFETCH
    quantized.DEPTH[bits], quantized.RESIDENT[bits], chain.CHAIN_BLOCKS, quantized.PREFETCH = (
        depth, conf["resident"], conf["chain_blocks"], conf["prefetch"])
    try:
        return fn()
    finally:
        quantized.DEPTH[bits], quantized.RESIDENT[bits], chain.CHAIN_BLOCKS, quantized.PREFETCH = saved
        quantized.INT_WEIGHTS.update(saved_int)


def _segments(events: list[dict], gap_us: float) -> list[dict]:
    """Kernel events split where the GPU idled longer than ``gap_us`` (the script sleeps between
    evaluations): one segment per evaluation, in order."""
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                     key=lambda e: e["ts"])
    out, cur = [], []
    for e in kernels:
        if cur and e["ts"] - max(c["ts"] + c["dur"] for c in cur[-4:]) > gap_us:
            out.append(cur)
            cur = []
        cur.append(e)
    if cur:
        out.append(cur)
    result = []
    for seg in out:
        by_name: dict[str, list[float]] = {}
        for e in seg:
            by_name.setdefault(e["name"], []).append(float(e["dur"]))
        name, durs = max(by_name.items(), key=lambda kv: sum(kv[1]))  # the product's kernel
        result.append({"busy_us": sum(float(e["dur"]) for e in seg), "span_us": seg[-1]["ts"] + seg[-1]["dur"] - seg[0]["ts"],
                       "kernels": len(seg), "name": name[:120], "product_us": sum(durs), "product_kernels": len(durs),
                       "product_max_us": max(durs)})
    return result


def _trace(runs: list, repeats: int) -> list[list[dict]] | str:
    """GPU time of each ``runs`` entry's evaluation (``repeats`` times each) under CUPTI."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError as err:
        return f"no PyTorch profiler: {err}"
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for fn in runs:
                    for _ in range(repeats):
                        mx.eval(fn())
                        mx.synchronize()
                        time.sleep(0.004)
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            events = json.loads(path.read_text()).get("traceEvents", [])
    except Exception as err:  # a profiler that cannot attach: keep the wall times
        return repr(err)[:500]
    segs = _segments(events, 2000.0)
    if len(segs) != len(runs) * repeats:
        return f"trace: {len(segs)} segments for {len(runs) * repeats} evaluations"
    return [segs[i * repeats:(i + 1) * repeats] for i in range(len(runs))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="4,8,16", help="weight formats (4, 8: affine quantized; 16: bf16)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rows", default="1", help="rows of x (1-64); the chain's stages run at rows <= 2, at the first "
                   "--configs entry above one row")
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    p.add_argument("--layers", type=int, default=32, help="different weights per evaluation (LM head: at most 4)")
    p.add_argument("--depths", default="", help="also run ours at these ring depths per bits (the shipped other "
                   "settings), e.g. '4:2,4,8;8:2,4,8;16:4,8,16'")
    p.add_argument("--hints", default="", help="load hints to compare at the shipped depth per bits, e.g. '4:0,2'")
    p.add_argument("--max-blocks", default="", help="also run ours at the shipped settings with at most this many "
                   "thread blocks walking the tiles (e.g. '264,528')")
    p.add_argument("--configs", default="default",
                   help="settings to run ours and the chain's stage at, comma-separated: 'default' (the shipped "
                   "ones) or tokens like 'd2r3' (ring depth 2, registers for 3 blocks per SM; the chain's blocks "
                   "walking tiles 3 per SM) with optional 't' (the chain: a block per tile) and 'p1' (the L2 "
                   "prefetch before the prologue), 'i' / 'i2' (the chain's weights as exact integers q / 1024 + q: quantized.INT_WEIGHTS), "
                   "e.g. 'd2r3,d2r2,d4r2t,d1r3ti'; 'int': the shipped settings with integer weights")
    p.add_argument("--rows-configs", default="",
                   help="at 8 and 16 bits also run the streaming GEMV (kernels/fast/gemv.py) at these settings, "
                   "comma-separated 'u<unroll>[r<features per warp>][b<blocks per SM>][x<resident>][h<hint>]', "
                   "e.g. 'u8,u4r2,u8b8,u16x2'")
    p.add_argument("--skinny", default="", help="at 16 bits and 2-64 rows also run these skinny products "
                   "(kernels/fast/skinny.py), comma-separated: 'wgmma' (the Hopper kernel, the decode step's "
                   "default at 9-16 rows until session 17), 'mma'")
    p.add_argument("--mma-configs", default="",
                   help="at 16 bits and 2-16 rows also run the streaming tensor-core product "
                   "(kernels/fast/rows_mma.py) at these settings, comma-separated 'u<spans in flight>x<blocks per SM>[e][h<hint>][b<grid blocks "
                   "per SM>]' ('e': x's fragments loaded with the weights), e.g. 'u8x2,u4x3e,u2x4h1'")
    p.add_argument("--no-copy", action="store_true")
    p.add_argument("--overlap", dest="serial", action="store_false",
                   help="let the layers' products overlap on the GPU (default: each waits for the one before, "
                   "through a tiny dependency, as in a decode step)")
    p.add_argument("--no-mlx", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trace-repeats", type=int, default=3)
    p.add_argument("--tol", type=float, default=2e-2)
    p.add_argument("--deadline", type=float, default=0.0, help="stop starting new work after this many seconds")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    def per_bits(spec: str, flag: str) -> dict[int, list[int]]:
        out = {}
        try:
            for part in filter(None, spec.split(";")):
                b, vals = part.split(":")
                out[int(b)] = [int(v) for v in vals.split(",")]
        except ValueError:
            p.error(f"{flag} must read like '4:2,4;8:2,4' (bits:values, ';' between widths), not {spec!r}")
        return out

    depths = per_bits(args.depths, "--depths")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for spec in configs:
        if _parse_config(spec, 4) is None:  # bad specs fail before any work
            p.error(f"bad --configs entry {spec!r} (e.g. 'default', 'd2r3', 'd4r2t', 'd2r3p1')")
    rows_configs = [c.strip() for c in args.rows_configs.split(",") if c.strip()]
    for spec in rows_configs:
        if _parse_rows(spec) is None:
            p.error(f"bad --rows-configs entry {spec!r} (e.g. 'u8', 'u4r2', 'u8b8x4h2')")
    hints = per_bits(args.hints, "--hints")
    mma_configs = [c.strip() for c in args.mma_configs.split(",") if c.strip()]
    for spec in mma_configs:
        if rows_mma.parse_settings(spec) is None:
            p.error(f"bad --mma-configs entry {spec!r} (e.g. 'u8x2', 'u4x3e', 'u2x4h1b2')")
    skinny = [c.strip() for c in args.skinny.split(",") if c.strip()]
    for kind in skinny:
        if kind not in ("wgmma", "mma"):
            p.error(f"bad --skinny entry {kind!r}: 'wgmma' or 'mma'")
    if not quantized.cuda_available():
        print("decode_product.py needs MLX's CUDA backend", file=sys.stderr)
        return 2
    max_blocks = [int(b) for b in args.max_blocks.split(",") if b]
    t_start = time.time()
    env = bm.environment()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    with args.out.open("a") as fh:
        def emit(rec):
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items() if k != "env"}),
                  flush=True)

        for bits in [int(b) for b in args.bits.split(",")]:
            shipped = quantized.DEPTH[bits]
            runs, recs, kept = [], [], []  # one CUPTI trace per weight format, after its wall times
            for name, n, k in [s for name in args.shapes.split(",") for s in SHAPES if s[0] == name]:  # in --shapes' order
                if args.deadline and time.time() - t_start > args.deadline:
                    emit({"stopped": "deadline", "bits": bits, "shape": name})
                    break
                layers = min(args.layers, 4) if name == "lm_head" else args.layers
                weights = [_weights(n, k, bits, args.group_size, 1000 * bits + i) for i in range(layers)]
                kept.append(weights)
                nbytes = sum(a.nbytes for a in weights[0])
                for rows in [int(r) for r in args.rows.split(",")]:
                    stage = _Stage(name, rows, n, k)
                    x = stage.xb
                    variants = []  # (label, fn(arrays) -> output, reference or None)
                    ref0 = _mlx(x, weights[0], bits, args.group_size)
                    if not args.no_copy and rows == 1:
                        variants.append(("copy", lambda a, dep: [t + 0 for t in a], None))
                    if not args.no_mlx:
                        variants.append(("mlx", lambda a, dep, x=x: _mlx(_plus(x, dep), a, bits, args.group_size),
                                         None))
                    for d in depths.get(bits, []):
                        variants.append((f"ours d{d} h{quantized.LOAD_HINT}",
                                         lambda a, dep, d=d, x=x: _ours(_plus(x, dep), a, bits, args.group_size, d,
                                                                        None), ref0))
                    for h in hints.get(bits, []):
                        if h != quantized.LOAD_HINT:
                            variants.append((f"ours d{shipped} h{h}",
                                             lambda a, dep, h=h, x=x: _ours(_plus(x, dep), a, bits, args.group_size,
                                                                            shipped, h), ref0))
                    for mb in max_blocks:
                        variants.append((f"ours d{shipped} h{quantized.LOAD_HINT} blocks{mb}",
                                         lambda a, dep, mb=mb, x=x: _ours(_plus(x, dep), a, bits, args.group_size,
                                                                          shipped, None, mb),
                                         ref0))
                    for spec in (rows_configs if bits in (4, 8, 16) and rows <= gemv.MAX_ROWS else []):
                        variants.append((f"rows {spec}", lambda a, dep, kw=_parse_rows(spec), x=x: gemv.rows_matmul(
                            _plus(x, dep), *a, group_size=args.group_size, bits=bits, **kw), ref0))
                    cref = stage.reference(weights[0], bits, args.group_size)
                    for kind in (skinny if bits == 16 and rows >= 2 else []):
                        variants.append((f"skinny {kind}",
                                         lambda a, dep, kind=kind, x=x: _skinny(kind, _plus(x, dep), a[0]), ref0))
                    for spec in (mma_configs if bits == 16 and rows <= rows_mma.MAX_ROWS else []):
                        variants.append((f"rows_mma {spec}", lambda a, dep, kw=rows_mma.parse_settings(spec), x=x:
                                         rows_mma.rows_mma_matmul(_plus(x, dep), a[0], **kw), ref0))
                    for i, spec in enumerate(configs):
                        conf = _parse_config(spec, bits)
                        if not conf.get("int"):  # the plain product has no integer-weights path
                            variants.append((f"ours {spec}", lambda a, dep, conf=conf, x=x: _with(
                                conf, lambda: _ours(_plus(x, dep), a, bits, args.group_size, None, None)), ref0))
                        if rows > 2 or (rows > 1 and i > 0):
                            continue
                        variants.append((f"chain {spec}", lambda a, dep, conf=conf, stage=stage: _with(
                            conf, lambda: stage.run(a, bits, args.group_size, dep)), cref))
                    for label, fn, ref in variants:
                        rec = {"bits": bits, "group_size": args.group_size if bits != 16 else None, "shape": name,
                               "N": n, "K": k, "rows": rows, "variant": label, "layers": layers,
                               "bytes_per_layer": nbytes}
                        try:
                            if ref is not None:
                                err = _rel(fn(weights[0], None), ref)
                                rec["rel_err"] = err
                                if not err <= args.tol:
                                    rec["error"] = f"differs from the reference by {err:.3g} (> {args.tol})"
                                    failures += 1

                            def run(fn=fn, weights=weights, serial=args.serial and label != "copy"):
                                outs, dep = [], None
                                for a in weights:
                                    outs.append(fn(a, dep))
                                    dep = _dep(outs[-1]) if serial else None
                                return outs

                            mx.eval(run())
                            times = []
                            for _ in range(args.repeats):
                                mx.synchronize()
                                t0 = time.perf_counter()
                                mx.eval(run())
                                mx.synchronize()
                                times.append(time.perf_counter() - t0)
                            wall = statistics.median(times)
                            rec.update(wall_ms=1000 * wall, wall_gbs=layers * nbytes / wall / 1e9)
                            runs.append(run)
                            recs.append(rec)
                            emit({**rec, "kind": "wall"})
                        except Exception as err:  # a variant that fails: say so, keep the others
                            rec["error"] = repr(err)[:500]
                            failures += 1
                            emit({**rec, "env": env})
            traced = _trace(runs, args.trace_repeats)
            for i, rec in enumerate(recs):
                # One trace for all (the profiler attaches once); where its evaluations do not
                # split cleanly by the idle gaps, this variant's own trace.
                mine = traced[i] if not isinstance(traced, str) else _trace([runs[i]], args.trace_repeats)
                if isinstance(mine, str):
                    rec["trace_error"] = mine
                else:
                    mine = mine if not isinstance(traced, str) else mine[0]
                    busy = statistics.median(s["busy_us"] for s in mine)
                    span = statistics.median(s["span_us"] for s in mine)
                    prod = statistics.median(s["product_us"] for s in mine)
                    rec.update(gpu_busy_ms=busy / 1000, gpu_span_ms=span / 1000, product_ms=prod / 1000,
                               product_kernels=mine[0]["product_kernels"],
                               us_per_product=prod / max(1, mine[0]["product_kernels"]),
                               gpu_gbs=rec["layers"] * rec["bytes_per_layer"] / (prod * 1e-6) / 1e9,
                               kernels=mine[0]["kernels"], kernel=mine[0]["name"])
                emit({**rec, "kind": "gpu", "env": env})
            del runs, kept
            mx.clear_cache()
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
