"""`xlstm-metal judge` and the lm-evaluation-harness adapter (offline, local task file)."""

import csv
import json
import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from xlstm_metal.assets import DEFAULT_MODEL_DIR
from xlstm_metal.cli import main
from xlstm_metal.judge import distinct_n, judge_record, longest_repeated_span, repeated_ngram_share, token_logprobs
from xlstm_metal.loading import load


@pytest.fixture(scope="module")
def judge_model():
    return load(DEFAULT_MODEL_DIR, dtype="float32")


def test_surface_statistics():
    words = "a b c a b c a b d".split()
    assert distinct_n(words, 1) == 4 / 9
    assert distinct_n(words, 2) == len({("a", "b"), ("b", "c"), ("c", "a"), ("b", "d")}) / 8
    # 4-grams: abca bcab cabc abca bcab cabd -> 6 grams, 4 unique -> 2 repeats
    assert repeated_ngram_share(words, 4) == 2 / 6
    assert longest_repeated_span(words) == 5  # "a b c a b" at 0 and 3 (overlapping)
    assert longest_repeated_span("x y z".split()) == 0 and distinct_n([], 2) == 0.0


def _manual_logprobs(model, ids, start):
    logits, _ = model(mx.array([ids]))
    logp = np.array(logits[0].astype(mx.float32))
    logp = logp - np.log(np.exp(logp - logp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logp.max(-1, keepdims=True)
    return np.array([logp[p - 1, ids[p]] for p in range(start, len(ids))])


def test_logprobs_match_one_forward_and_carry_state_across_pieces(judge_model, monkeypatch):
    model, tok = judge_model
    prompt = tok.encode("def add(a, b):", add_special_tokens=True)
    text = tok.encode("\n    return a + b\n", add_special_tokens=False)
    ref = _manual_logprobs(model, prompt + text, len(prompt))
    lp, greedy = token_logprobs(model, prompt, text, return_greedy=True)
    assert lp.shape == (len(text),) and np.allclose(lp, ref, atol=1e-4) and greedy.dtype == bool
    import xlstm_metal.judge as judge

    monkeypatch.setattr(judge, "SCORE_PIECE", 3)  # pieces of 3 tokens: the state carries the context
    assert np.allclose(token_logprobs(model, prompt, text), ref, atol=1e-4)
    rating = judge_record(model, tok, {"prompt": "def add(a, b):", "text": "\n    return a + b\n"})
    assert math.isclose(rating["mean_logprob"], float(ref.mean()), rel_tol=1e-5)
    assert math.isclose(rating["perplexity"], math.exp(-ref.mean()), rel_tol=1e-5)


def test_token_count_is_the_texts_own_with_or_without_a_prompt(judge_model):
    """Without a prompt the BOS the text is scored after was counted as one of its tokens ("a":
    2 tokens with no prompt, 1 after a prompt)."""
    model, tok = judge_model
    for text in ("a", "import os\nimport sys\n"):
        own = len(tok.encode(text, add_special_tokens=False))
        alone = judge_record(model, tok, {"text": text})
        prompted = judge_record(model, tok, {"prompt": "# code", "text": text})
        assert alone["tokens"] == prompted["tokens"] == own
        assert alone["scored_tokens"] == own and prompted["scored_tokens"] == own  # BOS predicts the first
    assert judge_record(model, tok, {"text": "a"})["tokens"] == 1


def test_judge_cli_writes_ratings(tmp_path, capsys, judge_model):
    src = tmp_path / "outputs"
    src.mkdir()
    (src / "trial-0001.jsonl").write_text(
        json.dumps({"trial": 1, "prompt": "import", "text": " os\nimport sys\n"}) + "\n"
        + json.dumps({"trial": 1, "text": "loop loop loop loop loop loop loop"}) + "\n")
    out = tmp_path / "ratings"
    assert main(["judge", "--outputs", str(src), "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(x) for x in (out / "ratings.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in rows] == [1, 1] and rows[0]["source"] == "trial-0001.jsonl"
    model, tok = judge_model
    assert math.isclose(rows[0]["mean_logprob"], judge_record(model, tok, {"prompt": "import", "text": " os\nimport sys\n"})[
        "mean_logprob"], rel_tol=1e-6)
    assert rows[1]["distinct_1"] == 1 / 7 and rows[1]["repeated_4gram_share"] == 3 / 4
    assert rows[1]["longest_repeated_span"] == 6 and rows[1]["words"] == 7
    table = list(csv.DictReader((out / "ratings.csv").open()))
    assert float(table[1]["repeated_4gram_share"]) == 0.75 and table[0]["trial"] == "1"
    assert main(["judge", "--outputs", str(src), "--out", str(out)]) == 2  # no overwrite
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    assert main(["judge", "--outputs", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "r2")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_judge_cli_empty_text_gives_null_not_nan(tmp_path, judge_model):
    """An empty text was written as NaN, which is not JSON (strict parsers reject the file)."""
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps({"prompt": "hello", "text": ""}) + "\n" + json.dumps({"text": "import os"}) + "\n")
    out = tmp_path / "r"
    assert main(["judge", "--outputs", str(src), "--out", str(out), "--no-progress"]) == 0

    def strict(token):
        raise ValueError(f"not JSON: {token}")

    rows = [json.loads(x, parse_constant=strict) for x in (out / "ratings.jsonl").read_text().splitlines()]
    assert rows[0]["mean_logprob"] is None and rows[0]["perplexity"] is None and rows[0]["scored_tokens"] == 0
    assert rows[0]["tokens"] == 0 and rows[0]["words"] == 0
    model, tok = judge_model
    assert math.isclose(rows[1]["mean_logprob"], judge_record(model, tok, {"text": "import os"})["mean_logprob"],
                        rel_tol=1e-6)
    table = list(csv.DictReader((out / "ratings.csv").open()))
    assert table[0]["perplexity"] == "" and float(table[1]["perplexity"]) == rows[1]["perplexity"]


TASK = """task: xlstm_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
DOCS = [  # lm-eval puts its target delimiter, one space, between question and choice
    {"question": "import", "choices": ["os", "banana zebra"], "label": 0},
    {"question": "def f(x):\n    return", "choices": ["x", "(((("], "label": 0},
    {"question": "for i in", "choices": ["]]]", "range(10):"], "label": 1},
]


def _task_dir(tmp_path):
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    return tmp_path / "tasks"


@pytest.mark.slow
def test_lm_eval_adapter_on_a_local_task(tmp_path, monkeypatch, judge_model):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import xlstm_metal.lm_eval_adapter  # noqa: F401  (registers the model)

    results = lm_eval.simple_evaluate(model="xlstm-metal", model_args=f"pretrained={DEFAULT_MODEL_DIR}",
                                      tasks=["xlstm_tiny_choice"], task_manager=TaskManager(include_path=str(_task_dir(tmp_path))),
                                      log_samples=True)
    assert results["results"]["xlstm_tiny_choice"]["acc,none"] == 1.0
    model, tok = judge_model
    samples = results["samples"]["xlstm_tiny_choice"]
    assert len(samples) == 3
    for sample in samples:
        doc = sample["doc"]
        ctx = tok.encode(doc["question"], add_special_tokens=True)
        for (lp, _greedy), choice in zip([r[0] for r in sample["resps"]], doc["choices"]):
            cont = tok.encode(" " + choice, add_special_tokens=False)
            assert math.isclose(lp, float(_manual_logprobs(model, ctx + cont, len(ctx)).sum()), rel_tol=1e-4)


def test_lm_eval_adapter_generation_and_rolling(judge_model):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from xlstm_metal.lm_eval_adapter import XLSTMMetalLM

    lm = XLSTMMetalLM(pretrained=str(DEFAULT_MODEL_DIR))
    model, tok = judge_model
    gen = lm.generate_until([Instance("generate_until", {}, ("def add(a, b):", {"until": ["\n\n"], "max_gen_toks": 20}), 0)])
    ids = tok.encode("def add(a, b):")
    greedy = lm.runner.generate(ids, max_tokens=20, temperature=0.0)
    expected = tok.decode(greedy).split("\n\n")[0]
    assert gen == [expected] and "\n\n" not in gen[0]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("import os\n",), 0)])[0]
    ids = tok.encode("import os\n", add_special_tokens=True)
    assert math.isclose(rolling, float(_manual_logprobs(model, ids, 1).sum()), rel_tol=1e-4)


def test_lm_eval_adapter_max_length_and_settings(judge_model):
    # max_length was stored and never used, and unknown model_args / generation settings were dropped
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from xlstm_metal.lm_eval_adapter import XLSTMMetalLM

    model, tok = judge_model
    with pytest.raises(ValueError, match=r"unknown model_args \['max_lenght'\]"):
        XLSTMMetalLM(pretrained=str(DEFAULT_MODEL_DIR), max_lenght=8)
    lm = XLSTMMetalLM(pretrained=str(DEFAULT_MODEL_DIR), max_length="3")
    ids = tok.encode("import os\nimport sys\n", add_special_tokens=True)
    assert len(ids) == 7  # BOS and two windows of 3 predictions, each from a fresh state
    windows = [(ids[:1], ids[1:4]), (ids[3:4], ids[4:7])]
    expected = sum(float(_manual_logprobs(model, c + p, len(c)).sum()) for c, p in windows)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("import os\nimport sys\n",), 0)])[0]
    assert math.isclose(rolling, expected, rel_tol=1e-4)
    ctx, cont = tok.encode("import os\nimport", add_special_tokens=True), tok.encode(" sys", add_special_tokens=False)
    cut = ctx[len(ctx) + len(cont) - 4:]
    assert 0 < len(cut) < len(ctx)
    (score, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("import os\nimport", " sys"), 0)])
    assert math.isclose(score, float(_manual_logprobs(model, cut + cont, len(cut)).sum()), rel_tol=1e-4)

    lm = XLSTMMetalLM(pretrained=str(DEFAULT_MODEL_DIR))
    ask = {"max_gen_toks": 12, "do_sample": True, "temperature": 50.0}
    (top1,) = lm.generate_until([Instance("generate_until", {}, ("def add(a, b):", {**ask, "top_k": 1}), 0)])
    assert top1 == tok.decode(lm.runner.generate("def add(a, b):", max_tokens=12))  # top_k 1 at any temperature: greedy
    with pytest.raises(ValueError, match=r"generation settings \['num_beams'\] are not supported"):
        lm.generate_until([Instance("generate_until", {}, ("x", {**ask, "num_beams": 4}), 0)])


@pytest.mark.slow
def test_lm_eval_command_line(tmp_path):
    pytest.importorskip("lm_eval")
    env_cmd = [sys.executable, "-m", "xlstm_metal.lm_eval_adapter", "--model", "xlstm-metal", "--model_args",
               f"pretrained={DEFAULT_MODEL_DIR}", "--include_path", str(_task_dir(tmp_path)), "--tasks",
               "xlstm_tiny_choice", "--output_path", str(tmp_path / "out")]
    import os

    proc = subprocess.run(env_cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert result["results"]["xlstm_tiny_choice"]["acc,none"] == 1.0
