"""`xlstm-metal bench`: prefill / decode speed and memory of random-weight xLSTM models.

Examples::

    xlstm-metal bench --shape 125m --prefill-lengths 512 --decode-batches 1,8
    xlstm-metal bench --shape 7b --dtype bfloat16 --prefill-lengths 2048,16384,131072 \\
        --decode-batches 1,16,64 --json
    xlstm-metal bench --config path/to/config.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..monitor import current_job
from . import INT_LIMIT, UsageError, peer_lost_exit, seed_value
from .profile import add_profile_argument, apply_cli_profile, profile_from_args


def _int_list(text: str) -> list[int]:
    parts = [v.strip() for v in text.split(",")]
    if not any(parts):  # `--prefill-lengths ""` ran no prefill at all
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not all(parts):  # "512,,2048" or "512,": a length left out or mistyped, not a smaller list
        raise argparse.ArgumentTypeError(f"an empty entry in {text!r}: give comma-separated integers")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
    if any(v > INT_LIMIT for v in values):  # MLX sizes arrays in 32 bits: an OverflowError traceback
        raise argparse.ArgumentTypeError(f"values must be at most {INT_LIMIT}, got {text!r}")
    return values


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="prefill/decode tokens/s, time to first token and peak memory (random weights)",
        description="Benchmark an xLSTM-Large model of a named shape or config file with random "
        "weights (nothing is downloaded). Prefill runs in chunks carrying the state, so long "
        "prompts use bounded memory; decode runs a compiled greedy step.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shape", default="125m", help="named shape: 7b, 1.3b or 125m (default: 125m)")
    src.add_argument("--config", help="config.json file (or checkpoint directory) giving the shape")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="weight dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--state-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="recurrent state dtype (default: the config's, float32)")
    p.add_argument("--kernel", default=None,
                   help="prefill kernel: chunkwise_fused (default; CUDA tensor-core kernels for bf16 at "
                   "chunk sizes up to 64, chunkwise_scan otherwise), chunkwise_scan (pure ops, no per-chunk "
                   "loop), chunkwise (the reference), parallel, or 'config' for the config's; see "
                   "BENCHMARKS.md")
    p.add_argument("--chunk-size", type=int, default=None, help="kernel chunk size (default: the config's)")
    p.add_argument("--prefill-lengths", type=_int_list, default=[512],
                   help="comma-separated prompt lengths (default: 512)")
    p.add_argument("--prefill-batch", type=int, default=1, help="rows per prefill (default: 1)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="tokens per forward during prefill (default: config max_inference_chunksize)")
    p.add_argument("--decode-batches", type=_int_list, default=[1],
                   help="comma-separated decode batch sizes (default: 1)")
    p.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed (default: 32)")
    p.add_argument("--repeats", type=int, default=1, help="prefill repeats, best kept (default: 1)")
    p.add_argument("--no-compile", action="store_true", help="do not mx.compile the decode step")
    p.add_argument("--no-fuse", action="store_true",
                   help="keep separate projection weights (default: fuse them at load time)")
    from ..quantization import BITS, GROUP_SIZES, MODES

    p.add_argument("--q-bits", type=int, choices=BITS, default=None,
                   help="quantize the random model's linear layers and embeddings to this many bits "
                   "(affine, MLX's layout; the i/f gate projections stay in float)")
    p.add_argument("--q-group-size", type=int, choices=GROUP_SIZES, default=None,
                   help="quantization group size (default 64; implies --q-bits 4 when that is not given)")
    p.add_argument("--q-mode", choices=tuple(MODES), default=None,
                   help="quantization mode (default affine; mxfp4, mxfp8 and nvfp4 fix bits and group size)")
    p.add_argument("--device", choices=("gpu", "cpu"), default=None, help="MLX device (default: MLX's)")
    add_profile_argument(p)
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line instead of a table (kind, tok_s, peak_mem_gb, ...; kernel: the "
                        "prefill kernel, step_kernel: the decode step's)")
    from ..distributed import add_parallel_argument

    add_parallel_argument(p)  # under mlx.launch: tensor or pipeline parallel
    p.set_defaults(func=run)
    return p


def _table(records: list[dict[str, Any]], env: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    caption = [f"{k}={env[k]}" for k in ("device", "device_name", "mlx", "blas_core") if env.get(k)]
    if "cpu_prefill" in env:  # which parts ran as one C call (kernels/cpu) rather than the MLX graph
        calls = [what for key, what in (("cpu_prefill", "prefill"), ("cpu_step", "decode step")) if env.get(key)]
        caption.append("C calls: " + (", ".join(calls) or "none (the MLX graph)"))
    table = Table(title=title, caption=", ".join(caption))
    for col in ("kind", "batch", "length", "tok/s", "TTFT / step", "peak mem (GiB)"):
        table.add_column(col, justify="right" if col != "kind" else "left")
    for r in records:
        latency = f"{r['ttft_s'] * 1000:.1f} ms" if r["kind"] == "prefill" else f"{r['ms_per_step']:.2f} ms"
        table.add_row(r["kind"], str(r["batch"]), str(r["length"]), f"{r['tok_s']:,.1f}", latency,
                      f"{r['peak_mem_gb']:.2f}")
    Console().print(table)


def _whole_model_fields(model) -> dict[str, Any]:
    """For a model split across ``mlx.launch`` processes: ``params`` and ``weights_gb`` of the
    whole model (each rank's share once, replicated parts once, as one process holds it), and
    this rank's own as ``rank_params`` / ``rank_weights_gb`` with ``rank`` (``peak_mem_gb`` is
    this rank's too). Nothing for a model in one process (run_suite's figures are the whole
    model's). A collective under a pipeline split: every rank calls it."""
    if not getattr(model, "parallel", None):
        return {}
    from ..generation.runner import model_sizes

    sizes = model_sizes(model)
    return {"params": sizes["parameters"], "weights_gb": sizes["bytes"] / 1e9, "rank": model.parallel["rank"],
            "rank_params": sizes["rank"]["parameters"], "rank_weights_gb": sizes["rank"]["bytes"] / 1e9}


def _shape_config(bm, source: str, **overrides):
    """benchmark.shape_config, or UsageError naming ``source``."""
    try:
        return bm.shape_config(source, **overrides)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    except ValueError as err:  # ConfigError and bad JSON
        raise UsageError(f"{source}: {err}") from None


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from .. import benchmark as bm
    from ..distributed import parallel_fields, parallelize, print_on_rank0_only, world
    from ..profiles import config_overrides

    print_on_rank0_only()  # under mlx.launch every rank measures; rank 0 reports

    if args.device:
        try:
            mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
        except ValueError as err:  # MLX built without that back-end (a CPU-only build and --device gpu)
            raise UsageError(f"--device {args.device}: this MLX cannot use it ({err})") from None
    for name in ("prefill_batch", "decode_tokens", "repeats"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.prefill_chunk is not None and args.prefill_chunk <= 0:
        raise UsageError(f"--prefill-chunk must be positive, got {args.prefill_chunk}")
    source = args.config or args.shape
    kernel_flag = args.kernel
    if kernel_flag == "config" and args.profile:
        # An explicit flag too: the config's kernel wins over the profile's (which replaced it).
        kernel_flag = _shape_config(bm, source).chunkwise_kernel
    profile = profile_from_args(args, dtype=args.dtype, state_dtype=args.state_dtype, chunk_size=args.chunk_size,
                                prefill_chunk=args.prefill_chunk, fuse=False if args.no_fuse else None,
                                chunkwise_kernel=None if kernel_flag in (None, "config") else kernel_flag)
    overrides: dict[str, Any] = config_overrides(profile) if profile else {}
    if args.state_dtype:
        overrides["inference_state_dtype"] = args.state_dtype
    kernel = args.kernel or (None if profile else "chunkwise_fused")
    if kernel and kernel != "config":
        overrides["chunkwise_kernel"] = kernel
    if args.chunk_size is not None:
        if args.chunk_size <= 0:
            raise UsageError(f"--chunk-size must be positive, got {args.chunk_size}")
        overrides["chunk_size"] = args.chunk_size
    config = _shape_config(bm, source, **overrides)
    dtype = profile.dtype if profile else args.dtype or bm.default_dtype()
    fused = profile.fuse if profile else not args.no_fuse
    prefill_chunk = profile.prefill_chunk if profile else args.prefill_chunk
    try:
        recipe = bm.config_recipe(config)  # a quantized checkpoint's config: measured quantized
    except ValueError as err:
        raise UsageError(f"{source}: {err}") from None
    if args.q_bits is not None or args.q_group_size is not None or args.q_mode is not None:
        if recipe is not None:
            raise UsageError(f"{source} is already quantized ({recipe.bits}-bit); "
                             "--q-bits / --q-group-size / --q-mode apply to float configs")
        from ..quantization import QuantizationError, make_recipe

        try:
            recipe = make_recipe(None, args.q_bits, args.q_group_size, args.q_mode)
        except QuantizationError as err:
            raise UsageError(str(err)) from None
        if config.embedding_dim % recipe.group_size:
            raise UsageError(f"group size {recipe.group_size} does not divide the embedding "
                             f"dimension {config.embedding_dim} of {source}")

    from tqdm import tqdm

    steps = len(args.prefill_lengths) + len(args.decode_batches)
    records = []
    job = current_job()  # status record for `xlstm-metal top`, memory watchdog
    job.update(phase="load", model=str(source))
    # run_suite's order (prefill first): top is told of each run as it starts, not after it ends.
    plan = [("prefill", f"prefill of {n:,} tokens x {args.prefill_batch}") for n in args.prefill_lengths] + [
        ("decode", f"decode at batch {b}, {args.decode_tokens} steps") for b in args.decode_batches]

    def starting(i: int) -> None:
        """Run ``i`` (0-based) is next: its kind and description; no speed until it is measured
        (the previous run's stays in prefill_tps / decode_tps)."""
        if i < steps:
            job.update(phase=plan[i][0], done=i, total=steps, unit="runs", tokens_per_s=None,
                       message=f"run {i + 1} of {steps}: {plan[i][1]}")
        else:
            job.update(phase="idle", done=steps, total=steps, unit="runs", tokens_per_s=None,
                       message=f"all {steps} runs done")
    main = world().rank() == 0
    try:
        # Under several ranks: every rank measures the same runs (ranks given other lengths or
        # batches paired their collectives wrongly: rank 0 blamed rank 1's memory limit, exit 3).
        # The model's shape, dtype and quantization are compared as it is split.
        from .generate import same_on_every_rank

        same_on_every_rank({
            "--prefill-lengths": args.prefill_lengths, "--prefill-batch": args.prefill_batch,
            "--prefill-chunk": prefill_chunk, "--decode-batches": args.decode_batches,
            "--decode-tokens": args.decode_tokens, "--repeats": args.repeats, "--no-compile": args.no_compile,
            "--no-fuse": not fused, "--seed": args.seed, "--profile": profile.to_dict() if profile else None,
        }, "benchmark settings")
        with tqdm(total=steps + 1, desc="bench", file=sys.stderr, disable=None if main else True) as bar:
            bar.set_postfix_str("building random model")
            model = bm.random_model(config, dtype=dtype, seed=args.seed)
            if recipe is not None:  # --q-bits, or a quantized checkpoint's config: those layers quantized so
                bar.set_postfix_str("quantizing")
                from ..quantization import QuantizationError, quantize_model

                try:
                    quantize_model(model, recipe=recipe)
                except QuantizationError as err:
                    raise UsageError(f"{source}: cannot apply its quantization entry: {err}") from None
            try:  # several mlx.launch processes: each keeps its part of the model (before fusing)
                model = parallelize(model, args.parallel)
            except ValueError as err:
                raise UsageError(str(err)) from None
            if profile is not None:
                apply_cli_profile(model, profile)  # kernels, chunk sizes, state dtype, eps, fused or not
            elif fused and hasattr(model, "fuse_projections"):
                model.fuse_projections()
            bar.update(1)
            whole = _whole_model_fields(model)  # a split model's figures, every rank together
            env = bm.environment()  # after the profile: its BLAS threads are the ones the runs use
            if "cpu_prefill" in env:  # on a CPU: whether this model's prompts and steps run as C calls
                from ..kernels.cpu import decode_step as cpu_decode_step
                from ..kernels.cpu import prefill as cpu_prefill

                env["cpu_prefill"] = cpu_prefill.unsupported_reason(model) is None
                env["cpu_prefill_amx"] = env["cpu_prefill"] and env["cpu_prefill_amx"]
                env["cpu_step"] = cpu_decode_step.unsupported_reason(model) is None
            starting(0)
            for record in bm.run_suite(
                config, dtype=dtype, model=model, prefill_lengths=args.prefill_lengths,
                decode_batches=args.decode_batches, decode_tokens=args.decode_tokens,
                prefill_batch=args.prefill_batch, prefill_chunk=prefill_chunk,
                repeats=args.repeats, compiled=not args.no_compile, seed=args.seed,
            ):
                record = {**record, "shape": str(source), "fused": fused and hasattr(model, "fuse_projections"),
                          "profile": profile.name if profile else None,
                          "q_bits": recipe.bits if recipe else None,
                          "q_group_size": recipe.group_size if recipe else None,
                          "q_mode": recipe.mode if recipe else None,
                          **env, **parallel_fields(model), **whole}
                records.append(record)
                job.update(done=len(records), **{f"{record['kind']}_tps": record["tok_s"]})
                if args.json:
                    print(json.dumps(record), flush=True)
                bar.update(1)
                # Memory watchdog: stop between runs at the hard limit (every rank together), the
                # finished run printed.
                job.check_all()
                starting(len(records))
    except RuntimeError as err:  # under mlx.launch: a peer process died (else raised again)
        return peer_lost_exit(err, f"the benchmark stopped with {len(records)} of {steps} runs done")
    if not args.json:
        weights = f"{dtype} weights" if recipe is None else (
            f"{recipe.bits}-bit weights (group {recipe.group_size}), {dtype} scales"
            if recipe.mode == "affine" else f"{recipe.mode} weights ({recipe.bits}-bit, group {recipe.group_size}), "
            f"{dtype} float layers")
        if records:
            weights += f", {records[0]['weights_gb']:.2f} GB"
        split = getattr(model, "parallel", None)
        whose = f", {split['mode']} parallel over {split['size']} processes (peak memory: rank 0's)" if split else ""
        _table(records, env, f"xlstm-metal bench: {source}, {weights}, "
                             f"{config.inference_state_dtype} state{whose}")
    return 0
