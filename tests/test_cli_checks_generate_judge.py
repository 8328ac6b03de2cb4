"""Bad input to judge, chat / generate and convert: a clear error and exit code 2, nothing lost.

judge refuses a record whose fields it would overwrite; an interactive chat refuses --prompt -
(stdin carries its turns); generation_config.json's token counts must be integers, named with the
file; convert's save warnings name OUT, not its temporary folder."""

import io
import json
import shutil
import sys
import warnings

import numpy as np
import pytest
from conftest import tiny_model
from test_cli_generate import ckpt, expected_text, run_cli, runner  # noqa: F401  (fixtures)

from xlstm_metal.cli import main
from xlstm_metal.judge import judge
from xlstm_metal.loading import save_model


# ---------------------------------------------------------------------- judge
def test_judge_refuses_a_record_with_fields_it_writes(ckpt, tmp_path, capsys):  # noqa: F811
    """{"source": "run-A", "line": 99, "tokens": ..., "perplexity": 3.0} was judged with rc 0: judge's
    provenance replaced the record's source / line, and its ratings the record's tokens / perplexity."""
    records = tmp_path / "collide.jsonl"
    records.write_text(json.dumps({"text": "the quick fox", "run": "A"}) + "\n" + json.dumps(
        {"text": "hello world", "source": "run-A", "line": 99, "tokens": "my-tok-field", "perplexity": 3.0}) + "\n")
    out = tmp_path / "ratings"
    code, _, err = run_cli(capsys, "judge", "-m", str(ckpt), "--outputs", str(records), "--out", str(out),
                           "--no-progress")
    assert code == 2 and "Traceback" not in err
    assert f"{records}:2:" in err
    assert all(f"'{name}'" in err for name in ("source", "line", "tokens", "perplexity")), err
    assert not out.exists()  # nothing written
    # The record without them is judged, its own fields kept beside judge's.
    records.write_text(json.dumps({"text": "the quick fox", "run": "A"}) + "\n")
    assert run_cli(capsys, "judge", "-m", str(ckpt), "--outputs", str(records), "--out", str(out),
                   "--no-progress")[0] == 0
    row = json.loads((out / "ratings.jsonl").read_text())
    assert (row["run"], row["source"], row["line"]) == ("A", "collide.jsonl", 1)


def test_judge_function_refuses_a_record_field_named_as_a_rating(runner):  # noqa: F811
    with pytest.raises(ValueError, match="'tokens'"):
        judge(runner.model, runner.tokenizer, [{"text": "the quick", "tokens": "mine"}])
    assert judge(runner.model, runner.tokenizer, [{"text": "the quick", "run": "A"}])[0]["run"] == "A"


# ---------------------------------------------------------------------- chat: --prompt - with stdin's turns
@pytest.mark.parametrize("command", [["chat"], ["generate", "-i"]], ids=["chat", "generate-i"])
def test_interactive_chat_refuses_prompt_from_stdin(command, ckpt, capsys, monkeypatch):  # noqa: F811
    """`printf 'hello\\n/quit\\n' | chat -p -` read all of stdin, /quit too, as the first turn."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/quit\n"))
    code, out, err = run_cli(capsys, *command, "-m", str(ckpt), "-p", "-", "-n", "4", "--temperature", "0")
    assert code == 2 and out == "" and "Traceback" not in err
    assert "--prompt -" in err and "turns from stdin" in err
    # A first turn given as text, then stdin's turns, still works.
    monkeypatch.setattr(sys, "stdin", io.StringIO("/quit\n"))
    code, out, _ = run_cli(capsys, *command, "-m", str(ckpt), "-p", "hello", "-n", "4", "--temperature", "0")
    assert code == 0 and out.strip()


# ---------------------------------------------------------------------- generation_config.json counts
@pytest.fixture
def config_ckpt(ckpt, tmp_path):  # noqa: F811
    path = tmp_path / "gen"
    shutil.copytree(ckpt, path)
    return path


@pytest.mark.parametrize("bad, flag, shown, good, kw", [
    ('{"max_new_tokens": 2.5}', "--max-tokens", "2.5", {"max_new_tokens": 3}, dict(max_tokens=3)),
    ('{"max_new_tokens": 1e400}', "--max-tokens", "inf", {"max_new_tokens": 3}, dict(max_tokens=3)),
    # int() made top_k 2.5 a 2 without a word
    ('{"do_sample": true, "top_k": 2.5}', "--top-k", "2.5", {"do_sample": True, "top_k": 2, "max_new_tokens": 6},
     dict(max_tokens=6, temperature=1.0, top_k=2)),
], ids=["max-new-tokens-float", "max-new-tokens-inf", "top-k-float"])
def test_generation_config_counts_must_be_integers(config_ckpt, runner, capsys, bad, flag, shown, good,  # noqa: F811
                                                   kw):
    """The runner refused max_new_tokens 2.5 naming neither the file nor a flag the user gave."""
    path = config_ckpt / "generation_config.json"
    seed = ["--seed", "5"] if "temperature" in kw else []  # greedy decoding refuses a --seed
    path.write_text(bad)
    code, out, err = run_cli(capsys, "generate", "-m", str(config_ckpt), "-p", "the quick", *seed)
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"{flag} must be an integer, got {shown} (from {path})" in err
    # The integer is applied.
    path.write_text(json.dumps(good))
    code, out, _ = run_cli(capsys, "generate", "-m", str(config_ckpt), "-p", "the quick", *seed)
    assert code == 0 and out == expected_text(runner, "the quick", seed=5 if seed else None, **kw) + "\n"


def test_serve_reads_the_same_integer_rule(config_ckpt):
    from xlstm_metal.serve import ServeError, model_generation_defaults

    (config_ckpt / "generation_config.json").write_text('{"do_sample": true, "top_k": 2.5}')
    with pytest.raises(ServeError, match=r"--top-k must be an integer, got 2\.5 \(from .*generation_config\.json"):
        model_generation_defaults(config_ckpt)


def test_runner_refuses_a_fractional_top_k(runner):  # noqa: F811
    with pytest.raises(ValueError, match="top_k must be an integer"):
        runner.generate("the quick", max_tokens=2, temperature=1.0, top_k=2.5, seed=0)
    # A NumPy integer is an integer.
    assert runner.generate("the quick", max_tokens=2, temperature=1.0, top_k=np.int64(2), seed=0) == \
        runner.generate("the quick", max_tokens=2, temperature=1.0, top_k=2, seed=0)


# ---------------------------------------------------------------------- convert's save warnings
def test_convert_warning_names_out_not_its_temporary_folder(tmp_path, capsys):
    """The save warned as a raw Python warning naming /.../.OUT.convert-xxxx, with the source line
    `save_model(model, tmp, tokenizer=...)` under it."""
    src, out = tmp_path / "src", tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the source's own save warns the same
        save_model(tiny_model(1), src)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        assert main(["convert", str(src), str(out), "-q", "--q-mode", "nvfp4"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {out}: qk_dim 32" in err
    assert ".convert-" not in err and "save_model(" not in err
    assert not [w for w in escaped if ".convert-" in str(w.message)]
