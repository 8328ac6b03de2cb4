"""Session 52: the ranks of one run (2 local processes, MLX's ring backend, started by hand)
given different prompts, chat turns or bench sizes paired their collectives wrongly (rank 0
blamed rank 1's memory limit, exit 3) or printed wrong text. Now every rank stops at once, exit 2,
naming what differs; ranks given the same input print what one process prints."""

import json
import subprocess
import time

import pytest

from conftest import BENCH_CONFIG  # noqa: E402
from distributed_helpers import run_two_ranks  # noqa: E402
from test_distributed_inference import tiny_checkpoint  # noqa: E402
from test_hunt_s51_distributed import xlstm_cmd  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ranks") / "ckpt")


def ranks(tmp_path, commands, inputs=("", "")):
    """commands[r] as rank r of a 2-process ring, inputs[r] on its stdin: [(code, out, err)]."""
    return run_two_ranks(tmp_path, commands, inputs=list(inputs))


def assert_refused(results, what):
    for rank, (code, _, err) in enumerate(results):
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert f"xlstm-metal: error: rank {rank} of 2: the processes disagree on {what}: rank(s) 1 differ from " \
               "rank 0" in err, err[-2000:]


@pytest.mark.parametrize("mode, first, second, what", [
    ("tensor", ["-p", "the quick", "-n", "8"], ["-p", "the slow", "-n", "8"], "the prompt's token ids"),
    ("tensor", ["-p", "the quick brown", "-n", "8"], ["-p", "the quick", "-n", "8"], "the prompt's token ids"),
    ("pipeline", ["-p", "the quick", "-n", "4"], ["-p", "the quick", "-n", "5"], "--max-tokens"),
])
def test_generate_ranks_given_different_prompts_or_settings_are_refused(tmp_path, ckpt, mode, first, second, what):
    base = ["generate", "-m", ckpt, "--temp", "0", "--parallel", mode]
    started = time.monotonic()
    results = ranks(tmp_path, [xlstm_cmd(*base, *extra) for extra in (first, second)])
    assert time.monotonic() - started < 60
    assert_refused(results, what)
    assert results[0][1] == ""


def test_generate_ranks_given_the_same_prompt_print_the_single_process_text(tmp_path):
    """The packaged model (a trained one: a random model's near-equal logits let the split
    model's round-off pick another token, as on CUDA, H100 S53)."""
    cmd = xlstm_cmd("generate", "-p", "the quick", "-n", "12", "--temp", "0")
    single = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert single.returncode == 0 and single.stdout.strip(), single.stderr[-2000:]
    results = ranks(tmp_path, [cmd, cmd])
    assert [r[0] for r in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert results[0][1] == single.stdout


def test_chat_ranks_given_different_turns_are_refused(tmp_path, ckpt):
    """A chat under several ranks: each reads its own stdin (mlx.launch copies its own to every
    rank); each turn is compared before it is fed. The same turns: the reply as before (the
    packaged model, as in the test above)."""
    cmd = xlstm_cmd("chat", "-m", ckpt, "-n", "6", "--temp", "0")
    results = ranks(tmp_path, [cmd, cmd], ["the quick\n/quit\n", "the slow\n/quit\n"])
    assert_refused(results, "the chat input")
    assert "(rank 1 has 'the slow')" in results[1][2]
    packaged = xlstm_cmd("chat", "-n", "6", "--temp", "0")  # a trained model (see above)
    same = ranks(tmp_path, [packaged, packaged], ["the quick\n/quit\n"] * 2)
    assert [r[0] for r in same] == [0, 0], same[0][2][-2000:]
    alone = subprocess.run(packaged, input="the quick\n/quit\n", capture_output=True, text=True, timeout=90)
    assert same[0][1] == alone.stdout and alone.stdout.strip()


def test_bench_ranks_given_different_lengths_are_refused(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(BENCH_CONFIG))
    base = ["bench", "--config", config, "--decode-batches", "1", "--decode-tokens", "4", "--json"]
    results = ranks(tmp_path, [xlstm_cmd(*base, "--prefill-lengths", n) for n in ("16", "32")])
    assert_refused(results, "--prefill-lengths")
    assert results[0][1] == ""


def test_train_sigterm_note_holds_without_mlx_launch(monkeypatch):
    """The note a train rank prints when SIGTERM ends it said mlx.launch had stopped it, also for
    ranks started by hand (whose ring watch sends the signal once the peer is lost)."""
    import xlstm_metal.distributed as dist
    import xlstm_metal.monitor as monitor
    from xlstm_metal.cli import train

    class Group:
        def size(self):
            return 2

        def rank(self):
            return 1

    notes = []
    monkeypatch.setattr(dist, "launched", lambda: True)
    monkeypatch.setattr(dist, "world", Group)
    monkeypatch.setattr(monitor, "note_on_sigterm", notes.append)
    assert train._launched_group()[1] is False
    note = notes[0]
    assert "rank 1 stopped by signal 15" in note and "mlx.launch stops every process" not in note, note
    assert "another process of the run failed or was lost" in note and "continue with --resume" in note
