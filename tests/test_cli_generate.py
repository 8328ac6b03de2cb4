"""`xlstm-metal generate` / `chat` end to end on a tiny checkpoint with an in-process BPE."""

import io
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import tiny_model
from mlx.utils import tree_flatten
from test_tokenizer import train_tiny_tokenizer

import xlstm_metal.generation as generation
from xlstm_metal.cli import main
from xlstm_metal.cli.chat import chat_loop
from xlstm_metal.generation import load_tokenizer, xLSTMRunner
from xlstm_metal.loading import load_model, save_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Checkpoint dir: tiny xLSTM-Large (vocab = the BPE's) + tokenizer.json (BOS 0, EOS 2)."""
    path = tmp_path_factory.mktemp("ckpt")
    hf = train_tiny_tokenizer()
    save_model(tiny_model(2, vocab_size=hf.get_vocab_size()), path)
    hf.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def runner(ckpt):
    return xLSTMRunner(load_model(ckpt), load_tokenizer(ckpt))


def expected_text(runner, prompt, **kw):
    return runner.tokenizer.decode(runner.generate(prompt, **kw))


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_end_to_end(ckpt, runner, capsys):
    code, out, err = run_cli(capsys, "generate", "--model", str(ckpt), "--prompt", "the quick", "--max-tokens", "15")
    assert code == 0
    assert out == expected_text(runner, "the quick", max_tokens=15) + "\n"
    assert len(out) > 5
    # Sampling flags reach the sampler: same seed -> the runner's seeded result.
    code, out, _ = run_cli(capsys, "generate", "-m", str(ckpt), "-p", "the quick", "-n", "15", "--temp", "0.8",
                           "--top-k", "50", "--top-p", "0.9", "--min-p", "0.02", "--repetition-penalty", "1.1",
                           "--seed", "5")
    assert code == 0
    kw = dict(max_tokens=15, temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.1, seed=5)
    assert out == expected_text(runner, "the quick", **kw) + "\n"


def test_tiny_temperature_generates_greedily(ckpt, runner, capsys):
    """--temp 1e-45 overflowed the scaled logits to inf / NaN and printed garbage."""
    code, out, err = run_cli(capsys, "generate", "-m", str(ckpt), "-p", "the quick", "-n", "12", "--temp", "1e-45",
                             "--seed", "1")
    assert code == 0, err
    assert out == expected_text(runner, "the quick", max_tokens=12) + "\n"


def test_prompt_from_stdin_and_file(ckpt, runner, capsys, monkeypatch, tmp_path):
    want = expected_text(runner, "héllo wörld", max_tokens=8) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("héllo wörld"))
    assert run_cli(capsys, "generate", "--model", str(ckpt), "--prompt", "-", "--max-tokens", "8")[1] == want
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("héllo wörld", encoding="utf-8")
    assert run_cli(capsys, "generate", "--model", str(ckpt), "--prompt-file", str(prompt_file),
                   "--max-tokens", "8")[1] == want


def test_stop_string_and_verbose(ckpt, runner, capsys):
    full = expected_text(runner, "the lazy", max_tokens=20)
    assert len(full) > 4
    needle = full[2:4]
    code, out, err = run_cli(capsys, "generate", "--model", str(ckpt), "--prompt", "the lazy", "--max-tokens", "20",
                             "--stop", needle, "--verbose")
    assert code == 0 and out == full[: full.index(needle)] + "\n"
    assert "prompt: " in err and "tok/s" in err and "peak memory" in err


def test_info_and_wiring(ckpt, capsys):
    code, out, _ = run_cli(capsys, "generate", "--model", str(ckpt), "--info", "--show-wiring")
    assert code == 0
    model = load_model(ckpt)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert f"{n_params:,}" in out
    for line in ("num_blocks             2", "num_heads              2", "embedding_dim          64",
                 "dtype                  float32"):
        assert line in out
    assert model.fuse_projections().wiring() in out  # the CLI shows the model as it runs: fused


def test_chat_keeps_state_and_equals_one_pass(ckpt, runner, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the quick\nbrown fox\n/reset\nthe quick\n"))
    code, out, err = run_cli(capsys, "chat", "--model", str(ckpt), "--max-tokens", "6")
    assert code == 0 and "/reset" in err
    # The same conversation through the runner: turn 2 continues turn 1's state.
    ref = xLSTMRunner(runner.model, runner.tokenizer)
    r1 = "".join(c.text for c in ref.stream("the quick\n", max_tokens=6, keep_state=True))
    sep = "" if r1.endswith("\n") or not r1 else "\n"
    chunks2 = list(ref.stream(sep + "brown fox\n", max_tokens=6, keep_state=True))
    r2 = "".join(c.text for c in chunks2)
    # ... and turn 2 equals one pass over the whole transcript before it.
    before_reply = ref.session_tokens[: -len(chunks2)]
    assert runner.tokenizer.decode(before_reply).endswith("brown fox\n")
    eos = set(runner.tokenizer.eos_token_ids)
    assert runner.generate(before_reply, max_tokens=6) == [c.token for c in chunks2 if c.token not in eos]
    lines = [r1, r2, r1]  # after /reset the first turn repeats exactly
    assert out == "".join(r if r.endswith("\n") else r + "\n" for r in lines) + "\n"
    # `generate --interactive` is the same command.
    monkeypatch.setattr(sys, "stdin", io.StringIO("the quick\nbrown fox\n/reset\nthe quick\n"))
    assert run_cli(capsys, "generate", "--interactive", "--model", str(ckpt), "--max-tokens", "6")[1] == out


def test_chat_ctrl_c_and_quit(ckpt, runner, capsys):
    class Args:
        max_tokens, temperature, top_k, top_p, min_p, repetition_penalty = 40, 0.0, 0, 1.0, 0.0, 1.0
        seed, stop, verbose = None, [], False

    class InterruptingOut(io.StringIO):
        """Raises KeyboardInterrupt at the 3rd write of the first reply, as Ctrl-C would."""

        writes = 0

        def write(self, text):
            InterruptingOut.writes += 1
            if InterruptingOut.writes == 3:
                raise KeyboardInterrupt
            return super().write(text)

    chat = xLSTMRunner(runner.model, runner.tokenizer)
    lines = iter(["the quick", "fox", "/quit", "never read"])
    out, err = InterruptingOut(), io.StringIO()
    assert chat_loop(chat, Args(), input_fn=lambda _: next(lines), out=out, err=err) == 0
    assert "(reply interrupted)" in err.getvalue()
    assert next(lines) == "never read"  # /quit stopped reading
    # The interrupted turn's shown tokens stay in the state; the next turn continued from them.
    tokens = chat.session_tokens
    assert tokens[0] == 0 and runner.tokenizer.decode(tokens).startswith("the quick\n")

    def ctrl_c(_):
        raise KeyboardInterrupt

    assert chat_loop(chat, Args(), input_fn=ctrl_c, out=io.StringIO(), err=io.StringIO()) == 0

    def ctrl_d(_):
        raise EOFError

    assert chat_loop(chat, Args(), input_fn=ctrl_d, out=io.StringIO(), err=io.StringIO()) == 0


def test_subprocess_module_entry(ckpt, runner):
    proc = subprocess.run(
        [sys.executable, "-m", "xlstm_metal", "generate", "--model", str(ckpt), "--prompt", "the quick",
         "--max-tokens", "10"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_text(runner, "the quick", max_tokens=10) + "\n"


def test_hugging_face_id_offline_is_a_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [sys.executable, "-m", "xlstm_metal", "generate", "--model", "NX-AI/xLSTM-7b", "--prompt", "hi"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert "xlstm-metal: error:" in proc.stderr and "NX-AI/xLSTM-7b" in proc.stderr
    assert "offline" in proc.stderr.lower() and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-tokens", "-1"], "--max-tokens must be >= 0"),
        (["--temperature", "-0.5"], "--temperature must be"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--top-k", "-3"], "--top-k must be >= 0"),
        (["--min-p", "2"], "--min-p must be in [0, 1]"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "prompt file not found: /nonexistent/prompt.txt"),
    ],
)
def test_bad_flags_exit_2(ckpt, capsys, argv, message):
    args = ["generate", "--model", str(ckpt)] + (["--prompt", "hi"] if "--prompt-file" not in argv else []) + argv
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and message in err and out == ""


def test_bad_files_and_models_exit_2(ckpt, capsys, tmp_path, monkeypatch):
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("café".encode("latin-1"))
    code, _, err = run_cli(capsys, "generate", "--model", str(ckpt), "--prompt-file", str(not_utf8))
    assert code == 2 and "not UTF-8" in err and str(not_utf8) in err
    code, _, err = run_cli(capsys, "generate", "--model", str(ckpt), "--prompt-file", str(tmp_path))
    assert code == 2 and "is a directory" in err
    missing = tmp_path / "no_such_model"
    code, _, err = run_cli(capsys, "generate", "--model", str(missing), "--prompt", "hi")
    assert code == 2 and "model directory not found" in err and str(missing) in err
    code, _, err = run_cli(capsys, "generate", "--model", str(ckpt))
    assert code == 2 and "give a prompt" in err
    code, _, err = run_cli(capsys, "generate", "--model", str(ckpt), "--prompt", "a", "--prompt-file", "b")
    assert code == 2 and "not both" in err
    # A checkpoint without tokenizer.json: --info works, text generation is a clear error.
    bare = tmp_path / "bare"
    save_model(tiny_model(0), bare)
    assert run_cli(capsys, "generate", "--model", str(bare), "--info")[0] == 0
    code, _, err = run_cli(capsys, "generate", "--model", str(bare), "--prompt", "hi")
    assert code == 2 and "no tokenizer.json" in err
    # No --model and no packaged model.
    monkeypatch.setattr(generation, "DEFAULT_MODEL_DIR", tmp_path / "absent_default")
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi")
    assert code == 2 and "default model is not installed" in err and "absent_default" in err


def test_default_model_is_used_without_model_flag(ckpt, runner, capsys, monkeypatch):
    monkeypatch.setattr(generation, "DEFAULT_MODEL_DIR", ckpt)
    code, out, _ = run_cli(capsys, "generate", "--prompt", "the quick", "--max-tokens", "5")
    assert code == 0 and out == expected_text(runner, "the quick", max_tokens=5) + "\n"


def test_runner_from_path_loads_model_and_tokenizer(ckpt, runner):
    from_path = xLSTMRunner(str(ckpt))
    assert from_path.tokenizer is not None and from_path.tokenizer.eos_token_ids == [2]
    assert from_path.get_model_info()["dtype"] == "float32"  # CPU default
    assert from_path.generate("the quick", max_tokens=6) == runner.generate("the quick", max_tokens=6)
    half = xLSTMRunner(ckpt, dtype="bfloat16")
    assert half.get_model_info()["dtype"] == "bfloat16"
    ids = half.generate("the quick", max_tokens=3)
    # Three tokens, or fewer only because an EOS ended the reply; the first is the bfloat16
    # model's own greedy choice (not the float32 model's logits, not nothing).
    assert 1 <= len(ids) <= 3 and all(0 <= i < half.tokenizer.vocab_size for i in ids)
    if len(ids) < 3:
        assert half.tokenizer.eos_token_ids  # generation only ends early at an EOS
    prompt = mx.array([half.tokenizer.encode("the quick")])
    logits, _ = half.model(prompt)
    assert ids[0] == int(mx.argmax(logits[0, -1]).item())


def test_chat_mistyped_command_is_not_a_turn(ckpt, runner):
    # "/rest" (for /reset) was sent to the model as a turn and stayed in the conversation.
    class Args:
        max_tokens, temperature, top_k, top_p, min_p, repetition_penalty = 4, 0.0, 0, 1.0, 0.0, 1.0
        seed, stop, verbose = None, [], False

    chat = xLSTMRunner(runner.model, runner.tokenizer)
    lines = iter(["/rest", "/usr/bin/env", "//etc", "/quit"])
    out, err = io.StringIO(), io.StringIO()
    fed = []
    stream = chat.stream

    def recording(text, **kwargs):
        fed.append(text)
        return stream(text, **kwargs)

    chat.stream = recording
    assert chat_loop(chat, Args(), input_fn=lambda _: next(lines), out=out, err=err) == 0
    assert "(unknown command /rest: did you mean /reset?" in err.getvalue()
    # a path is text; "//" sends text that begins with "/"
    assert [t.strip() for t in fed] == ["/usr/bin/env", "/etc"]
    assert runner.tokenizer.decode(chat.session_tokens).count("rest") == 0


def test_chat_seed_seeds_the_conversation_not_every_turn(ckpt, runner, capsys, monkeypatch):
    """--seed in chat: turn 1 (and the first turn after /reset) starts from the seed, later turns
    continue the session's keys. Each turn used to restart from the seed, replaying the same
    random draws every turn."""
    flags = dict(max_tokens=8, temperature=1.5)
    monkeypatch.setattr(sys, "stdin", io.StringIO("the quick\nthe quick\n/reset\nthe quick\n"))
    code, out, _ = run_cli(capsys, "chat", "-m", str(ckpt), "-n", "8", "--temp", "1.5", "--seed", "7")
    assert code == 0
    ref = xLSTMRunner(runner.model, runner.tokenizer)
    r1 = "".join(c.text for c in ref.stream("the quick\n", keep_state=True, seed=7, **flags))
    sep = "" if r1.endswith("\n") or not r1 else "\n"
    r2 = "".join(c.text for c in ref.stream(sep + "the quick\n", keep_state=True, **flags))  # keys continue
    assert out == "".join(r if r.endswith("\n") else r + "\n" for r in (r1, r2, r1)) + "\n"
    reseeded = xLSTMRunner(runner.model, runner.tokenizer)
    list(reseeded.stream("the quick\n", keep_state=True, seed=7, **flags))
    assert r2 != "".join(c.text for c in reseeded.stream(sep + "the quick\n", keep_state=True, seed=7, **flags))
