"""Session 53's hunt over generation and chat: the runner's stream, generate and the chat loop."""

import io

import pytest
from conftest import tiny_model

import xlstm_metal  # noqa: F401
from xlstm_metal.cli.chat import chat_loop
from xlstm_metal.generation import DEFAULT_MODEL_DIR, xLSTMRunner


@pytest.fixture(scope="module")
def runner():
    return xLSTMRunner(DEFAULT_MODEL_DIR, dtype="float32")


class Args:
    max_tokens, temperature, top_k, top_p, min_p, repetition_penalty = 40, 0.0, 0, 1.0, 0.0, 1.0
    seed, verbose = None, False


def test_a_reply_interrupted_with_text_held_for_a_stop_string_keeps_the_reply_as_shown(runner):
    class Out(io.StringIO):  # Ctrl-C after the 6th write (while the next token is computed)
        def write(self, text, n=[0]):
            super().write(text)
            n[0] += 1
            if n[0] == 6:
                raise KeyboardInterrupt

    runner.reset_state()
    args, out, turns = Args(), Out(), iter(["To open a file in Python,", "/quit"])
    args.stop = ["\n\nZZZZZZZZZZ"]  # 10 characters held back until they cannot start it
    chat_loop(runner, args, input_fn=lambda _: next(turns), out=out, err=io.StringIO())
    shown = out.getvalue().strip("\n")
    assert len(shown) > 5
    # the model went on with text the user never saw (" retained solely" after "... re")
    assert runner.tokenizer.decode(runner.session_tokens) == "To open a file in Python,\n\n" + shown


def test_a_prompt_ending_inside_a_character_is_not_streamed_again(runner):
    ids = runner.tokenizer.encode("The café")[:-1]  # é's second byte left out
    assert runner.tokenizer.decode(ids) == "The caf\ufffd"
    reply = runner.generate(ids, max_tokens=6)
    assert reply[0] == 105  # the model completes the é
    pieces = [c.text for c in runner.stream(ids, max_tokens=6)]
    assert "".join(pieces) == runner.tokenizer.decode(reply) and not pieces[0].startswith("The")  # was "The café"
    assert runner.generate(ids, max_tokens=6, stop="The") == reply  # a stop string in the prompt: no stop


def test_a_stream_closed_after_a_reset_leaves_the_session_reset(runner):
    runner.reset_state()
    stream = runner.stream("To open a file in Python,", max_tokens=20, stop="ZZZZZZZZZZ", keep_state=True)
    [next(stream) for _ in range(5)]
    runner.reset_state()
    stream.close()
    assert runner.session_tokens == []


@pytest.mark.parametrize("stop", [b"\n", bytearray(b"ab"), 2.5])
def test_stop_as_bytes_or_a_float_is_refused_by_name(runner, stop):
    for call in (runner.generate, lambda *a, **k: list(runner.stream(*a, **k))):
        with pytest.raises(TypeError, match="stop must be a str, a token id or a list"):  # b"\n" stopped at id 10
            call("To open a file", max_tokens=3, stop=stop)


@pytest.mark.parametrize("first", ["// a C comment", "/reset the counter", "/quit"])
def test_a_first_turn_given_by_flag_is_text_not_a_command(runner, first):
    runner.reset_state()
    args, err, turns = Args(), io.StringIO(), iter(["/quit"])
    args.stop, args.max_tokens = [], 3
    chat_loop(runner, args, first_turn=first, input_fn=lambda _: next(turns), out=io.StringIO(), err=err)
    # "// x" lost a slash, "/reset ..." was refused and dropped, "/quit" quit at once
    assert runner.tokenizer.decode(runner.session_tokens).startswith(first + "\n") and err.getvalue().count("(") == 0


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_latin_1_terminal_shows_what_it_cannot_encode_as_a_question_mark(runner, monkeypatch, command):
    from xlstm_metal.cli import main

    out = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stdin", io.StringIO("/quit\n"))
    expected = runner.tokenizer.decode(runner.generate("The “" + "\n" * (command == "chat"), 12))
    assert "“" in expected  # the model's curly quotes: exit code 2 at the first one
    assert main([command, "--temp", "0", "--repetition-penalty", "1", "-n", "12", "--prompt", "The “"]) == 0
    out.flush()
    shown = out.buffer.getvalue().decode("latin-1")
    assert shown.strip("\n") == expected.encode("latin-1", "replace").decode().strip("\n")  # “ as ?


def test_a_reply_stopped_inside_a_character_leaves_its_first_bytes_out_of_the_session(runner):
    chat, tok = xLSTMRunner(tiny_model(vocab_size=4096), runner.tokenizer), runner.tokenizer
    stream = chat.stream("hi", max_tokens=30, temperature=1.0, seed=5, keep_state=True)
    chunks = [next(stream) for _ in range(6)]
    assert chunks[-1].text == ""  # a character's first byte, not shown
    stream.close()
    before = chat.session_tokens  # held the byte: the next turn followed a broken character
    assert tok.decode(before) == "hi" + "".join(c.text for c in chunks)
    nxt = [c.token for c in chat.stream(" x", max_tokens=5, keep_state=True)]
    assert nxt == xLSTMRunner(chat.model, tok).generate(before + tok.encode(" x", add_special_tokens=False), 5)
