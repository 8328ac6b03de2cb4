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
fallback and " " for a space (where mlx-lm picks its naive detokenizer, the server decodes through
ours: the reply is the tokenizer's decode). The random model is steered to a scripted reply
(test_serve_text_offset's ``scripted``), so the tokens, the text and the offsets are known exactly.
Nothing downloads."""

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


#: "the X😀y中 x": X, the emoji and 中 are byte-fallback tokens, one per byte. X before the emoji
#: came back twice under the plain tokenizer ("XX😀"): mlx-lm's naive detokenizer cuts its text's
#: trailing U+FFFDs as an unfinished character, and the tokenizer decodes a run of byte tokens that
#: is no UTF-8 as a U+FFFD a token, so at <0xF0> "X" read "\ufffd\ufffd": the text shrank by the X
#: and the next segment repeated it.
REPLY = ["▁the", "▁", "<0x58>", *byte_tokens("😀"), "y", *byte_tokens("中"), "▁x"]
REPLY_TOKENS = [" the", " ", "X", F, F, F, F, "y", F, F, F, " x"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_byte_fallback_characters_count_once_at_their_last_token(server, tokenizer, variant, scripted, stream):
    """Each byte-fallback token's string is its byte decoded ("X" for <0x58>, U+FFFD for a part of
    a character); the offsets of a split character's tokens stay at its start until the token
    completing it, and a "▁" word counts its space (but for the reply's first, where Llama's
    decoder drops it). The old offsets: [1, 4, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13] under Llama's
    (tokens "the", "", "X", U+FFFD ..., "y", U+FFFD ..., "x"). The plain tokenizer's text was
    " the XX😀y中 x" (mlx-lm's naive detokenizer)."""
    reply = ids(tokenizer, variant, REPLY)
    scripted("a", reply)
    text, logprobs = completion(server, "a", len(reply), stream)
    assert text == tokenizer.decode(reply) == ("" if variant == "llama" else " ") + "the X😀y中 x"
    assert logprobs["tokens"] == REPLY_TOKENS
    #                                 the " " X f0 9f 98 80 y e4 b8 ad " x"   (after the prompt "a")
    assert logprobs["text_offset"] == ([1, 4, 5, 6, 6, 6, 6, 7, 8, 8, 8, 9] if variant == "llama" else
                                       [1, 5, 6, 7, 7, 7, 7, 8, 9, 9, 9, 10])
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
    assert text == "a" + tokenizer.decode(reply) == "a" + ("" if variant == "llama" else " ") + "the X😀y中 x"
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


def chat(server, n, stream):
    """(text, logprobs content) of a chat reply of ``n`` tokens to "hi", streamed or not."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": n, "temperature": 0,
            "logprobs": True, "top_logprobs": 1}
    if stream:
        events = stream_events(server.url, "/v1/chat/completions", {**body, "stream": True})
        choices = [e["choices"][0] for e in events if e["choices"]]
        text = "".join(c["delta"].get("content") or "" for c in choices)
        return text, [entry for c in choices if c.get("logprobs") for entry in c["logprobs"]["content"]]
    status, answer = post(server.url, "/v1/chat/completions", body)
    assert status == 200, answer
    return answer["choices"][0]["message"]["content"], answer["choices"][0]["logprobs"]["content"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_chat_logprobs_bytes_of_byte_fallback_tokens_are_their_bytes(server, tokenizer, variant, scripted, stream):
    """Chat's ``bytes`` of a byte-fallback token is its byte ([240] for <0xF0>), not the UTF-8 of
    U+FFFD; of "▁x" those of " x"; the top_logprobs entries likewise. The reply's text has the A
    before the emoji once ("AA😀 x" under the plain tokenizer, from mlx-lm's naive detokenizer)."""
    reply = ids(tokenizer, variant, ["<0x41>", *byte_tokens("😀"), "▁x"])
    scripted("Assistant:", reply)  # the chat prompt ends "...\nAssistant:"
    text, content = chat(server, len(reply), stream)
    assert text == "A😀 x"
    assert [e["id"] for e in content] == reply
    assert [e["bytes"] for e in content] == [[65], [0xF0], [0x9F], [0x98], [0x80], [32, 120]]
    assert [e["token"] for e in content] == ["A", F, F, F, F, " x"]
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


#: X, then 😀 é 中 in a row, each unfinished over several byte tokens (4, 2 and 3), then "y": one
#: run of 10 byte tokens. mlx-lm's naive detokenizer wrote "XX😀X😀éX😀é中y" for it (each
#: unfinished character cut the text back to before the X, and the next segment repeated it all).
RUN = ["<0x58>", *byte_tokens("😀é中"), "y"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_several_unfinished_characters_in_a_row_come_back_once(server, tokenizer, variant, scripted, stream):
    reply = ids(tokenizer, variant, ["▁the", *RUN, "▁x"])
    scripted("c", reply)
    text, logprobs = completion(server, "c", len(reply), stream)
    assert text == tokenizer.decode(reply) == ("" if variant == "llama" else " ") + "theX😀é中y x"
    assert logprobs["tokens"] == [" the", "X", *[F] * 9, "y", " x"]
    #                                 the X  f0 9f 98 80 c3 a9 e4 b8 ad y " x"   (after the prompt "c")
    assert logprobs["text_offset"] == ([1, 4, 5, 5, 5, 5, 6, 6, 7, 7, 7, 8, 9] if variant == "llama" else
                                       [1, 5, 6, 6, 6, 6, 7, 7, 8, 8, 8, 9, 10])
    check_consistent("c", text, logprobs, " x")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_several_unfinished_characters_in_a_row_in_a_chat_reply(server, tokenizer, variant, scripted, stream):
    reply = ids(tokenizer, variant, [*RUN, "▁x"])
    scripted("Assistant:", reply)
    text, content = chat(server, len(reply), stream)
    assert text == "X😀é中y x"
    assert b"".join(bytes(e["bytes"]) for e in content).decode() == text
    assert [e["id"] for e in content] == reply


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_byte_run_that_is_no_utf8_keeps_the_text_sent(server, tokenizer, variant, scripted, stream):
    """X, then <0xF0> that no continuation byte follows, then "y": the tokenizer decodes the run
    (X, <0xF0>) as a U+FFFD a byte, "\\ufffd\\ufffdy", rewriting the X already sent. The reply keeps
    the X and takes the decode's characters past it, "X\\ufffdy", as the SentencePiece
    detokenizers write it too (the naive one wrote "X\\ufffd\\ufffdy"; our StreamingDetokenizer
    failed here: tokenizers' DecodeStream raised "Invalid prefix" at "y" and at every later token).
    The tokens after it decode as usual."""
    reply = ids(tokenizer, variant, ["<0x58>", "<0xF0>", "y", "▁x"])
    scripted("d", reply)
    text, logprobs = completion(server, "d", len(reply), stream)
    assert tokenizer.decode(reply) == F + F + "y x"
    assert text == "X" + F + "y x"
    assert logprobs["tokens"] == ["X", F, "y", " x"]
    # The U+FFFD is <0xF0>'s (the decoder gives it at "y"'s byte): "y" sits after it, at 3 (it was 2)
    assert logprobs["text_offset"] == [1, 2, 3, 4]
    check_consistent("d", text, logprobs, " x")
    scripted("Assistant:", reply)
    assert chat(server, len(reply), stream)[0] == "X" + F + "y x"


def test_each_request_detokenizes_on_its_own(ckpt, variant):
    """The server's tokenizer (load_for_serving) hands each request a copy of one detokenizer:
    two replies detokenized at once, token by token, keep to their own text, which is at each
    step the decode of the tokens so far less an unfinished character at its end, and after
    finalize the whole decode. An id past the tokenizer's adds no text. mlx-lm's SentencePiece
    detokenizers stay those of the SentencePiece variants."""
    from xlstm_metal.serve import load_for_serving

    tokenizer = load_for_serving(ckpt, dtype="float32")[1]
    if variant != "plain":
        assert type(tokenizer._detokenizer) is SPMStreamingDetokenizer
        return
    padded = len(tokenizer) + 1
    first = ids(tokenizer, variant, ["▁the", *RUN, "▁x"])
    second = ids(tokenizer, variant, ["<0x41>", *byte_tokens("中"), "▁x", "<0xC3>"])
    first.insert(3, padded)  # inside 😀's bytes
    texts = {0: [], 1: []}
    detokenizers = [tokenizer.detokenizer, tokenizer.detokenizer]
    for step in range(max(len(first), len(second))):
        for k, reply in enumerate((first, second)):
            if step < len(reply):
                detokenizers[k].add_token(reply[step])
                texts[k].append(detokenizers[k].last_segment)
    for k in texts:
        detokenizers[k].finalize()
        texts[k].append(detokenizers[k].last_segment)
    assert "".join(texts[0]) == detokenizers[0].text == " theX😀é中y x" == tokenizer.decode(first)
    assert "".join(texts[1]) == detokenizers[1].text == "A中 x" + F == tokenizer.decode(second)
    assert texts[0] == [" the", "X", "", "", "", "", "😀", "", "é", "", "", "中", "y", " x", ""]
    assert texts[1] == ["A", "", "", "中", " x", "", F]
    assert detokenizers[0].tokens == first and detokenizers[1].tokens == second
    assert type(tokenizer._detokenizer) is not NaiveStreamingDetokenizer
