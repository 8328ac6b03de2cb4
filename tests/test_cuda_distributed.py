"""MLX's NCCL backend on one GPU (issue 18: what one GPU allows before several are lent).

A one-rank NCCL "world" (the environment ``mlx.launch --backend nccl`` gives rank 0 of 1): the
backend initialises, its collectives return their input, and our own NCCL users (the
vocabulary-sharded embedding / LM head of tensor parallelism, gradient averaging in a compiled
step) give the single-process results. Several ranks need several GPUs: NCCL refuses two ranks
on one device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xlstm_metal.kernels.fast.step import cuda_available

from distributed_helpers import free_port  # noqa: E402

cuda = pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")
HERE = Path(__file__).resolve().parent


@cuda
def test_one_rank_nccl_world_runs_our_collectives():
    env = {**os.environ, "MLX_RANK": "0", "MLX_WORLD_SIZE": "1", "NCCL_HOST_IP": "127.0.0.1",
           "NCCL_PORT": str(free_port(1)), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    run = subprocess.run([sys.executable, str(HERE / "nccl_one_rank_worker.py")], env=env, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["launched"] and out["size"] == 1 and out["rank"] == 0 and out["world_is_nccl_group"]
    for name in ("float32", "bfloat16"):
        assert out[f"all_sum_{name}"] == 0.0
        assert out[f"all_gather_{name}"] == 0.0
        assert out[f"all_max_{name}"] == 0.0
    assert out["sharded_vocab_logits"] == 0.0
    assert out["average_gradients"] == 0.0
