"""Session 51's hunt in distributed runs (`mlx.launch`, ring backend, 2 local processes) and
in the profiles as the commands apply them."""

import json
import sys

from xlstm_metal.profiles import load_profile

from distributed_helpers import run_two_ranks  # noqa: E402
from test_train_cli import make_corpus  # noqa: E402

TRAIN = ["--config", "tiny", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--steps", "2",
         "--warmup", "0", "--no-progress", "--val-fraction", "0.1"]


def xlstm_cmd(*args):
    return [sys.executable, "-m", "xlstm_metal", *map(str, args)]


def _run_ranks(tmp_path, commands, cwds=None, timeout=180):
    """Run ``commands[r]`` as rank r of a 2-process ring (in ``cwds[r]``); [(exit code, stderr)]."""
    return [(code, err) for code, _, err in run_two_ranks(tmp_path, commands, cwds=cwds, timeout=timeout)]


def test_train_takes_rank_0s_profile_file(tmp_path):
    """`train --profile FILE` where only rank 0's machine has the file (as it may have the data
    alone): every rank trains under rank 0's profile. Rank 1 stopped with 'file not found'
    and rank 0 with a traceback."""
    corpus = make_corpus(tmp_path / "corpus")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    profile = load_profile("exact-fp32").replace(name="mine", chunk_size=8, eps=2e-6)
    (first / "mine.json").write_text(json.dumps(profile.to_dict()))
    out = tmp_path / "run"
    cmd = xlstm_cmd("train", corpus, "--out", out, *TRAIN, "--profile", "mine.json")
    results = _run_ranks(tmp_path, [cmd, cmd], cwds=[first, second])
    for code, err in results:
        assert code == 0 and "Traceback" not in err, err[-3000:]
    config = json.loads((out / "checkpoint-0000002" / "config.json").read_text())
    assert config["chunk_size"] == 8 and config["eps"] == 2e-6


def test_train_peer_lost_while_starting_is_one_line(tmp_path):
    """A rank that dies before the training loop (here: it joins the ring and exits) stops the
    others with one line naming it, exit code 1; it was a RuntimeError traceback from the
    set-up's first collective."""
    corpus = make_corpus(tmp_path / "corpus")
    train = xlstm_cmd("train", corpus, "--out", tmp_path / "run", *TRAIN)
    joins_and_exits = [sys.executable, "-c", "import mlx.core as mx; mx.distributed.init()"]
    (code, err), _ = _run_ranks(tmp_path, [train, joins_and_exits])
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert "xlstm-metal: error: rank 0 of 2: the run stopped while starting, before training began: lost the " \
           "connection to rank 1" in err


def _served_settings(monkeypatch, *flags):
    """The server settings `xlstm-metal serve FLAGS` starts with (the server itself is not made)."""
    import pytest

    pytest.importorskip("mlx_lm")
    import xlstm_metal.serve as serve
    from xlstm_metal.cli import main

    seen = []

    def make_server(cli_args):
        seen.append(cli_args)
        raise serve.ServeError("not serving in this test")

    monkeypatch.setattr(serve, "make_server", make_server)
    assert main(["serve", "--port", "0", *flags]) == 2
    return seen[0]


def test_serve_prefills_in_the_profiles_prompt_pieces(monkeypatch, tmp_path):
    """serve --profile: the profile's prefill_chunk is the prompt piece length (it was 2048
    whatever the profile said); --prefill-step-size wins over it; without either, 2048."""
    path = tmp_path / "pieces.json"
    path.write_text(json.dumps(load_profile("exact-fp32").replace(name="pieces", prefill_chunk=96).to_dict()))
    settings = _served_settings(monkeypatch, "--profile", str(path))
    assert settings.prefill_step_size == 96 and settings.profile.prefill_chunk == 96
    assert _served_settings(monkeypatch, "--profile", "fast-bf16").prefill_step_size == 16384
    settings = _served_settings(monkeypatch, "--profile", str(path), "--prefill-step-size", "32")
    assert settings.prefill_step_size == 32 and settings.profile.prefill_chunk == 32
    assert _served_settings(monkeypatch).prefill_step_size == 2048


def test_bench_kernel_config_wins_over_the_profiles_kernel(tmp_path, capsys):
    """bench --profile P --kernel config: the config's kernel, an explicit flag, wins over the
    profile's (it was replaced by it without a word); the profile's other settings stay."""
    from xlstm_metal.cli import main

    from conftest import BENCH_CONFIG  # noqa: E402

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BENCH_CONFIG, "chunkwise_kernel": "parallel"}))
    assert main(["bench", "--config", str(path), "--profile", "fast-bf16", "--kernel", "config", "--prefill-lengths",
                 "32", "--decode-tokens", "2", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert records and {(r["kernel"], r["dtype"], r["fused"], r["chunk_size"]) for r in records} == {
        ("parallel", "bfloat16", True, 64)}


def test_judge_rates_under_the_profile(tmp_path, capsys):
    """judge --profile: the texts are rated by the model under the profile (its soft caps and
    eps change the log-probabilities); `judge --profile` was refused as an unknown option.
    --dtype wins over the profile's; a bad profile is one line, exit 2."""
    import pytest

    from xlstm_metal.cli import main
    from xlstm_metal.generation import load_tokenizer
    from xlstm_metal.judge import judge_record
    from xlstm_metal.loading import load_model, save_model
    from xlstm_metal.profiles import apply_profile

    from conftest import tiny_model  # noqa: E402
    from test_tokenizer import train_tiny_tokenizer  # noqa: E402

    ckpt = tmp_path / "ckpt"
    hf = train_tiny_tokenizer()
    save_model(tiny_model(4, vocab_size=hf.get_vocab_size()), ckpt)
    hf.save(str(ckpt / "tokenizer.json"))
    record = {"prompt": "the", "text": "the quick brown fox"}
    (tmp_path / "in.jsonl").write_text(json.dumps(record) + "\n")
    capped_profile = load_profile("exact-fp32").replace(name="capped", output_logit_soft_cap=0.5, norm_eps=1e-2)
    (tmp_path / "capped.json").write_text(json.dumps(capped_profile.to_dict()))

    def rated(*flags):
        out = tmp_path / "ratings"
        assert main(["judge", "-m", str(ckpt), "--outputs", str(tmp_path / "in.jsonl"), "--out", str(out),
                     "--overwrite", "--no-progress", *flags]) == 0
        return json.loads((out / "ratings.jsonl").read_text())["mean_logprob"]

    tok = load_tokenizer(ckpt)
    plain = judge_record(load_model(ckpt), tok, record)["mean_logprob"]
    capped = judge_record(apply_profile(load_model(ckpt), capped_profile), tok, record)["mean_logprob"]
    assert abs(capped - plain) > 1e-3
    assert rated() == pytest.approx(plain, rel=1e-5)
    assert rated("--profile", str(tmp_path / "capped.json")) == pytest.approx(capped, rel=1e-5)
    half = judge_record(apply_profile(load_model(ckpt, dtype="bfloat16"), capped_profile.replace(dtype="bfloat16")),
                        tok, record)["mean_logprob"]
    assert rated("--profile", str(tmp_path / "capped.json"), "--dtype", "bfloat16") == pytest.approx(half, rel=1e-5)
    capsys.readouterr()
    assert main(["judge", "-m", str(ckpt), "--outputs", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "r2"),
                 "--profile", "nope"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
