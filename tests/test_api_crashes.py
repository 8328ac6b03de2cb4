"""Inputs to the public Python API that ended the process (a segmentation fault, an abort) or
read memory outside an array, each run in a process of its own: they must now raise a Python
exception (or give NaN where the forward cannot refuse without a host sync)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import repo_env

TESTS = Path(__file__).parent


def run_probe(tmp_path: Path, script: str, **env: str) -> dict:
    """``script`` (it may import conftest) in a Python process of its own -> the JSON object of
    its last stdout line; fails on a nonzero return code (negative: a signal)."""
    path = tmp_path / "probe.py"
    # xlstm_metal before mlx: it binds MLX's BLAS
    path.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport xlstm_metal\n" + script)
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300,
                          env=repo_env(**env))
    assert proc.returncode == 0, f"return code {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


_QUANTIZED_ROWS_SCRIPT = """
import json
import mlx.core as mx
from conftest import tiny_model
from xlstm_metal.quantization import quantize_model

def outcome(key, ids):
    model = tiny_model(vocab_size=400_000)
    quantize_model(model, bits=4, group_size=32)
    # one row of scales and biases for a weight of 400,000 rows (load_weights(strict=False) does
    # not compare shapes)
    model.load_weights([(key + ".scales", mx.ones((1, 2))), (key + ".biases", mx.ones((1, 2)))], strict=False)
    try:
        logits, state = model(mx.array(ids))
        mx.eval(logits, state)
    except ValueError as err:
        return str(err)
    return "ran"

print(json.dumps({"lm_head": outcome("lm_head", [[3]]),
                  "lm_head_prompt": outcome("lm_head", [[3, 4, 5]]),
                  "embeddings": outcome("backbone.embeddings", [[399_999, 3]])}))
"""


def test_quantized_layer_with_too_few_scale_rows_is_refused_not_read_past(tmp_path):
    # MLX's quantized_matmul checks only the last axis of scales and biases: the LM head read
    # 399,999 rows past a one-row scales array (a segmentation fault), and a quantized table's
    # gather read its rows' scales from outside the array (garbage embeddings, silently).
    report = run_probe(tmp_path, _QUANTIZED_ROWS_SCRIPT)
    message = "a quantized weight of shape (400000, 8) has scales of shape (1, 2)"
    assert all(value.startswith(message) for value in report.values()), report


_TARGETS_SCRIPT = """
import json
import mlx.core as mx
from conftest import tiny_model
from xlstm_metal import judge
from xlstm_metal.quantization import fidelity

model = tiny_model()
bare = lambda ids, state=None: model(ids, state)  # a model without config.vocab_size
narrow = tiny_model()
narrow.load_weights([("lm_head.weight", mx.zeros((50, 64)))], strict=False)  # 50 logits, vocab 97

def outcome(call):
    try:
        call()
    except ValueError as err:
        return str(err)
    return "ran"

print(json.dumps({
    "judge_bare": outcome(lambda: judge.token_logprobs(bare, [1], [2, 5_000_000, 3])),
    "judge_narrow": outcome(lambda: judge.batched_token_logprobs(narrow, [([1], [2, 96, 3])])),
    "fidelity_bare": outcome(lambda: fidelity(bare, bare, [1, 5_000_000, 3], greedy_tokens=1, prompt_tokens=1)),
    "fidelity_narrow": outcome(lambda: fidelity(model, narrow, [1, 96, 3], greedy_tokens=1, prompt_tokens=1)),
}))
"""


def test_scored_ids_past_the_logits_are_refused_not_read_past(tmp_path):
    # judge and fidelity check ids against config.vocab_size only: a model without one (any
    # callable) took the targets to mx.take_along_axis unchecked (a segmentation fault for
    # 5,000,000), and logits narrower than the vocabulary were read past silently.
    report = run_probe(tmp_path, _TARGETS_SCRIPT)
    assert report == {"judge_bare": "token id 5000000 is outside the model's logits [0, 97)",
                      "judge_narrow": "token id 96 is outside the model's logits [0, 50)",
                      "fidelity_bare": "token id 5000000 is outside the model's logits [0, 97)",
                      "fidelity_narrow": "token id 96 is outside the model's logits [0, 50)"}


def test_serve_prompt_logprobs_refuses_ids_past_the_logits():
    # take_along_axis read past a model's logits unchecked (garbage, or a crash far past them)
    import mlx.core as mx

    pytest.importorskip("mlx_lm")  # the serve extra (the GPU machine's environment has none)
    from xlstm_metal.serve import prompt_logprobs

    class Narrow:  # an mlx-lm model whose logits (5 columns) are narrower than the prompt's ids
        def make_cache(self):
            return []

        def __call__(self, inputs, cache=None):
            return mx.zeros((1, inputs.shape[1], 5))

    assert prompt_logprobs(Narrow(), [1, 4, 2])[0][1:] == pytest.approx([-1.6094379, -1.6094379])
    with pytest.raises(ValueError, match=r"token id 7 is outside the model's logits \[0, 5\)"):
        prompt_logprobs(Narrow(), [1, 2, 7, 3])


def test_a_plain_quantized_table_with_too_few_scale_rows_is_refused():
    # an nn.QuantizedEmbedding set into the tree directly (not through update_modules or quantize_model,
    # which bring FastQuantizedEmbedding): its gather took each row's scales from past their end
    import mlx.core as mx
    import mlx.nn as nn
    from conftest import tiny_model

    model = tiny_model(seed=3)
    table = nn.QuantizedEmbedding(97, 64, group_size=32, bits=8)
    table.scales = table.scales[:1]
    table.biases = table.biases[:1]
    model.backbone.embeddings = table
    with pytest.raises(ValueError, match=r"a quantized weight of shape \(97, 16\) has scales of shape \(1, 2\)"):
        model(mx.array([[5, 90]]), None)
