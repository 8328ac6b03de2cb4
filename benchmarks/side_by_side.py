"""xlstm-metal vs NX-AI's official PyTorch ``xlstm`` on the same shapes, on the same machine.

Each side runs in its own process (its own allocator, its own peak-memory counter), one after
the other; on a CPU the rounds alternate and the best of each measurement is kept, so load
from other processes hits both sides alike. Results go to a JSON file that
``benchmarks/report.py`` turns into BENCHMARKS.md.

    python benchmarks/side_by_side.py --preset cpu      # 125m, float32, this machine's CPU
    python benchmarks/side_by_side.py --preset h100 --out $OUT/h100.json   # 7B shape, bf16

Both sides measure the same things: prefill = embeddings + all blocks over the prompt + LM head
on the last position + argmax (what generation needs); decode = one greedy step (all blocks,
LM head, argmax) per token from a zero state. Ours: chunked prefill carrying the state, fused
projections, compiled step. Theirs: ``xLSTMLarge`` in inference mode with the Triton kernels
on CUDA (``chunkwise--triton_limit_chunk``, ``native_sequence__triton``, ``triton``) or the
native PyTorch kernels on CPU, decode both eager and with one step captured in a CUDA graph; on a
CPU also with one PyTorch thread (its default threads stall behind other jobs on a shared
machine), the ratios taking the official's better variant.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRESETS = {
    "cpu": dict(shape="125m", dtype="float32", prefill=[512], decode=[1, 8], decode_tokens=16,
                chunk_size=64, rounds=2, official_decode_tokens=16, official_prefill=[512],
                kernel="chunkwise_scan"),  # chunkwise_fused is CUDA-only (it runs chunkwise_scan elsewhere)
    "h100": dict(shape="7b", dtype="bfloat16", prefill=[2048, 16384, 131072], decode=[1, 16, 64],
                 decode_tokens=64, chunk_size=64, rounds=1, official_decode_tokens=32, official_prefill=[2048, 16384]),
    # The H200 targets of issue 19 add the time to first token of a 512-token prompt, and issue 11
    # item 5 the quantized decode (--quantized 4,8 measures it on our side, after the rest).
    "h200": dict(shape="7b", dtype="bfloat16", prefill=[512, 2048, 16384, 131072], decode=[1, 16, 64],
                 decode_tokens=64, chunk_size=64, rounds=1, official_decode_tokens=32,
                 official_prefill=[512, 2048, 16384]),
    # Prefill only (issue 19 item 2: 2,048 and 16,384 tokens beside the official, and the time to
    # first token of a 512-token prompt), for short runs.
    "h200-prefill": dict(shape="7b", dtype="bfloat16", prefill=[512, 2048, 16384], decode=[], decode_tokens=64,
                         chunk_size=64, rounds=1, official_decode_tokens=32, official_prefill=[512, 2048, 16384]),
}

SHAPES = {
    "7b": dict(embedding_dim=4096, num_heads=8, num_blocks=32, vocab_size=50304),
    "1.3b": dict(embedding_dim=2048, num_heads=4, num_blocks=24, vocab_size=50304),
    "125m": dict(embedding_dim=768, num_heads=4, num_blocks=12, vocab_size=50304),
}


def _emit(out: Path, record: dict) -> None:
    with open(out, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------------- ours
def worker_ours(args) -> None:
    import xlstm_metal  # noqa: F401  (BLAS before mlx)
    import mlx.core as mx

    from xlstm_metal import benchmark as bm

    out = Path(args.worker_out)
    deadline = time.time() + args.budget
    env = bm.environment()
    _emit(out, {"side": "ours", "kind": "env", **env})
    kernel = args.kernel
    config = bm.shape_config(args.shape, chunkwise_kernel=kernel, chunk_size=args.chunk_size,
                             max_inference_chunksize=args.prefill_chunk)
    t0 = time.time()
    model = bm.random_model(config, dtype=args.dtype)
    model.fuse_projections()
    _emit(out, {"side": "ours", "kind": "build", "seconds": time.time() - t0,
                "weights_gb": mx.get_active_memory() / 2**30})
    common = {"side": "ours", "variant": f"{kernel}/{args.chunk_size}, fused, compiled step"}
    for length in args.prefill:
        if time.time() > deadline:
            break
        try:
            r = bm.measure_prefill(model, length, chunk=args.prefill_chunk, repeats=args.repeats)
            _emit(out, {**common, **r})
        except Exception as err:  # e.g. out of memory: report it and go on
            _emit(out, {**common, "kind": "prefill", "length": length, "error": repr(err)[:500]})
    for batch in args.decode:
        if time.time() > deadline:
            break
        try:
            r = bm.measure_decode(model, batch, tokens=args.decode_tokens, compiled=not args.no_compile)
            _emit(out, {**common, **r})
        except Exception as err:
            _emit(out, {**common, "kind": "decode", "batch": batch, "error": repr(err)[:500]})
    if args.profile and time.time() < deadline:
        for record in profile_ours(model, bm, deadline, prefill_tokens=min(max(args.prefill), 2048)):
            _emit(out, {"side": "ours", "kind": "profile", **record})
    for bits in args.quantized:
        # The same model quantized (group 64, gate projections in float: the default recipe), as
        # `xlstm-metal bench --q-bits`: decode at batch 1 (issue 11 item 5), after everything else.
        if time.time() > deadline:
            break
        from mlx.utils import tree_flatten

        from xlstm_metal.quantization import dequantize_model, quantize_model

        try:
            dequantize_model(model)
            quantize_model(model, bits=bits, group_size=64)
            model.fuse_projections()
            r = bm.measure_decode(model, 1, tokens=args.decode_tokens)
            _emit(out, {"side": "ours", "variant": f"{bits}-bit g64 weights, fused, compiled (quantized)",
                        "q_bits": bits, "weights_gb": sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9,
                        **r})
        except Exception as err:
            _emit(out, {"side": "ours", "variant": f"{bits}-bit g64", "kind": "decode", "batch": 1,
                        "error": repr(err)[:500]})
    if args.variants and time.time() < deadline:
        # Same model, other settings: what each fast path is worth.
        extra = [("decode", 1, dict(compiled=False), "fused, eager step"),
                 ("decode", 16, dict(compiled=False), "fused, eager step")]
        for kind, batch, kw, name in extra:
            if time.time() > deadline:
                break
            r = bm.measure_decode(model, batch, tokens=args.decode_tokens, **kw)
            _emit(out, {"side": "ours", "variant": name, **r})
        # bf16 recurrent state (weights unchanged): halves the state traffic of a decode step.
        import mlx.core as mx

        model.config.inference_state_dtype = "bfloat16"
        for block in model.blocks:
            for cell in (block.mlstm_layer.parallel_kernel_cell, block.mlstm_layer.recurrent_kernel_cell):
                cell.state_dtype = mx.bfloat16
        for batch in args.decode:
            if time.time() > deadline:
                break
            try:
                r = bm.measure_decode(model, batch, tokens=args.decode_tokens)
                _emit(out, {"side": "ours", "variant": "fused, compiled step, bf16 state", **r,
                            "state_dtype": "bfloat16"})
            except Exception as err:
                _emit(out, {"side": "ours", "variant": "bf16 state", "kind": "decode", "batch": batch,
                            "error": repr(err)[:500]})
        model.config.inference_state_dtype = "float32"
        for block in model.blocks:
            for cell in (block.mlstm_layer.parallel_kernel_cell, block.mlstm_layer.recurrent_kernel_cell):
                cell.state_dtype = mx.float32
        for kern, cs in args.kernel_variants:
            if time.time() > deadline:
                break
            for block in model.blocks:
                cell = block.mlstm_layer.parallel_kernel_cell
                cell.kernel, cell.chunk_size = kern, cs
            try:
                r = bm.measure_prefill(model, args.variant_length, chunk=args.prefill_chunk, repeats=args.repeats)
                _emit(out, {"side": "ours", "variant": f"{kern}/{cs}, fused", **r})
            except Exception as err:
                _emit(out, {"side": "ours", "variant": f"{kern}/{cs}", "kind": "prefill", "error": repr(err)[:500]})


def profile_ours(model, bm, deadline, prefill_tokens=2048):
    """Time each part of one decode step and of one prefill chunk in isolation (synchronised),
    summed over the blocks: which kernels take the time."""
    import mlx.core as mx

    def timeit(fn, n):
        mx.eval(fn())
        mx.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            mx.eval(fn())
        mx.synchronize()
        return (time.perf_counter() - t) / n

    c = model.config
    nb = c.num_blocks
    blk = model.blocks[0]
    layer = blk.mlstm_layer
    dt = model.lm_head.weight.dtype
    from xlstm_metal.kernels.fast.decode import add_rms_norm, gate_product_in_kernel

    for batch, seq in ((1, 1), (16, 1), (64, 1), (1, prefill_tokens)):
        if time.time() > deadline:
            return
        x = mx.random.normal((batch, seq, c.embedding_dim)).astype(dt)
        y = mx.random.normal((batch, seq, c.embedding_dim)).astype(dt)
        state = model.make_state(batch)[0]
        n = 20 if seq == 1 else 3
        if seq == 1 and blk.fused_step(x):
            # The fused decode path (mLSTMBlock.step): the parts it launches, one block.
            defer = gate_product_in_kernel(x)
            q, k, v, o, i, f, ib, fb, w_if = layer.projection_cell.project_raw_gates(layer, x, defer_gates=defer)
            kcell = layer.recurrent_kernel_cell
            cap = layer.projection_cell.gate_soft_cap
            mx.eval(x, y, q, k, v, o, state)
            h, _ = kcell.step_raw_gates(q, k, v, i, f, ib, fb, cap, state, x=x, w_if=w_if)
            mx.eval(h)
            parts = {
                "rms norm + residual add (2/block)": 2 * timeit(lambda: add_rms_norm(x, y, blk.norm_ffn), n),
                "q|k|v|o(|i|f) projection": timeit(
                    lambda: layer.projection_cell.project_raw_gates(layer, x, defer_gates=defer)[:4], n),
                "mLSTM step kernel (gates inside)": timeit(
                    lambda: kcell.step_raw_gates(q, k, v, i, f, ib, fb, cap, state, x=x, w_if=w_if), n),
                "output (norm + gate kernel, out_proj)": timeit(lambda: layer.output_cell.fused(layer, h, o), n),
                "ffn (gate|up, down)": timeit(lambda: blk.ffn(x), n),
            }
        else:
            q, k, v, o, i, f = layer.project(x)
            mx.eval(x, q, k, v, o, i, f, state)
            kcell = layer.recurrent_kernel_cell if seq == 1 else layer.parallel_kernel_cell
            h, _ = kcell(q, k, v, i, f, state)
            mx.eval(h)
            output = layer.output_cell.fused if layer.fused else layer.output
            parts = {
                "rms norms (2/block)": 2 * timeit(lambda: blk.norm_mlstm(x), n),
                "q|k|v|o|i|f projection": timeit(lambda: layer.project(x), n),
                f"mLSTM kernel ({kcell.step_kernel if seq == 1 else kcell.kernel})":
                    timeit(lambda: kcell(q, k, v, i, f, state), n),
                "output (norm, gate, out_proj)": timeit(
                    (lambda: output(layer, h, o)) if layer.fused else (lambda: output(h, o)), n),
                "ffn (gate|up, down)": timeit(lambda: blk.ffn(x), n),
            }
        per_block = {name: t * nb for name, t in parts.items()}
        last = x[:, -1:]
        per_block["lm_head"] = timeit(lambda: model.lm_head(last), n)
        yield {"what": f"batch {batch} x {seq} tokens", "ms": {k: 1000 * v for k, v in per_block.items()}}


# ------------------------------------------------------------------------------- official
def worker_official(args) -> None:
    import torch
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    out = Path(args.worker_out)
    deadline = time.time() + args.budget
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    import xlstm

    _emit(out, {"side": "official", "kind": "env", "torch": torch.__version__, "xlstm": xlstm.__version__,
                "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
                "threads": torch.get_num_threads()})
    cfg = xLSTMLargeConfig(
        **SHAPES[args.shape], mode="inference", return_last_states=True,
        chunkwise_kernel="chunkwise--triton_limit_chunk" if cuda else "chunkwise--native_autograd",
        sequence_kernel="native_sequence__triton" if cuda else "native_sequence__native",
        step_kernel="triton" if cuda else "native",
        autocast_kernel_dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
        inference_state_dtype="float32",
    )
    t0 = time.time()
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        model = xLSTMLarge(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    _emit(out, {"side": "official", "kind": "build", "seconds": time.time() - t0})

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def peak_reset():
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak():
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    @torch.inference_mode()
    def prefill(ids):
        x = model.embedding(ids)
        x, state = model.backbone(x, None)
        logits = model.lm_head(x[:, -1:])
        logits = cfg.output_logit_soft_cap * torch.tanh(logits / cfg.output_logit_soft_cap)
        return logits.argmax(-1), state

    gen = torch.Generator(device=dev).manual_seed(0)
    for length in args.prefill:
        if time.time() > deadline:
            break
        try:
            ids = torch.randint(0, cfg.vocab_size, (1, length), device=dev, generator=gen)
            prefill(ids[:, : min(length, 2048)])  # warm-up: Triton compiles here
            sync()
            peak_reset()
            best = float("inf")
            for _ in range(args.repeats):
                sync()
                t = time.perf_counter()
                prefill(ids)
                sync()
                best = min(best, time.perf_counter() - t)
            _emit(out, {"side": "official", "variant": "eager", "kind": "prefill", "batch": 1, "length": length,
                        "seconds": best, "tok_s": length / best, "ttft_s": best, "peak_mem_gb": peak()})
        except Exception as err:
            _emit(out, {"side": "official", "kind": "prefill", "length": length, "error": repr(err)[:500]})

    @torch.inference_mode()
    def decode_eager(batch, steps):
        tok = torch.randint(0, cfg.vocab_size, (batch, 1), device=dev, generator=gen)
        logits, state = model(tok, None)
        for _ in range(3):
            logits, state = model(logits[:, -1:].argmax(-1), state)
        sync()
        peak_reset()
        t = time.perf_counter()
        for _ in range(steps):
            logits, state = model(logits[:, -1:].argmax(-1), state)
        sync()
        return time.perf_counter() - t

    @torch.inference_mode()
    def decode_graph(batch, steps):
        static_tok = torch.randint(0, cfg.vocab_size, (batch, 1), device=dev, generator=gen)
        _, state = model(static_tok, None)  # allocates the state; later steps update it in place
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                logits, _ = model(static_tok, state)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits, _ = model(static_tok, state)
            static_tok.copy_(logits[:, -1:].argmax(-1))
        for _ in range(3):
            graph.replay()
        sync()
        peak_reset()
        t = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        sync()
        return time.perf_counter() - t

    # The CUDA graph first on a GPU: it is the official's fastest decode, the one compared with.
    modes = ([("cuda graph", decode_graph)] if cuda else []) + [("eager", decode_eager)]
    for name, fn in modes:
        for batch in args.decode:
            if time.time() > deadline:
                break
            steps = args.decode_tokens if name == "cuda graph" else args.official_decode_tokens
            try:
                seconds = fn(batch, steps)
                _emit(out, {"side": "official", "variant": name, "kind": "decode", "batch": batch, "length": steps,
                            "seconds": seconds, "tok_s": batch * steps / seconds,
                            "ms_per_step": 1000 * seconds / steps, "peak_mem_gb": peak()})
            except Exception as err:
                _emit(out, {"side": "official", "variant": name, "kind": "decode", "batch": batch,
                            "error": repr(err)[:500]})
    if not cuda and torch.get_num_threads() > 1:
        # On a shared CPU PyTorch's threads can stall behind other jobs (ours picks its BLAS
        # threads from the idle cores); one thread as well, and the ratios take its best variant.
        torch.set_num_threads(1)
        for length in args.prefill:
            if time.time() > deadline:
                break
            ids = torch.randint(0, cfg.vocab_size, (1, length), device=dev, generator=gen)
            t = time.perf_counter()
            prefill(ids)
            seconds = time.perf_counter() - t
            _emit(out, {"side": "official", "variant": "eager, 1 thread", "kind": "prefill", "batch": 1,
                        "length": length, "seconds": seconds, "tok_s": length / seconds, "ttft_s": seconds,
                        "peak_mem_gb": None})
        for batch in args.decode:
            if time.time() > deadline:
                break
            seconds = decode_eager(batch, args.official_decode_tokens)
            _emit(out, {"side": "official", "variant": "eager, 1 thread", "kind": "decode", "batch": batch,
                        "length": args.official_decode_tokens, "seconds": seconds,
                        "tok_s": batch * args.official_decode_tokens / seconds,
                        "ms_per_step": 1000 * seconds / args.official_decode_tokens, "peak_mem_gb": None})


# ---------------------------------------------------------------------------------- driver
def _run_worker(side: str, args, preset: dict, budget: float, jsonl: Path) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--worker-out", str(jsonl),
           "--shape", preset["shape"], "--dtype", preset["dtype"], "--budget", str(budget),
           "--prefill", ",".join(map(str, preset["prefill"] if side == "ours" else preset["official_prefill"])),
           "--decode", ",".join(map(str, preset["decode"])),
           "--decode-tokens", str(preset["decode_tokens"]),
           "--official-decode-tokens", str(preset["official_decode_tokens"]),
           "--repeats", str(args.repeats), "--kernel", args.kernel, "--chunk-size", str(args.chunk_size),
           "--prefill-chunk", str(args.prefill_chunk)]
    if args.profile:
        cmd.append("--profile")
    if args.quantized and side == "ours":
        cmd += ["--quantized", ",".join(map(str, args.quantized))]
    if args.variants:
        cmd += ["--variants", "--variant-length", str(args.variant_length),
                "--kernel-variants", ",".join(f"{k}/{c}" for k, c in args.kernel_variants)]
    start = jsonl.stat().st_size if jsonl.exists() else 0
    with open(jsonl, "a") as fh:  # other load on the machine skews CPU figures: keep it beside them
        fh.write(json.dumps({"side": side, "kind": "load", "loadavg_1m": os.getloadavg()[0]}) + "\n")
    try:
        proc = subprocess.run(cmd, timeout=budget + 60, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"[{side}] exit {proc.returncode}: {proc.stderr[-3000:]}", file=sys.stderr)
    except subprocess.TimeoutExpired:
        print(f"[{side}] timed out after {budget + 60:.0f} s", file=sys.stderr)
    if not jsonl.exists():
        return []
    with open(jsonl) as fh:
        fh.seek(start)
        return [json.loads(line) for line in fh if line.strip()]


def _best(records: list[dict]) -> list[dict]:
    """Best tok/s per (side, variant, kind, batch, length) over rounds."""
    best: dict[tuple, dict] = {}
    for r in records:
        if r.get("kind") not in ("prefill", "decode") or "tok_s" not in r:
            continue
        key = (r["side"], r.get("variant"), r["kind"], r.get("batch"), r.get("length"))
        if key not in best or r["tok_s"] > best[key]["tok_s"]:
            best[key] = r
    return list(best.values())


def ratios(records: list[dict]) -> list[dict]:
    """ours / official for each (kind, batch, length) both measured; against the official's best variant."""
    rows = []
    ours = [r for r in records if r["side"] == "ours" and r.get("variant", "").endswith("compiled step")]
    for r in ours:
        theirs = [t for t in records if t["side"] == "official" and t["kind"] == r["kind"]
                  and t.get("batch") == r.get("batch") and (r["kind"] == "decode" or t.get("length") == r.get("length"))]
        if theirs:
            t = max(theirs, key=lambda x: x["tok_s"])
            rows.append({"kind": r["kind"], "batch": r["batch"], "length": r["length"],
                         "ours_tok_s": r["tok_s"], "official_tok_s": t["tok_s"],
                         "official_variant": t.get("variant"), "ratio": r["tok_s"] / t["tok_s"]})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--out", help="results JSON (default: benchmarks/results/<preset>.json)")
    p.add_argument("--sides", default="ours,official")
    p.add_argument("--budget", type=float, default=None, help="seconds per side and round")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None, help="rounds (default: the preset's)")
    p.add_argument("--append", action="store_true", help="add rounds to the results already in --out")
    p.add_argument("--kernel", default=None, help="our prefill kernel (default: the preset's, else chunkwise_fused)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="our kernel chunk size (default: the preset's; 64 on the H100, the largest "
                   "chunkwise_fused runs and its fastest there)")
    p.add_argument("--prefill-chunk", type=int, default=16384)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--variants", action="store_true")
    p.add_argument("--variant-length", type=int, default=16384)
    p.add_argument("--kernel-variants", default="chunkwise_scan/256,chunkwise_fused/32")
    p.add_argument("--quantized", default="", help="our side: then decode batch 1 with the weights "
                   "quantized to these bits (comma-separated, e.g. 4,8; group 64)")
    # worker-only arguments
    p.add_argument("--worker", choices=("ours", "official"))
    p.add_argument("--worker-out")
    p.add_argument("--shape", default="125m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prefill", default="512")
    p.add_argument("--decode", default="1")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--official-decode-tokens", type=int, default=16)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    args.kernel_variants = [(k.split("/")[0], int(k.split("/")[1])) for k in args.kernel_variants.split(",") if k]
    args.quantized = [int(b) for b in args.quantized.split(",") if b]

    if args.worker:
        args.prefill = [int(x) for x in args.prefill.split(",") if x]
        args.decode = [int(x) for x in args.decode.split(",") if x]
        (worker_ours if args.worker == "ours" else worker_official)(args)
        return 0

    preset = PRESETS[args.preset]
    args.chunk_size = args.chunk_size or preset["chunk_size"]
    args.kernel = args.kernel or preset.get("kernel", "chunkwise_fused")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    records: list[dict] = []
    packed = jsonl.with_name(jsonl.name + ".xz")  # the archived runs are stored xz-compressed
    if args.append and (jsonl.exists() or packed.exists()):  # more rounds on top of an earlier run's
        text = jsonl.read_text() if jsonl.exists() else lzma.open(packed, "rt").read()
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif jsonl.exists():
        jsonl.unlink()
    budget = args.budget or (240.0 if args.preset == "h100" else 300.0)
    sides = [s for s in args.sides.split(",") if s]
    from tqdm import tqdm

    for _ in tqdm(range(args.rounds or preset["rounds"]), desc="rounds", file=sys.stderr):
        for side in sides:
            records += _run_worker(side, args, preset, budget, jsonl)
            result = {
                "preset": args.preset, "preset_config": preset,
                "command": "python benchmarks/side_by_side.py " + " ".join(sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                         "cpu_name": next((r["cpu_name"] for r in records if r.get("kind") == "env" and "cpu_name" in r),
                                          None)},
                "records": records, "best": _best(records), "ratios": ratios(_best(records)),
            }
            tmp = out.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, out)
    for row in ratios(_best(records)):
        print(f"{row['kind']:8s} batch {row['batch']:3d} length {row['length']:6d}: ours {row['ours_tok_s']:10.1f} "
              f"official {row['official_tok_s']:10.1f} ({row['official_variant']}) -> {row['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
