"""`xlstm-metal serve`: the legacy /v1/completions ``text_offset`` where one character's bytes
are split across tokens (an emoji, a CJK character under a byte-level BPE).

OpenAI's (and vLLM's) text_offset of a token is the length of the text decoded from all the
tokens before it, counted here from the start of the prompt (as OpenAI does, echo or not). A
token holding only some bytes of a character adds nothing; the token completing it adds the
character. The offsets never decrease, and the last one plus the length of the text its token
completes is the prompt's length plus the returned text's.

The tiny byte-level BPE of test_serve knows no emoji or CJK character: each is one token per
byte. The random model is steered to a scripted reply (each token's successor gets all the
probability), so the tokens, the text and the offsets are known exactly. Nothing downloads."""

import mlx.core as mx
import numpy as np
import pytest
from test_serve import post, stream_events, write_checkpoint

mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm.tokenizer_utils import _byte_decoder  # noqa: E402

from xlstm_metal.mlx_lm_model import ModelLarge  # noqa: E402
from xlstm_metal.serve import make_server, server_args  # noqa: E402

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve_text_offset") / "ckpt")


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return mlx_lm.load(str(ckpt), trust_remote_code=True)[1]


@pytest.fixture(scope="module")
def server(ckpt):
    with make_server(server_args(ckpt, port=0, dtype="float32")).start() as srv:
        yield srv


def byte_token(tokenizer, byte: int) -> int:
    """The id of the token of one byte (the GPT-2 byte alphabet)."""
    char = {b: c for c, b in _byte_decoder().items()}[byte]
    return tokenizer.convert_tokens_to_ids(char)


def byte_tokens(tokenizer, text: str) -> list[int]:
    return [byte_token(tokenizer, b) for b in text.encode()]


@pytest.fixture
def scripted(monkeypatch, tokenizer):
    """``scripted(after, reply_ids)``: the model answers a prompt ending in ``after`` (a token id,
    or a one-character prompt: its last token) with ``reply_ids``. Every token's logits put all
    the probability on the successor the scripts give it (scripts must not give a token two
    successors)."""
    successor = {}
    call = ModelLarge.__call__

    def forward(self, inputs, cache=None):
        logits = call(self, inputs, cache)  # the recurrent state moves on as usual
        table = np.full((logits.shape[-1], logits.shape[-1]), -30.0, np.float32)
        for token, following in successor.items():
            table[token, following] = 30.0
        return mx.array(table)[inputs].astype(logits.dtype)

    monkeypatch.setattr(ModelLarge, "__call__", forward)

    def script(after: int | str, reply: list[int]) -> None:
        chain = [after if isinstance(after, int) else tokenizer.encode(after)[-1], *reply]
        for token, following in zip(chain, chain[1:]):
            assert successor.setdefault(token, following) == following, "a token with two successors"

    return script


def completion(server, prompt, n, stream=False):
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 1}
    if not stream:
        status, answer = post(server.url, "/v1/completions", body)
        assert status == 200, answer
        choice = answer["choices"][0]
        return choice["text"], choice["logprobs"]
    events = stream_events(server.url, "/v1/completions", {**body, "stream": True})
    choices = [e["choices"][0] for e in events if e["choices"]]
    logprobs = {key: [v for c in choices for v in c["logprobs"][key]]
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    return "".join(c["text"] for c in choices), logprobs


def check_consistent(prompt, text, logprobs, completed_by_last):
    """Offsets never decrease, and they end where the returned text does."""
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets)
    assert offsets[-1] + len(completed_by_last) == len(prompt) + len(text)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_character_split_across_tokens_counts_once_at_its_last_token(server, tokenizer, scripted, stream):
    """"x😀y中 z": the emoji is 4 tokens (one per byte), 中 3. Each byte token is "\\ufffd" (its
    bytes decoded with replacement; the 😀's trailing bytes are one U+FFFD each, as Python
    decodes lone continuation bytes), and their offsets stay at the character's start until the
    token that completes it. Summing the token strings' lengths (the old offsets) counted 4
    characters for the emoji and 3 for 中, and ran 5 past the text by the end."""
    reply = [byte_token(tokenizer, ord("x")), *byte_tokens(tokenizer, "😀"), byte_token(tokenizer, ord("y")),
             *byte_tokens(tokenizer, "中"), byte_token(tokenizer, ord(" ")), byte_token(tokenizer, ord("z"))]
    scripted("a", reply)
    text, logprobs = completion(server, "a", len(reply), stream)
    assert text == "x😀y中 z"
    assert logprobs["tokens"] == ["x", *[REPLACEMENT] * 4, "y", *[REPLACEMENT] * 3, " ", "z"]
    #                                x  f0 9f 98 80  y  e4 b8 ad  " "  z      (after the prompt "a")
    assert logprobs["text_offset"] == [1, 2, 2, 2, 2, 3, 4, 4, 4, 5, 6]
    assert [list(top) for top in logprobs["top_logprobs"]] == [[t] for t in logprobs["tokens"]]
    assert logprobs["token_logprobs"] == pytest.approx([0.0] * len(reply), abs=1e-6)
    check_consistent("a", text, logprobs, "z")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_reply_ending_in_a_completed_character(server, tokenizer, scripted, stream):
    """The reply's last token completes a 3-byte character: its offset is the character's start,
    and that offset plus the character's length is the end of the text."""
    reply = [byte_token(tokenizer, ord("q")), *byte_tokens(tokenizer, "€")]
    scripted("c", reply)
    text, logprobs = completion(server, "c", len(reply), stream)
    assert text == "q€"
    assert logprobs["text_offset"] == [1, 2, 2, 2]
    check_consistent("c", text, logprobs, "€")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_the_leading_space_the_reply_drops_is_not_counted(server, tokenizer, scripted, stream):
    """mlx-lm's byte-level detokenizer drops a reply's leading space ("Ġt" then é comes back as
    "té"): the offsets follow the text it returns, so the split é sits at 1 + len("t")."""
    space_t = tokenizer.convert_tokens_to_ids("Ġt")
    assert space_t != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(space_t) == "Ġt"
    reply = [space_t, *byte_tokens(tokenizer, "é"), byte_token(tokenizer, ord("w"))]
    scripted("b", reply)
    text, logprobs = completion(server, "b", len(reply), stream)
    assert text == "téw"
    assert logprobs["tokens"] == [" t", REPLACEMENT, REPLACEMENT, "w"]
    assert logprobs["text_offset"] == [1, 2, 2, 3]
    check_consistent("b", text, logprobs, "w")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_bytes_that_never_form_a_character_count_before_the_token_that_shows_it(server, tokenizer, scripted,
                                                                                stream):
    """0xF0 0x9F (an emoji's start) then "y", and 0xFF then "z": each bad run is one U+FFFD of
    the text, which the decoder gives only at the next token's first byte, together with that
    token's own character. The U+FFFD is the earlier tokens' text, so "y" starts after it: the
    counts put "y" and "z" one character early (offsets [.., 2, 4, 4]) and "y"'s text ran past
    the next token's offset."""
    reply = [byte_token(tokenizer, ord("x")), byte_token(tokenizer, 0xF0), byte_token(tokenizer, 0x9F),
             byte_token(tokenizer, ord("y")), byte_token(tokenizer, 0xFF), byte_token(tokenizer, ord("z"))]
    scripted("d", reply)
    text, logprobs = completion(server, "d", len(reply), stream)
    assert text == f"x{REPLACEMENT}y{REPLACEMENT}z"
    assert logprobs["tokens"] == ["x", REPLACEMENT, REPLACEMENT, "y", REPLACEMENT, "z"]
    #                                x  f0 9f  y  ff  z      (after the prompt "d")
    assert logprobs["text_offset"] == [1, 2, 2, 3, 4, 5]
    for token, offset in zip(logprobs["tokens"], logprobs["text_offset"]):
        if token != REPLACEMENT:  # each whole character sits at its offset in prompt + text
            assert ("d" + text)[offset] == token
    check_consistent("d", text, logprobs, "z")


def test_an_echoed_prompt_of_ids_with_a_bad_byte_run(server, tokenizer, scripted):
    """The echoed prompt's offsets follow the same rule: a prompt of ids "p", 0xE0 (a 3-byte
    character's start), "q" decodes to "p\\ufffdq", and "q" sits at 2, not 1."""
    prompt = [byte_token(tokenizer, ord("p")), byte_token(tokenizer, 0xE0), byte_token(tokenizer, ord("q"))]
    reply = [byte_token(tokenizer, ord("r"))]
    scripted(prompt[-1], reply)
    status, answer = post(server.url, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0,
                                                          "logprobs": 1, "echo": True})
    assert status == 200, answer
    choice = answer["choices"][0]
    assert choice["text"] == f"p{REPLACEMENT}qr"
    assert choice["logprobs"]["tokens"] == ["p", REPLACEMENT, "q", "r"]
    assert choice["logprobs"]["text_offset"] == [0, 1, 2, 3]
