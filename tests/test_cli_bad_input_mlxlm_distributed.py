"""Bad input to `xlstm-metal mlx-lm ...` and to the distributed entry points (a sweep beyond
test_mlxlm_cli_checks.py): each is refused with one line naming the problem and exit code 2,
before anything loads or is written, where it ended in a traceback, a hang, a misleading message
or a silently ignored setting. Tiny random checkpoints; nothing downloads."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from cli_helpers import assert_rejected, run_main
from conftest import repo_env
from test_mlxlm_cli_checks import adapters, lora_args, lora_data  # noqa: F401  (fixtures: the same one-step LoRA)

REPO = Path(__file__).resolve().parents[1]


def xlstm_metal(*argv, env=None, timeout=90) -> subprocess.CompletedProcess:
    """``xlstm-metal ARGV`` in a subprocess (text output)."""
    return subprocess.run([sys.executable, "-m", "xlstm_metal", *map(str, argv)], capture_output=True, text=True,
                          env=repo_env(**(env or {})), timeout=timeout, cwd=REPO)


def assert_one_error_line(proc: subprocess.CompletedProcess, *words) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("xlstm-metal: error: "), proc.stderr[-3000:]
    for word in words:
        assert word in last, last


def save_tiny(path: Path, **overrides) -> Path:
    """A tiny random xLSTM-Large checkpoint with the packaged tokenizer."""
    from conftest import tiny_model

    from xlstm_metal.assets import DEFAULT_MODEL_DIR
    from xlstm_metal.loading import save_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        save_model(tiny_model(0, vocab_size=4096, **overrides), path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, path / name)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    pytest.importorskip("mlx_lm")
    return save_tiny(tmp_path_factory.mktemp("mlxlm_bad") / "ckpt")


@pytest.fixture(scope="module")
def no_shim(ckpt, tmp_path_factory) -> Path:
    """``ckpt`` as transformers re-saves it (no model file): mlx-lm loads it without --trust-remote-code."""
    path = tmp_path_factory.mktemp("mlxlm_bad") / "no_shim"
    shutil.copytree(ckpt, path)
    (path / "xlstm_mlx_lm.py").unlink()
    return path


# ---------------------------------------------------------------------- generate
def test_generate_max_tokens_zero_is_refused_before_loading(ckpt, capsys):
    # 0 passed the parser and mlx-lm refused it after loading the model, with "use -1 for no
    # limit", a value this command line refuses.
    code, err = run_main(["mlx-lm", "generate", "--model", ckpt, "--prompt", "hi", "--max-tokens", "0"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "mlx_lm.generate: error: argument --max-tokens/-m: must be >= 1, got 0", err


def test_server_max_tokens_zero_is_refused_before_loading(ckpt, capsys, monkeypatch):
    # 0 was taken: every request that gave no max_tokens got an empty reply.
    import mlx_lm.server

    def serve(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(mlx_lm.server, "run", serve)
    code, err = run_main(["mlx-lm", "server", "--model", ckpt, "--max-tokens", "0"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].endswith("error: argument --max-tokens: must be >= 1, got 0"), err


@pytest.mark.parametrize("kind", ["missing", "weights", "garbage"])
def test_generate_prompt_cache_file_that_is_no_prompt_cache(kind, ckpt, tmp_path, capsys):
    # Before: "cannot read the weights: [load_safetensors] Failed to open file" (missing), "not
    # enough values to unpack (expected 3, got 1)" (a weight file).
    cache = {"missing": tmp_path / "gone.safetensors", "weights": ckpt / "model.safetensors",
             "garbage": tmp_path / "bad.safetensors"}[kind]
    if kind == "garbage":
        cache.write_text("not safetensors\n")
    err = assert_rejected(["mlx-lm", "generate", "--model", ckpt, "--prompt", "hi", "--max-tokens", "2",
                           "--prompt-cache-file", cache], capsys, f"--prompt-cache-file {cache}")
    assert "weights" not in err.splitlines()[-1]
    assert ("does not exist" if kind == "missing" else "is not a prompt cache mlx-lm can read") in err


@pytest.mark.parametrize("command", ["generate", "server"])
def test_draft_model_path_that_does_not_exist(command, ckpt, tmp_path, capsys):
    # mlx-lm looked the path up on the Hub: "Repo id must be in the form 'repo_name' ...".
    gone = tmp_path / "no_draft"
    extra = ["--prompt", "hi"] if command == "generate" else []
    err = assert_rejected(["mlx-lm", command, "--model", ckpt, *extra, "--draft-model", gone], capsys,
                          f"mlx-lm {command}: --draft-model path {gone} does not exist")
    assert "Repo id" not in err


def test_generate_draft_model_with_an_xlstm(ckpt, no_shim, capsys):
    # mlx-lm loaded both models, printed its separator and then refused ("Speculative decoding
    # requires a trimmable prompt cache"); now refused once the model is known to be an xLSTM.
    assert_rejected(["mlx-lm", "generate", "--model", ckpt, "--prompt", "hi", "--max-tokens", "2",
                     "--draft-model", no_shim], capsys, "--draft-model", "cannot be rewound")


# ---------------------------------------------------------------------- server (subprocesses: it hung)
def test_server_draft_model_with_an_xlstm_does_not_listen(ckpt, no_shim):
    # The server listened and every request failed on the untrimmable cache.
    proc = xlstm_metal("mlx-lm", "server", "--model", ckpt, "--port", "0", "--draft-model", no_shim, timeout=60)
    assert_one_error_line(proc, "mlx-lm server: --draft-model", "cannot be rewound")


def test_server_port_in_use_exits_instead_of_hanging(ckpt):
    # A traceback from mlx-lm's _run_http_server (OSError: Address already in use), after which
    # the process hung on its generation thread.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = xlstm_metal("mlx-lm", "server", "--model", ckpt, "--port", port, timeout=60)
    assert_one_error_line(proc, f"mlx-lm server: cannot listen on 127.0.0.1 port {port}")


def test_server_host_that_does_not_resolve(ckpt):
    proc = xlstm_metal("mlx-lm", "server", "--model", ckpt, "--port", "0", "--host", "no-such-host.invalid",
                       timeout=60)
    assert_one_error_line(proc, "mlx-lm server: --host no-such-host.invalid cannot be resolved")


# ---------------------------------------------------------------------- convert, adapters, lora
def test_convert_quantize_a_quantized_checkpoint_writes_nothing(ckpt, tmp_path, capsys):
    # `-q --q-bits 8` of a 4-bit checkpoint wrote the 4-bit model unchanged ("Quantized model
    # with 6.040 bits per weight.").
    from xlstm_metal.cli import main

    q4 = tmp_path / "q4"
    assert main(["mlx-lm", "convert", "--hf-path", str(ckpt), "--mlx-path", str(q4), "-q", "--q-group-size", "32"]) == 0
    capsys.readouterr()
    out = tmp_path / "q8"
    assert_rejected(["mlx-lm", "convert", "--hf-path", q4, "--mlx-path", out, "-q", "--q-bits", "8"], capsys,
                    "already quantized (4-bit, groups of 32)", "--dequantize")
    assert not out.exists()


def test_adapters_for_another_model_are_one_line(adapters, tmp_path, capsys):
    # mlx-lm's message listed every mismatched tensor, one a line.
    wider = save_tiny(tmp_path / "wider", embedding_dim=128)
    code, err = run_main(["mlx-lm", "generate", "--model", wider, "--prompt", "hi", "--adapter-path", adapters],
                         capsys)
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xlstm-metal: error: mlx-lm generate: Adapter at "), err
    assert "does not match model parameter shape" in lines[0] and "more)" in lines[0], err


@pytest.mark.parametrize("rate", ["-1", "0"])
def test_lora_learning_rate_must_be_positive(rate, ckpt, lora_data, tmp_path, capsys):
    # -1 trained uphill, 0 trained nothing; both without a word.
    code, err = run_main(lora_args(ckpt, lora_data, "--adapter-path", tmp_path / "ad", "--learning-rate", rate),
                         capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"mlx_lm.lora: error: argument --learning-rate: must be > 0, got {rate}", err
    assert not (tmp_path / "ad").exists()


@pytest.mark.parametrize("rate", ["-1", "0", ".nan", "fast"])
def test_lora_config_learning_rate_must_be_positive(rate, ckpt, lora_data, tmp_path, capsys):
    # A --config's learning_rate skips the parser's check: -1 trained uphill without a word.
    config = tmp_path / "lora.yaml"
    config.write_text(f"learning_rate: {rate}\n")
    code, err = run_main(lora_args(ckpt, lora_data, "--adapter-path", tmp_path / "ad", "--config", config), capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "the learning rate (--learning-rate or the --config's learning_rate) must be a finite number > 0, got" \
        in err.strip().splitlines()[-1], err
    assert not (tmp_path / "ad").exists()


@pytest.mark.parametrize("kind", ["missing", "directory", "corrupt"])
def test_lora_resume_adapter_file_checked_before_loading(kind, ckpt, lora_data, adapters, tmp_path, capsys):
    # mlx-lm loaded the model and the data and started training, then failed with "cannot read
    # the weights: [load_safetensors] Failed to open file ...".
    resume = {"missing": tmp_path / "gone.safetensors", "directory": adapters,
              "corrupt": tmp_path / "cut.safetensors"}[kind]
    if kind == "corrupt":
        resume.write_bytes(b"\x00" * 3)
    err = assert_rejected(lora_args(ckpt, lora_data, "--adapter-path", tmp_path / "ad",
                                    "--resume-adapter-file", resume), capsys, "--resume-adapter-file")
    assert {"missing": "does not exist", "directory": "is a directory (the adapters are",
            "corrupt": "cannot read weight file"}[kind] in err
    assert "Loading pretrained model" not in capsys.readouterr().out + err


# ---------------------------------------------------------------------- distributed: the ring's environment
@pytest.mark.parametrize("hostfile, rank, words", [
    (None, "0", ["cannot read the ring backend's host file"]),
    ("{bad", "0", ["is not valid JSON"]),
    ("[]", "0", ['one list of "ip:port" addresses per process']),  # MLX crashed on SIGFPE
    ('[[], []]', "0", ['one list of "ip:port" addresses per process']),
    ('[["nohostport"], ["x"]]', "0", ['one list of "ip:port" addresses per process']),
    ('[["127.0.0.1:1"], ["127.0.0.1:2"]]', "2", ["MLX_RANK=2 must be a process number from 0 to 1"]),
    ('[["127.0.0.1:1"], ["127.0.0.1:2"]]', "abc", ["MLX_RANK=abc must be a process number"]),  # MLX hung
    ('[["127.0.0.1:1"], ["127.0.0.1:2"]]', None, ["MLX_RANK is not"]),  # MLX ran one process silently
])
def test_ring_environment_is_checked(hostfile, rank, words, tmp_path):
    from xlstm_metal.distributed.comm import ring_hosts
    from xlstm_metal.errors import SettingError

    path = tmp_path / "hosts.json"
    if hostfile is not None:
        path.write_text(hostfile)
    env = {"MLX_HOSTFILE": str(path), **({"MLX_RANK": rank} if rank is not None else {})}
    with pytest.raises(SettingError) as caught:
        ring_hosts(env)
    assert "MLX_" in str(caught.value)
    for word in words:
        assert word in str(caught.value)


def test_ring_environment_that_is_fine():
    from xlstm_metal.distributed.comm import ring_hosts

    assert ring_hosts({}) is None


def test_missing_hostfile_is_one_line_at_the_command_line(tmp_path):
    # A RuntimeError traceback from mx.distributed.init ("[json.exception.parse_error.101] ...").
    gone = tmp_path / "hosts.json"
    proc = xlstm_metal("generate", "--model", save_tiny(tmp_path / "m"), "--prompt", "hi", "-n", "2", "--temp", "0",
                       env={"MLX_RANK": "0", "MLX_HOSTFILE": str(gone)}, timeout=60)
    assert_one_error_line(proc, f"MLX_HOSTFILE={gone}", "cannot read")


@pytest.mark.parametrize("hostfile", ["\n", '[["127.0.0.1:1"]]'], ids=["mlx.launch -n 1", "one host"])
def test_a_world_of_one_runs(hostfile, tmp_path):
    # `mlx.launch -n 1 --backend ring` writes an empty host file: MLX's init failed to parse it
    # (a traceback); a host file of one host made it wait forever.
    hosts = tmp_path / "hosts.json"
    hosts.write_text(hostfile)
    proc = xlstm_metal("generate", "--model", save_tiny(tmp_path / "m"), "--prompt", "hi", "-n", "2", "--temp", "0",
                       env={"MLX_RANK": "0", "MLX_HOSTFILE": str(hosts)}, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.strip(), proc.stdout


def test_mlx_launch_one_process(tmp_path):
    from distributed_helpers import launch_cmd

    model = save_tiny(tmp_path / "m")
    proc = subprocess.run(launch_cmd(1, [sys.executable, "-m", "xlstm_metal", "generate", "--model", model,
                                         "--prompt", "hi", "-n", "2", "--temp", "0"]),
                          capture_output=True, text=True, env=repo_env(), timeout=90, cwd=REPO)
    assert "Traceback" not in proc.stderr and "exited with code" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.strip(), proc.stdout
