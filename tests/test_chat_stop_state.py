"""A chat turn that a stop string ends keeps the reply as shown in the session: neither the stop
string nor text after it inside the token that completed it (the next turn was conditioned on
text the user never saw)."""

from __future__ import annotations

import pytest

import xlstm_metal  # noqa: F401
from xlstm_metal.generation import DEFAULT_MODEL_DIR, xLSTMRunner


@pytest.fixture(scope="module")
def runner():
    return xLSTMRunner(DEFAULT_MODEL_DIR, dtype="float32")


@pytest.mark.parametrize("prompt, stop", [("def main():", "\n"), ("A list in Python", ".")])
def test_the_next_turn_continues_the_reply_as_shown(runner, prompt, stop):
    runner.reset_state()
    chunks = list(runner.stream(prompt, max_tokens=40, stop=stop, keep_state=True))
    assert chunks[-1].finish_reason == "stop"
    shown = "".join(c.text for c in chunks)
    last = runner.tokenizer.decode([chunks[-1].token])
    assert stop in last and stop not in shown  # the last token carried the stop string, not shown
    asked = runner.encode(prompt)
    reply = runner.encode(shown, add_special_tokens=False) if shown else []
    assert runner.session_tokens == asked + reply  # the conversation so far: the reply as shown
    follow = " x = 1"
    continued = [c.token for c in runner.stream(follow, max_tokens=12, keep_state=True)]
    at_once = xLSTMRunner(runner.model, runner.tokenizer).generate(
        asked + reply + runner.encode(follow, add_special_tokens=False), max_tokens=12)
    assert continued == at_once
