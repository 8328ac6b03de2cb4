"""`--profile` under a pipeline-parallel split (`mlx.launch -n 2 --backend ring`): the profile
is applied to the blocks each rank holds and the placeholders for the others' are skipped (it
failed with "AttributeError: 'PipelineGap' object has no attribute 'mlstm_layer'", exit 1)."""

import json
import subprocess
import sys

import pytest

from distributed_helpers import launch_cmd  # noqa: E402
from test_distributed_inference import tiny_checkpoint  # noqa: E402


def run(cmd, launch=False):
    full = [sys.executable, "-m", "xlstm_metal", *map(str, cmd)]
    proc = subprocess.run(launch_cmd(2, full) if launch else full, capture_output=True, timeout=240)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt") / "prompt.txt"
    path.write_text("the quick brown")
    return path


@pytest.mark.parametrize("profile", ["exact-fp32", "fast-bf16"])
def test_pipeline_generate_with_a_profile_prints_the_single_process_tokens(tmp_path, prompt_file, profile):
    """xLSTM-Large, 2 blocks over 2 ranks, greedy: the launched run's bytes equal one process's
    under the same profile."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    args = ["generate", "-m", ckpt, "--prompt-file", prompt_file, "-n", "30", "--temp", "0", "--profile", profile]
    single = run(args)
    assert single.strip()
    assert run([*args, "--parallel", "pipeline"], launch=True) == single


def test_pipeline_generate_of_the_2024_xlstm_with_a_profile(tmp_path, prompt_file):
    """The 2024 xLSTM (mLSTM + sLSTM blocks, 3 over 2 ranks) takes the same path."""
    from test_tokenizer import train_tiny_tokenizer

    from xlstm_metal.loading import save_model
    from xlstm_metal.models.xlstm_2024 import create_xlstm_model

    hf = train_tiny_tokenizer()
    ckpt = tmp_path / "ckpt"
    save_model(create_xlstm_model(vocab_size=hf.get_vocab_size(), num_layers=3, signature=(1, 1), inp_dim=32,
                                  head_dim=16, head_num=2, seed=3), ckpt)
    hf.save(str(ckpt / "tokenizer.json"))
    args = ["generate", "-m", ckpt, "--prompt-file", prompt_file, "-n", "30", "--temp", "0", "--profile", "exact-fp32"]
    single = run(args)
    assert single.strip()
    assert run([*args, "--parallel", "pipeline"], launch=True) == single


def test_pipeline_bench_with_a_profile(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97, chunk_size=16)))
    out = run(["bench", "--config", config, "--prefill-lengths", "16", "--decode-batches", "1", "--decode-tokens",
               "4", "--json", "--parallel", "pipeline", "--profile", "fast-bf16"], launch=True)
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert [(r["kind"], r["profile"], r["parallel"], r["world_size"]) for r in records] == [
        ("prefill", "fast-bf16", "pipeline", 2), ("decode", "fast-bf16", "pipeline", 2)]
