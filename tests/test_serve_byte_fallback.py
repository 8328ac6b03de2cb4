"""`xlstm-metal serve` with SentencePiece-style tokenizers (Llama's, Mistral's, Gemma's
tokenizer.json): "▁" for a space, and byte-fallback tokens ``<0x00>`` ... ``<0xFF>`` spelling a
character missing from the vocabulary as its UTF-8 bytes, one token each.

A token's own text is its bytes decoded ("▁x" is " x", ``<0xF0>`` is the byte 0xF0, "\\ufffd" on
its own). The server decoded each token alone through the tokenizer's decoder: "x" for "▁x"
(Llama's Strip drops the text's leading space) and "\\ufffd" for a byte-fallback token that is no
whole character. So /v1/completions' token strings lost their spaces, text_offset ran behind the
text by a space a word and ahead by a U+FFFD a byte of a split character, and chat's ``bytes``
were those of U+FFFD ([239, 191, 189]) in place of the token's byte.

Three tokenizers, one vocabulary: Llama's decoder (mlx-lm's SentencePiece detokenizer, the
reply's leading space dropped), Gemma's (the same without Strip: kept), and a plain BPE with byte
fallback and " " for a space (mlx-lm's naive detokenizer: the tokenizer decodes). The random model
is steered to a scripted reply (test_serve_text_offset's ``scripted``), so the tokens, the text and
the offsets are known exactly. Nothing downloads."""

import pytest
import test_serve_text_offset
from conftest import tiny_model
from test_serve import post, stream_events
from test_serve_text_offset import REPLACEMENT, check_consistent, completion

from xlstm_metal import save_model

mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer, SPMStreamingDetokenizer  # noqa: E402

from xlstm_metal.serve import make_server, server_args  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama's
#: The tokenizers: their space symbol, the detokenizer mlx-lm picks, and whether it drops the
#: reply's leading space.
VARIANTS = {"llama": ("▁", SPMStreamingDetokenizer, True), "gemma": ("▁", SPMStreamingDetokenizer, False),
            "plain": (" ", NaiveStreamingDetokenizer, False)}
F = REPLACEMENT  # a byte-fallback token's own text when its byte is no whole character
scripted = test_serve_text_offset.scripted  # the fixture, on this module's tokenizer


def byte_fallback_tokenizer(variant: str):
    """A BPE over a space symbol, a-z, ".,:" and a few merges, with byte fallback: any other
    character (capitals, "é", "😀") is its UTF-8 bytes, one token each. "llama" normalizes and
    decodes as Llama's tokenizer.json does, "gemma" as Gemma's (no Strip)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    space = VARIANTS[variant][0]
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in space + "abcdefghijklmnopqrstuvwxyz.,:":
        vocab[char] = len(vocab)
    merges = [(space, "t"), ("h", "e"), (space + "t", "he"), (space, "x")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [decoders.ByteFallback(), decoders.Fuse()]
    if variant != "plain":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        steps = [decoders.Replace("▁", " "), *steps, *([decoders.Strip(" ", 1, 0)] if variant == "llama" else [])]
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens(SPECIALS)
    return tok


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, variant):
    tok = byte_fallback_tokenizer(variant)
    model = tiny_model(5, vocab_size=tok.get_vocab_size(), bos_token_id=1, pad_token_id=None, eos_token_id=None)
    return save_model(model, tmp_path_factory.mktemp(f"serve_byte_fallback_{variant}") / "ckpt", tokenizer=tok)


@pytest.fixture(scope="module")
def tokenizer(ckpt, variant):
    tokenizer = mlx_lm.load(str(ckpt), trust_remote_code=True)[1]
    _, detokenizer, trims = VARIANTS[variant]
    assert type(tokenizer.detokenizer) is detokenizer
    assert getattr(tokenizer.detokenizer, "trim_space", False) == trims
    return tokenizer


@pytest.fixture(scope="module")
def server(ckpt):
    with make_server(server_args(ckpt, port=0, dtype="float32")).start() as srv:
        yield srv


def ids(tokenizer, variant, text_tokens):
    """The ids of tokens named as in Llama's vocabulary ("▁" for a space) in this variant's."""
    space = VARIANTS[variant][0]
    found = tokenizer.convert_tokens_to_ids([t.replace("▁", space) for t in text_tokens])
    assert tokenizer.unk_token_id not in found, text_tokens
    return found


def byte_tokens(text):
    return [f"<0x{byte:02X}>" for byte in text.encode()]


#: "the 😀Xy中 x": the emoji, X and 中 are byte-fallback tokens, one per byte. (X before the emoji
#: comes back twice from mlx-lm's naive detokenizer, "XX😀": the tokenizer decodes a run of byte
#: tokens that is no UTF-8 as a U+FFFD a token, so "... X" becomes "... \ufffd\ufffd" at <0xF0>,
#: which that detokenizer holds back whole as unfinished: its text shrinks by the X, and its next
#: segment starts before it. mlx-lm's to mend, not this server's logprobs.)
REPLY = ["▁the", "▁", *byte_tokens("😀"), "<0x58>", "y", *byte_tokens("中"), "▁x"]
REPLY_TOKENS = [" the", " ", F, F, F, F, "X", "y", F, F, F, " x"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_byte_fallback_characters_count_once_at_their_last_token(server, tokenizer, variant, scripted, stream):
    """Each byte-fallback token's string is its byte decoded ("X" for <0x58>, U+FFFD for a part of
    a character); the offsets of a split character's tokens stay at its start until the token
    completing it, and a "▁" word counts its space (but for the reply's first, where Llama's
    decoder drops it). The old offsets: [1, 4, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13] under Llama's
    (tokens "the", "", U+FFFD ..., "X", "y", U+FFFD ..., "x")."""
    reply = ids(tokenizer, variant, REPLY)
    scripted("a", reply)
    text, logprobs = completion(server, "a", len(reply), stream)
    assert text == tokenizer.decode(reply) == ("" if variant == "llama" else " ") + "the 😀Xy中 x"
    assert logprobs["tokens"] == REPLY_TOKENS
    #                                 the " " f0 9f 98 80 X y e4 b8 ad " x"   (after the prompt "a")
    assert logprobs["text_offset"] == ([1, 4, 5, 5, 5, 5, 6, 7, 8, 8, 8, 9] if variant == "llama" else
                                       [1, 5, 6, 6, 6, 6, 7, 8, 9, 9, 9, 10])
    assert [list(top) for top in logprobs["top_logprobs"]] == [[t] for t in REPLY_TOKENS]
    assert logprobs["token_logprobs"] == pytest.approx([0.0] * len(reply), abs=1e-6)
    check_consistent("a", text, logprobs, " x")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_reply_opening_with_a_space_and_a_split_character(server, tokenizer, variant, scripted, stream):
    """"▁", é in two byte tokens, "▁x": Llama's decoder drops the leading space, so é's bytes sit
    at the prompt's end; the others keep it."""
    reply = ids(tokenizer, variant, ["▁", *byte_tokens("é"), "▁x"])
    scripted("b", reply)
    text, logprobs = completion(server, "b", len(reply), stream)
    assert text == tokenizer.decode(reply) == ("" if variant == "llama" else " ") + "é x"
    assert logprobs["tokens"] == [" ", F, F, " x"]
    assert logprobs["text_offset"] == ([1, 1, 1, 2] if variant == "llama" else [1, 2, 2, 3])
    check_consistent("b", text, logprobs, " x")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_echo_puts_the_prompt_before_a_byte_fallback_reply(server, tokenizer, variant, scripted, stream):
    """Echo, and echo with logprobs: the prompt's tokens first (their text_offset counting the
    prompt, a "▁" the normalizer put before it not counted), then the reply's entries as without echo."""
    reply = ids(tokenizer, variant, REPLY)
    scripted("a", reply)
    body = {"prompt": "a", "max_tokens": len(reply), "temperature": 0, "echo": True}
    if stream:
        events = stream_events(server.url, "/v1/completions", {**body, "stream": True})
        text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    else:
        status, answer = post(server.url, "/v1/completions", body)
        assert status == 200, answer
        text = answer["choices"][0]["text"]
    assert text == "a" + tokenizer.decode(reply)
    status, echoed = post(server.url, "/v1/completions", {**body, "logprobs": 1})
    assert status == 200, echoed
    status, plain = post(server.url, "/v1/completions", {**body, "logprobs": 1, "echo": False})
    assert status == 200, plain
    echoed, plain = echoed["choices"][0]["logprobs"], plain["choices"][0]["logprobs"]
    prompt = ["a"] if variant == "plain" else [" ", "a"]  # "▁a" is no token of this vocabulary
    n = len(prompt)
    assert echoed["tokens"] == prompt + plain["tokens"]
    assert echoed["text_offset"] == [0] * n + plain["text_offset"]
    assert echoed["token_logprobs"][n:] == plain["token_logprobs"]
    # The server puts a BOS before the prompt: its first token has a logprob too.
    assert all(isinstance(value, float) for value in echoed["token_logprobs"][:n])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_chat_logprobs_bytes_of_byte_fallback_tokens_are_their_bytes(server, tokenizer, variant, scripted, stream):
    """Chat's ``bytes`` of a byte-fallback token is its byte ([240] for <0xF0>), not the UTF-8 of
    U+FFFD; of "▁x" those of " x"; the top_logprobs entries likewise."""
    reply = ids(tokenizer, variant, [*byte_tokens("😀"), "▁x", "<0x41>"])
    scripted("Assistant:", reply)  # the chat prompt ends "...\nAssistant:"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": len(reply), "temperature": 0,
            "logprobs": True, "top_logprobs": 1}
    if stream:
        events = stream_events(server.url, "/v1/chat/completions", {**body, "stream": True})
        choices = [e["choices"][0] for e in events if e["choices"]]
        text = "".join(c["delta"].get("content") or "" for c in choices)
        content = [entry for c in choices if c.get("logprobs") for entry in c["logprobs"]["content"]]
    else:
        status, answer = post(server.url, "/v1/chat/completions", body)
        assert status == 200, answer
        text, content = answer["choices"][0]["message"]["content"], answer["choices"][0]["logprobs"]["content"]
    assert text == "😀 xA"
    assert [e["id"] for e in content] == reply
    assert [e["bytes"] for e in content] == [[0xF0], [0x9F], [0x98], [0x80], [32, 120], [65]]
    assert [e["token"] for e in content] == [F, F, F, F, " x", "A"]
    assert b"".join(bytes(e["bytes"]) for e in content).decode() == text
    for e in content:
        assert [(t["token"], t["bytes"]) for t in e["top_logprobs"]] == [(e["token"], e["bytes"])]


def test_ids_past_the_tokenizer_add_no_text_and_fail_no_request(variant, tmp_path):
    """A model whose vocabulary is padded past its tokenizer's may pick an id the tokenizer lacks.
    mlx-lm's SentencePiece detokenizer failed on it (IndexError in the generation thread: a 500,
    streamed or not); the reply now has no text for it, as the tokenizer decodes it, on both
    endpoints, and the padded ids' logprobs entries are "" too."""
    tok = byte_fallback_tokenizer(variant)
    size = tok.get_vocab_size()
    model = tiny_model(5, vocab_size=size + 8, bos_token_id=1, pad_token_id=None, eos_token_id=None)
    path = save_model(model, tmp_path / "ckpt", tokenizer=tok)
    bias = {"logit_bias": {str(size + 5): 100}, "max_tokens": 3, "temperature": 0}
    with make_server(server_args(path, port=0, dtype="float32")).start() as srv:
        status, answer = post(srv.url, "/v1/completions", {"prompt": "the", "logprobs": 1, **bias})
        assert status == 200, answer
        choice = answer["choices"][0]
        assert choice["text"] == "" and choice["finish_reason"] == "length"
        assert choice["logprobs"]["tokens"] == ["", "", ""]
        events = stream_events(srv.url, "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}], "stream": True, **bias})
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == ""
        # Text around it is untouched: a plain reply of the same server.
        status, answer = post(srv.url, "/v1/completions", {"prompt": "the", "max_tokens": 4, "temperature": 0})
        assert status == 200 and answer["choices"][0]["finish_reason"] == "length"
