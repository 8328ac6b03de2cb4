"""Tokenizer wrapper: special ids from the checkpoint's files, BOS insertion, streaming decode."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import xlstm_metal  # noqa: F401  (BLAS preload before mlx)
from xlstm_metal.generation.tokenizer import StreamingDetokenizer, Tokenizer, TokenizerError, load_tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog. ",
    "xLSTM models keep a recurrent state; generation feeds one token at a time.\n",
    "héllo wörld, naïve café, 日本語のテキスト, emoji 🙂🚀 and more. ",
    "def f(x):\n    return x * 2\n",
]
SPECIALS = ["<|bos|>", "<|pad|>", "<|eos|>"]  # ids 0, 1, 2 as in xLSTM-7b's config


def train_tiny_tokenizer(vocab_size: int = 320) -> HFTokenizer:
    """A byte-level BPE trained in-process (a few milliseconds)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def write_tokenizer_dir(path, config=None, generation_config=None, tokenizer_config=None) -> HFTokenizer:
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    for name, data in (("config.json", config), ("generation_config.json", generation_config),
                       ("tokenizer_config.json", tokenizer_config)):
        if data is not None:
            (path / name).write_text(json.dumps(data))
    return tok


def test_no_tokenizer_json_gives_none(tmp_path):
    assert load_tokenizer(tmp_path) is None


def test_bos_inserted_once_per_config(tmp_path):
    write_tokenizer_dir(tmp_path, config={"bos_token_id": 0, "eos_token_id": 2, "force_bos_token_insert": True})
    tok = load_tokenizer(tmp_path)
    assert tok.bos_token_id == 0 and tok.eos_token_ids == [2] and tok.add_bos
    ids = tok.encode("the quick brown fox")
    raw = tok.encode("the quick brown fox", add_special_tokens=False)
    assert ids == [0, *raw] and 0 not in raw
    assert tok.encode("") == [0]
    assert tok.decode(ids) == "the quick brown fox"
    assert tok.decode(ids, skip_special_tokens=False) == "<|bos|>the quick brown fox"


def test_no_bos_when_config_says_so(tmp_path):
    write_tokenizer_dir(tmp_path, config={"bos_token_id": 0, "force_bos_token_insert": False},
                        tokenizer_config={"add_bos_token": True})
    tok = load_tokenizer(tmp_path)
    assert not tok.add_bos  # config.json's force_bos_token_insert wins over tokenizer_config
    assert tok.encode("fox") == tok.encode("fox", add_special_tokens=False)


def test_special_id_precedence(tmp_path):
    write_tokenizer_dir(
        tmp_path,
        config={"bos_token_id": 0, "eos_token_id": 2},
        generation_config={"eos_token_id": [2, 7], "bos_token_id": 1},
    )
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_ids == [2, 7] and tok.bos_token_id == 1


def test_special_ids_from_tokenizer_config_strings(tmp_path):
    write_tokenizer_dir(tmp_path, tokenizer_config={
        "bos_token": {"content": "<|bos|>"}, "eos_token": "<|eos|>", "add_bos_token": True})
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos) == (0, [2], True)
    assert tok.encode("dog")[0] == 0


def test_bad_files_are_named(tmp_path):
    write_tokenizer_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="generation_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 100000}))
    with pytest.raises(TokenizerError, match="eos_token_id .*outside"):
        load_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def _pieces(detok: StreamingDetokenizer, ids):
    return [detok.add(i) for i in ids]


def test_streaming_never_emits_broken_utf8(tmp_path):
    write_tokenizer_dir(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "日本語 🙂🚀 héllo wörld naïve café"
    ids = tok.encode(text)
    # The test is only meaningful if some character really is split across tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = tok.detokenizer()
    pieces = _pieces(detok, ids)
    assert "" in pieces  # held back while a character was incomplete
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.finalize() == text == detok.text


def test_finalize_flushes_bytes_that_never_complete(tmp_path):
    write_tokenizer_dir(tmp_path)
    tok = load_tokenizer(tmp_path)
    lone_lead_byte = tok.token_to_id("ã")  # byte 0xE3: starts a 3-byte character
    assert lone_lead_byte is not None
    ids = tok.encode("fox ") + [lone_lead_byte]
    detok = tok.detokenizer()
    shown = "".join(_pieces(detok, ids))
    assert shown == "fox "
    rest = detok.finalize()
    assert shown + rest == tok.decode(ids) and rest == "\ufffd"


def test_streaming_with_context_keeps_leading_space(tmp_path):
    write_tokenizer_dir(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("the quick brown fox jumps")
    split = 3
    detok = tok.detokenizer(context=ids[:split])
    tail = "".join(_pieces(detok, ids[split:])) + detok.finalize()
    assert tok.decode(ids[:split]) + tail == "the quick brown fox jumps"


def test_encode_rejects_non_text(tmp_path):
    write_tokenizer_dir(tmp_path)
    with pytest.raises(TypeError, match="str"):
        load_tokenizer(tmp_path).encode([1, 2])
    with pytest.raises(TokenizerError, match="no bos_token_id"):
        Tokenizer(train_tiny_tokenizer(), add_bos=True)


def test_streaming_detokenizer_goes_on_where_the_decoder_rewrites_returned_text():
    """ByteFallback decodes a run of byte tokens that is no UTF-8 as a U+FFFD a byte, rewriting
    text already returned: "X" (<0x58>), <0xF0>, "y" decode as "\\ufffd\\ufffdy". DecodeStream
    then failed ("Invalid prefix") at "y" and at every later id: `generate` raised mid-reply.
    Text returned stays, the pieces go on with the decode's characters past it, and later ids
    decode as before."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for char in " abcxy":
        vocab[char] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok = Tokenizer(hf)
    ids = [vocab["<0x58>"], vocab["<0xF0>"], vocab["y"], vocab[" "], vocab["x"], vocab["<0xC3>"], vocab["<0xA9>"]]
    assert tok.decode(ids) == "\ufffd\ufffdy x\u00e9"
    stream = tok.detokenizer()
    pieces = [stream.add(i) for i in ids] + [stream.finalize()]
    assert pieces == ["X", "", "\ufffdy", " ", "x", "", "\u00e9", ""]
    assert stream.text == "X\ufffdy x\u00e9" and len(stream.text) == len(tok.decode(ids))
    # A rewrite by the last ids: finalize gives the decode's characters past those returned.
    stream = tok.detokenizer()
    assert [stream.add(i) for i in ids[:2]] == ["X", ""] and stream.finalize() == "\ufffd"
