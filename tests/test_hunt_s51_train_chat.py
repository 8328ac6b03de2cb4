"""Session 51's hunt in `train`, `chat`, `generate` and their Python API: results that were
wrong or inconsistent between commands (each test failed before its fix)."""

import io
import json
import sys

import numpy as np
import pytest
from test_cli_generate import ckpt  # noqa: F401  (the fixture: a tiny checkpoint with a BPE, BOS 0, EOS 2)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import xlstm_metal  # noqa: F401  (BLAS preload before mlx use)
from xlstm_metal.cli import main
from xlstm_metal.generation import xLSTMRunner
from xlstm_metal.generation.tokenizer import Tokenizer as OurTokenizer

WORDS = "the interpreter reads a line of input and executes it list mutable sequence items".split()


def _text(seed: int = 0, n: int = 600) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n)) + "\n"


def _foreign_tokenizer(directory, text: str) -> int:
    """A byte-level BPE whose only special token, <|endoftext|>, comes last (GPT-2's layout:
    ids 0, 1, 2 are the ordinary "!", '"', "#"), named BOS and EOS by its tokenizer_config.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": False}))
    return tok.token_to_id("<|endoftext|>")


def test_train_with_a_foreign_tokenizer_saves_the_special_ids_it_trained_with(tmp_path):
    # The documents were wrapped in <|endoftext|>, but the preset's ids 0 / 2 ("!" / "#") went into
    # every checkpoint and the export: generation put "!" before each prompt and stopped at "#".
    text = _text()
    (tmp_path / "data.txt").write_text(text)
    eot = _foreign_tokenizer(tmp_path / "tok", text)
    out, export = tmp_path / "run", tmp_path / "export"
    code = main(["train", str(tmp_path / "data.txt"), "--tokenizer", str(tmp_path / "tok"), "--out", str(out),
                 "--export", str(export), "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--no-progress"])
    assert code == 0
    for directory in (export, out / "checkpoint-0000002"):
        config = json.loads((directory / "config.json").read_text())
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (eot, eot, None)
        tokenizer = OurTokenizer.from_dir(directory)
        assert tokenizer.bos_token_id == eot and tokenizer.eos_token_ids == [eot]
        assert tokenizer.encode("the line")[0] == eot
        tok_config = json.loads((directory / "tokenizer_config.json").read_text())
        assert tok_config["bos_token"] == tok_config["eos_token"] == "<|endoftext|>"
        assert "pad_token" not in tok_config  # (was '"')
    generation = json.loads((export / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (eot, eot)
    # The checkpoint's tokenizer_config.json named "!" / "#", so --resume wrapped the documents
    # with those and refused the run as "trained on different data".
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0


def test_a_prompt_file_or_stdin_starting_with_a_byte_order_mark_is_the_prompt_without_it(ckpt, tmp_path, capsys,
                                                                                         monkeypatch):
    # Windows editors start a file with U+FEFF: it reached the model as three byte tokens before
    # the prompt (train reads its data files without it).
    want = "".join(c.text for c in xLSTMRunner(ckpt).stream("the quick", max_tokens=8)) + "\n"
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"\xef\xbb\xbfthe quick")
    assert main(["generate", "-m", str(ckpt), "--prompt-file", str(prompt), "-n", "8"]) == 0
    assert capsys.readouterr().out == want
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfthe quick")))
    assert main(["generate", "-m", str(ckpt), "--prompt", "-", "-n", "8"]) == 0
    assert capsys.readouterr().out == want


def test_a_fine_tuned_export_keeps_the_source_models_generation_config(ckpt, tmp_path):
    # The export's generation_config.json was always ours (sampling at 0.8, top-k 40, 200 tokens):
    # a greedy source model came back sampling. A resumed run's export keeps it too.
    source = tmp_path / "source"
    source.mkdir()
    for f in ckpt.iterdir():
        (source / f.name).write_bytes(f.read_bytes())
    (source / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 33}))
    (tmp_path / "data.txt").write_text(_text())
    out = tmp_path / "run"
    common = ["--no-progress", "--seq-len", "16", "--batch-size", "2"]
    assert main(["train", str(tmp_path / "data.txt"), "--init-from", str(source), "--out", str(out), "--steps", "2",
                 "--export", str(tmp_path / "export"), *common]) == 0
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--export", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    # summary.json: the whole run's steps and tokens, and this session's beside its wall time
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["tokens"]) == (3, 3 * 2 * 16)
    assert (summary["session_steps"], summary["session_tokens"]) == (1, 2 * 16)
    assert summary["session_tok_s"] == pytest.approx(32 / summary["wall_s"])
    for export in (tmp_path / "export", tmp_path / "again"):
        generation = json.loads((export / "generation_config.json").read_text())
        config = json.loads((export / "config.json").read_text())
        assert generation == {"do_sample": False, "max_new_tokens": 33, "bos_token_id": config["bos_token_id"],
                              "eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}


def test_a_stop_string_that_is_a_special_tokens_text_stops_there(ckpt, capsys):
    # The text streamed skips special tokens, so `--stop "<pad>"` (say, a chat model's
    # <|im_end|>) never matched: the generation ran on to its max_tokens.
    runner = xLSTMRunner(ckpt)
    tokenizer = runner.tokenizer
    special = {i: t.content for i, t in tokenizer.backend.get_added_tokens_decoder().items()
               if t.special and i not in tokenizer.eos_token_ids}
    kw = dict(max_tokens=40, temperature=3.0)
    seed, ids = next((s, ids) for s in range(200) for ids in [runner.generate("the quick", seed=s, **kw)]
                     if any(i in special for i in ids[:-1]))
    at = next(j for j, i in enumerate(ids) if i in special)
    stop = special[ids[at]]
    assert runner.generate("the quick", seed=seed, stop=stop, **kw) == ids[:at]
    chunks = list(runner.stream("the quick", seed=seed, stop=[stop, "zzzz"], **kw))
    assert len(chunks) == at + 1 and chunks[-1].finish_reason == "stop"
    assert runner.generate(["the quick", "the quick"], seed=[seed, seed], row_stops=[stop, None], **kw)[0] == ids[:at]
    assert main(["generate", "-m", str(ckpt), "-p", "the quick", "-n", "40", "--temp", "3", "--seed", str(seed),
                 "--stop", stop]) == 0
    assert capsys.readouterr().out == tokenizer.decode(ids[:at]) + "\n"
