"""`xlstm-metal chat`'s commands, driven through its input function on a tiny checkpoint."""

import io

import pytest
from conftest import tiny_model
from test_tokenizer import train_tiny_tokenizer

from xlstm_metal.cli.chat import chat_loop
from xlstm_metal.generation import xLSTMRunner


class Args:
    max_tokens, temperature, top_k, top_p, min_p, repetition_penalty = 4, 0.0, 0, 1.0, 0.0, 1.0
    seed, stop, verbose = None, [], False


@pytest.fixture(scope="module")
def chat_runner():
    hf = train_tiny_tokenizer()
    from xlstm_metal.generation.tokenizer import Tokenizer

    return xLSTMRunner(tiny_model(2, vocab_size=hf.get_vocab_size()), Tokenizer(hf))


def _recording(runner):
    fed = []
    stream = runner.stream

    def recording(text, **kwargs):
        fed.append(text)
        return stream(text, **kwargs)

    runner.stream = recording
    return fed


def test_a_command_with_words_after_it_is_refused_not_sent(chat_runner):
    """"/reset now" and "/quit please" were sent to the model as turns: the conversation was
    neither reset nor ended, and the words stayed in its state."""
    runner = xLSTMRunner(chat_runner.model, chat_runner.tokenizer)
    fed = _recording(runner)
    lines = iter(["the quick", "/reset now", "/quit please", "//reset now", "/help me", "/quit", "never read"])
    out, err = io.StringIO(), io.StringIO()
    assert chat_loop(runner, Args(), input_fn=lambda _: next(lines), out=out, err=err) == 0
    assert next(lines) == "never read"  # the bare /quit ended the chat
    assert [t.strip() for t in fed] == ["the quick", "/reset now"]  # only the // line went as text
    for word in ("/reset", "/quit", "/help"):
        assert f"({word} takes nothing after it" in err.getvalue()
    text = runner.tokenizer.decode(runner.session_tokens)
    assert "please" not in text and "me" not in text.split()
    assert text.startswith("the quick\n")  # not reset
