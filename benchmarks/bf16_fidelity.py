"""bf16 fidelity at length: NX-AI's bf16 xLSTMLarge and ours against one float32 reference,
on the same weights (issue 19 item 6: "speed must not buy drift").

The weights are NX-AI's ``xlstm.xlstm_large`` ``xLSTMLarge`` with its own initialisation
(seeded, built on the device), float32. The reference is that model in float32 with NX-AI's
native PyTorch kernels (``chunkwise--native_autograd``, ``native`` step) and TF32 off
everywhere on the torch side. Then, on weights cast to bf16 (one cast, shared by both sides):

- official: the same model class in bf16 with the kernels NX-AI runs in bf16 (Triton
  ``chunkwise--triton_limit_chunk`` / ``triton`` step on CUDA, the native kernels on a CPU),
  float32 recurrent state;
- ours: the bf16 state dict loaded into xlstm-metal's ``xLSTMLarge`` (float32 state), fused
  projections, ``model.prefill`` for the prompt and a compiled step for decoding, i.e. the
  path ``xlstm-metal generate`` runs (``chunkwise_fused`` and ``step_fused`` on CUDA).

For each prompt length: a random prompt (seeded; prompts are prefixes of one token stream),
the reference's logits at its last position and its greedy continuation of ``--steps`` tokens;
each side then sees the same prompt and is fed the reference's greedy tokens (teacher forcing).
Per side: relative error of the last prompt position's logits, ``||a - r||_2 / ||r||_2`` (and
``max|a - r| / max|r|``), the same over all steps, KL(reference || side), and greedy agreement:
at how many of the ``--steps`` positions the side's argmax equals the reference's token.

    python benchmarks/bf16_fidelity.py --shape 7b --lengths 8192,131072 --out $OUT/bf16_fidelity.json
    python benchmarks/bf16_fidelity.py --shape 512:4:6:4096 --lengths 256,2048 --out /tmp/f.json --plot /tmp/f.png

``--shape``: a named shape (7b, 1.3b, 125m) or EMBEDDING:HEADS:BLOCKS:VOCAB. Each side runs
after the other in one process, its memory freed before the next; a length whose reference
does not finish inside ``--budget`` seconds is reported as skipped, never as a figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import xlstm_metal  # noqa: E402,F401  (first: binds MLX to OpenBLAS on Linux)
import mlx.core as mx  # noqa: E402

from xlstm_metal.benchmark import SHAPES, environment  # noqa: E402

#: ours: the generation path (bf16 weights, float32 residual stream and state); ours-ops: the same
#: with the pure-ops reference kernels (chunkwise / step: tells kernel drift from the rest);
#: ours-bf16-residual: ours with the residual stream in bf16, as NX-AI's bf16 model keeps it;
#: ours-float32: float32 weights, reference kernels (checks the weight transfer: it should match
#: the reference to float32 round-off).
SIDES = ("official", "ours", "ours-ops", "ours-bf16-residual", "ours-float32")


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


# ------------------------------------------------------------------------------ metrics
def rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    """||a - ref||_2 / ||ref||_2 in float64."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


def rel_max(a: np.ndarray, ref: np.ndarray) -> float:
    """max|a - ref| / max|ref| in float64."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-300))


def kl_divergence(ref: np.ndarray, a: np.ndarray) -> float:
    """KL(softmax(ref) || softmax(a)) in nats, float64."""
    ref, a = np.asarray(ref, np.float64), np.asarray(a, np.float64)
    lp = ref - ref.max()
    lp -= np.log(np.exp(lp).sum())
    lq = a - a.max()
    lq -= np.log(np.exp(lq).sum())
    return float(np.sum(np.exp(lp) * (lp - lq)))


def compare(logits: np.ndarray, ref_logits: np.ndarray, ref_tokens: np.ndarray) -> dict[str, Any]:
    """logits, ref_logits [T, V] (position 0: the prompt's last token, then one per fed token);
    ref_tokens [T] (the reference's argmax at each position)."""
    if not np.all(np.isfinite(logits)):
        return {"finite": False, "last_rel_l2": float("inf"), "last_rel_max": float("inf"),
                "agree": 0, "steps": int(len(ref_tokens))}
    per_l2 = [rel_l2(a, r) for a, r in zip(logits, ref_logits)]
    per_kl = [kl_divergence(r, a) for a, r in zip(logits, ref_logits)]
    hits = (np.argmax(logits, axis=-1) == ref_tokens)
    return {
        "finite": True,
        "last_rel_l2": per_l2[0],
        "last_rel_max": rel_max(logits[0], ref_logits[0]),
        "mean_rel_l2": float(np.mean(per_l2)),
        "max_rel_l2": float(np.max(per_l2)),
        "mean_kl": float(np.mean(per_kl)),
        "agree": int(hits.sum()),
        "steps": int(len(ref_tokens)),
        "first_disagreement": int(np.argmin(hits)) if not hits.all() else None,
        "per_step_rel_l2": per_l2,
        "per_step_agree": [bool(h) for h in hits],
    }


# ------------------------------------------------------------------------------ shapes
def parse_shape(text: str) -> dict[str, int]:
    if text.lower() in SHAPES:
        return dict(SHAPES[text.lower()])
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) <= 0:
        raise UsageError(f"--shape must be one of {', '.join(SHAPES)} or EMBEDDING:HEADS:BLOCKS:VOCAB, got {text!r}")
    E, NH, blocks, vocab = values
    if E % (2 * NH):
        raise UsageError(f"--shape: embedding {E} must be divisible by 2 x heads ({2 * NH})")
    return dict(embedding_dim=E, num_heads=NH, num_blocks=blocks, vocab_size=vocab)


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(p.replace("_", "")) for p in text.split(",") if p.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 2:
        raise UsageError(f"--lengths must be comma-separated integers >= 2, got {text!r}")
    return sorted(set(lengths))


# ------------------------------------------------------------------------------ NX-AI's side
def nxai_config(shape: dict[str, int], *, triton: bool, kernel_dtype: str, state_dtype: str = "float32"):
    from xlstm.xlstm_large.model import xLSTMLargeConfig

    return xLSTMLargeConfig(
        **shape, mode="inference", return_last_states=True, chunk_size=64, inference_state_dtype=state_dtype,
        chunkwise_kernel="chunkwise--triton_limit_chunk" if triton else "chunkwise--native_autograd",
        sequence_kernel="native_sequence__triton" if triton else "native_sequence__native",
        step_kernel="triton" if triton else "native",
        autocast_kernel_dtype=kernel_dtype,
    )


def torch_float32_exact() -> None:
    """TF32 off for every float32 matmul and convolution on the torch side."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def torch_sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def torch_free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


#: NX-AI's model takes the prompt in pieces of this many tokens, the state carried (its native
#: float32 chunkwise kernel ran out of the H200's 140 GB on 131,072 tokens in one call, R2).
TORCH_PIECE = 16384


def run_torch(model, prompt: np.ndarray, steps: int, feed: np.ndarray | None, device) -> tuple[np.ndarray, np.ndarray]:
    """Prefill ``prompt`` [S] (in pieces of :data:`TORCH_PIECE` tokens, the state carried), then
    ``steps - 1`` single-token steps fed ``feed`` (or the model's own argmax when None). Returns
    logits [steps, V] float32 and the argmax tokens [steps]."""
    import torch

    cap = model.config.output_logit_soft_cap

    def head(x):
        logits = model.lm_head(x)
        return logits if cap is None else cap * torch.tanh(logits / cap)

    out, tokens = [], []
    with torch.inference_mode():
        state = None
        for start in range(0, len(prompt), TORCH_PIECE):
            ids = torch.as_tensor(prompt[None, start : start + TORCH_PIECE].astype(np.int64), device=device)
            x, state = model.backbone(model.embedding(ids), state)
            last = x[:, -1:]
            del x
        logits = head(last)[0, -1]  # the lm_head on the last position only
        for t in range(steps):
            row = logits.float().cpu().numpy()
            out.append(row)
            tokens.append(int(np.argmax(row)))
            if t == steps - 1:
                break
            nxt = tokens[-1] if feed is None else int(feed[t])
            logits, state = model(torch.tensor([[nxt]], device=device), state)
            logits = logits[0, -1]
    return np.stack(out), np.array(tokens)


# ------------------------------------------------------------------------------ our side
def our_model(state_dict: dict, nxai_cfg, dtype: str):
    """Our xLSTMLarge from NX-AI's state dict (torch tensors, NX-AI names), weights in ``dtype``,
    set up as ``xlstm-metal generate`` runs it (fused projections, fast kernels on CUDA, float32
    residual stream)."""
    from xlstm_metal.config import xLSTMConfig
    from xlstm_metal.connectors import from_nxai_state_dict
    from xlstm_metal.loading import load_weights_strict
    from xlstm_metal.models.xlstm_large import xLSTMLarge

    config = xLSTMConfig.from_dict(dataclasses.asdict(nxai_cfg))
    model = xLSTMLarge(config)
    target = getattr(mx, dtype)
    weights = {}
    for key, value in from_nxai_state_dict(state_dict, config, model).items():  # model: gets a use_bias out norm
        weights[key] = value if value.dtype == target else value.astype(target)
        mx.eval(weights[key])
    load_weights_strict(model, weights, "NX-AI state dict")
    del weights
    mx.eval(model.parameters())
    return model.fuse_projections()


def run_ours(model, prompt: np.ndarray, steps: int, feed: np.ndarray) -> np.ndarray:
    """Same protocol as :func:`run_torch` (fed ``feed``): logits [steps, V] float32."""
    logits, state = model.prefill(mx.array(prompt[None].astype(np.int32)))

    def one(tokens, state):
        out, state = model(tokens, state)
        return out[:, -1], state

    step = mx.compile(one, inputs=model.state)  # as the generation runner compiles its step
    out = []
    for t in range(steps):
        out.append(np.array(logits[0].astype(mx.float32)))
        if t == steps - 1:
            break
        logits, state = step(mx.array([[int(feed[t])]], dtype=mx.int32), state)
    return np.stack(out)


def set_kernels(model, kernels: dict[str, str]) -> None:
    for block in model.blocks:
        block.mlstm_layer.parallel_kernel_cell.kernel = kernels["prefill"]
        block.mlstm_layer.recurrent_kernel_cell.step_kernel = kernels["step"]


def residual_cost(model, prompt: np.ndarray, log) -> dict[str, Any]:
    """What the float32 residual stream costs: prefill tokens/s of ``prompt`` and one decode
    step's time, with the residual in float32 and in the weights' dtype (best of 3 each,
    settings interleaved)."""
    from xlstm_metal.benchmark import make_decode_step

    ids = mx.array(prompt[None].astype(np.int32))
    out: dict[str, Any] = {"prompt_tokens": int(len(prompt))}
    best: dict[str, dict[str, float]] = {"float32": {}, "weights": {}}
    # One compiled step per setting: the residual dtype is read when a step is traced.
    steps = {name: make_decode_step(model) for name in best}
    for _ in range(3):
        for name, dtype in (("float32", mx.float32), ("weights", None)):
            model.residual_dtype = dtype
            t = time.perf_counter()
            _, state = model.prefill(ids)
            mx.eval(state)
            prefill_s = time.perf_counter() - t
            step = steps[name]
            tok = mx.zeros((1, 1), dtype=mx.int32)
            tok, state = step(tok, state)
            mx.eval(tok, state)  # traces and warms the compiled step
            t = time.perf_counter()
            for _ in range(16):
                tok, state = step(tok, state)
                mx.eval(tok)
            step_ms = (time.perf_counter() - t) / 16 * 1000
            b = best[name]
            b["prefill_tok_s"] = max(b.get("prefill_tok_s", 0.0), len(prompt) / prefill_s)
            b["decode_step_ms"] = min(b.get("decode_step_ms", float("inf")), step_ms)
    model.residual_dtype = mx.float32
    out.update({f"residual_{k}": v for k, v in best.items()})
    log(f"cost: {out}")
    return out


def kernels_of(model) -> dict[str, str]:
    layer = model.blocks[0].mlstm_layer
    return {"prefill": layer.parallel_kernel_cell.kernel, "step": layer.recurrent_kernel_cell.step_kernel}


# ------------------------------------------------------------------------------ report
def table(record: dict[str, Any]) -> str:
    lines = [
        "| tokens | side | dtype, kernels | last-logit rel. error (L2) | (max) | mean over steps (L2) | "
        "mean KL (nats) | greedy agreement | seconds |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in record["rows"]:
        if row.get("skipped"):
            lines.append(f"| {row['length']:,} | {row['side']} | | skipped: {row['skipped']} | | | | | |")
            continue
        if row["side"] == "reference":
            lines.append(f"| {row['length']:,} | reference | {row['setup']} | | | | | | {row['seconds']:.1f} |")
            continue
        m = row["metrics"]
        if not m["finite"]:
            lines.append(f"| {row['length']:,} | {row['side']} | {row['setup']} | non-finite logits | | | | | |")
            continue
        lines.append(
            f"| {row['length']:,} | {row['side']} | {row['setup']} | {m['last_rel_l2']:.4f} | {m['last_rel_max']:.4f} | "
            f"{m['mean_rel_l2']:.4f} | {m['mean_kl']:.2e} | {m['agree']}/{m['steps']} ({m['agree'] / m['steps']:.0%}) | "
            f"{row['seconds']:.1f} |")
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xlstm_metal.plotting import save_figure

    rows = [r for r in record["rows"] if "metrics" in r and r["metrics"]["finite"]]
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(lengths)), figsize=(5.5 * max(1, len(lengths)), 3.8), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for r in rows:
            if r["length"] != length:
                continue
            m = r["metrics"]
            ax.semilogy(range(m["steps"]), m["per_step_rel_l2"], marker=".",
                        label=f"{r['side']} ({m['agree']}/{m['steps']} agree)")
        ax.set_title(f"{length:,}-token prompt")
        ax.set_xlabel("teacher-forced step (0 = last prompt position)")
        ax.set_ylabel("logits rel. error vs float32 (L2)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"bf16 vs float32 reference, shape {record['shape_name']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, overwrite=True)


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(record, indent=2) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ main
def measure(args) -> dict[str, Any]:
    import torch

    torch_float32_exact()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if cuda and mx.default_device() != mx.gpu:
        raise SystemExit("torch sees a CUDA device but MLX does not: the sides would not run on the same device")
    shape = parse_shape(args.shape)
    import xlstm

    record: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python benchmarks/bf16_fidelity.py", *sys.argv[1:]]),
        "round": args.round, "shape_name": args.shape, "shape": shape, "seed": args.seed, "steps": args.steps,
        "environment": {**environment(), "torch": torch.__version__, "xlstm": xlstm.__version__,
                        "torch_device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                        "torch_threads": torch.get_num_threads(), "tf32": False},
        "reference": "NX-AI xLSTMLarge, float32 weights and state, native kernels (chunkwise--native_autograd, "
                     "native step), TF32 off",
        "rows": [],
    }

    def add(row: dict[str, Any]) -> None:
        # Written after every row (atomically), so a run stopped by a time limit keeps what it measured.
        record["rows"].append(row)
        write_json(args.out, {**record, "partial": True, "table": table(record)})

    def run_side(side: str, setup: str, logits_of, after=None, extra=None) -> None:
        """Each measured length: ``logits_of(length, reference tokens)`` against the reference."""
        for length, (ref_logits, ref_tokens) in refs.items():
            if time.time() > deadline:
                add({"length": length, "side": side, "skipped": "time budget"})
                continue
            t = time.time()
            try:
                logits = logits_of(length, ref_tokens)
            except Exception as err:  # e.g. out of memory: reported, the next run goes on
                add({"length": length, "side": side, "skipped": f"{type(err).__name__}: {str(err)[:160]}"})
                log(f"{side} {length}: {type(err).__name__}")
                if after is not None:
                    after()
                continue
            row = {"length": length, "side": side, "setup": setup, "seconds": time.time() - t,
                   "metrics": compare(logits, ref_logits, ref_tokens), **(extra() if extra else {})}
            add(row)
            log(f"{side} {length}: rel L2 {row['metrics']['last_rel_l2']:.4f}, agree {row['metrics']['agree']}")
            if after is not None:
                after()

    def run_our_side(model, side: str, dtype: str) -> None:
        kernels = kernels_of(model)
        residual = "bf16" if dtype != "float32" and model.residual_dtype is None else "float32"
        setup = f"{dtype}, {kernels['prefill']} / {kernels['step']} step, float32 state, {residual} residual"

        def logits_of(length: int, ref_tokens: np.ndarray) -> np.ndarray:
            mx.reset_peak_memory()
            return run_ours(model, stream[:length], args.steps, ref_tokens)

        run_side(side, setup, logits_of, extra=lambda: {"peak_gb": mx.get_peak_memory() / 2**30})

    deadline = time.time() + args.budget
    rng = np.random.default_rng(args.seed)
    stream = rng.integers(0, shape["vocab_size"], size=max(args.lengths))
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    from xlstm.xlstm_large.model import xLSTMLarge as TorchLarge

    t0 = time.time()
    torch.manual_seed(args.seed)
    ref_cfg = nxai_config(shape, triton=False, kernel_dtype="float32")
    with torch.device(device):
        ref_model = TorchLarge(ref_cfg).eval()  # NX-AI's own initialisation, float32
    torch_sync(device)
    log(f"built NX-AI xLSTMLarge {shape} on {device} in {time.time() - t0:.1f}s")

    refs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for length in args.lengths:
        if time.time() > deadline:
            add({"length": length, "side": "reference", "skipped": "time budget"})
            continue
        t = time.time()
        try:
            logits, tokens = run_torch(ref_model, stream[:length], args.steps, None, device)
            torch_sync(device)
        except Exception as err:  # e.g. out of memory: this length is reported, the others run
            add({"length": length, "side": "reference", "skipped": f"{type(err).__name__}: {str(err)[:160]}"})
            log(f"reference {length}: {type(err).__name__}")
            torch_free(device)
            continue
        refs[length] = (logits, tokens)
        log(f"reference {length}: {time.time() - t:.1f}s")
        top2 = np.sort(logits, axis=-1)[:, -2:]
        add({"length": length, "side": "reference", "setup": "float32, native", "seconds": time.time() - t,
             "tokens": tokens.tolist(), "top1_margins": (top2[:, 1] - top2[:, 0]).tolist(),
             "logit_std": float(np.std(logits))})
        torch_free(device)

    sd32 = {k: v.detach() for k, v in ref_model.state_dict().items()}
    ours_sd = None
    if "official" in args.sides and refs:
        # NX-AI's native chunkwise kernel (the CPU's) fails on bf16 q, k, v beside a float32
        # state ("expected m1 and m2 to have the same dtype"): on a CPU its bf16 model runs
        # with a bf16 state; on CUDA the Triton kernels take the float32 state.
        off_cfg = nxai_config(shape, triton=cuda, kernel_dtype="bfloat16", state_dtype="float32" if cuda else "bfloat16")
        with torch.device("meta"):
            official = TorchLarge(off_cfg).eval()
        official = official.to(torch.bfloat16).to_empty(device=device)
        official.load_state_dict(sd32)  # copy_ rounds float32 -> bf16 to nearest even
        del ref_model
        torch_free(device)
        setup = (f"bf16, {off_cfg.chunkwise_kernel} / {off_cfg.step_kernel} step, "
                 f"{off_cfg.inference_state_dtype.replace('bfloat16', 'bf16')} state")
        def official_logits(length: int, ref_tokens: np.ndarray) -> np.ndarray:
            logits, _ = run_torch(official, stream[:length], args.steps, ref_tokens, device)
            torch_sync(device)
            return logits

        run_side("official", setup, official_logits, after=lambda: torch_free(device))
        ours_sd = {k: v.detach() for k, v in official.state_dict().items()}  # the very bf16 weights
        del official
    else:
        del ref_model
    if ours_sd is None:
        ours_sd = {k: v.to(torch.bfloat16) for k, v in sd32.items()}
    # Host copies for MLX; torch's device memory is given back before our side runs.
    ours_sd = {k: v.cpu() for k, v in ours_sd.items()}
    sd32_host = {k: v.cpu() for k, v in sd32.items()} if "ours-float32" in args.sides else None
    del sd32
    torch_free(device)

    # The bf16 variants share one model (settings switched between runs): one weight transfer.
    variants = {"ours": (True, mx.float32), "ours-ops": (False, mx.float32), "ours-bf16-residual": (True, None)}
    wanted = [side for side in variants if side in args.sides]
    if wanted and refs:
        t = time.time()
        model = our_model(ours_sd, nxai_config(shape, triton=True, kernel_dtype="bfloat16"), "bfloat16")
        fast_kernels = kernels_of(model)
        log(f"ours: bf16 model ready in {time.time() - t:.1f}s, kernels {fast_kernels}")
        cost_pending = args.cost
        for side in wanted:
            fast, residual = variants[side]
            set_kernels(model, fast_kernels if fast else {"prefill": "chunkwise", "step": "step"})
            model.residual_dtype = residual
            run_our_side(model, side, "bf16")
            if side == "ours" and cost_pending and time.time() < deadline:
                # Right after the main side (before the variants), on the generation path.
                record["cost"] = residual_cost(model, stream[: min(refs)], log)
                write_json(args.out, {**record, "partial": True, "table": table(record)})
                cost_pending = False
        if cost_pending and time.time() < deadline:
            set_kernels(model, fast_kernels)
            record["cost"] = residual_cost(model, stream[: min(refs)], log)
            write_json(args.out, {**record, "partial": True, "table": table(record)})
        del model
        gc.collect()
        mx.clear_cache()
    del ours_sd
    if "ours-float32" in args.sides and refs:
        model = our_model(sd32_host, nxai_config(shape, triton=True, kernel_dtype="bfloat16"), "float32")
        set_kernels(model, {"prefill": "chunkwise", "step": "step"})
        run_our_side(model, "ours-float32", "float32")
        del model
        gc.collect()
        mx.clear_cache()
    # The reference rows carry no metrics; keep them first in each length's group.
    order = {s: i for i, s in enumerate(("reference", *SIDES))}
    record["rows"].sort(key=lambda r: (r["length"], order[r["side"]]))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="7b", help="7b, 1.3b, 125m or EMBEDDING:HEADS:BLOCKS:VOCAB (default: 7b)")
    p.add_argument("--lengths", default="8192,131072", help="prompt lengths, comma-separated (default: 8192,131072)")
    p.add_argument("--steps", type=int, default=32, help="teacher-forced positions compared (default: 32)")
    p.add_argument("--sides", default="official,ours", help=f"comma-separated, of {', '.join(SIDES)} (default: official,ours)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=float("inf"), help="seconds; later runs are skipped past it")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    p.add_argument("--plot", type=Path, help="per-step error plot (.png/.svg/.pdf)")
    p.add_argument("--round", default=None, help="a label stored with the results (e.g. the GPU round)")
    p.add_argument("--cost", action="store_true",
                   help="also time our prefill (shortest length) and decode step with the residual in float32 and in bf16")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out / --plot files")
    args = p.parse_args(argv)
    try:
        args.lengths = parse_lengths(args.lengths)
        parse_shape(args.shape)
        args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
        bad = [s for s in args.sides if s not in SIDES]
        if bad or not args.sides:
            raise UsageError(f"--sides: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(SIDES)}")
        if args.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {args.steps}")
        for path in (args.out, args.plot):
            if path is not None and path.exists() and not args.overwrite:
                raise UsageError(f"{path} exists; pass --overwrite to replace it")
        if args.plot is not None and args.plot.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise UsageError(f"--plot must end in .png, .svg or .pdf, got {args.plot.name}")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record = measure(args)
    record["table"] = table(record)
    write_json(args.out, record)
    print(record["table"])
    print(f"wrote {args.out}", file=sys.stderr)
    if args.plot is not None:
        plot(record, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
