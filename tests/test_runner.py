"""xLSTMRunner: greedy == argmax loop by hand, chunked prefill, streaming, batching, sessions."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model
from mlx.utils import tree_flatten
from test_tokenizer import write_tokenizer_dir

from xlstm_metal.generation import load_tokenizer, wiring_text, xLSTMRunner
from xlstm_metal.generation.runner import format_model_info
from xlstm_metal.kernels.cpu import prefill as cpu_prefill

PROMPT = [5, 17, 33, 8, 91, 12, 40, 41, 42, 3, 77, 64, 19, 23, 50, 7, 9, 88, 13, 21, 34, 55, 60]


@pytest.fixture(scope="module")
def model():
    return tiny_model(0, eos_token_id=None)


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    """A tiny model whose vocabulary is that of a BPE trained in-process."""
    path = tmp_path_factory.mktemp("tok")
    hf = write_tokenizer_dir(path, config={"bos_token_id": 0, "eos_token_id": 2, "force_bos_token_insert": True})
    return tiny_model(1, vocab_size=hf.get_vocab_size()), load_tokenizer(path)


def argmax_loop(model, prompt, n):
    """Greedy decoding the slow, obvious way: re-run the whole sequence for every token."""
    ids, out = list(prompt), []
    for _ in range(n):
        logits, _ = model(mx.array([ids], dtype=mx.int32))
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        ids.append(token)
    return out


def test_greedy_equals_argmax_loop(model):
    expected = argmax_loop(model, PROMPT, 12)
    for chunk in (4, 16, 2048):  # prompt fed in pieces of 4, in 2 pieces, in one
        runner = xLSTMRunner(model, prefill_chunk_size=chunk)
        assert runner.generate(PROMPT, max_tokens=12) == expected
    assert xLSTMRunner(model, compile=False).generate(PROMPT, max_tokens=12) == expected
    assert xLSTMRunner(model).generate(mx.array([PROMPT]), max_tokens=12) == expected


def test_prefill_pieces_are_bounded_and_exact(model):
    calls = []

    class Recorder:
        config = model.config

        def __call__(self, ids, state=None):
            calls.append(ids.shape[1])
            return model(ids, state)

    runner = xLSTMRunner(Recorder(), prefill_chunk_size=5)
    logits, state = runner.prefill(PROMPT)
    assert calls == [5, 5, 5, 5, 3]
    ref_logits, ref_state = model(mx.array([PROMPT]))
    np.testing.assert_allclose(np.array(logits), np.array(ref_logits[:, -1]), rtol=1e-4, atol=1e-4)
    for (name, a), (_, b) in zip(tree_flatten(state), tree_flatten(ref_state)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5, err_msg=name)


def test_prefill_memory_stays_flat(model):
    def peak_of_prefill(runner, n):
        mx.eval(model.parameters())
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(*runner.prefill([i % 97 for i in range(n)]))
        return mx.get_peak_memory() - base

    # the MLX graph's memory (the CPU's C prefill keeps its own work space, bounded by
    # tests/test_cpu_prefill.py)
    with cpu_prefill.switched(False):
        chunked = xLSTMRunner(model, prefill_chunk_size=64)
        assert peak_of_prefill(chunked, 2048) < 1.5 * peak_of_prefill(chunked, 256)
        # Without pieces the same prompt needs several times the memory: the bound is real.
        whole = xLSTMRunner(model, prefill_chunk_size=4096)
        assert peak_of_prefill(whole, 2048) > 4 * peak_of_prefill(chunked, 2048)


def test_prefill_uses_last_only_logits_when_the_model_offers_them(model):
    seen = []

    class LastOnly:
        config = model.config

        def __call__(self, ids, state=None, last_only=False):
            seen.append(last_only)
            logits, state = model(ids, state)
            return (logits[:, -1:] if last_only else logits), state

    assert xLSTMRunner(LastOnly(), prefill_chunk_size=8).generate(PROMPT, max_tokens=5) == \
        argmax_loop(model, PROMPT, 5)
    assert seen[:3] == [True, True, True]  # the three prefill pieces


def test_batched_equals_one_by_one(model):
    prompts = [PROMPT, PROMPT[:3], PROMPT[7:19]]
    runner = xLSTMRunner(model, prefill_chunk_size=8)
    solo = [runner.generate(p, max_tokens=10) for p in prompts]
    assert runner.generate(prompts, max_tokens=10) == solo
    # Sampling: row r of a batch seeded s equals the prompt alone seeded s + r.
    kw = dict(max_tokens=10, temperature=1.3, top_k=40, top_p=0.95, repetition_penalty=1.2)
    solo = [runner.generate(p, seed=7 + r, **kw) for r, p in enumerate(prompts)]
    assert runner.generate(prompts, seed=7, **kw) == solo
    assert runner.generate(prompts, seed=[7, 8, 9], **kw) == solo


def test_seeded_sampling_is_reproducible(model):
    runner = xLSTMRunner(model)
    kw = dict(max_tokens=16, temperature=1.5, min_p=0.01)
    a, b, c = (runner.generate(PROMPT, seed=s, **kw) for s in (3, 3, 4))
    assert a == b and a != c
    assert a != runner.generate(PROMPT, max_tokens=16)  # really sampled, not greedy


def test_stop_ids_end_generation(model):
    runner = xLSTMRunner(model)
    full = runner.generate(PROMPT, max_tokens=12)
    stop = full[5]
    first = full.index(stop)
    assert runner.generate(PROMPT, max_tokens=12, stop=stop) == full[:first]
    # Batch: each row stops on its own; the other rows keep going.
    other = runner.generate(PROMPT[:4], max_tokens=12)
    stopped_other = other[: other.index(stop)] if stop in other else other
    assert runner.generate([PROMPT, PROMPT[:4]], max_tokens=12, stop=[stop]) == [full[:first], stopped_other]


def test_stream_equals_generate(text_setup):
    model, tok = text_setup
    runner = xLSTMRunner(model, tok)
    prompt = "the quick brown fox"
    ids = runner.generate(prompt, max_tokens=20, temperature=0.9, seed=1)
    chunks = list(runner.stream(prompt, max_tokens=20, temperature=0.9, seed=1))
    tokens = [c.token for c in chunks if c.token not in tok.eos_token_ids]
    assert tokens == ids
    assert "".join(c.text for c in chunks) == tok.decode(ids)
    assert chunks[-1].finish_reason in ("stop", "length") and all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].prompt_tokens == len(tok.encode(prompt)) and chunks[-1].generation_tokens == len(chunks)
    assert chunks[-1].generation_tps > 0 and chunks[-1].prompt_tps > 0 and chunks[-1].peak_memory_gb > 0


def test_stop_string_cuts_text(text_setup):
    model, tok = text_setup
    runner = xLSTMRunner(model, tok)
    full = "".join(c.text for c in runner.stream("héllo", max_tokens=30))
    assert len(full) > 6
    needle = full[3:6]
    cut = full[: full.index(needle)]
    chunks = list(runner.stream("héllo", max_tokens=30, stop=needle))
    assert "".join(c.text for c in chunks) == cut
    assert chunks[-1].finish_reason == "stop"
    ids = runner.generate("héllo", max_tokens=30, stop=needle)
    assert needle in tok.decode(ids) and needle not in tok.decode(ids[:-1])


def test_multi_turn_chat_equals_one_pass(text_setup):
    model, tok = text_setup
    chat = xLSTMRunner(model, tok, prefill_chunk_size=6)
    turns = ["the quick brown fox\n", "jumps over the lazy dog\n", "café 🙂\n"]
    replies = []
    for turn in turns:
        replies.append([c.token for c in chat.stream(turn, max_tokens=7, keep_state=True)])
    transcript = chat.session_tokens
    # The transcript is exactly: BOS + turn 1 + reply 1 + turn 2 + reply 2 + ...
    expected = [0]
    for turn, reply in zip(turns, replies):
        expected += tok.encode(turn, add_special_tokens=False) + reply
    assert transcript == expected
    # Each reply equals one pass over everything before it, from a fresh state.
    one_pass = xLSTMRunner(model, tok)
    position = 1
    for turn, reply in zip(turns, replies):
        position += len(tok.encode(turn, add_special_tokens=False))
        assert one_pass.generate(transcript[:position], max_tokens=7) == [t for t in reply if t not in tok.eos_token_ids]
        position += len(reply)
    # The session state equals the state of one pass over the transcript minus the pending token.
    _, state = one_pass.prefill(transcript[:-1])
    for a, b in zip(tree_flatten(chat._session.state), tree_flatten(state)):
        np.testing.assert_allclose(np.array(a[1]), np.array(b[1]), rtol=1e-4, atol=1e-5)
    chat.reset_state()
    assert chat.session_tokens == []
    again = [c.token for c in chat.stream(turns[0], max_tokens=7, keep_state=True)]
    assert again == replies[0]


def test_interrupted_stream_leaves_session_consistent(text_setup):
    model, tok = text_setup
    runner = xLSTMRunner(model, tok)
    stream = runner.stream("the lazy dog", max_tokens=50, keep_state=True)
    got = [next(stream).token for _ in range(3)]
    stream.close()  # what Ctrl-C in the consumer does to the generator
    assert runner.session_tokens[-3:] == got
    nxt = [c.token for c in runner.stream(" fox", max_tokens=5, keep_state=True)]
    one_pass = xLSTMRunner(model, tok).generate(runner.session_tokens[:-len(nxt)], max_tokens=5)
    assert nxt[: len(one_pass)] == one_pass


def test_generate_next_token_steps_the_session(model):
    runner = xLSTMRunner(model)
    expected = argmax_loop(model, PROMPT, 6)
    got = [runner.generate_next_token(PROMPT)] + [runner.generate_next_token() for _ in range(5)]
    assert got == expected
    assert runner.session_tokens == PROMPT + expected
    runner.reset_state()
    with pytest.raises(ValueError, match="session is empty"):
        runner.generate_next_token()


def test_bad_inputs(model, text_setup):
    runner = xLSTMRunner(model)
    with pytest.raises(ValueError, match="max_tokens"):
        runner.generate(PROMPT, max_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        runner.generate(PROMPT, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        runner.generate(PROMPT, top_p=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        runner.generate([1, 500])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        runner.generate("text")
    with pytest.raises(ValueError, match="empty"):
        list(runner.stream([]))
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        xLSTMRunner(model, prefill_chunk_size=0)
    assert runner.generate(PROMPT, max_tokens=0) == []
    assert runner.generate([PROMPT, PROMPT[:2]], max_tokens=0) == [[], []]


def test_model_info_and_wiring(model):
    info = xLSTMRunner(model).get_model_info()
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert info["parameters"] == n_params
    assert info["num_blocks"] == 2 and info["block_types"] == {"mLSTMBlock": 2}
    assert (info["embedding_dim"], info["num_heads"], info["vocab_size"]) == (64, 2, 97)
    assert info["dtype"] == "float32" and info["weights_bytes"] == 4 * n_params
    # C [1, 2, 16, 32] + n [1, 2, 16] + m [1, 2, 1] per block, float32.
    assert info["state_bytes_per_row"] == 2 * 4 * (2 * 16 * 32 + 2 * 16 + 2)
    text = format_model_info(info)
    assert f"{n_params:,}" in text and "2 x mLSTMBlock" in text
    assert wiring_text(model) == model.wiring()


def test_generic_wiring_groups_identical_blocks(model):
    class NoWiring(type(model)):
        wiring = None

    plain = NoWiring(model.config)
    text = wiring_text(plain)
    assert text.splitlines()[0] == "NoWiring"
    assert "blocks.0-1: mLSTMBlock" in text and "blocks.0:" not in text
    assert "mlstm_layer: mLSTMNeuron" in text and "lm_head: Linear [weight(97, 64)]" in text



def test_2024_mixed_model_batched_chat_and_info():
    from xlstm_metal.models.xlstm_2024 import create_xlstm_model

    model = create_xlstm_model(97, 3, (1, 1), 32, 8, 4, seed=5)  # mLSTM, sLSTM, mLSTM
    runner = xLSTMRunner(model, prefill_chunk_size=3)
    prompts = [PROMPT[:9], PROMPT[4:6], PROMPT[10:15]]
    assert runner.generate(prompts, max_tokens=6) == [runner.generate(p, max_tokens=6) for p in prompts]
    first = [c.token for c in runner.stream(prompts[0], max_tokens=4, keep_state=True)]
    second = [c.token for c in runner.stream(prompts[1], max_tokens=4, keep_state=True)]
    assert runner.session_tokens == prompts[0] + first + prompts[1] + second
    assert xLSTMRunner(model).generate(runner.session_tokens[:-4], max_tokens=4) == second
    info = runner.get_model_info()
    assert info["num_blocks"] == 3 and sum(info["block_types"].values()) == 3
    assert info["mlstm_num_heads"] == 4 and info["slstm_num_heads"] == 4 and info["slstm_at"] == [1]
    assert info["parameters"] == sum(v.size for _, v in tree_flatten(model.parameters()))


def test_array_prompts_are_checked_like_lists(model):
    """An MLX array prompt used to skip the vocabulary check (an id past the embedding crashed
    the process with a segmentation fault) and float ids were truncated silently; NumPy arrays
    and NumPy integers raised a bare TypeError."""
    runner = xLSTMRunner(model)
    want = runner.generate(PROMPT[:6], max_tokens=4)
    for bad in (mx.array([3, 500]), mx.array([[3, -1]]), np.array([3, 97])):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            runner.encode(bad)
    with pytest.raises(ValueError, match="must be integers"):
        runner.encode(mx.array([3.5, 2.0]))
    with pytest.raises(ValueError, match="must be integers"):
        runner.generate([3, 2.0])
    assert runner.generate(np.array(PROMPT[:6]), max_tokens=4) == want
    assert runner.generate([np.int64(i) for i in PROMPT[:6]], max_tokens=4) == want
    assert runner.generate([np.array(PROMPT[:6]), mx.array(PROMPT[:6])], max_tokens=4) == [want, want]


def test_unseeded_sampling_after_a_greedy_turn_draws_a_fresh_seed(text_setup, monkeypatch):
    """A greedy call left its placeholder keys (zeros) in the session, so the next sampled call
    without a seed drew from those: the same 'random' reply in every run. Now a greedy call
    keeps the session's keys and an unseeded call after it draws a fresh seed."""
    import random

    from xlstm_metal.generation import sampling

    model, tok = text_setup
    monkeypatch.setattr(sampling.random, "SystemRandom", lambda: random.Random(0))  # the fresh seed, fixed
    fresh = random.Random(0).randrange(2**31)

    def two_turns(seed):
        runner = xLSTMRunner(model, tok)
        list(runner.stream("the quick", max_tokens=3, keep_state=True))  # greedy
        return [c.token for c in runner.stream(" brown", max_tokens=8, temperature=1.0, keep_state=True, seed=seed)]

    assert two_turns(None) == two_turns(fresh)

    def steps(seed):
        runner = xLSTMRunner(model, tok)
        runner.generate_next_token("the quick")  # greedy
        return [runner.generate_next_token(temperature=1.0, seed=seed if i == 0 else None) for i in range(6)]

    assert steps(None) == steps(fresh)
    # A greedy turn between two sampled ones draws nothing: the keys carry across it.
    runner = xLSTMRunner(model, tok)
    list(runner.stream("the quick", max_tokens=4, temperature=1.0, seed=5, keep_state=True))
    keys = runner._session.keys
    list(runner.stream(" brown", max_tokens=4, keep_state=True))
    assert runner._session.keys is keys
