"""`generate` / `chat` on hostile input and output: a reader that goes away, bytes that are not
UTF-8, and --stop escapes. Subprocesses run the packaged model, as a user's shell would."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import assert_rejected, run_main
from conftest import repo_env

from xlstm_metal.cli import main

REPO = Path(__file__).resolve().parent.parent
#: Bytes like the start of an executable: not UTF-8 (0x80.. 0xff alone never are).
BINARY = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8


def xlstm_metal(*argv, stdin=None, env=None, stdout=subprocess.PIPE, timeout=120):
    full_env = repo_env(**(env or {}))
    return subprocess.run([sys.executable, "-m", "xlstm_metal", *argv], input=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, env=full_env, timeout=timeout, cwd=REPO)


def assert_clean_usage_error(proc, *words):
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("xlstm-metal: error: "), err
    for word in words:
        assert word in err, err


def test_closed_stdout_ends_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first token: every write hits EPIPE
    try:
        proc = xlstm_metal("generate", "-p", "The Python", "-n", "40", "--temp", "0", stdout=write_end)
    finally:
        os.close(write_end)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


#: stdin decoded strictly (UnicodeDecodeError on read) or with surrogateescape (bad bytes kept).
DECODING = ["utf-8:strict", "utf-8:surrogateescape"]


@pytest.mark.parametrize("encoding", DECODING)
def test_binary_stdin_prompt_is_a_usage_error(encoding):
    env = {"PYTHONIOENCODING": encoding}
    proc = xlstm_metal("generate", "-p", "-", "-n", "3", stdin=BINARY, env=env)
    assert_clean_usage_error(proc, "stdin", "not UTF-8", "0x80")
    assert proc.stdout == b""


@pytest.mark.parametrize("encoding", DECODING)
def test_binary_chat_input_is_a_usage_error(encoding):
    env = {"PYTHONIOENCODING": encoding}
    proc = xlstm_metal("chat", "-n", "3", stdin=BINARY, env=env)
    assert_clean_usage_error(proc, "not UTF-8")


def test_non_utf8_prompt_argument_is_a_usage_error():
    # bash's -p $'caf\xe9': Python keeps the byte as a lone surrogate in sys.argv.
    proc = xlstm_metal("generate", "-p", b"caf\xe9", "-n", "3")
    assert_clean_usage_error(proc, "--prompt", "not UTF-8", "0xe9")


def test_surrogate_text_is_a_value_error_in_the_api():
    from xlstm_metal.generation import DEFAULT_MODEL_DIR, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR)
    with pytest.raises(ValueError, match="not valid Unicode"):
        tokenizer.encode("caf\udce9")
    assert tokenizer.encode("café") == tokenizer.encode("café")  # real text still encodes


def test_stop_escapes():
    from xlstm_metal.cli.generate import unescape_stop

    assert unescape_stop(r"\n\n") == "\n\n"
    assert unescape_stop(r"a\tb\r\n") == "a\tb\r\n"
    assert unescape_stop(r"C:\\dir") == "C:\\dir"
    assert unescape_stop(r"\\n") == "\\n"  # an escaped backslash, then a plain n
    assert unescape_stop(r"\d+") == r"\d+"  # other escapes stay as typed
    assert unescape_stop("plain") == "plain"


def test_readme_stop_newlines_stops_at_the_first_blank_line(capsys, monkeypatch):
    # The packaged model, greedy, writes paragraphs: without the escape the literal backslashes
    # never appear and all 120 tokens come out.
    monkeypatch.setattr(sys, "stdin", io.StringIO("def read_file(path):"))
    assert main(["generate", "--prompt", "-", "--temp", "0", "-n", "120"]) == 0
    full = capsys.readouterr().out
    assert "\n\n" in full.rstrip("\n"), full
    monkeypatch.setattr(sys, "stdin", io.StringIO("def read_file(path):"))
    assert main(["generate", "--prompt", "-", "--temp", "0", "-n", "120", "--stop", r"\n\n"]) == 0
    out = capsys.readouterr().out
    assert out == full[: full.index("\n\n")] + "\n"


# ---------------------------------------------------------------------- bad input, every subcommand
# In-process (cli_helpers): main() returns 2 for a UsageError; argparse exits with SystemExit(2).


@pytest.mark.parametrize("argv", [
    ["generate", "-p", "hi", "-n", "1"],
    ["bench", "--shape", "125m"],
    ["train", "nothing.txt", "--out", "run"],
    ["mad", "--arch", "mlstm", "--epochs", "0"],
    ["evolve", "--budget", "10", "--out", "ev"],
    ["tune", "--objective", "speed", "--out", "t"],
], ids=lambda argv: argv[0])
@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_seed_outside_mlx_range_is_a_usage_error(argv, seed, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written; if it were, here
    assert_rejected([*argv, "--seed", seed], capsys, "--seed", seed)
    assert list(tmp_path.iterdir()) == []


def test_make_keys_rejects_seeds_mlx_cannot_take():
    from xlstm_metal.generation.sampling import make_keys

    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match="seed must be in"):
            make_keys(seed, 1)
    assert make_keys(2**64 - 1, 1).shape == (1, 2)


@pytest.mark.parametrize("flag,value,words", [
    ("--val-fraction", "1.5", ["--val-fraction", "1.5"]),
    ("--val-fraction", "-0.1", ["--val-fraction"]),
    ("--keep", "-1", ["keep must be >= 0"]),
])
def test_train_out_of_range_settings(flag, value, words, text_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert_rejected(["train", text_data, "--out", out, "--steps", "1", flag, value], capsys, *words)
    assert not out.exists()


def test_train_default_preset_is_not_shadowed_by_a_directory(tmp_path, monkeypatch):
    # `xlstm-metal train ... --out tiny` once, then any run from that directory: `--config`
    # defaults to the preset "tiny", not to the directory of that name.
    from xlstm_metal.cli.train import PRESETS, _config_dict

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert _config_dict("tiny") == dict(PRESETS["tiny"])
    with pytest.raises(Exception, match="is a directory"):
        _config_dict("tiny/")  # a path that is plainly the directory still names it


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me\n")
    return path


def test_output_under_a_file_is_refused_before_any_work(a_file, tmp_path, capsys):
    records = tmp_path / "samples.jsonl"
    records.write_text('{"text": "hello world"}\n')
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"kind": "decode", "batch": 1, "length": 2, "tok_s": 10.0}\n')
    under = a_file / "sub"
    for argv in (["judge", "--outputs", records, "--out", under],
                 ["plot", bench, "--out", under / "p.png"],
                 ["mad", "--arch", "mlstm", "--tasks", "in_context_recall", "--epochs", "1", "--out", under],
                 ["evolve", "--budget", "10", "--out", under],
                 ["tune", "--objective", "speed", "--shape", "125m", "--trials", "1", "--out", under]):
        assert_rejected(argv, capsys, str(under), "is not a writable directory")
    assert a_file.read_text() == "keep me\n"


def test_plot_over_a_directory_is_refused(tmp_path, capsys):
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"kind": "decode", "batch": 1, "length": 2, "tok_s": 10.0}\n')
    target = tmp_path / "figure.png"
    target.mkdir()
    (target / "inside").write_text("x")
    assert_rejected(["plot", bench, "--out", target, "--overwrite"], capsys, "is a directory")
    assert (target / "inside").read_text() == "x"


@pytest.mark.parametrize("temp", ["nan", "inf"])
def test_serve_temperature_must_be_finite(temp, tmp_path, capsys):
    assert_rejected(["serve", "--temp", temp, "--port", "0", "--model", tmp_path / "none"], capsys, "--temp")


@pytest.mark.parametrize("origins", [",", "http://a.org,", "http://a.org,,http://b.org"])
def test_serve_empty_allowed_origin_is_a_usage_error(origins, tmp_path, capsys):
    # Was accepted: an empty origin matches no request's Origin header.
    assert_rejected(["serve", "--allowed-origins", origins, "--port", "0", "--model", tmp_path / "none"], capsys,
                    f"--allowed-origins {origins!r} has an empty origin")


def test_serve_allowed_origins_are_stripped(capsys, monkeypatch):
    # "http://a.org, http://b.org" allowed " http://b.org", which no browser's Origin header is:
    # b.org's requests were refused without a word.
    pytest.importorskip("mlx_lm")
    from xlstm_metal import serve

    seen = []

    def make_server(cli_args):
        seen.append(cli_args.allowed_origins)
        raise serve.ServeError("stop here")

    monkeypatch.setattr(serve, "make_server", make_server)
    code, err = run_main(["serve", "--port", "0", "--no-mem-watchdog", "--allowed-origins",
                          "http://a.org, http://b.org ,http://c.org"], capsys)
    assert code == 2 and "stop here" in err, err
    assert seen == [["http://a.org", "http://b.org", "http://c.org"]]


@pytest.mark.parametrize("name", ["../escape", "a/b", "x.json", ""])
def test_tune_profile_name_is_a_plain_name(name, tmp_path, capsys, monkeypatch, tiny_model_dir):
    profiles = tmp_path / "profiles" / "dir"
    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(profiles))
    argv = ["tune", "--objective", "speed", "--shape", tiny_model_dir / "config.json", "--trials", "1",
            "--prefill-length", "8", "--decode-tokens", "1", "--no-progress", "--out", tmp_path / "t",
            "--profile-name", name]
    assert_rejected(argv, capsys, "--profile-name")
    assert not (tmp_path / "profiles").exists() and not (tmp_path / "t").exists()


def test_evolve_start_is_checked(tmp_path, capsys):
    out = tmp_path / "ev"
    assert_rejected(["evolve", "--budget", "10", "--out", out, "--start", "mlstm,nope"], capsys,
                    "--start nope", "no architecture")
    assert_rejected(["evolve", "--budget", "10", "--out", out, "--engine", "optuna", "--start", "mlstm"], capsys,
                    "--start", "--engine star")
    odd = tmp_path / "odd.yaml"
    odd.write_text("blocks: [{spec: mlstm, params: {num_heads: 3}}]\n")
    assert_rejected(["evolve", "--budget", "10", "--out", out, "--start", odd], capsys,
                    "block 0: num_heads 3 is not one of the genome's")
    assert not out.exists()


@pytest.mark.parametrize("command", [["mad", "--arch", "mlstm"], ["evolve", "--budget", "10", "--out", "ev"]],
                         ids=["mad", "evolve"])
@pytest.mark.parametrize("tasks,words", [("", ["--tasks: must not be empty"]), (",", ["names no task"])])
def test_empty_task_list_is_a_usage_error(command, tasks, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_rejected([*command, "--tasks", tasks, "--epochs", "0"], capsys, *words)


def test_mlx_lm_corrupt_weights_is_a_usage_error(tiny_model_dir, capsys):
    pytest.importorskip("mlx_lm")
    import shutil

    from xlstm_metal.assets import DEFAULT_MODEL_DIR

    for name in ("tokenizer.json", "tokenizer_config.json"):  # (without a tokenizer that is the error)
        shutil.copy(DEFAULT_MODEL_DIR / name, tiny_model_dir / name)
    (tiny_model_dir / "model.safetensors").write_bytes(os.urandom(5000))
    assert_rejected(["mlx-lm", "generate", "--model", tiny_model_dir, "--prompt", "hi"], capsys,
                    "model.safetensors")


def test_memory_watchdog_help_prints_one_percent_sign(capsys):
    # argparse %-formats argument help but prints a group's description as written.
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "or N% of the device's memory" in text and "N%%" not in text
    assert "else 80%)" in text


def test_tune_speed_with_corrupt_model_is_a_usage_error(tiny_model_dir, tmp_path, capsys, monkeypatch):
    # Checked before the sweep: every trial would have failed on it (exit 1, the reason in trials.jsonl).
    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))
    (tiny_model_dir / "model.safetensors").write_bytes(os.urandom(5000))
    out = tmp_path / "t"
    assert_rejected(["tune", "--objective", "speed", "--model", tiny_model_dir, "--trials", "1", "--prefill-length", "8",
                     "--decode-tokens", "1", "--no-progress", "--out", out], capsys, "--model", "model.safetensors")
    assert not out.exists()


@pytest.mark.parametrize("command", ["generate", "fuse"])
def test_mlx_lm_model_without_tokenizer_is_named(command, tiny_model_dir, capsys):
    # mlx-lm's own message for it was "Either input_embeddings or prompt (or both) must be provided."
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tiny_model_dir / name).unlink(missing_ok=True)
    argv = ["mlx-lm", command, "--model", tiny_model_dir] + (["--prompt", "hi"] if command == "generate" else [])
    assert_rejected(argv, capsys, "has no tokenizer", "tokenizer.json")


def test_mlx_lm_lora_data_not_found_offline_is_a_usage_error():
    # A --data name that is no local path (a typo, run from another directory) is looked up as a
    # Hugging Face dataset id; offline that was a ConnectionError traceback (exit 1).
    pytest.importorskip("mlx_lm")
    from xlstm_metal.assets import DEFAULT_MODEL_DIR

    missing = "no-such-lora-data"
    assert not (REPO / missing).exists()
    proc = xlstm_metal("mlx-lm", "lora", "--model", str(DEFAULT_MODEL_DIR), "--train", "--data", missing,
                       "--iters", "1", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert_clean_usage_error(proc, "mlx-lm lora: ", missing)


# ---------------------------------------------------------------------- sweep of bad input (round 2)
@pytest.mark.parametrize("argv,flag,value", [
    (["train", "{data}", "--out", "{out}", "--steps", "1"], "--lr", "inf"),
    (["train", "{data}", "--out", "{out}", "--steps", "1"], "--weight-decay", "nan"),
    (["train", "{data}", "--out", "{out}", "--steps", "1"], "--grad-clip", "nan"),
    (["train", "{data}", "--out", "{out}", "--steps", "1"], "--max-time", "nan"),
    (["train", "{data}", "--out", "{out}", "--steps", "1"], "--memory-limit", "inf"),  # was an OverflowError
    (["tune", "--objective", "speed", "--backend", "ray", "--out", "{out}"], "--cpus-per-trial", "nan"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_non_finite_numbers_are_usage_errors(argv, flag, value, text_data, tmp_path, capsys):
    # nan / inf parse as floats: --lr inf and --grad-clip nan trained to NaN losses (exit 0).
    out = tmp_path / "run"
    argv = [a.format(data=text_data, out=out) for a in argv]
    assert_rejected([*argv, flag, value], capsys, flag, "finite", value)
    assert not out.exists()


@pytest.mark.parametrize("extra,words", [
    (["--export-dtype", "float16"], ["--export-dtype", "--export DIR"]),
    (["--tokenizer", "{tokenizer}", "--vocab-size", "300"], ["--vocab-size", "--tokenizer"]),
    (["--init-from", "default", "--vocab-size", "300"], ["--vocab-size", "--init-from default"]),
    (["--arch", "mlstm", "--kernel", "parallel"], ["--kernel", "--arch mlstm"]),
], ids=["export-dtype", "vocab-with-tokenizer", "vocab-with-init-from", "kernel-with-arch"])
def test_train_flags_that_would_be_ignored_are_usage_errors(extra, words, text_data, tmp_path, capsys):
    from xlstm_metal.assets import DEFAULT_MODEL_DIR

    out = tmp_path / "run"
    extra = [a.format(tokenizer=DEFAULT_MODEL_DIR / "tokenizer.json") for a in extra]
    assert_rejected(["train", text_data, "--out", out, "--steps", "1", "--seq-len", "8", "--batch-size", "2",
                     "--no-progress", *extra], capsys, *words)
    assert not out.exists()


def test_train_arch_is_checked_before_the_tokenizer_is_trained(text_data, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("blocks: [\n")
    out = tmp_path / "run"
    code, err = run_main(["train", text_data, "--out", out, "--steps", "1", "--arch", bad], capsys)
    assert code == 2 and "Traceback" not in err and f"--arch {bad}" in err, err
    assert "training a byte-level BPE" not in err and not out.exists()


@pytest.fixture
def model_with_bad_file(tiny_model_dir, request):
    """The tiny checkpoint with the packaged tokenizer, then ``request.param`` overwritten with
    bytes that are not JSON."""
    import shutil

    from xlstm_metal.assets import DEFAULT_MODEL_DIR

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, tiny_model_dir / name)
    (tiny_model_dir / request.param).write_bytes(BINARY)
    return tiny_model_dir, request.param


@pytest.mark.parametrize("model_with_bad_file", ["tokenizer.json", "generation_config.json"], indirect=True)
def test_convert_checks_the_tokenizer_before_converting(model_with_bad_file, tmp_path, capsys):
    # It was read when OUT was written, after the model was loaded (and quantized): a traceback.
    model, name = model_with_bad_file
    out = tmp_path / "out"
    assert_rejected(["convert", model, out, "-q"], capsys, "tokenizer", name)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


@pytest.mark.parametrize("model_with_bad_file", ["tokenizer.json", "generation_config.json"], indirect=True)
def test_judge_with_unreadable_tokenizer_is_a_usage_error(model_with_bad_file, tmp_path, capsys):
    model, name = model_with_bad_file
    records = tmp_path / "samples.jsonl"
    records.write_text('{"text": "hello world"}\n')
    out = tmp_path / "ratings"
    assert_rejected(["judge", "--model", model, "--outputs", records, "--out", out, "--no-progress"], capsys,
                    "judge model", name)
    assert not out.exists()


def test_bench_device_without_its_backend_is_a_usage_error(tiny_model_dir, capsys):
    import mlx.core as mx

    if mx.is_available(mx.gpu):
        pytest.skip("this MLX has a GPU back-end")
    assert_rejected(["bench", "--config", tiny_model_dir, "--device", "gpu"], capsys, "--device gpu")


@pytest.mark.parametrize("flag", ["--prefill-lengths", "--decode-batches"])
@pytest.mark.parametrize("value", ["", ","])
def test_bench_empty_list_is_a_usage_error(flag, value, tiny_model_dir, capsys):
    # It ran no prefill (or no decode) at all, and said nothing.
    assert_rejected(["bench", "--config", tiny_model_dir, flag, value], capsys, flag)


@pytest.mark.parametrize("objective,extra,words", [
    ("speed", ["--seq-len", "32", "--max-depth", "2"], ["--seq-len, --max-depth belong to --objective train"]),
    ("train", ["--prefill-length", "64"], ["--prefill-length belongs to --objective speed"]),
    ("speed", ["--workers", "4"], ["--workers applies only with --backend ray"]),
    ("speed", ["--max-new-tokens", "5"], ["--max-new-tokens applies only with --save-outputs"]),
    ("train", ["--tokenizer", "{tokenizer}", "--vocab-size", "300"], ["--vocab-size", "--tokenizer"]),
    ("train", ["--seq-len", "1"], ["--seq-len must be >= 2"]),  # every trial failed on it (exit 1)
], ids=["train-flags-with-speed", "speed-flags-with-train", "ray-flags-locally", "max-new-tokens-alone",
        "vocab-with-tokenizer", "seq-len-1"])
def test_tune_flags_that_would_be_ignored_or_fail_every_trial(objective, extra, words, text_data, tmp_path, capsys,
                                                              monkeypatch):
    from xlstm_metal.assets import DEFAULT_MODEL_DIR

    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))
    out = tmp_path / "t"
    source = ["--shape", "125m"] if objective == "speed" else ["--data", text_data]
    extra = [a.format(tokenizer=DEFAULT_MODEL_DIR / "tokenizer.json") for a in extra]
    assert_rejected(["tune", "--objective", objective, *source, "--trials", "1", "--no-progress", "--out", out,
                     *extra], capsys, *words)
    assert not out.exists() and not (tmp_path / "profiles").exists()


def test_tune_save_outputs_with_unreadable_tokenizer_is_checked_first(tiny_model_dir, tmp_path, capsys, monkeypatch):
    # Every trial failed writing its continuations (exit 1, the reason in trials.jsonl).
    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))
    (tiny_model_dir / "tokenizer.json").write_bytes(BINARY)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(\n")
    out = tmp_path / "t"
    assert_rejected(["tune", "--objective", "speed", "--model", tiny_model_dir, "--trials", "1", "--no-progress",
                     "--save-outputs", "--prompt-file", prompts, "--out", out], capsys, "--save-outputs",
                    "tokenizer.json")
    assert not out.exists()


def test_evolve_resume_with_unreadable_search_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "ev"
    (out / "search.json").mkdir(parents=True)  # was an IsADirectoryError traceback
    assert_rejected(["evolve", "--budget", "1000", "--out", out, "--resume"], capsys, "--resume", "search.json")


def test_mad_show_wiring_with_scoring_flags_is_a_usage_error(tmp_path, capsys):
    # --show-wiring exits before training: --out, --tasks, --epochs and --json went unused.
    out = tmp_path / "m"
    assert_rejected(["mad", "--arch", "mlstm", "--show-wiring", "--out", out, "--tasks", "in_context_recall"], capsys,
                    "--show-wiring", "--tasks, --out")
    assert not out.exists()


# ---------------------------------------------------------------------- sweep of bad input (round 3)
@pytest.mark.parametrize("flags,env,words", [
    (["--no-mem-watchdog", "--mem-hard", "2GB"], {}, ["--mem-hard needs the memory watchdog", "--no-mem-watchdog"]),
    (["--no-mem-watchdog", "--mem-soft", "1GB", "--mem-log", "{log}"], {}, ["--mem-soft, --mem-log need"]),
    (["--mem-log", "{log}"], {"XLSTM_MEM_WATCHDOG": "0"}, ["--mem-log needs", "XLSTM_MEM_WATCHDOG=0"]),
], ids=["flag-hard", "flag-soft-log", "env-log"])
def test_memory_limits_with_the_watchdog_off_are_usage_errors(flags, env, words, tmp_path, capsys, monkeypatch):
    # An off watchdog sets no limit and writes no log: the flags were silently ignored (exit 0).
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    log = tmp_path / "mem.csv"
    assert_rejected(["generate", "-p", "hi", "-n", "1", *[f.format(log=log) for f in flags]], capsys, *words)
    assert not log.exists()


def test_watchdog_off_alone_still_generates(capsys):
    code, err = run_main(["generate", "-p", "def f", "-n", "3", "--temp", "0", "--no-mem-watchdog"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("extra,named", [
    (["--info", "-n", "5", "--temp", "0.5"], "--max-tokens, --temperature would be ignored"),
    (["--show-wiring", "--stop", "x", "--seed", "3"], "--seed, --stop would be ignored"),
    (["--info", "--show-wiring", "-v"], "--verbose would be ignored"),
    (["--info", "--prefill-chunk-size", "8"], "--prefill-chunk-size would be ignored"),
])
def test_describe_only_with_generation_options_is_a_usage_error(extra, named, tiny_model_dir, capsys):
    # `generate --info` without a prompt describes the model and exits: they went unused (exit 0).
    code, err = run_main(["generate", "-m", tiny_model_dir, *extra], capsys)
    assert code == 2 and "without a prompt describes the model" in err and named in err, err


def test_describe_only_still_describes(tiny_model_dir, capsys):
    assert main(["generate", "-m", str(tiny_model_dir), "--info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("architecture") and "num_blocks             2" in out


@pytest.mark.parametrize("extra,words", [
    (["--config", "bogus"], ["--config 'bogus' is neither"]),
    (["--config", "{data}"], ["--config", "not valid JSON"]),
    (["--kernel", "nope"], ["--kernel", "unknown mLSTM kernel 'nope'"]),
    (["--vocab-size", "5"], ["--vocab-size must be >= 259"]),
], ids=["config-name", "config-file", "kernel", "vocab-size"])
def test_train_settings_are_checked_before_the_tokenizer_is_trained(extra, words, text_data, tmp_path, capsys):
    # They failed only after the data was read and a BPE tokenizer trained on it.
    out = tmp_path / "run"
    code, err = run_main(["train", text_data, "--out", out, "--steps", "1", "--no-progress",
                          *[a.format(data=text_data) for a in extra]], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert all(word in err for word in words), err
    assert "training a byte-level BPE" not in err and not out.exists()


def test_train_text_field_without_json_lines_is_a_usage_error(text_data, tmp_path, capsys):
    # It names a field of JSON Lines records; on plain text it was silently ignored.
    out = tmp_path / "run"
    assert_rejected(["train", text_data, "--out", out, "--steps", "1", "--text-field", "body"], capsys,
                    "--text-field body", "none of the data is JSON Lines")
    records = tmp_path / "records.jsonl"
    records.write_text('{"text": "hello world"}\n')
    # With JSON Lines among the data it is read (this record has no such field).
    assert_rejected(["train", text_data, records, "--out", out, "--steps", "1", "--text-field", "body"], capsys,
                    "record has no 'body' field")
    assert not out.exists()


def test_train_resume_with_overwrite_is_a_usage_error(tmp_path, capsys):
    # --overwrite reads as "start over", but --resume continued the run and ignored it.
    out = tmp_path / "run"
    (out / "checkpoint-0000001").mkdir(parents=True)
    assert_rejected(["train", "--out", out, "--resume", "--overwrite", "--steps", "5"], capsys,
                    "--resume continues the run", "--overwrite", "would be ignored")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-0000001"]


@pytest.mark.parametrize("extra,words", [
    (["--resume", "--overwrite"], ["--resume continues the sweep", "--overwrite replaces it"]),
    (["--trials", "2", "--population", "4"], ["--population would be ignored", "--trials 2"]),
    (["--trials", "2", "--mode", "ga", "--generations", "3"], ["--generations would be ignored"]),
    (["--trials", "2", "--population", "3", "--generations", "3"], ["--population, --generations would be ignored"]),
], ids=["resume-overwrite", "population", "generations-ga", "both"])
def test_tune_settings_that_would_be_ignored(extra, words, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))
    out = tmp_path / "t"
    assert_rejected(["tune", "--objective", "speed", "--shape", "125m", "--no-progress", "--out", out, *extra],
                    capsys, *words)
    assert not out.exists() and not (tmp_path / "profiles").exists()


def test_tune_population_sizes_generations_and_budget():
    import argparse

    from xlstm_metal.cli.tune import _check_search

    def checked(**given):
        args = argparse.Namespace(**{"mode": "random", "trials": None, "population": None, "generations": None,
                                     **given})
        _check_search(args)
        return args.trials, args.population, args.generations

    assert checked() == (None, 10, 5)
    assert checked(population=3, generations=2) == (None, 3, 2)  # the budget: 6 trials
    assert checked(mode="ga", trials=7, population=4) == (7, 4, 5)  # the genetic sampler's generation size


def test_tune_text_field_without_json_lines_is_a_usage_error(text_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))
    out = tmp_path / "t"
    assert_rejected(["tune", "--objective", "train", "--data", text_data, "--text-field", "body", "--trials", "1",
                     "--no-progress", "--out", out], capsys, "--text-field body", "none of --data is JSON Lines")
    assert not out.exists()


@pytest.mark.parametrize("target", ["notes.txt", "afile/w.png"])
def test_mad_show_wiring_checks_the_file_before_printing(target, tmp_path, capsys):
    # The wiring was printed, then the file refused (exit 2 after output).
    (tmp_path / "afile").write_text("a file where a folder would go")
    code = main(["mad", "--arch", "mlstm", "--show-wiring", str(tmp_path / target)])
    out, err = capsys.readouterr()
    assert code == 2 and f"--show-wiring {tmp_path / target}" in err, err
    assert out == ""


def test_mad_show_wiring_makes_missing_folders_as_plot_does(tmp_path, capsys):
    drawing = tmp_path / "new" / "dir" / "w.png"
    assert main(["mad", "--arch", "mlstm", "--show-wiring", str(drawing)]) == 0
    out, err = capsys.readouterr()
    assert "mlstm" in out and f"wrote {drawing}" in err
    assert drawing.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mad_show_wiring_refuses_an_existing_drawing_before_printing(tmp_path, capsys):
    drawing = tmp_path / "w.png"
    drawing.write_text("mine")
    code = main(["mad", "--arch", "mlstm", "--show-wiring", str(drawing)])
    out, err = capsys.readouterr()
    assert code == 2 and "pass --overwrite" in err and out == "", err
    assert drawing.read_text() == "mine" and not (tmp_path / "w-block1.png").exists()
    assert_rejected(["mad", "--arch", "mlstm", "--show-wiring", tmp_path / "x.png", "--plot-format", "svg"], capsys,
                    "--plot-format would be ignored")


def test_mad_and_evolve_keep_files_of_theirs_found_in_out(tmp_path, capsys):
    # Only results.json (mad), summary.json / history.jsonl (evolve) were looked for: the plot, and
    # best-N.yaml files (a new search deletes those beyond --top), were replaced or removed.
    mad_out = tmp_path / "m"
    mad_out.mkdir()
    (mad_out / "accuracy.png").write_text("mine")
    assert_rejected(["mad", "--arch", "mlstm", "--tasks", "in_context_recall", "--epochs", "1", "--out", mad_out],
                    capsys, "accuracy.png exists", "--overwrite")
    evolve_out = tmp_path / "e"
    evolve_out.mkdir()
    for name in ("evolution.png", "best-7.yaml"):
        (evolve_out / name).write_text("mine")
    assert_rejected(["evolve", "--budget", "200000", "--out", evolve_out], capsys, "holds a search already",
                    "evolution.png, best-7.yaml")
    assert [p.read_text() for p in (mad_out / "accuracy.png", evolve_out / "evolution.png",
                                    evolve_out / "best-7.yaml")] == ["mine"] * 3


@pytest.mark.parametrize("extra", [["--once"], ["--json", "--interval", "2"], ["--sort", "memory"]])
def test_top_clear_cache_with_view_options_is_a_usage_error(extra, capsys):
    # It asks one job to clear its cache and exits: the view's options went unused.
    assert_rejected(["top", "--clear-cache", str(os.getpid()), *extra], capsys, "--clear-cache PID",
                    "would be ignored", extra[0])


def test_convert_check_option_at_its_default_value_needs_check(tiny_model_dir, tmp_path, capsys):
    # Compared with the default, `--check-tokens 8192` alone passed (and was ignored).
    out = tmp_path / "out"
    for extra in (["--check-tokens", "8192"], ["--check-dtype", "float32"]):
        assert_rejected(["convert", tiny_model_dir, out, *extra], capsys, f"{extra[0]} needs --check")
    assert not out.exists()


def test_outputs_overlapping_the_training_data_are_refused(tmp_path, capsys, monkeypatch):
    # train --export DATA_DIR --overwrite replaced the training data with the model; an --out inside
    # the data directory trained, but `--resume` then read its loss.png as data ("looks binary"), as
    # `tune --resume` read study.db.
    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 50)
    run = tmp_path / "run"
    for argv, words in (
        (["train", corpus, "--out", run, "--export", corpus, "--overwrite"], ["--export", "is the training data"]),
        (["train", corpus / "a.txt", "--out", run, "--export", corpus, "--overwrite"],
         ["contains the training data", "--overwrite would delete it"]),
        (["train", corpus, "--out", corpus / "run"], ["--out", "inside the training data directory"]),
        (["train", corpus, "--out", run, "--export", corpus / "model"], ["--export", "inside the training data"]),
        (["tune", "--objective", "train", "--data", corpus, "--out", corpus / "t", "--trials", "1"],
         ["--out", "inside the training data directory"]),
    ):
        assert_rejected([*argv, "--no-progress"], capsys, *words)
    assert [p.name for p in corpus.iterdir()] == ["a.txt"] and not run.exists()


# ---------------------------------------------------------------------- outputs apart from inputs (round 2)
class WorkStarted(Exception):
    """Raised by a loader the test replaced: the command got past its checks and began the work."""


def no_loading(*args, **kwargs):
    raise WorkStarted


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_judge_out_overlapping_its_outputs_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    # `--out DIR` inside (or at) an --outputs directory wrote the ratings among the texts; with
    # --overwrite, a ratings file that is an --outputs file replaced the texts it rated.
    import xlstm_metal.loading

    monkeypatch.setattr(xlstm_metal.loading, "load", no_loading)  # the judge model: work that must not start
    texts = tmp_path / "outputs"
    texts.mkdir()
    (texts / "a.jsonl").write_text('{"text": "hello world"}\n')
    rated = tmp_path / "rated"
    rated.mkdir()
    (rated / "ratings.jsonl").write_text('{"text": "an earlier run kept its texts here"}\n')
    before = tree(tmp_path)
    for outputs, out, words in (
        ([texts], texts, [f"--out {texts} is --outputs {texts}"]),
        ([texts], texts / "ratings", [f"--out {texts / 'ratings'} is inside the --outputs directory {texts}"]),
        ([texts / "a.jsonl"], texts / "a.jsonl", [f"--out {texts / 'a.jsonl'} is --outputs {texts / 'a.jsonl'}"]),
        ([texts / "a.jsonl", rated / "ratings.jsonl"], rated,
         [f"the --out file {rated / 'ratings.jsonl'} is --outputs {rated / 'ratings.jsonl'}"]),
    ):
        assert_rejected(["judge", "--outputs", *outputs, "--out", out, "--overwrite", "--no-progress"], capsys,
                        *words, "write it elsewhere")
    assert tree(tmp_path) == before
    # --out beside an --outputs file (not one judge writes) is fine: the work starts.
    with pytest.raises(WorkStarted):
        main(["judge", "--outputs", str(texts / "a.jsonl"), "--out", str(texts.parent), "--no-progress"])


def test_convert_out_overlapping_src_is_refused_before_any_work(tiny_model_dir, tmp_path, capsys, monkeypatch):
    # `convert SRC SRC/sub` converted the model into its own checkpoint directory.
    import xlstm_metal.loading

    monkeypatch.setattr(xlstm_metal.loading, "load_model", no_loading)
    outer = tmp_path / "outer"
    src = outer / "src"
    outer.mkdir()
    tiny_model_dir.rename(src)
    before = tree(tmp_path)
    for argv, words in (
        ([src, src / "sub"], [f"OUT {src / 'sub'} is inside the source checkpoint directory {src}",
                              "written into the checkpoint it converts"]),
        ([src, src / "a" / "b", "-q"], [f"OUT {src / 'a' / 'b'} is inside the source checkpoint directory {src}"]),
        ([src, src], [f"OUT {src} is the source checkpoint {src}"]),
        # SRC inside OUT: named even without --overwrite (it said "already exists; pass --overwrite").
        ([src, outer], [f"OUT {outer} contains the source checkpoint {src}", "--overwrite would delete it"]),
        ([src, outer, "--overwrite"], [f"OUT {outer} contains the source checkpoint {src}"]),
    ):
        assert_rejected(["convert", *argv], capsys, *words, "write it elsewhere")
    assert tree(tmp_path) == before  # no OUT, no temporary directory in SRC
    with pytest.raises(WorkStarted):  # a sibling of SRC is fine
        main(["convert", str(src), str(outer / "converted")])


# ---------------------------------------------------------------------- train --arch, --vocab-size
def test_train_arch_file_is_read_once(tmp_path, monkeypatch):
    import yaml

    import xlstm_metal

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus about recurrent cells and gates." for i in range(200)))
    arch = tmp_path / "a.yaml"
    arch.write_text(yaml.safe_dump({"name": "read-once", "embedding_dim": 32, "blocks": ["mlstm", "swiglu"]}))
    reads = []
    read_text = Path.read_text

    def counting(self, *args, **kwargs):
        if self.resolve() == arch.resolve():
            reads.append(self)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    export = tmp_path / "export"
    assert main(["train", str(corpus), "--out", str(tmp_path / "run"), "--arch", str(arch), "--vocab-size", "300",
                 "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--eval-every", "2",
                 "--save-every", "2", "--seed", "0", "--no-progress", "--export", str(export)]) == 0
    assert len(reads) == 1, reads  # was 2: the check, then the model
    model = xlstm_metal.load_model(export)
    assert model.config.name == "read-once" and model.config.embedding_dim == 32
    assert [b.resolved.name for b in model.blocks] == ["mlstm", "swiglu"]


def test_train_config_file_is_read_once(tmp_path, monkeypatch):
    import json

    import xlstm_metal

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus about recurrent cells and gates." for i in range(200)))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"embedding_dim": 32, "num_heads": 2, "num_blocks": 1, "vocab_size": 300}))
    reads = []
    read_text = Path.read_text

    def counting(self, *args, **kwargs):
        if self.resolve() == config.resolve():
            reads.append(self)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    export = tmp_path / "export"
    assert main(["train", str(corpus), "--out", str(tmp_path / "run"), "--config", str(config), "--vocab-size", "300",
                 "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--eval-every", "2",
                 "--save-every", "2", "--seed", "0", "--no-progress", "--export", str(export)]) == 0
    assert len(reads) == 1, reads  # was 2: the check, then the model
    model = xlstm_metal.load_model(export)
    assert model.config.embedding_dim == 32 and model.config.num_blocks == 1


def test_tune_token_budget_below_two_steps_is_refused(tmp_path, text_data, capsys):
    # --token-budget 5 trained each trial 2 full batches (up to 2 x 32 x 64 tokens) without a word.
    out = tmp_path / "sweep"
    assert_rejected(["tune", "--objective", "train", "--data", text_data, "--out", out, "--token-budget", "5"],
                    capsys, "--token-budget must be >= 4,096 (2 steps of 32 sequences of --seq-len 64, "
                    "the largest batch searched), got 5")
    assert not out.exists()


def test_train_config_chunkwise_kernel_is_checked(tmp_path, text_data, capsys):
    # Was replaced by the training kernel without a word, "bogus" included (exit 0).
    import json

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"embedding_dim": 32, "num_heads": 2, "num_blocks": 1, "chunkwise_kernel": "bogus"}))
    out = tmp_path / "run"
    assert_rejected(["train", text_data, "--out", out, "--config", config, "--steps", "1"], capsys,
                    f"--config {config}: chunkwise_kernel: unknown mLSTM kernel 'bogus'")
    assert not out.exists()


@pytest.mark.parametrize("named,flag,trained_with", [
    ("chunkwise_scan", [], "chunkwise_scan"),  # ours: the config chooses
    ("chunkwise_scan", ["--kernel", "parallel"], "parallel"),  # --kernel wins
    ("chunkwise--triton_xl_chunk", [], "chunkwise"),  # NX-AI's Triton name: the training default (CPU)
])
def test_train_config_chunkwise_kernel_trains_where_it_names_ours(named, flag, trained_with, tmp_path, text_data):
    import json

    import xlstm_metal

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"embedding_dim": 32, "num_heads": 2, "num_blocks": 1, "vocab_size": 300,
                                  "chunkwise_kernel": named}))
    export = tmp_path / "export"
    assert main(["train", str(text_data), "--out", str(tmp_path / "run"), "--config", str(config), "--vocab-size",
                 "300", "--seq-len", "16", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--seed", "0",
                 "--val-fraction", "0", "--no-progress", "--export", str(export), *flag]) == 0
    assert xlstm_metal.load_model(export).config.chunkwise_kernel == trained_with


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("extra,message", [
    (["--vocab-size", "5"], "--vocab-size must be >= 259 (256 bytes + special tokens), got 5"),
    (["--vocab-size", "0"], "--vocab-size must be >= 259 (256 bytes + special tokens), got 0"),
    (["--vocab-size", "-4"], "--vocab-size must be >= 259 (256 bytes + special tokens), got -4"),
    (["--tokenizer", "{tokenizer}", "--vocab-size", "300"],
     "--vocab-size sizes a BPE tokenizer trained here; --tokenizer {tokenizer} brings its own tokenizer: "
     "leave out --vocab-size"),
], ids=["small", "zero", "negative", "with-tokenizer"])
def test_vocab_size_is_checked_alike_in_train_and_tune(command, extra, message, text_data, tmp_path, capsys,
                                                        monkeypatch):
    # One check (cli.check_vocab_size) for both: tune said "--vocab-size must be positive" for 0 and
    # worded the --tokenizer conflict differently.
    from xlstm_metal.assets import DEFAULT_MODEL_DIR

    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))
    tokenizer = DEFAULT_MODEL_DIR / "tokenizer.json"
    out = tmp_path / "out"
    base = (["train", text_data, "--out", out, "--steps", "1"] if command == "train" else
            ["tune", "--objective", "train", "--data", text_data, "--trials", "1", "--out", out])
    code, err = run_main([*base, "--no-progress", *[a.format(tokenizer=tokenizer) for a in extra]], capsys)
    assert code == 2 and err.strip() == "xlstm-metal: error: " + message.format(tokenizer=tokenizer), err
    assert not out.exists() and not (tmp_path / "profiles").exists()
