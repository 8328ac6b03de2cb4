"""Model figures under a split (`mlx.launch -n 2 --backend ring`): `generate --info` described
rank 0's share as if it were the model (tensor parallel: 74,372 of 148,424 parameters; pipeline:
"1 x PipelinemLSTMBlock, 1 x PipelineGap") and `bench --json` gave params / weights_gb per rank
without saying so. Now both give the whole model's (what one process shows), and this rank's
share under labels of its own."""

import json
import subprocess
import sys

import pytest

from distributed_helpers import launch_cmd  # noqa: E402
from test_distributed_inference import tiny_checkpoint  # noqa: E402


def run(args, launch=False):
    cmd = [sys.executable, "-m", "xlstm_metal", *map(str, args)]
    proc = subprocess.run(launch_cmd(2, cmd) if launch else cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "exited with code" not in proc.stderr and "Traceback" not in proc.stderr, \
        proc.stderr[-3000:]
    return proc.stdout


def info(text):
    return dict(line.split(None, 1) for line in text.splitlines())


def tokenizer_checkpoint(path, model):
    from test_tokenizer import train_tiny_tokenizer

    from xlstm_metal.loading import save_model

    hf = train_tiny_tokenizer()
    save_model(model(hf.get_vocab_size()), path)
    hf.save(str(path / "tokenizer.json"))
    return path


def tied_odd_vocabulary(vocab_size):
    """Tied embeddings over 321 rows: the vocabulary shards are padded (161 + 160 + 1 zero row)."""
    from conftest import tiny_model

    return tiny_model(2, vocab_size=vocab_size + 1, tie_word_embeddings=True)


def quantized(vocab_size):
    from conftest import tiny_model

    from xlstm_metal.quantization import Recipe, quantize_model

    model = tiny_model(2, vocab_size=vocab_size)
    quantize_model(model, recipe=Recipe.from_config({"bits": 4, "group_size": 32}))
    return model


def xlstm_2024(vocab_size):
    from xlstm_metal.models.xlstm_2024 import create_xlstm_model

    return create_xlstm_model(vocab_size=vocab_size, num_layers=3, signature=(1, 1), inp_dim=32, head_dim=16,
                              head_num=2, seed=3)


@pytest.mark.parametrize("case, mode, share", [
    ("plain", "tensor", "0 of 2: 1/2 of the heads, FFN width and vocabulary"),
    ("plain", "pipeline", "0 of 2: block 0"),
    ("tied_odd", "tensor", "0 of 2: 1/2 of the heads, FFN width and vocabulary"),
    ("quantized", "tensor", "0 of 2: 1/2 of the heads, FFN width and vocabulary"),
    ("xlstm_2024", "pipeline", "0 of 2: blocks 0-1"),
])
def test_generate_info_describes_the_whole_model(tmp_path, case, mode, share):
    builders = {"tied_odd": tied_odd_vocabulary, "quantized": quantized, "xlstm_2024": xlstm_2024}
    ckpt = tiny_checkpoint(tmp_path / "ckpt") if case == "plain" else tokenizer_checkpoint(tmp_path / "ckpt",
                                                                                             builders[case])
    single = info(run(["generate", "-m", ckpt, "--info"]))
    split = info(run(["generate", "-m", ckpt, "--info", "--parallel", mode], launch=True))
    assert {k: split[k] for k in single} == single  # blocks, parameters, dtype, weights and state bytes
    assert split["parallel"] == f"{mode}, 2 processes" and split["this_rank"] == share
    whole, own = (int(d[k].split()[0].replace(",", "")) for d, k in ((single, "parameters"),
                                                                     (split, "this_rank_parameters")))
    assert 0 < own < whole
    assert {"this_rank_weights_bytes", "this_rank_state_bytes_per_row"} <= set(split)


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_bench_json_gives_the_whole_model_and_labels_this_ranks_share(tmp_path, mode):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97, chunk_size=16)))
    args = ["bench", "--config", config, "--prefill-lengths", "16", "--decode-batches", "1", "--decode-tokens", "4",
            "--json"]
    single = [json.loads(line) for line in run(args).splitlines()]
    split = [json.loads(line) for line in run([*args, "--parallel", mode], launch=True).splitlines()]
    assert len(single) == len(split) == 2
    for one, two in zip(single, split):
        assert "rank_params" not in one and "rank" not in one
        assert (two["params"], two["weights_gb"]) == (one["params"], one["weights_gb"])
        assert two["rank"] == 0 and 0 < two["rank_params"] < two["params"]
        assert 0 < two["rank_weights_gb"] < two["weights_gb"]
