"""Session 52's hunt in `train`, `bench`'s records and `plot` (each test failed before its fix)."""

import json
import lzma
import re
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_rejected, run_main

from xlstm_metal import _blas
from xlstm_metal.cli import main
from xlstm_metal.profiles import load_profile, set_blas_threads

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--seq-len", "16", "--batch-size", "2", "--vocab-size", "300", "--val-fraction", "0.2", "--no-progress"]


@pytest.fixture
def blas_threads():
    """The process's OpenBLAS and row-kernel threads, put back after the test."""
    before, rows = _blas.info()["threads"], _blas.gemv_threads()
    if before is None:
        pytest.skip("no preloaded OpenBLAS: a profile's BLAS threads do not apply")
    yield before
    set_blas_threads(before)
    _blas.set_gemv_threads(rows)


def test_a_resumed_run_applies_its_profiles_blas_threads(text_data, tmp_path, capsys, blas_threads):
    # The first run set the profile's OpenBLAS threads; --resume (which refuses --profile) ran
    # with the machine's default instead: the profile was not saved with the run.
    wanted = 1 if blas_threads != 1 else 2
    other = 3 if wanted != 3 else 4
    profile = tmp_path / "threads.json"
    profile.write_text(json.dumps(load_profile("exact-fp32").replace(name="threads", blas_threads=wanted).to_dict()))
    out = tmp_path / "run"
    code, err = run_main(["train", text_data, "--out", out, "--steps", "2", "--profile", profile, *TRAIN], capsys)
    assert code == 0, err
    assert _blas.info()["threads"] == wanted
    set_blas_threads(other)  # (a new process starts with the machine's count)
    code, err = run_main(["train", "--out", out, "--resume", "--steps", "3", "--no-progress"], capsys)
    assert code == 0, err
    assert _blas.info()["threads"] == wanted and _blas.gemv_threads() == wanted
    state = json.loads((out / "checkpoint-0000003" / "trainer_state.json").read_text())
    assert state["profile"]["name"] == "threads" and state["profile"]["blas_threads"] == wanted


def test_a_resume_refuses_a_saved_profile_that_is_not_one(text_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(["train", text_data, "--out", out, "--steps", "2", *TRAIN], capsys)[0] == 0
    path = out / "checkpoint-0000002" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "profile": {"name": "x", "blas_threads": 0}}))
    assert_rejected(["train", "--out", out, "--resume", "--steps", "3"], capsys, "trainer_state.json: 'profile'")


def test_a_profiles_blas_threads_reach_the_row_kernel(blas_threads):
    # One-row products (CPU decoding, the C decode step and prefill) run the GEMV forwarder's
    # threads, which stayed at the import's count whatever a profile (or tune's trial) set.
    if _blas._FORWARD_HANDLE is None:
        pytest.skip("no GEMV forwarder")
    for threads in (1, 3):
        set_blas_threads(threads)
        assert _blas.gemv_threads() == threads == _blas.info()["threads"]


def test_train_helps_step_time_figure_cites_the_file_that_holds_it(capsys):
    # "--mlstm-products ... (H200, 1.3b: a 4.7% faster step ..., BENCHMARKS.md)": BENCHMARKS.md has no
    # such figure; the S8R2 log does (float32 products 186.9 ms, bf16 178.2 ms).
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    assert exit_info.value.code == 0 and "4.7% faster step" in out
    source = re.search(r"benchmarks/results/\S+\.txt\.xz", out)
    assert source, out
    log = lzma.open(ROOT / source.group(0), "rt").read()
    assert re.search(r"^A .* float32 step 186\.9 ms", log, re.M) and re.search(r"^F .* bf16 step 178\.2 ms", log, re.M)


def test_the_max_time_start_line_names_the_warmup_the_run_takes(text_data, tmp_path, capsys):
    # "warmup min(44, steps / 10)" was printed, but a sized run warms up for at least
    # min(44, steps / 2) steps (a 63-step run: 31, not 6).
    code, err = run_main(["train", text_data, "--out", tmp_path / "run", "--max-time", "1", "--eval-every", "1000",
                          *TRAIN], capsys)
    assert code == 0, err
    assert "max(min(44, steps / 2), min(100, steps / 10))" in err and "min(44, steps / 10)" not in err
    state = json.loads(next((tmp_path / "run").glob("checkpoint-*/trainer_state.json")).read_text())
    steps, warmup = state["step"], state["training_config"]["warmup"]
    if warmup is None:  # the second ended inside the probe (a GPU's first steps compile): nothing was sized
        assert steps <= state["training_config"]["probe_steps"] + 1
    else:
        assert warmup >= max(min(44, steps // 2), min(100, steps // 10))


@pytest.mark.parametrize("record,words", [
    ('{"kind": "decode", "batch": 1, "tok_s": NaN}', ["'tok_s' must be a positive number", "nan"]),
    ('{"kind": "decode", "batch": 1, "tok_s": "fast"}', ["'tok_s' must be a positive number", "'fast'"]),
    ('{"kind": "decode", "batch": 1, "tok_s": true}', ["'tok_s' must be a positive number", "True"]),
    ('{"kind": "decode", "batch": 2, "tok_s": -3}', ["'tok_s' must be a positive number", "-3"]),
    ('{"kind": "prefill", "length": 0, "tok_s": 3}', ["'length' must be positive in every prefill record, got 0"]),
], ids=["nan", "text", "bool", "negative", "length-0"])
def test_plot_refuses_bench_records_it_would_not_draw(record, words, tmp_path, capsys):
    # Beside a good record each was skipped (text), drawn as 1.0 (true) or drawn as nothing (NaN,
    # a 0 on the logarithmic axis), and the figure written without a word.
    bench = tmp_path / "b.jsonl"
    bench.write_text('{"kind": "decode", "batch": 4, "tok_s": 5.0}\n' + record + "\n")
    assert_rejected(["plot", bench, "--out", tmp_path / "o.png"], capsys, *words)
    assert not (tmp_path / "o.png").exists()



def test_a_profiles_random_gate_weights_follow_the_seed(text_data, tmp_path, capsys):
    # A gate_weight_std > 0 was a traceback (init_gates called mx.random.fold_in, which MLX lacks),
    # and its key was 0 whatever --seed said.
    from xlstm_metal.loading import load_model

    profile = tmp_path / "std.json"
    init = {"igate_bias": -10.0, "fgate_bias": [3.0, 6.0], "gate_weight_std": 0.1}
    profile.write_text(json.dumps(load_profile("exact-fp32").replace(name="std", init=init).to_dict()))
    weights = []
    for seed in (1, 2):
        out = tmp_path / f"s{seed}"
        code, err = run_main(["train", text_data, "--out", out, "--steps", "1", "--lr", "1e-12", "--seed", seed,
                              "--profile", profile, *TRAIN], capsys)
        assert code == 0, err
        gate = load_model(out / "checkpoint-0000001").blocks[0].mlstm_layer.igate_preact.weight
        weights.append(np.array(gate))
    assert 0.05 < weights[0].std() < 0.2 and np.abs(weights[0] - weights[1]).max() > 0.01
