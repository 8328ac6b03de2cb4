"""`generate` takes sampling defaults from the checkpoint's generation_config.json, flags win."""

import json
import shutil

import pytest
from test_cli_generate import ckpt, expected_text, run_cli, runner  # noqa: F401  (fixtures)


@pytest.fixture
def sampling_ckpt(ckpt, tmp_path):  # noqa: F811
    path = tmp_path / "sampling"
    shutil.copytree(ckpt, path)
    (path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.9, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.2,
         "max_new_tokens": 12, "bos_token_id": 0, "eos_token_id": 2}))
    return path


def test_generation_config_supplies_defaults(sampling_ckpt, runner, capsys):  # noqa: F811
    code, out, _ = run_cli(capsys, "generate", "-m", str(sampling_ckpt), "-p", "the quick", "--seed", "3")
    assert code == 0
    kw = dict(max_tokens=12, temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.2, seed=3)
    assert out == expected_text(runner, "the quick", **kw) + "\n"
    # An explicit flag wins over the file: --temp 0 is greedy.
    code, out, _ = run_cli(capsys, "generate", "-m", str(sampling_ckpt), "-p", "the quick", "--temp", "0", "-n", "9")
    assert code == 0
    assert out == expected_text(runner, "the quick", max_tokens=9, temperature=0.0, top_k=20, top_p=0.95,
                                repetition_penalty=1.2) + "\n"


def test_without_do_sample_only_length_is_taken(sampling_ckpt, runner, capsys):  # noqa: F811
    (sampling_ckpt / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.9,
                                                                      "max_new_tokens": 7}))
    code, out, _ = run_cli(capsys, "generate", "-m", str(sampling_ckpt), "-p", "the quick")
    assert code == 0
    assert out == expected_text(runner, "the quick", max_tokens=7) + "\n"


def test_bad_generation_config_is_named(sampling_ckpt, capsys):
    (sampling_ckpt / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": 3}))
    code, _, err = run_cli(capsys, "generate", "-m", str(sampling_ckpt), "-p", "x")
    assert code == 2
    assert "--top-p must be in (0, 1], got 3" in err and "generation_config.json" in err


def test_generation_config_is_read_as_transformers_reads_it(sampling_ckpt, runner, capsys):  # noqa: F811
    """do_sample alone samples at transformers' defaults (temperature 1, top-k 50; it ran greedy
    here), and repetition_penalty applies to greedy search too (it was dropped without do_sample)."""
    gen = sampling_ckpt / "generation_config.json"
    gen.write_text(json.dumps({"do_sample": True, "max_new_tokens": 10}))
    greedy = expected_text(runner, "the quick", max_tokens=10)
    code, out, _ = run_cli(capsys, "generate", "-m", str(sampling_ckpt), "-p", "the quick", "--seed", "4")
    assert code == 0
    sampled = expected_text(runner, "the quick", max_tokens=10, temperature=1.0, top_k=50, seed=4)
    assert out == sampled + "\n" and sampled != greedy
    gen.write_text(json.dumps({"do_sample": False, "repetition_penalty": 3.0, "max_new_tokens": 12}))
    code, out, _ = run_cli(capsys, "generate", "-m", str(sampling_ckpt), "-p", "the the the the")
    assert code == 0
    penalised = expected_text(runner, "the the the the", max_tokens=12, repetition_penalty=3.0)
    assert out == penalised + "\n" and penalised != expected_text(runner, "the the the the", max_tokens=12)


def test_max_length_bounds_prompt_plus_generated(sampling_ckpt, runner, capsys):  # noqa: F811
    """max_length alone is the total length, as in transformers: it was ignored (256 new tokens)."""
    gen = sampling_ckpt / "generation_config.json"
    gen.write_text(json.dumps({"max_length": 12}))
    prompt_tokens = len(runner.encode("the quick"))
    assert 0 < prompt_tokens < 12
    want = expected_text(runner, "the quick", max_tokens=12 - prompt_tokens)
    assert len(runner.generate("the quick", max_tokens=12 - prompt_tokens)) == 12 - prompt_tokens  # no early EOS
    code, out, _ = run_cli(capsys, "generate", "-m", str(sampling_ckpt), "-p", "the quick")
    assert code == 0 and out == want + "\n"
    # --max-tokens wins over it, and so does the file's own max_new_tokens.
    code, out, _ = run_cli(capsys, "generate", "-m", str(sampling_ckpt), "-p", "the quick", "-n", "15")
    assert code == 0 and out == expected_text(runner, "the quick", max_tokens=15) + "\n"
    gen.write_text(json.dumps({"max_length": 12, "max_new_tokens": 14}))
    code, out, _ = run_cli(capsys, "generate", "-m", str(sampling_ckpt), "-p", "the quick")
    assert code == 0 and out == expected_text(runner, "the quick", max_tokens=14) + "\n"
    # A prompt that fills max_length is refused, as transformers refuses it.
    gen.write_text(json.dumps({"max_length": prompt_tokens}))
    code, out, err = run_cli(capsys, "generate", "-m", str(sampling_ckpt), "-p", "the quick")
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"the prompt is {prompt_tokens} tokens" in err and f"max_length {prompt_tokens}" in err
    gen.write_text(json.dumps({"max_length": 0}))
    code, _, err = run_cli(capsys, "generate", "-m", str(sampling_ckpt), "-p", "the quick")
    assert code == 2 and "max_length must be an integer > 0, got 0" in err


def test_chat_max_length_bounds_the_conversation(sampling_ckpt, runner, capsys, monkeypatch):  # noqa: F811
    """In chat, max_length bounds the whole transcript: a turn that finds it full is not fed."""
    import io
    import sys

    (sampling_ckpt / "generation_config.json").write_text(json.dumps({"max_length": 12}))
    first = len(runner.encode("the quick\n"))
    want = expected_text(runner, "the quick\n", max_tokens=12 - first)
    monkeypatch.setattr(sys, "stdin", io.StringIO("the quick\nbrown fox\n"))
    code, out, err = run_cli(capsys, "chat", "-m", str(sampling_ckpt))
    assert code == 0
    assert out == want + ("" if want.endswith("\n") else "\n") + "\n"  # the second turn generated nothing
    assert "the conversation is" in err and "max_length 12" in err and "/reset" in err
