"""Bad input to bench, profile, judge, mad, evolve and tune: one error line, exit 2, before any work."""

import json

import pytest
from cli_helpers import assert_rejected


def _profile(tmp_path, **changes):
    from xlstm_metal.profiles import load_profile

    path = tmp_path / "p.json"
    path.write_text(json.dumps({**load_profile("exact-fp32").to_dict(), **changes}))  # NaN, Infinity as Python writes them
    return path


@pytest.mark.parametrize("changes,word", [({"tolerance": {"max_rel_error": float("inf")}}, "tolerance"),
                                          ({"init": {"igate_bias": float("nan")}}, "init"),
                                          ({"blas_threads": 2**32 + 2}, "blas_threads must be at most 4096")])
def test_profile_numbers_must_be_finite(changes, word, tmp_path, capsys):
    assert_rejected(["profile", "show", _profile(tmp_path, **changes)], capsys, word)  # inf: every check passed


def test_bench_quantization_entry_must_be_an_object(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"embedding_dim": 64, "num_heads": 2, "num_blocks": 2, "vocab_size": 97,
                                  "quantization": "yes"}))
    assert_rejected(["bench", "--config", config, "--prefill-lengths", "16"], capsys, "must be an object")


@pytest.mark.parametrize("entry, words", [({"group_size": 64}, "lacks bits:"), ({"bits": 4}, "lacks group_size:"),
                                          ({"mode": "affine"}, "lacks bits and group_size:"),
                                          ({"mode": "bogus", "bits": 4, "group_size": 64}, "mode must be one of")])
def test_bench_quantization_entry_names_what_it_lacks(entry, words, tmp_path, capsys):
    # a missing key was a bare KeyError's text: "cannot apply its quantization entry: 'bits'"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"embedding_dim": 64, "num_heads": 2, "num_blocks": 2, "vocab_size": 97,
                                  "quantization": entry}))
    assert_rejected(["bench", "--config", config, "--prefill-lengths", "16"], capsys, words)


def test_a_float_format_entry_needs_no_bits():
    # mxfp4 fixes bits 4 and group 32: an entry without them is complete
    from xlstm_metal.quantization import Recipe

    recipe = Recipe.from_config({"mode": "mxfp4"})
    assert (recipe.bits, recipe.group_size, recipe.mode) == (4, 32, "mxfp4")


def test_tune_measures_a_quantized_shape_quantized(tmp_path, capsys):
    # tune --shape of a quantized checkpoint's config timed float random weights (bench quantized them)
    from xlstm_metal.quantization import quantization_config
    from xlstm_metal.tuning.objectives import SpeedObjective

    shape = {"embedding_dim": 64, "num_heads": 2, "num_blocks": 2, "vocab_size": 97, "chunk_size": 16}
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**shape, "quantization": {"bits": 8, "group_size": 32}}))
    model = SpeedObjective(shape=str(config), seed=3)._base()["model"]
    assert quantization_config(model)["bits"] == 8 and quantization_config(model)["group_size"] == 32
    config.write_text(json.dumps({**shape, "quantization": {"group_size": 32}}))
    assert_rejected(["tune", "--objective", "speed", "--shape", config, "--out", tmp_path / "t"], capsys,
                    "--shape: cannot apply its quantization entry")
    assert not (tmp_path / "t").exists()


def test_judge_refuses_a_file_given_twice(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "hi"}\n')
    for given in ([tmp_path / "d" / "a.jsonl", tmp_path / "d" / ".." / "d" / "a.jsonl"], [tmp_path / "d" / "a.jsonl", tmp_path / "d"]):
        assert_rejected(["judge", "--outputs", *given, "--out", tmp_path / "r"], capsys, "more than once")
    assert not (tmp_path / "r").exists()


EVOLVE = ["evolve", "--budget", "2000000", "--tasks", "memorization"]


@pytest.mark.parametrize("argv,words", [
    (["mad", "--arch", "mlstm", "--tasks", "memorization,,compression"], ["empty entry"]),
    ([*EVOLVE[:3], "--tasks", "memorization,"], ["empty entry"]),
    ([*EVOLVE, "--start", "mlstm,,attention"], ["empty or repeated"]),
    ([*EVOLVE, "--start", "mlstm,mlstm"], ["empty or repeated"]),
    ([*EVOLVE[:2], "1000", *EVOLVE[3:]], ["budget of 1,000", "--min-blocks"]),  # was minutes of silence
    ([*EVOLVE[:2], "1000", *EVOLVE[3:], "--start", ""], ["budget of 1,000", "--min-blocks"]),
], ids=["mad-tasks", "evolve-tasks", "start-empty", "start-twice", "budget", "budget-no-start"])
def test_lab_lists_and_budget(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_rejected([*argv, *(["--out", "ev"] if argv[0] == "evolve" else [])], capsys, *words)
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("given,word", [({"trials": "x"}, "--trials"), ({"trials": "5"}, "--trials"),
                                        ({"mode": "zzz"}, "--mode"), ({"shape": 5}, "--shape")])
def test_tune_resume_checks_saved_flags(given, word, tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / "study.db").write_bytes(b"")
    cli = {"given": {"objective": "speed", **given}, "used": {"objective": "speed"}}
    (out / "run_meta.json").write_text(json.dumps({"cli": cli}))
    assert_rejected(["tune", "--out", out, "--resume"], capsys, "run_meta.json", word)


def test_tune_prompt_file_lines_end_at_newlines_only(tmp_path):
    """A plain prompt file holds one prompt per line: a U+2028 / U+0085 / form feed inside a prompt
    cut it in two (splitlines), and \\r\\n endings leave no \\r behind."""
    from xlstm_metal.cli.tune import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes("one\u2028two\r\nthree\x85four\x0cfive\n\n  \nsix".encode())
    assert read_prompts(str(path)) == ["one\u2028two", "three\x85four\x0cfive", "six"]
