"""Public API arguments of the wrong type, shape or value fail early with an error naming the
argument: the model's input_ids and state, make_state's batch_size, make_keys' seed, the
runner's prompt, sampling numbers and stop ids, and quantize_model / dequantize_model."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model

from xlstm_metal import xLSTMRunner
from xlstm_metal.generation.sampling import SamplingParams, make_keys
from xlstm_metal.quantization import QuantizationError, dequantize_model, make_recipe, quantize_model

IDS = mx.array([[1, 2, 3, 4]], dtype=mx.int32)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def runner(model):
    return xLSTMRunner(model, compile=False)


# ---------------------------------------------------------------------- model: state
@pytest.mark.parametrize("call", ["forward", "prefill"])
def test_state_for_another_batch_is_refused(model, call):
    """A batch-2 state broadcast against batch-1 ids (a batch-2 state came back); the right
    state still works."""
    fn = model if call == "forward" else model.prefill
    with pytest.raises(ValueError, match="batch"):
        fn(IDS, model.make_state(batch_size=2))
    logits, state = fn(mx.concatenate([IDS, IDS]), model.make_state(2))
    assert logits.shape[0] == 2 and state[0][0].shape[0] == 2


@pytest.mark.parametrize("call", ["forward", "prefill"])
def test_state_with_wrong_block_count_is_refused(model, call):
    fn = model if call == "forward" else model.prefill
    with pytest.raises(ValueError, match="blocks"):
        fn(IDS, model.make_state()[:1])


@pytest.mark.parametrize("state", ["abc", 5, [("a", "b", "c"), ("a", "b", "c")]])
def test_state_of_wrong_type_is_refused(model, state):
    with pytest.raises(ValueError, match="state"):
        model(IDS, state)


def test_correct_state_gives_the_same_logits(model):
    """A zero state passed explicitly equals state=None; a carried state continues a prompt;
    one for a batch of 1 is refused for a batch of 2."""
    with pytest.raises(ValueError, match="batch of 2"):
        model(mx.concatenate([IDS, IDS]), model.make_state(1))
    none_logits, none_state = model(IDS)
    zero_logits, _ = model(IDS, model.make_state(1))
    assert mx.allclose(none_logits, zero_logits, atol=1e-6).item()
    whole, _ = model(mx.array([[1, 2, 3, 4, 5, 6]], dtype=mx.int32))
    tail, _ = model(mx.array([[5, 6]], dtype=mx.int32), none_state)
    assert mx.allclose(whole[:, -2:], tail, atol=1e-4).item()
    last, _ = model.prefill(IDS, model.make_state(1))
    assert mx.allclose(last, none_logits[:, -1], atol=1e-4).item()


# ---------------------------------------------------------------------- model: input_ids
@pytest.mark.parametrize("ids, error, match", [
    ([[1, 2]], TypeError, "input_ids must be an mx.array"),
    (np.array([[1, 2]]), TypeError, "input_ids must be an mx.array"),
    (mx.array([[1.0, 2.0]]), TypeError, "input_ids must have an integer dtype"),
    (mx.array([[True, False]]), TypeError, "input_ids must have an integer dtype"),
])
@pytest.mark.parametrize("call", ["forward", "hidden", "prefill"])
def test_bad_input_ids_are_refused(model, ids, error, match, call):
    with pytest.raises(error, match=match):
        {"forward": model, "hidden": model.hidden, "prefill": model.prefill}[call](ids)


@pytest.mark.parametrize("call", ["forward", "hidden"])
def test_empty_input_ids_are_refused(model, call):
    with pytest.raises(ValueError, match="input_ids must have shape"):
        {"forward": model, "hidden": model.hidden}[call](mx.zeros((1, 0), dtype=mx.int32))


def test_integer_ids_of_any_width_work(model):
    """Any integer dtype is ids; float ones are refused."""
    base, _ = model(IDS)
    for dtype in (mx.int64, mx.uint32, mx.uint8):
        logits, _ = model(IDS.astype(dtype))
        assert mx.array_equal(logits, base).item()
    with pytest.raises(TypeError, match="input_ids"):
        model(IDS.astype(mx.float16))


def test_forward_checks_trace_under_compile():
    """The checks read only types and shapes: a compiled forward still traces and matches, and
    refuses a state of another batch while tracing (a model of its own: an error inside a trace
    leaves MLX's placeholders in the compile inputs, the weights)."""
    model = tiny_model(seed=3)

    def step(ids, state):
        return model(ids, state)

    compiled = mx.compile(step, inputs=model.state)
    state = model.make_state(1)
    want, _ = step(IDS[:, :1], state)
    got, _ = compiled(IDS[:, :1], state)
    assert mx.allclose(want, got, atol=1e-5).item()
    with pytest.raises(ValueError, match="batch"):
        compiled(IDS[:, :1], model.make_state(2))


# ---------------------------------------------------------------------- model: make_state
@pytest.mark.parametrize("batch_size, error", [(-1, ValueError), (0, ValueError), (1.5, TypeError),
                                               (True, TypeError), ("2", TypeError)])
def test_make_state_refuses_bad_batch_size(model, batch_size, error):
    with pytest.raises(error, match="batch_size"):
        model.make_state(batch_size=batch_size)
    assert model.make_state(np.int64(3))[0][0].shape[0] == 3  # NumPy integers are integers


# ---------------------------------------------------------------------- sampling: seeds
@pytest.mark.parametrize("seed", [1.5, "a", True, [1.7, 2.2], ["1", "2"], [True, 1], b"ab"])
def test_make_keys_refuses_non_integer_seeds(seed):
    with pytest.raises(TypeError, match="seed"):
        make_keys(seed, 2)


def test_make_keys_takes_numpy_integers():
    want = make_keys(3, 2)
    assert mx.array_equal(make_keys(np.int64(3), 2), want).item()
    assert mx.array_equal(make_keys([np.int64(3), np.int32(4)], 2), want).item()
    assert mx.array_equal(make_keys(np.array([3, 4]), 2), want).item()


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty"])
@pytest.mark.parametrize("value", ["0.5", None, True])
def test_sampling_params_refuse_non_numbers(name, value):
    with pytest.raises(TypeError, match=name):
        SamplingParams(**{name: value})


# ---------------------------------------------------------------------- runner
@pytest.mark.parametrize("prompt", [b"\x01\x02", bytearray(b"\x01\x02")])
def test_runner_refuses_bytes_prompts(runner, prompt):
    with pytest.raises(TypeError, match="prompt"):
        runner.generate(prompt, max_tokens=3)
    with pytest.raises(TypeError, match="prompt"):
        list(runner.stream(prompt, max_tokens=3))


@pytest.mark.parametrize("prompt", [None, 5])
def test_runner_refuses_non_prompts(runner, prompt):
    with pytest.raises(TypeError, match="prompt"):
        runner.generate(prompt, max_tokens=3)


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty"])
@pytest.mark.parametrize("value", ["0.5", None, True])
def test_runner_refuses_non_number_sampling_settings(runner, name, value):
    with pytest.raises(TypeError, match=name):
        runner.generate([1, 2], max_tokens=2, **{name: value})


def test_runner_takes_numpy_sampling_numbers(runner):
    want = runner.generate([1, 2], max_tokens=4, temperature=0.7, top_p=0.9, seed=5)
    got = runner.generate([1, 2], max_tokens=4, temperature=np.float32(0.7), top_p=np.float64(0.9),
                          seed=np.int64(5))
    assert got == want


@pytest.mark.parametrize("stop", [[-1], [97], 200, [np.int64(-3)]])
def test_runner_refuses_stop_ids_outside_the_vocabulary(runner, stop):
    with pytest.raises(ValueError, match="stop id"):
        runner.generate([1, 2], max_tokens=3, stop=stop)


def test_runner_takes_numpy_stop_ids(runner):
    full = runner.generate([1, 2], max_tokens=6)
    cut = full[2]
    want = full[: full.index(cut)]
    assert runner.generate([1, 2], max_tokens=6, stop=[np.int64(cut)]) == want
    assert runner.generate([1, 2], max_tokens=6, stop=np.int32(cut)) == want
    assert runner.generate([1, 2], max_tokens=6, stop=[cut]) == want


def test_compiled_runner_matches_eager(model, runner):
    """The default (compiled) decode path still runs the checked forward, and agrees (with a
    NumPy stop id that never comes, for an argument the old code refused)."""
    stop = [np.int64(96)]
    want = runner.generate([[1, 2, 3], [4, 5]], max_tokens=5, stop=stop)
    compiled = xLSTMRunner(model)
    assert compiled.compile
    assert compiled.generate([[1, 2, 3], [4, 5]], max_tokens=5, stop=stop) == want
    assert compiled.generate([1, 2, 3], max_tokens=5, stop=stop) == want[0]


# ---------------------------------------------------------------------- quantization
def test_quantize_model_refuses_a_non_string_recipe():
    with pytest.raises(TypeError, match="recipe"):
        quantize_model(tiny_model(), recipe=5)


@pytest.mark.parametrize("fn", [quantize_model, dequantize_model])
def test_quantization_refuses_a_non_model(fn):
    with pytest.raises(TypeError, match="model"):
        fn("x")


@pytest.mark.parametrize("name, value", [("bits", 4.0), ("group_size", 64.0)])
def test_quantization_refuses_non_integer_bits_and_group_size(name, value):
    """4.0 == 4 passed the range test and was used as 4; bools and NumPy integers as before."""
    with pytest.raises(QuantizationError, match=name):
        quantize_model(tiny_model(), **{name: value})
    with pytest.raises(QuantizationError, match=name):
        make_recipe("mixed-4-6" if name == "bits" else None, **{name: value})
    with pytest.raises(QuantizationError, match=name):
        make_recipe(None, **{name: True})
    recipe = make_recipe(None, np.int64(8), np.int64(32))
    assert (recipe.bits, recipe.group_size) == (8, 32) and type(recipe.bits) is int
    assert quantize_model(tiny_model(), bits=np.int64(4))["bits"] == 4
