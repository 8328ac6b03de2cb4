"""The 2024 xLSTM[7:1] (~350M parameters) beside NX-AI's official ``xlstm.xLSTMLMModel``:
training tokens/s (forward + backward + clipping + AdamW) and greedy decode tokens/s at batch 1.

Both sides are built from one config (NX-AI's ``xLSTMLMModelConfig`` layout, ``CONFIG`` below:
embedding 1024, 48 blocks, sLSTM at every 8th position, tied embeddings, vocab 50304) and, with
``--same-weights`` (default), the same weights: ours initialises its model (NX-AI's
initialisation, :mod:`xlstm_metal.models.xlstm_2024_init`) and writes it as safetensors, the
official side loads it by name (its sLSTM weights through its cell's ``*_ext2int`` layout maps).

Each side runs in its own process, one after the other: ours first, while the official sLSTM
CUDA kernel builds in the background, then the official. Training: float32 master weights,
bf16 compute (theirs: ``torch.autocast``; ours: the trainer's cast-in-the-loss step, compiled),
AdamW, global-norm clipping at 1.0, random tokens, ``--batch`` x ``--seq``; the first step
(compilation / autotuning) is not timed. Decode: bf16 weights, one greedy token per step from a
zero state (theirs: ``model.step`` under ``inference_mode``; ours: the compiled step of
``xlstm_metal.benchmark.measure_decode``).

The official sLSTM ``cuda`` backend compiles its kernel at run time (torch cpp extension,
ninja + nvcc); where that fails or takes longer than ``--cuda-build-timeout`` the ``vanilla``
backend (PyTorch ops) runs, and the result says which ran (``official.slstm_backend``).

    python benchmarks/slstm_2024.py --out results/xlstm71_350m.json
    python benchmarks/slstm_2024.py --tiny --out /tmp/x.json      # a small config, any device
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# NX-AI's xLSTMLMModelConfig fields (dataclasses.asdict layout); sLSTM at 3, 11, ..., 43.
CONFIG = {
    "vocab_size": 50304,
    "embedding_dim": 1024,
    "num_blocks": 48,
    "context_length": 2048,
    "tie_weights": True,
    "slstm_at": [3, 11, 19, 27, 35, 43],
    "mlstm_block": {"mlstm": {"conv1d_kernel_size": 4, "qkv_proj_blocksize": 4, "num_heads": 4, "proj_factor": 2.0}},
    "slstm_block": {
        "slstm": {"backend": "cuda", "num_heads": 4, "conv1d_kernel_size": 4, "bias_init": "powerlaw_blockdependent"},
        "feedforward": {"proj_factor": 1.3, "act_fn": "gelu"},
    },
}
TINY = dict(CONFIG, vocab_size=512, embedding_dim=128, num_blocks=8, context_length=256, slstm_at=[3, 7])


def _emit(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def _exit_with_parent() -> None:
    """A worker stops when the driver is gone (a killed driver must not leave the GPU busy)."""
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _token_ids(V: int, B: int, S: int):
    """The same random tokens on both sides (with the same weights the first losses agree)."""
    import numpy as np

    return np.random.default_rng(0).integers(0, V, (B, S + 1)).astype(np.int32)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


# -------------------------------------------------------------------------------- official
def _official_config(d: dict, backend: str, batch: int):
    from xlstm import (FeedForwardConfig, mLSTMBlockConfig, mLSTMLayerConfig, sLSTMBlockConfig,
                       sLSTMLayerConfig, xLSTMLMModelConfig)

    s = dict(d["slstm_block"]["slstm"], backend=backend)
    if backend == "cuda":
        s["batch_size"] = batch  # the CUDA kernel is compiled for one batch size
    return xLSTMLMModelConfig(
        **{k: v for k, v in d.items() if k not in ("mlstm_block", "slstm_block")},
        mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(**d["mlstm_block"]["mlstm"])),
        slstm_block=sLSTMBlockConfig(slstm=sLSTMLayerConfig(**s),
                                     feedforward=FeedForwardConfig(**d["slstm_block"]["feedforward"])),
    )


def worker_official(args) -> None:
    import torch
    import torch.nn.functional as F
    from xlstm import xLSTMLMModel

    out = Path(args.worker_out)
    deadline = time.time() + args.budget
    cfg_dict = json.loads(args.config)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    backend = args.official_backend
    model = xLSTMLMModel(_official_config(cfg_dict, backend, args.batch)).to(dev)
    model.reset_parameters()
    n_params = sum(p.numel() for p in model.parameters())
    if args.weights:
        _load_official_weights(model, args.weights)
    _emit(out, {"side": "official", "kind": "model", "slstm_backend": backend, "params": n_params,
                "same_weights": bool(args.weights), "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"})

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    V, B, S = cfg_dict["vocab_size"], args.batch, args.seq
    if "train" in args.measure:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=dev == "cuda")
        ids = torch.tensor(_token_ids(V, B, S), device=dev).long()
        model.train()

        def step():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                logits = model(ids[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, V), ids[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.train_steps + 1):
            if i > 1 and time.time() + 1.5 * times[-1] > deadline - args.decode_reserve:
                break
            sync()
            t0 = time.perf_counter()
            loss = step()
            sync()
            dt = time.perf_counter() - t0
            if i == 0:
                _emit(out, {"side": "official", "kind": "train_first_step", "seconds": dt, "loss": loss.item()})
            else:
                times.append(dt)
        med = _median(times)
        _emit(out, {"side": "official", "kind": "train", "batch": B, "seq": S, "steps": len(times),
                    "seconds": med, "tok_s": B * S / med, "step_seconds": times,
                    "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None})
        del opt
        model.zero_grad(set_to_none=True)
    if "decode" in args.measure and time.time() < deadline - 5:
        model = model.to(torch.bfloat16).eval() if dev == "cuda" else model.eval()
        for module in model.modules():  # the CUDA sLSTM kernel was compiled for a float32 bias
            if module.__class__.__name__ == "sLSTMCell_cuda":
                module._bias_.data = module._bias_.data.float()
        tok = torch.randint(0, V, (1, 1), device=dev)
        with torch.inference_mode():
            state = None
            for _ in range(args.warmup_tokens):
                logits, state = model.step(tok, state)
                tok = logits[:, -1:].argmax(-1)
            sync()
            t0 = time.perf_counter()
            n = 0
            state = None
            while n < args.decode_tokens and time.time() < deadline:
                logits, state = model.step(tok, state)
                tok = logits[:, -1:].argmax(-1)
                n += 1
            tok.cpu()
            dt = time.perf_counter() - t0
        _emit(out, {"side": "official", "kind": "decode", "batch": 1, "tokens": n, "seconds": dt, "tok_s": n / dt})


def _load_official_weights(model, path: str) -> None:
    """Our safetensors (NX-AI names; sLSTM weights in the "cuda" layout, i.e. NX-AI's external
    view) into the official model, through each sLSTM cell's own layout map."""
    from safetensors.torch import load_file

    own = model.state_dict()
    state = {}
    for key, value in load_file(path).items():
        if key.endswith("slstm_cell._recurrent_kernel_") or key.endswith("slstm_cell._bias_"):
            cell = model.get_submodule(key.rsplit(".", 1)[0])
            value = (cell._recurrent_kernel_ext2int(value) if key.endswith("_recurrent_kernel_")
                     else cell._bias_ext2int(value))
        state[key] = value.reshape(own[key].shape).to(own[key].dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_weights else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"weights do not match the official model: missing {missing}, unexpected {unexpected}")


# ------------------------------------------------------------------------------------ ours
def worker_ours(args) -> None:
    import xlstm_metal  # noqa: F401  (BLAS before mlx)
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_unflatten

    import xlstm_metal.kernels.fast  # noqa: F401  (registers the fast mLSTM kernels)
    from xlstm_metal import benchmark as bm
    from xlstm_metal.kernels.fast import slstm_fused
    from xlstm_metal.config_2024 import xLSTMLMConfig
    from xlstm_metal.models.xlstm_2024 import xLSTMLMModel
    from xlstm_metal.training.trainer import TrainingConfig, make_loss_fn, make_optimizer

    out = Path(args.worker_out)
    deadline = time.time() + args.budget
    cfg_dict = json.loads(args.config)
    model = xLSTMLMModel(xLSTMLMConfig.from_dict(cfg_dict), mlstm_kernel=args.mlstm_kernel, seed=0)
    if args.weights:  # for the official side: float32, NX-AI's names, the config's sLSTM layout
        mx.save_safetensors(args.weights, {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())})
    cells = [b.xlstm.slstm_cell for b in model.blocks if "slstm_cell" in b.xlstm]
    for cell in cells:
        cell.kernel = args.slstm_kernel
    slstm_fused.EXCHANGE = args.exchange
    for block in model.blocks:
        if "mlstm_cell" in block.xlstm:
            block.xlstm.step_kernel = args.mlstm_step_kernel
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    _emit(out, {"side": "ours", "kind": "model", "params": n_params, "same_weights": bool(args.weights),
                "slstm_kernel": args.slstm_kernel, "exchange": args.exchange,
                "mlstm_step_kernel": args.mlstm_step_kernel, "fused_active": bool(cells and cells[0].uses_fused_kernel()),
                "mlstm_kernel": args.mlstm_kernel, "mlstm_fused_chunkwise_active": _fused_chunkwise_runs(model, args),
                "ptx_cache": os.environ.get("MLX_PTX_CACHE_DIR"), **bm.environment()})

    V, B, S = cfg_dict["vocab_size"], args.batch, args.seq
    train_params = None
    if "decode" in args.measure:  # first: quick to compile, so a slow training compile cannot starve it
        train_params = dict(tree_flatten(model.parameters()))  # float32 masters, kept for training
        model.set_dtype(mx.bfloat16)
        t0 = time.time()
        rec = bm.measure_decode(model, 1, tokens=args.decode_tokens, warmup=args.warmup_tokens)
        _emit(out, {"side": "ours", **rec, "wall_s": time.time() - t0})
        model.update(tree_unflatten(list(train_params.items())))
        del train_params
    if "train" in args.measure:
        tcfg = TrainingConfig(seq_len=S, batch_size=B, lr=1e-4, weight_decay=0.1, grad_clip=1.0, dtype="bfloat16",
                              recompute=args.recompute)
        loss_fn = make_loss_fn(model, mx.bfloat16, args.recompute)
        grad_fn = mx.value_and_grad(loss_fn)
        ids = mx.array(_token_ids(V, B, S))
        for n_mode, compiled in enumerate(args.train_modes):
            if n_mode == 1 and args.profile_parts:  # after the first (eager) figure is in
                _profile_parts(model, args, out, deadline)
            if time.time() > deadline - 10:
                break
            optimizer = make_optimizer(tcfg, model)
            optimizer.init(model.trainable_parameters())
            state = [model.state, optimizer.state]

            def train_step(inputs, targets):
                params = model.trainable_parameters()
                loss, grads = grad_fn(params, inputs, targets)
                model.update(params)
                grads, _ = optim.clip_grad_norm(grads, 1.0)
                optimizer.update(model, grads)
                return loss

            step = mx.compile(train_step, inputs=state, outputs=state) if compiled else train_step
            mx.eval(ids)
            mx.reset_peak_memory()
            times = []
            for i in range(args.train_steps + 1):
                if i > 1 and time.time() + 1.5 * times[-1] > deadline:
                    break
                if i == 0:  # a first step cut off by the time limit still says it started
                    _emit(out, {"side": "ours", "kind": "train_first_step_start", "compiled": compiled,
                                "budget_left_s": deadline - time.time()})
                mx.synchronize()
                t0 = time.perf_counter()
                loss = step(ids[:, :-1], ids[:, 1:])
                mx.eval(loss, state)
                mx.synchronize()
                dt = time.perf_counter() - t0
                if i == 0:
                    _emit(out, {"side": "ours", "kind": "train_first_step", "compiled": compiled, "seconds": dt,
                                "loss": loss.item(), "peak_mem_gb": mx.get_peak_memory() / 2**30})
                else:
                    times.append(dt)
            if times:
                med = _median(times)
                _emit(out, {"side": "ours", "kind": "train", "compiled": compiled, "batch": B, "seq": S,
                            "recompute": args.recompute, "steps": len(times), "seconds": med, "tok_s": B * S / med,
                            "step_seconds": times, "peak_mem_gb": mx.get_peak_memory() / 2**30})
            del optimizer, state, step


def _fused_chunkwise_runs(model, args) -> bool:
    """Whether our mLSTM layers run chunkwise_fused's CUDA kernels in training (bf16 compute)."""
    import mlx.core as mx

    from xlstm_metal.kernels import resolve_kernel_name
    from xlstm_metal.kernels.fast.chunkwise_fused import fused_chunkwise_supported

    layer = next((b.xlstm for b in model.blocks if "mlstm_cell" in b.xlstm), None)
    if layer is None or resolve_kernel_name(args.mlstm_kernel) != "chunkwise_fused":
        return False
    DH = layer.mlstm_cell.head_dim
    q = mx.zeros((1, 1, 1, DH), dtype=mx.bfloat16)
    return fused_chunkwise_supported(q, q, layer.chunk_size)


def _profile_parts(model, args, out: Path, deadline: float) -> None:
    """Eager forward + backward time of one mLSTM block, one sLSTM block and the LM head + loss
    on [batch, seq, E] bf16 activations (median of 3), so the step's time can be split: x the
    number of blocks of each kind."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from xlstm_metal.training.trainer import cross_entropy

    B, S, E = args.batch, args.seq, model.config.embedding_dim
    x = (mx.random.normal((B, S, E), key=mx.random.key(1)) * 0.5).astype(mx.bfloat16)
    targets = mx.array(_token_ids(model.config.vocab_size, B, S))[:, 1:]
    parts = {}  # name: (module, fn(module, x) -> scalar, x, blocks of this kind)
    for kind in ("mLSTM", "sLSTM"):
        block = next((b for b in model.blocks if b.kind == kind), None)
        if block is not None:
            parts[kind] = (block, lambda b, x: b(x)[0].astype(mx.float32).sum(), x, kind)
    layer = next((b.xlstm for b in model.blocks if b.kind == "mLSTM"), None)
    if layer is not None:  # inside the mLSTM block: the cell (gates, kernel, norm), q/k/v projections
        xi = (mx.random.normal((B, S, layer.inner_dim), key=mx.random.key(2)) * 0.5).astype(mx.bfloat16)
        parts["mLSTM cell (gates, kernel, group norm)"] = (
            layer.mlstm_cell,
            lambda c, x: c(x, x * 0.5, x * 0.25, None, layer._kernel, layer.chunk_size)[0].astype(mx.float32).sum(),
            xi, "mLSTM")
        parts["mLSTM q/k/v projections (block-diagonal)"] = (
            layer, lambda n, x: (n.q_proj(x) + n.k_proj(x) + n.v_proj(x)).astype(mx.float32).sum(), xi, "mLSTM")

    def head_loss(m, x):
        stack = m.xlstm_block_stack
        if "post_blocks_norm" in stack:
            x = stack.post_blocks_norm(x)
        logits = m.lm_head(x) if "lm_head" in m else m.token_embedding.as_linear(x)
        return cross_entropy(logits, targets)

    parts["head"] = (model, head_loss, x, None)
    for name, (module, fn, x, kind) in parts.items():
        if time.time() > deadline - 15:
            break
        masters = module.trainable_parameters()
        module.update(tree_map(lambda p: p.astype(mx.bfloat16), masters))

        def loss(params, x):
            module.update(params)
            return fn(module, x)

        grad = mx.value_and_grad(loss, argnums=(0, 1))
        params = module.trainable_parameters()
        times = []
        for i in range(4):
            mx.synchronize()
            t0 = time.perf_counter()
            mx.eval(grad(params, x))
            mx.synchronize()
            times.append(time.perf_counter() - t0)
        mx.eval(fn(module, x))  # a forward alone may JIT-compile kernels the backward run did not use
        mx.synchronize()
        t0 = time.perf_counter()
        for i in range(3):
            mx.eval(fn(module, x))
        mx.synchronize()
        fwd = (time.perf_counter() - t0) / 3
        module.update(masters)
        count = sum(1 for b in model.blocks if b.kind == kind) if kind else 1
        _emit(out, {"side": "ours", "kind": "part_profile", "part": name, "count": count,
                    "fwd_bwd_ms": 1e3 * _median(times[1:]), "fwd_ms": 1e3 * fwd, "fwd_warmed_up": True,
                    "total_fwd_bwd_ms": 1e3 * _median(times[1:]) * count})


# ---------------------------------------------------------------------------------- driver
def _run_worker(side: str, args, extra: list[str], budget: float, log) -> list[dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
        wout = fh.name
    cmd = [sys.executable, __file__, "--worker", side, "--worker-out", wout, "--budget", str(budget),
           "--config", json.dumps(args.config_dict), "--batch", str(args.batch), "--seq", str(args.seq),
           "--train-steps", str(args.train_steps), "--decode-tokens", str(args.decode_tokens),
           "--warmup-tokens", str(args.warmup_tokens), "--measure", args.measure,
           "--decode-reserve", str(args.decode_reserve), "--recompute", args.recompute,
           *(["--profile-parts"] if args.profile_parts else []), *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, timeout=budget + 5, capture_output=True, text=True)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as err:
        rc, tail = "timeout", str(err)[-500:]
    records = [json.loads(x) for x in Path(wout).read_text().splitlines() if x.strip()]
    os.unlink(wout)
    log.write(f"--- {side} {' '.join(extra)} rc={rc} {time.time() - t0:.1f}s\n{tail}\n")
    log.flush()
    if rc != 0:
        records.append({"side": side, "kind": "error", "rc": rc, "tail": tail[-1500:]})
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--tiny", action="store_true", help="a small config (smoke test on any device)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--warmup-tokens", type=int, default=4)
    p.add_argument("--measure", default="train,decode")
    p.add_argument("--sides", default="official,ours")
    p.add_argument("--official-backend", choices=["auto", "cuda", "vanilla"], default="auto")
    p.add_argument("--cuda-build-timeout", type=float, default=60.0,
                   help="seconds the official sLSTM CUDA kernel may take to build before vanilla runs")
    p.add_argument("--slstm-kernel", choices=["fused", "reference"], default="fused")
    p.add_argument("--mlstm-kernel", default="chunkwise_fused",
                   help="our mLSTM kernel for training (chunkwise_fused: its CUDA kernels with their own "
                        "backward where they run, chunkwise_scan elsewhere)")
    p.add_argument("--recompute", choices=["none", "head", "mlstm", "ffn", "blocks"], default="none",
                   help="our training step: activations recomputed in the backward pass (xlstm-metal train's option)")
    p.add_argument("--profile-parts", action="store_true",
                   help="after the first training mode: forward + backward time of one block of each kind and of the head")
    p.add_argument("--mlstm-step-kernel", choices=["step", "step_fused"], default="step_fused",
                   help="our mLSTM decode step: the reference ops or one fused CUDA launch")
    p.add_argument("--exchange", choices=["tagged", "barrier"], default="tagged",
                   help="how the fused sLSTM kernels' blocks exchange a step's values")
    p.add_argument("--train-modes", default="eager,compiled",
                   help="our training step eager and/or under mx.compile (each timed; the faster is compared)")
    p.add_argument("--num-blocks", type=int, help="fewer blocks than the 48 of the benchmark's config")
    p.add_argument("--slstm-at", help="with --num-blocks: the sLSTM positions, comma-separated ('' for none)")
    p.add_argument("--same-weights", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--budget", type=float, default=100.0, help="seconds for our side")
    p.add_argument("--official-budget", type=float, default=60.0, help="seconds for the official side")
    p.add_argument("--decode-reserve", type=float, default=10.0)
    # worker arguments
    p.add_argument("--worker", choices=["official", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.train_modes.split(",") if m.strip()]
    if not modes or set(modes) - {"eager", "compiled"}:
        p.error(f"--train-modes takes eager and/or compiled, got {args.train_modes!r}")
    if args.worker:
        args.train_modes = [m == "compiled" for m in modes]
        _exit_with_parent()
        (worker_official if args.worker == "official" else worker_ours)(args)
        return 0
    if args.out is None:
        p.error("--out is required")
    if args.out.exists():
        p.error(f"{args.out} exists; choose another --out")
    args.config_dict = dict(TINY if args.tiny else CONFIG)
    if args.num_blocks is not None:  # a shallower model of the same blocks (e.g. to fill a PTX cache)
        at = args.slstm_at if args.slstm_at is not None else ",".join(
            str(i) for i in args.config_dict["slstm_at"] if i < args.num_blocks)
        args.config_dict.update(num_blocks=args.num_blocks, slstm_at=[int(i) for i in at.split(",") if i.strip()])
    started = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = open(args.out.with_suffix(".log"), "w")
    records: list[dict] = []
    tmp = tempfile.mkdtemp(prefix="slstm2024_")
    sides = args.sides.split(",")
    both = "ours" in sides and "official" in sides
    weights = os.path.join(tmp, "weights.safetensors") if args.same_weights and both else None
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])

    def write() -> dict:  # after each side, so a run cut short still leaves its results
        result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "command": command,
                  "config": args.config_dict,
                  "args": {k: str(v) for k, v in vars(args).items() if k != "config_dict"},
                  "records": records, "ratios": _ratios(records)}
        tmp_out = args.out.with_suffix(".tmp")
        tmp_out.write_text(json.dumps(result, indent=1))
        os.replace(tmp_out, args.out)
        return result

    probe = None
    if "official" in sides and args.official_backend in ("auto", "cuda"):
        probe = _CudaBuildProbe(args)  # builds while our side runs
    if "ours" in sides:
        extra = ["--slstm-kernel", args.slstm_kernel, "--mlstm-kernel", args.mlstm_kernel,
                 "--exchange", args.exchange, "--train-modes", args.train_modes,
                 "--mlstm-step-kernel", args.mlstm_step_kernel]
        extra += ["--weights", weights] if weights else []
        records += _run_worker("ours", args, extra, args.budget, log)
        write()
    if "official" in sides:
        backend = args.official_backend
        if probe is not None:
            rec = probe.wait(log)
            records.append(rec)
            backend = "cuda" if rec["ok"] else ("vanilla" if args.official_backend == "auto" else "cuda")
        extra = ["--official-backend", backend]
        extra += ["--weights", weights] if weights and os.path.exists(weights) else []
        records += _run_worker("official", args, extra, args.official_budget, log)
    if weights and os.path.exists(weights):
        os.unlink(weights)
    print(json.dumps(write()["ratios"]))
    return 0


class _CudaBuildProbe:
    """Builds the official sLSTM CUDA kernel (as its cell does, torch cpp extension) in a
    background process, capped at --cuda-build-timeout seconds from its start."""

    CODE = (
        "import torch, time; from xlstm import sLSTMLayer, sLSTMLayerConfig; t=time.time(); "
        "l = sLSTMLayer(sLSTMLayerConfig(embedding_dim=%d, num_heads=%d, backend='cuda', batch_size=%d)).cuda(); "
        "x = torch.randn(%d, 8, %d, device='cuda'); y = l(x); torch.cuda.synchronize(); print('built', time.time()-t)"
    )

    def __init__(self, args):
        c = args.config_dict
        code = self.CODE % (c["embedding_dim"], c["slstm_block"]["slstm"]["num_heads"], args.batch, args.batch,
                            c["embedding_dim"])
        self.cap = args.cuda_build_timeout
        self.t0 = time.time()
        env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "4"))
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)

    def wait(self, log) -> dict:
        try:
            out, _ = self.proc.communicate(timeout=max(1.0, self.cap - (time.time() - self.t0)))
            ok, tail = self.proc.returncode == 0, out[-1500:]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            ok, tail = False, (out or "")[-1000:] + f"\nnot built within {self.cap} s"
        seconds = time.time() - self.t0
        log.write(f"--- cuda backend build ok={ok} {seconds:.1f}s\n{tail}\n")
        return {"side": "official", "kind": "cuda_backend_probe", "ok": ok, "seconds": seconds, "tail": tail[-800:]}


def _ratios(records: list[dict]) -> dict:
    def pick(side, kind):  # the best run of a side (ours: eager or compiled training step)
        r = [x["tok_s"] for x in records if x.get("side") == side and x.get("kind") == kind and x.get("tok_s")]
        return max(r) if r else None

    out = {}
    for kind in ("train", "decode"):
        o, t = pick("ours", kind), pick("official", kind)
        out[kind] = {"ours_tok_s": o, "official_tok_s": t, "ratio": (o / t) if o and t else None}
    return out


if __name__ == "__main__":
    sys.exit(main())
