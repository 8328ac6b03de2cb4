"""Scoring speed: ``judge.batched_token_logprobs`` (what ``judge``, ``convert --check`` and the
lm-eval adapter run) at batch 1 / 8 / 32 over 64 rows of 20-300 random tokens (1-8 of them
scored), the packaged model as generate loads it and, unless ``--no-125m``, a random 125m bf16
xLSTM-Large. One JSON record per (model, batch size) on stdout and appended to OUT.

    python benchmarks/score_batches.py OUT.jsonl [--no-125m]
    SCORE_MLX_PRODUCT=1 BATCHES=1,8 REPS=1 python benchmarks/score_batches.py OUT.jsonl --no-125m

``BATCHES`` (default 1,8,32) and ``REPS`` (timed passes, best kept; default 2);
``SCORE_MLX_PRODUCT=1`` runs MLX's quantized product at every row count on the CPU (the code
before session 49's dequantize + GEMM, :func:`xlstm_metal.kernels.fast.quantized.many_rows_on_cpu`).
"""
import json, os, random, sys, time
import xlstm_metal  # noqa: F401
import mlx.core as mx
import numpy as np
from xlstm_metal import judge
from xlstm_metal.assets import default_model_path, for_this_device
from xlstm_metal.benchmark import shape_config
from xlstm_metal.loading import load
from xlstm_metal.models.xlstm_large import xLSTMLarge

random.seed(0)
if os.environ.get("SCORE_MLX_PRODUCT") == "1":  # the CPU before session 49: MLX's quantized product at every row count
    from xlstm_metal.kernels.fast import quantized
    quantized.many_rows_on_cpu = lambda x: False
out = sys.argv[1] if len(sys.argv) > 1 else None
models = {}
m, _ = load(str(default_model_path()), dtype="float32"); models["packaged"] = for_this_device(m)
if "--no-125m" not in sys.argv:
    m = xLSTMLarge(shape_config("125m")); m.set_dtype(mx.bfloat16); mx.eval(m.parameters()); models["125m-bf16"] = m
for name, model in models.items():
    V = model.config.vocab_size
    rows = [([0] + [random.randrange(1, V) for _ in range(random.randint(20, 300))], [random.randrange(1, V) for _ in range(random.randint(1, 8))]) for _ in range(64)]
    base = None
    for bs in [int(b) for b in os.environ.get("BATCHES", "1,8,32").split(",")]:
        judge.batched_token_logprobs(model, rows[:bs], bs)  # warm-up
        times = []
        for _ in range(int(os.environ.get("REPS", "2"))):
            t = time.perf_counter(); got = judge.batched_token_logprobs(model, rows, bs); times.append(time.perf_counter() - t)
        sums = np.array([lp.sum() for lp, _ in got])
        base = sums if base is None else base
        rec = {"model": name, "batch_size": bs, "best_s": min(times), "times_s": times, "rows": len(rows),
               "max_rel_diff_vs_b1": float(np.max(np.abs(sums - base) / np.maximum(np.abs(base), 1e-9))),
               "device": str(mx.default_device()), "mlx": mx.__version__, "mlx_product": os.environ.get("SCORE_MLX_PRODUCT") == "1"}
        print(json.dumps(rec), flush=True)
        if out:
            with open(out, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
