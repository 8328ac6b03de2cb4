"""xLSTMRunner.generate's per-row settings (max_tokens and row_stops, one per prompt): a batch's rows
end at their own limits, stop ids / strings and EOS, each with what its prompt gets alone."""

import mlx.core as mx
import pytest
from conftest import tiny_model
from test_tokenizer import write_tokenizer_dir

from xlstm_metal.generation import load_tokenizer, xLSTMRunner
from xlstm_metal.generation.sampling import make_keys

PROMPTS = [[5, 17, 33, 8, 91, 12, 40, 41, 42, 3, 77, 64, 19], [23, 50], [7, 9, 88, 13, 21, 34, 55], [60]]


@pytest.fixture(scope="module")
def runner():
    return xLSTMRunner(tiny_model(0, eos_token_id=None))


@pytest.fixture(scope="module")
def text_runner(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows_tok")
    hf = write_tokenizer_dir(path, config={"bos_token_id": 0, "eos_token_id": 2, "force_bos_token_insert": True})
    return xLSTMRunner(tiny_model(1, vocab_size=hf.get_vocab_size()), load_tokenizer(path))


def test_rows_end_at_their_own_max_tokens_and_stop_ids(runner):
    full = [runner.generate(p, max_tokens=12) for p in PROMPTS]
    assert len({tuple(f) for f in full}) == len(full)
    stop = full[0][4]  # row 0 stops there; a row with no stop of its own keeps it
    assert stop not in full[0][:4]
    limits = [12, 5, 0, 9]
    row_stops = [stop, None, [stop], []]
    solo = [runner.generate(p, max_tokens=n, stop=s) for p, n, s in zip(PROMPTS, limits, row_stops)]
    assert solo[0] == full[0][:4] and solo[1] == full[1][:5] and solo[2] == []
    got = runner.generate(PROMPTS, max_tokens=limits, row_stops=row_stops)
    assert got == solo
    # stop applies to every row beside each row's own
    shared = full[1][2]
    solo = [runner.generate(p, max_tokens=n, stop=[shared] + ([s] if s is not None else []))
            for p, n, s in zip(PROMPTS, limits, [stop, None, None, full[3][6]])]
    assert runner.generate(PROMPTS, max_tokens=limits, stop=shared, row_stops=[stop, None, None, full[3][6]]) == solo
    assert solo[1] == full[1][:2]


def test_rows_end_at_eos_alone(runner, monkeypatch):
    full = [runner.generate(p, max_tokens=10) for p in PROMPTS]
    eos = full[2][3]
    monkeypatch.setattr(runner, "_eos_ids", lambda: {eos})
    solo = [runner.generate(p, max_tokens=10) for p in PROMPTS]
    assert solo[2] == full[2][: full[2].index(eos)] and any(s == f for s, f in zip(solo, full))  # others go on
    assert runner.generate(PROMPTS, max_tokens=[10, 10, 10, 10]) == solo


def test_rows_stop_at_their_own_stop_strings(text_runner):
    tok = text_runner.tokenizer
    prompts = ["the quick brown fox", "héllo", "def f(x):\n", "the quick brown fox"]
    full = [tok.decode(text_runner.generate(p, max_tokens=16)) for p in prompts]
    needle = next(full[0][i : i + 2] for i in range(3, len(full[0]) - 1) if "\ufffd" not in full[0][i : i + 2])
    row_stops = [needle, None, ["\n", "zz"], ["zz"]]  # rows 0 and 3: one prompt, a stop in one only
    solo = [text_runner.generate(p, max_tokens=16, stop=s) for p, s in zip(prompts, row_stops)]
    got = text_runner.generate(prompts, max_tokens=16, row_stops=row_stops)
    assert got == solo
    assert needle in tok.decode(got[0]) and len(got[0]) < len(got[3]) and needle in tok.decode(got[3])


def test_sampled_rows_keep_their_seeds(runner):
    kw = dict(temperature=1.3, top_k=40, repetition_penalty=1.2)
    limits = [8, 0, 6, 8]
    solo = [runner.generate(p, max_tokens=n, seed=7 + r, **kw) for r, (p, n) in enumerate(zip(PROMPTS, limits))]
    assert runner.generate(PROMPTS, max_tokens=limits, seed=7, **kw) == solo  # row r: seed 7 + r, row 1 not run
    solo = [runner.generate(p, max_tokens=n, seed=3, **kw) for p, n in zip(PROMPTS, limits)]
    assert runner.generate(PROMPTS, max_tokens=limits, seed=[3, 3, 3, 3], **kw) == solo
    assert len({tuple(s) for s in solo if s}) == 3
    # None in a list of seeds: a fresh seed for that row, the others' as given
    keys = make_keys([None, 3], 2)
    assert keys.shape == (2, 2) and mx.array_equal(keys[1], make_keys(3, 1)[0]).item()


def test_per_row_arguments_are_checked(runner):
    with pytest.raises(ValueError, match="got 2 max_tokens values for 3 prompts"):
        runner.generate(PROMPTS[:3], max_tokens=[1, 2])
    with pytest.raises(ValueError, match=r"max_tokens must be an integer >= 0 \(or a list of one per prompt\), got -1"):
        runner.generate(PROMPTS[:2], max_tokens=[3, -1])
    with pytest.raises(ValueError, match=r"max_tokens must be an integer >= 0, got \[3\]"):
        runner.generate(PROMPTS[0], max_tokens=[3])  # one prompt: one limit
    with pytest.raises(ValueError, match="got 1 row_stops values for 2 prompts"):
        runner.generate(PROMPTS[:2], max_tokens=3, row_stops=[5])
    with pytest.raises(TypeError, match="row_stops must be a list of one value per prompt, got str"):
        runner.generate(PROMPTS[:2], max_tokens=3, row_stops="ab")
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        runner.generate(PROMPTS[:2], max_tokens=3, row_stops=[None, "x"])
    with pytest.raises(ValueError, match="can never be generated"):
        runner.generate(PROMPTS[:2], max_tokens=3, row_stops=[None, [10**6]])
    with pytest.raises(ValueError, match="got 3 seed values for 2 prompts"):
        runner.generate(PROMPTS[:2], max_tokens=[3, 0], seed=[1, 2, 3], temperature=1.0)
    assert runner.generate(PROMPTS[:2], max_tokens=[0, 0]) == [[], []]


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.9, "seed": [3, 4, 5, 6, 7, 8, 9, 10],
                                           "repetition_penalty": 1.3}], ids=["greedy", "seeded"])
def test_rows_that_ended_leave_the_batch(runner, monkeypatch, settings):
    """Once half the running rows have ended, the rest decode without them (from the step's token,
    state, keys and seen marks): the later steps run fewer rows, and every row gets what it gets
    alone (greedy, and seeded with a repetition penalty)."""
    prompts = PROMPTS * 2
    limits = [3, 14, 2, 2, 2, 9, 2, 2]
    seeds = settings.get("seed")
    solo = [runner.generate(p, max_tokens=n, **{**settings, **({"seed": seeds[i]} if seeds else {})})
            for i, (p, n) in enumerate(zip(prompts, limits))]
    step_fn, widths = runner._step_fn, []

    def spying(params):
        step = step_fn(params)

        def counted(tok, *rest):
            widths.append(tok.shape[0])
            return step(tok, *rest)
        return counted

    monkeypatch.setattr(runner, "_step_fn", spying)
    assert runner.generate(prompts, max_tokens=limits, **settings) == solo
    # 8 rows for the first steps; 3 once five have ended (after 2 tokens); 1 once row 5 has too (9)
    assert widths[:2] == [8, 8] and widths[2:7] == [3] * 5 and widths[-1] == 1
    assert sum(widths) < 8 * 13 // 2  # (8 rows for every step: 8 x 13)


def test_rows_that_ended_leave_a_wide_batch(runner):
    """20 rows (on CUDA the decode state is deferred from 16 rows: its six arrays are taken by row
    too), 14 ending after 2 tokens: the rest continue alone, as each row alone."""
    prompts = PROMPTS * 5
    limits = [2 if i % 4 else 11 for i in range(14)] + [7, 2, 2, 2, 2, 5]
    solo = [runner.generate(p, max_tokens=n) for p, n in zip(prompts, limits)]
    assert runner.generate(prompts, max_tokens=limits) == solo
