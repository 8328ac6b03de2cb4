"""Shared fixtures: tiny xLSTM-Large configs and checkpoints built in-process (no downloads)."""

import json
import os
import subprocess
import sys
from pathlib import Path

# Full float32 matmuls on every device: parity is checked to float32 round-off, and MLX may
# otherwise run float32 GEMMs as TF32 on GPUs (one fused vs six separate matmuls then differ ~1e-4).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import xlstm_metal  # noqa: E402,F401,I001  (first: preloads the BLAS before mlx is imported)

import mlx.core as mx
import numpy as np
import pytest
from xlstm_metal.config import xLSTMConfig
from xlstm_metal.loading import save_model
from xlstm_metal.models.xlstm_large import xLSTMLarge


def tiny_config(**overrides) -> xLSTMConfig:
    """E=64, 2 heads (DQK=16, DV=32), 2 blocks, vocab 97, chunk 16."""
    fields = dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97, chunk_size=16)
    fields.update(overrides)
    return xLSTMConfig(**fields)


#: The tiny shape the benchmark scripts' tests run (their ``--shape`` takes a config.json).
BENCH_CONFIG = {"embedding_dim": 64, "num_heads": 2, "num_blocks": 2, "vocab_size": 97, "ffn_proj_factor": 2.0,
                "chunk_size": 16}
ROOT = Path(__file__).resolve().parents[1]


def repo_env(**extra: str) -> dict[str, str]:
    """``os.environ`` for a subprocess of the repository's code: the repository first on
    PYTHONPATH, what was there kept after it (a machine whose MLX lives on PYTHONPATH, as the lent
    GPU's does, still finds it), then ``extra``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


#: A process that claims a folder through xlstm_metal.training.tempdirs (the module loaded by path:
#: no MLX import), runs ``{claim}`` (``module``: tempdirs, ``base``: the folder to claim in; it sets
#: ``path``), prints ``path`` and then waits, as a run holding its folder does.
_CLAIMING = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("tempdirs", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
base = sys.argv[2]
{claim}
print(path, flush=True)
time.sleep(300)
"""


def start_claiming_process(claim: str, base: Path) -> tuple[subprocess.Popen, Path]:
    """:data:`_CLAIMING` with ``claim`` in a process of its own: (the process, the folder it holds)."""
    from xlstm_metal.training import tempdirs

    proc = subprocess.Popen([sys.executable, "-c", _CLAIMING.format(claim=claim), tempdirs.__file__, str(base)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line, "the claiming process printed no folder"
    return proc, Path(line)


def run_benchmark(script: str, *args: str, tmp_path: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> --shape <BENCH_CONFIG as config.json> *args`` from the repository."""
    config = tmp_path / "bench_config.json"
    config.write_text(json.dumps(BENCH_CONFIG))
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--shape", str(config), *args],
                          check=check, env=repo_env(), capture_output=True, text=True,
                          timeout=300)


def randomize_gates(model: xLSTMLarge, seed: int = 0) -> xLSTMLarge:
    """Gate biases spread so some heads' gates are wide open and others nearly shut."""
    rng = np.random.default_rng(seed)
    for block in model.backbone.blocks:
        layer = block.mlstm_layer
        nh = layer.igate_preact.bias.shape[0]
        layer.igate_preact.bias = mx.array(rng.uniform(-6, 6, nh).astype(np.float32))
        layer.fgate_preact.bias = mx.array(rng.uniform(-4, 8, nh).astype(np.float32))
        layer.multihead_norm.weight = mx.array(rng.uniform(0.5, 1.5, layer.multihead_norm.weight.shape).astype(np.float32))
    return model


def tiny_model(seed: int = 0, **overrides) -> xLSTMLarge:
    mx.random.seed(seed)
    model = randomize_gates(xLSTMLarge(tiny_config(**overrides)), seed)
    mx.eval(model.parameters())
    return model


@pytest.fixture
def text_data(tmp_path):
    """A small text file for training commands (50 lines of one sentence)."""
    path = tmp_path / "data.txt"
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * 50)
    return path


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny random xLSTM-Large checkpoint directory (config.json + model.safetensors)."""
    path = tmp_path / "tiny"
    save_model(tiny_model(), path)
    return path


@pytest.fixture(params=[1, 2, 3, 4], ids=["layout1", "layout2", "layout3", "layout4"])
def step_layout(request):
    """Each layout of the CUDA step kernel in turn (kernels.fast.decode.set_step_kernel_version)."""
    from xlstm_metal.kernels.fast import decode

    old = decode.step_kernel_version()
    decode.set_step_kernel_version(request.param)
    yield request.param
    decode.set_step_kernel_version(old)
