"""Which BOS / EOS ids `train` wraps documents with: never a model config's id that is an
ordinary token of the tokenizer (a preset's 0 and 2 with a foreign tokenizer were "!" and "#"
around every document)."""

import json
from pathlib import Path
from types import SimpleNamespace

from tokenizers import Tokenizer, models, pre_tokenizers

import xlstm_metal  # noqa: F401  (BLAS preload before mlx use)
from xlstm_metal.cli.train import _special_ids


def _tokenizer(specials=()) -> Tokenizer:
    vocab = {c: i for i, c in enumerate("!\"#abcdefgh ")}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens(list(specials))
    return tok


CONFIG = SimpleNamespace(bos_token_id=0, eos_token_id=2)


def test_a_config_id_that_is_an_ordinary_token_is_not_used(capsys):
    tok = _tokenizer()
    assert _special_ids(tok, CONFIG) == (None, None)
    err = capsys.readouterr().err
    assert "bos_token_id 0 is the ordinary token '!'" in err and "eos_token_id 2 is the ordinary token '#'" in err
    assert _special_ids(tok, CONFIG, warn=False) == (None, None) and capsys.readouterr().err == ""


def test_the_tokenizer_config_names_its_own_tokens(tmp_path: Path, capsys):
    tok = _tokenizer(["<|endoftext|>"])
    eot = tok.token_to_id("<|endoftext|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|endoftext|>", "special": True}, "eos_token": "<|endoftext|>"}))
    assert _special_ids(tok, CONFIG, tmp_path) == (eot, eot)
    assert capsys.readouterr().err == ""


def test_ours_first_then_config_ids_that_are_special():
    tok = _tokenizer(["<|bos|>", "<|eos|>"])
    assert _special_ids(tok, CONFIG) == (tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>"))
    tok = _tokenizer(["<s>", "</s>"])
    config = SimpleNamespace(bos_token_id=tok.token_to_id("<s>"), eos_token_id=[tok.token_to_id("</s>")])
    assert _special_ids(tok, config) == (tok.token_to_id("<s>"), tok.token_to_id("</s>"))
