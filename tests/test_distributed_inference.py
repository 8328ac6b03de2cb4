"""Tensor- and pipeline-parallel inference under `mlx.launch` (2 local processes, ring backend):
logits, prefill, recurrent states and greedy tokens equal the unsplit model's (float32)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xlstm_metal.distributed import parallelize, stage_bounds
from xlstm_metal.distributed.tensor import _check_shardable, tensor_parallel_supported

from conftest import tiny_model  # noqa: E402
from distributed_helpers import assert_memory_stop, launch_cmd  # noqa: E402

WORKER = Path(__file__).parent / "distributed_worker.py"
PROMPT = "def read_file(path):"


@pytest.fixture(scope="module")
def split_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("split") / "results.json"
    proc = subprocess.run(launch_cmd(2, [sys.executable, WORKER, out]), capture_output=True, text=True, timeout=480)
    assert out.is_file(), proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["tensor", "tensor_fused", "tensor_tied"])
def test_tensor_parallel_equals_the_full_model(split_results, case):
    """Heads, FFN width and vocabulary split across 2 processes (the tied case with a padded
    vocabulary shard; the fused case fused after splitting, from a model fused before it)."""
    r = split_results[case]
    assert split_results["world_size"] == 2 and r["parallel"]["mode"] == "tensor"
    assert r["logits"] <= 1e-5 and r["prefill"] <= 1e-5 and r["state"] <= 1e-5, r
    assert r["tokens_equal"], r


@pytest.mark.parametrize("case", ["pipeline", "pipeline_2024"])
def test_pipeline_parallel_equals_the_full_model_exactly(split_results, case):
    """Three blocks over 2 processes (2 + 1), xLSTM-Large and the 2024 xLSTM (mLSTM + sLSTM)."""
    r = split_results[case]
    assert r["parallel"]["mode"] == "pipeline" and tuple(r["parallel"]["blocks"]) == (0, 2)
    assert r["logits"] == 0.0 and r["prefill"] == 0.0 and r["state"] == 0.0, r  # same ops, moved state
    assert r["tokens_equal"], r


def generate(*extra, launch=False):
    cmd = [sys.executable, "-m", "xlstm_metal", "generate", "--prompt", PROMPT, "-n", "12", "--temp", "0", *extra]
    proc = subprocess.run(launch_cmd(2, cmd) if launch else cmd, capture_output=True, text=True, timeout=480)
    assert "Traceback" not in proc.stderr and "exited with code" not in proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # three generate runs, two of them under mlx.launch
def test_generate_under_mlx_launch_prints_the_single_process_text():
    """The packaged model, greedy: tensor and pipeline parallel print what one process prints,
    once (rank 0)."""
    single = generate().stdout
    assert single.strip()
    for mode in ("tensor", "pipeline"):
        assert generate("--parallel", mode, launch=True).stdout == single, mode


def test_parallel_flag_needs_several_processes():
    proc = subprocess.run([sys.executable, "-m", "xlstm_metal", "generate", "--prompt", "x", "--parallel", "tensor"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--parallel tensor splits the model across processes" in proc.stderr and "mlx.launch -n" in proc.stderr


def test_split_plans_and_refusals():
    assert stage_bounds(3, 2) == [(0, 2), (2, 3)]
    assert stage_bounds(8, 3) == [(0, 3), (3, 6), (6, 8)]
    with pytest.raises(ValueError, match="cannot split 2 blocks across 3 processes"):
        stage_bounds(2, 3)
    model = tiny_model()  # 2 heads, FFN 192
    _check_shardable(model, 2)
    with pytest.raises(ValueError, match=r"num_heads \(2\) is not divisible by the number of processes \(3\)"):
        _check_shardable(model, 3)
    from xlstm_metal.models.xlstm_2024 import create_xlstm_model

    other = create_xlstm_model(vocab_size=61, num_layers=2, inp_dim=32, head_dim=16, head_num=2)
    assert tensor_parallel_supported(model) and not tensor_parallel_supported(other)
    with pytest.raises(ValueError, match="tensor parallelism covers xLSTM-Large models"):
        _check_shardable(other, 2)
    assert parallelize(model, None) is model  # one process: nothing to split
    with pytest.raises(ValueError, match="splits the model across processes"):
        parallelize(model, "pipeline")


def test_rank0_files_reach_a_rank_without_them(split_results):
    """share_path (train's data, --init-from, --resume): a rank seeing the same files keeps its
    path; a rank without them receives rank 0's, byte for byte, in a directory of its own."""
    rank0, rank1 = split_results["share_path"]
    assert rank0 == {"kept_own": True, "moved": False, "files": ["a.txt", "sub/b.bin"], "equal": True}
    assert rank1 == {"kept_own": True, "moved": True, "files": ["a.txt", "sub/b.bin"], "equal": True}


@pytest.mark.slow  # a 2-process server, then the same completions in this process
def test_serve_under_mlx_launch_answers_like_one_process():
    """`mlx.launch -n 2 -- xlstm-metal serve`: rank 0 listens, both ranks compute (tensor
    parallel); a greedy completion equals mlx-lm's stream_generate on the unsplit model, with the
    repetition penalty of the model's generation_config.json, and so does a seeded one that leaves
    the sampling to that file (both ranks sample alike)."""
    import json
    import os
    import signal
    import urllib.request

    import mlx.core as mx

    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    from xlstm_metal.generation import DEFAULT_MODEL_DIR
    from xlstm_metal.serve import load_for_serving

    cmd = launch_cmd(2, [sys.executable, "-m", "xlstm_metal", "serve", "--port", "0", "--dtype", "float32"])
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    served = []
    try:
        url = None
        for line in server.stderr:  # ends if the launch fails
            if "serving on " in line:
                url = line.split("serving on ")[1].split()[0]
                break
        assert url is not None, "the server did not start"
        # Seeded first (in the batch, its own random key), on an empty prompt cache, then greedy.
        for fields in ({"seed": 3}, {"temperature": 0}):
            body = json.dumps({"prompt": PROMPT, "max_tokens": 10, **fields}).encode()
            request = urllib.request.Request(url + "/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=300) as response:
                served.append(json.loads(response.read())["choices"][0]["text"])
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)
    gen = json.loads((DEFAULT_MODEL_DIR / "generation_config.json").read_text())
    model, tokenizer = load_for_serving(DEFAULT_MODEL_DIR, dtype="float32")
    penalty = make_logits_processors(None, gen["repetition_penalty"], 20)
    greedy = "".join(r.text for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=10,
                                                             logits_processors=penalty))
    mx.random.seed(3)
    sampler = make_sampler(gen["temperature"], top_p=gen["top_p"], top_k=gen["top_k"])
    sampled = "".join(r.text for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=10,
                                                              sampler=sampler, logits_processors=penalty))
    assert served == [sampled, greedy] and greedy and sampled != greedy


def test_a_pipeline_rank_reads_only_its_blocks(split_results):
    """load_model(prepare=pipeline_model), as generate/serve load under mlx.launch: 3 of 6
    blocks per rank, so a rank's peak while loading stays well under the checkpoint's size;
    loading everything first and splitting after peaks at the whole model."""
    fractions = split_results["lazy_pipeline_load"]
    assert fractions["split_after_load"] >= 1.0, fractions
    assert fractions["prepare"] < 0.75, fractions


def kill_rank_1_during(tmp_path, command, started, tries: int = 3, watched: bool = False):
    """Run two ranks of ``command`` (ring backend), SIGKILL rank 1 once ``started(record)`` holds
    for rank 0's status record, and return rank 0's (exit code, stdout, stderr).

    MLX's scheduler sometimes waits forever after the ring's failure (an (async_)eval waiting
    for a task that never completes; mlx.launch's SIGTERM ends such a process, see test_monitor's
    stuck-job test; without it the ring watch now ends it): a rank 0 still running 20 s after the
    kill, or ended by the ring watch (``watched``: that is the result looked for), is killed and
    the run tried again."""
    import os
    import signal
    import time

    from distributed_helpers import free_port, ring_env

    from xlstm_metal.monitor import read_jobs

    for attempt in range(tries):
        runtime, port, procs = tmp_path / f"runtime{attempt}", free_port(2), []
        out_path = tmp_path / f"out{attempt}.txt"
        with open(out_path, "w") as out:  # a file, not a pipe: nothing blocks rank 0's output
            for rank in range(2):
                env = {**ring_env(rank, 2, port, tmp_path), "XLSTM_RUNTIME_DIR": str(runtime),
                       "XLSTM_STATUS_INTERVAL": "0.1"}
                procs.append(subprocess.Popen([sys.executable, "-m", "xlstm_metal", *command], env=env,
                                              stdin=subprocess.DEVNULL, stdout=out if rank == 0 else subprocess.DEVNULL,
                                              stderr=subprocess.PIPE, text=True))
            try:
                deadline = time.monotonic() + 120
                while not any(j.get("rank") == 0 and started(j) for j in read_jobs(runtime)):
                    assert procs[0].poll() is None and procs[1].poll() is None, procs[0].communicate()[1][-2000:]
                    assert time.monotonic() < deadline, "rank 0 never got there"
                    time.sleep(0.05)
                os.kill(procs[1].pid, signal.SIGKILL)
                try:
                    _, err = procs[0].communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    continue  # MLX hung (see above): killed in finally
                if "did not return from native code" in err and not watched:
                    # MLX hung and the ring watch (distributed.comm._watch_ring) ended the rank, as
                    # mlx.launch's SIGTERM would: its own error path never ran, try again
                    assert "lost the connection to rank 1 in a collective" in err, err[-2000:]
                    continue
                return procs[0].returncode, out_path.read_text(), err
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                    p.communicate()
    pytest.fail(f"rank 0 hung after rank 1 was killed in all {tries} tries")


def lost_rank_1_line(err: str, what: str) -> str:
    """The one error line of rank 0 that lost rank 1 after ``what`` (a regex); no traceback."""
    assert "Traceback" not in err, err[-2000:]
    line = next(line for line in err.splitlines() if line.startswith("xlstm-metal: error:"))
    assert re.fullmatch(rf"xlstm-metal: error: rank 0 of 2: {what}: lost the connection to rank 1 \(.*peer.*\); "
                        r"it has probably died \(mlx.launch reports each process's exit code\)", line), line
    return line


def test_generate_names_a_lost_peer_instead_of_a_traceback(tmp_path):
    """Kill rank 1 of a 2-process `generate` mid-decode: rank 0 printed a RuntimeError
    traceback ("[ring] connection to a peer was lost"); it now says which rank it is, after how
    many tokens, and that it lost rank 1, and exits 1. (Pipeline parallel: in tensor parallel
    MLX's async_eval never returns after the ring's failure, and mlx.launch's SIGTERM ends the
    process, see test_monitor's stuck-job test; in pipeline parallel it sometimes does too, see
    kill_rank_1_during.)"""
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    code, out, err = kill_rank_1_during(
        tmp_path, ["generate", "-m", str(ckpt), "-p", "the quick", "-n", "1000000", "--temp", "0",
                   "--parallel", "pipeline"],
        lambda j: (j.get("done") or 0) > 20)
    assert code == 1, err[-2000:]
    lost_rank_1_line(err, r"the generation stopped after \d+ tokens")
    assert out.strip()  # what was generated before is printed


def tiny_checkpoint(path):
    """A tiny random xLSTM-Large (2 heads: splits over 2 processes) with a tokenizer."""
    from test_tokenizer import train_tiny_tokenizer

    from xlstm_metal.loading import save_model

    hf = train_tiny_tokenizer()
    save_model(tiny_model(2, vocab_size=hf.get_vocab_size()), path)
    hf.save(str(path / "tokenizer.json"))
    return path


def run_ranks(tmp_path, command, hit):
    """Two ranks of ``command`` (ring backend); rank ``hit`` over a 2 MB hard memory limit.
    Returns [(exit code, stdout, stderr)] per rank; a rank still running after 60 s fails."""
    from distributed_helpers import run_two_ranks

    envs = [{"XLSTM_RUNTIME_DIR": str(tmp_path / "runtime"), **({"XLSTM_MEM_HARD_MB": "2"} if rank == hit else {})}
            for rank in range(2)]  # 2 MB: any process is over it
    return run_two_ranks(tmp_path, [[sys.executable, "-m", "xlstm_metal", *command]] * 2, envs=envs, timeout=60)


def assert_all_stopped_for(results, hit):
    for rank, (code, _, err) in enumerate(results):
        assert_memory_stop(rank, hit, code, err, prefix="xlstm-metal: ", forbidden=("Traceback", "[ring]"))


@pytest.mark.parametrize("hit", [0, 1])
def test_generate_one_rank_at_its_hard_memory_limit_stops_every_rank(tmp_path, hit):
    """One rank of a 2-process `generate` over its hard memory limit stopped alone (exit 3); the
    other waited in the next step's collective until mlx.launch's SIGTERM and the 5 s grace
    ended it (143). Now the ranks agree every 16 tokens: both stop at token 16 with exit 3 and
    a message, rank 0 having printed those 16 tokens (one process's greedy text)."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    args = ["generate", "-m", str(ckpt), "-p", "the quick", "--temp", "0"]
    single = subprocess.run([sys.executable, "-m", "xlstm_metal", *args, "-n", "16"], capture_output=True, text=True,
                            timeout=120)
    assert single.returncode == 0 and single.stdout.strip(), single.stderr[-2000:]
    results = run_ranks(tmp_path, [*args, "-n", "400"], hit)
    assert_all_stopped_for(results, hit)
    assert results[0][1].rstrip("\n") == single.stdout.rstrip("\n")  # stopped at the same token


@pytest.mark.slow  # two processes load and serve
def test_serve_refuses_new_requests_while_another_rank_is_over_its_hard_limit(tmp_path):
    """`serve` in two processes, rank 1 over a 2 MB hard memory limit and rank 0 under none:
    rank 0 refused only on its own memory (it answered, and rank 1 computed its share over its
    limit); now the ranks sum their watchdogs' refusals at every turn of the generation loop and
    rank 0 answers 503 naming 1 of 2 processes, with no traceback on either rank."""
    import os
    import signal
    import threading
    import urllib.error
    import urllib.request

    from distributed_helpers import free_port, ring_env

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    port = free_port(2)
    procs = []
    for rank in range(2):
        env = {**ring_env(rank, 2, port, tmp_path), "XLSTM_RUNTIME_DIR": str(tmp_path / "runtime"),
               "PYTHONUNBUFFERED": "1", **({"XLSTM_MEM_HARD_MB": "2"} if rank == 1 else {})}
        procs.append(subprocess.Popen([sys.executable, "-m", "xlstm_metal", "serve", "-m", str(ckpt), "--port", "0",
                                       "--dtype", "float32"], env=env, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    logs: list[list[str]] = [[], []]
    for p, log in zip(procs, logs):
        threading.Thread(target=lambda p=p, log=log: log.extend(p.stderr), daemon=True).start()
    try:
        url, answers = None, []
        for _ in range(600):  # 60 s to load
            url = next((line.split("serving on ")[1].split()[0] for line in logs[0] if "serving on " in line), None)
            if url or any(p.poll() is not None for p in procs):
                break
            threading.Event().wait(0.1)
        assert url is not None, "".join(logs[0])[-2000:] + "".join(logs[1])[-2000:]
        body = json.dumps({"prompt": "the quick", "max_tokens": 2}).encode()
        for _ in range(100):  # rank 1's watchdog samples every 250 ms; the exchange runs every 0.1 s
            request = urllib.request.Request(url + "/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answers.append(response.status)
            except urllib.error.HTTPError as err:
                answers.append((err.code, json.loads(err.read())["error"]["message"]))
                break
            threading.Event().wait(0.1)
        served = ["".join(log) for log in logs]  # (killing one rank then makes the other's exchange fail)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=60)
    assert answers[-1] == (503, "the server is over its memory limit (1 of 2 processes); retry later"), answers
    assert not any("Traceback" in log for log in served), served[0][-2000:] + served[1][-2000:]


@pytest.mark.parametrize("hit", [0, 1])
def test_bench_one_rank_at_its_hard_memory_limit_stops_every_rank(tmp_path, hit):
    """The same for `bench`, between runs: both ranks stop after the first run."""
    import json

    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97, chunk_size=16)))
    results = run_ranks(tmp_path, ["bench", "--config", str(config), "--prefill-lengths", "16,32,64",
                                   "--decode-batches", "1", "--decode-tokens", "4", "--json"], hit)
    assert_all_stopped_for(results, hit)
    assert [json.loads(line)["length"] for line in results[0][1].splitlines()] == [16]


def test_chat_names_a_lost_peer_instead_of_a_traceback(tmp_path):
    """`chat` as `generate` above: rank 1 killed during the first reply; rank 0 printed a
    RuntimeError traceback, now one line naming rank 1 and the reply's tokens so far, exit 1."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    code, out, err = kill_rank_1_during(
        tmp_path, ["chat", "-m", str(ckpt), "-p", "the quick", "-n", "1000000", "--temp", "0", "--parallel", "pipeline"],
        lambda j: (j.get("done") or 0) > 20)
    assert code == 1, err[-2000:]
    lost_rank_1_line(err, r"the reply stopped after \d+ tokens")
    assert out.strip()  # the reply so far is printed


def test_bench_names_a_lost_peer_instead_of_a_traceback(tmp_path):
    """`bench`: rank 1 killed during the second prefill run (the first printed); rank 0 printed
    a RuntimeError traceback, now one line naming rank 1 and the runs done, exit 1. (Killed in a
    prefill run: in the decode run MLX's async_eval never returns after the ring's failure.)"""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97, chunk_size=16)))
    # 1,000 repeats of 16 tokens take ~2 s, of 4,096 tokens in 256 pieces ~8 min.
    code, out, err = kill_rank_1_during(
        tmp_path, ["bench", "--config", str(config), "--prefill-lengths", "16,4096", "--prefill-chunk", "16",
                   "--repeats", "1000", "--decode-batches", "1", "--decode-tokens", "4", "--parallel", "pipeline",
                   "--json"],
        lambda j: (j.get("done") or 0) >= 1)
    assert code == 1, err[-2000:]
    lost_rank_1_line(err, "the benchmark stopped with 1 of 3 runs done")
    assert [json.loads(line)["length"] for line in out.splitlines()] == [16]


def test_peer_lost_exit_raises_other_errors_again():
    """In a process on its own (and for any error but a lost peer) the RuntimeError itself is
    raised again: chat / bench / generate show it as before."""
    from xlstm_metal.cli import peer_lost_exit

    err = RuntimeError("[ring] connection to a peer was lost")
    with pytest.raises(RuntimeError) as raised:
        peer_lost_exit(err, "the reply stopped")
    assert raised.value is err


def test_only_a_lost_peer_is_taken_for_one():
    """In a group of two, the backends' peer-loss messages become a DistributedError naming the
    peer; any other RuntimeError (one mentioning a socket or a connection too) stays itself."""
    from xlstm_metal.distributed import comm

    class Pair:
        def size(self):
            return 2

        def rank(self):
            return 0

    for message in ("[ring] connection to a peer was lost", "NCCL error: remote process exited or there was a "
                    "network error", "[Errno 104] Connection reset by peer", "[Errno 32] Broken pipe"):
        lost = comm.peer_lost(RuntimeError(message), "the generation stopped", Pair())
        assert lost is not None and str(lost).startswith("rank 0 of 2: the generation stopped: lost the "
                                                         "connection to rank 1 (")
    for message in ("[ring] sum_scatter not supported.", "could not open socket file /tmp/x.json",
                    "peer model has a different vocabulary", "[metal] connection string invalid"):
        assert comm.peer_lost(RuntimeError(message), "the generation stopped", Pair()) is None
