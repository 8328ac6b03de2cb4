"""Bad input to `xlstm-metal mlx-lm ...` and to the distributed entry points (a sweep beyond
test_mlxlm_cli_checks.py): each is refused with one line naming the problem and exit code 2,
before anything loads or is written, where it ended in a traceback, a hang, a misleading message
or a silently ignored setting. Tiny random checkpoints; nothing downloads."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
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


@pytest.fixture
def no_listening(monkeypatch):
    """mlx-lm's server ``run`` replaced by a recorder (the wrapper's checks still run around it)."""
    import mlx_lm.server

    served = []
    monkeypatch.setattr(mlx_lm.server, "run", lambda *a, **k: served.append(a))
    return served


@pytest.mark.parametrize("size", ["abc", "-5", "12K"])
def test_server_prompt_cache_bytes_it_cannot_parse(size, ckpt, capsys, no_listening):
    # mlx-lm's size parser raised decimal.InvalidOperation ("abc", "-5") or KeyError ("12K"):
    # a traceback, exit 1.
    code, err = run_main(["mlx-lm", "server", "--model", ckpt, "--prompt-cache-bytes", size], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].endswith(
        f"error: argument --prompt-cache-bytes: must be a size in bytes: a number, optionally followed by M, MB, "
        f"G or GB (e.g. 512MB), got '{size}'"), err
    assert no_listening == []


@pytest.mark.parametrize("value, words", [("[1]", "must be a JSON object"), ('"x"', "must be a JSON object"),
                                          ('{"tokenize": false}', "must not set tokenize"),
                                          ('{"add_generation_prompt": false}', "must not set add_generation_prompt")])
def test_server_chat_template_args_that_are_no_template_variables(value, words, ckpt, capsys, no_listening):
    # The server listened, and every chat request failed ("argument after ** must be a mapping",
    # "got multiple values for keyword argument 'tokenize'").
    code, err = run_main(["mlx-lm", "server", "--model", ckpt, "--chat-template", CHAT_TEMPLATE,
                          "--chat-template-args", value], capsys)
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "error: argument --chat-template-args: " in last and words in last, err
    assert no_listening == []


#: A chat template that renders every message.
CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


@pytest.mark.parametrize("flags, words", [
    (["--chat-template", "{% if %}"], "the chat template (--chat-template) cannot render a chat: TemplateSyntaxError"),
    (["--chat-template", "templates/chat.jinja"], "--chat-template renders no message of the chat"),
    (["--chat-template", ""], "--chat-template is empty"),
    (["--chat-template-args", '{"enable_thinking": false}'],
     "--chat-template-args only goes into the chat template, and the model's tokenizer has none"),
    (["--use-default-chat-template"], "--use-default-chat-template: the model's tokenizer has no chat template"),
    (["--pipeline"], "--pipeline splits the model across the processes mlx.launch starts"),
    (["--num-draft-tokens", "5"], "--num-draft-tokens only applies with --draft-model"),
], ids=["malformed-template", "template-file-name", "empty-template", "args-without-template",
        "use-default-template", "pipeline", "num-draft-tokens"])
def test_server_options_that_could_not_work_are_refused_before_listening(flags, words, ckpt, capsys, no_listening):
    # Before: the server listened while every chat request failed on the template (a 404 with
    # Jinja's error), rendered every chat as the file name given as the template, or dropped the
    # option without a word (an empty --chat-template, --chat-template-args without a template,
    # --pipeline in one process, --num-draft-tokens without a draft model); and
    # --use-default-chat-template ended in an AttributeError traceback (transformers has no
    # default template any more).
    assert_rejected(["mlx-lm", "server", "--model", ckpt, "--port", "0", *flags], capsys, f"mlx-lm server: {words}")
    assert no_listening == []


def test_server_chat_template_that_works_still_serves(ckpt, no_listening):
    from xlstm_metal.cli import main

    assert main(["mlx-lm", "server", "--model", str(ckpt), "--port", "0", "--chat-template", CHAT_TEMPLATE,
                 "--chat-template-args", '{"enable_thinking": false}']) == 0
    assert len(no_listening) == 1


def test_generate_num_draft_tokens_without_a_draft_model(ckpt, capsys):
    # generate dropped it without a word too.
    assert_rejected(["mlx-lm", "generate", "--model", ckpt, "--prompt", "hi", "--num-draft-tokens", "4"], capsys,
                    "mlx-lm generate: --num-draft-tokens only applies with --draft-model")


@pytest.fixture(scope="module")
def mlx_lm_server(ckpt):
    """``xlstm-metal mlx-lm server`` of ``ckpt`` on a free port: its URL (stopped afterwards)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "xlstm_metal", "mlx-lm", "server", "--model", str(ckpt),
                             "--port", str(port)], env=repo_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the server exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not listen within 60 s"
                time.sleep(0.2)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=30)


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("extra, words", [
    ({"stop": 5}, "stop must be a string or a list of strings"),
    ({"stop": [1]}, "stop must be a string or a list of strings"),
    ({"seed": 2**64}, "seed must be in 0..2**64-1"),
    ({"seed": -1}, "seed must be in 0..2**64-1"),
    ({"logit_bias": {"999999": 5}}, "logit_bias token id 999999 is not in the vocabulary (0..4095)"),
    ({"logit_bias": {"-5": 5}}, "logit_bias token id -5 is not in the vocabulary"),
    ({"n": 3}, "n must be 1"),
    ({"num_draft_tokens": 4}, "num_draft_tokens: speculative decoding"),
    ({"draft_model": "other"}, "draft_model: speculative decoding"),
], ids=["stop-int", "stop-list-of-int", "seed-2**64", "seed-negative", "logit-bias-beyond", "logit-bias-negative",
        "n", "num-draft-tokens", "draft-model"])
def test_mlx_lm_server_requests_that_broke_it_get_a_400(extra, words, mlx_lm_server):
    # Before: a stop that is not text stopped the generation thread for good (every later request
    # got "generation thread died"), a seed beyond MLX's dropped the connection, a logit_bias id
    # beyond the vocabulary crashed the process (SIGSEGV), -5 biased another token, and n / the
    # draft fields were ignored without a word.
    proc, url = mlx_lm_server
    code, body = post(url, {"prompt": "hi", "max_tokens": 2, **extra})
    assert code == 400 and words in body["error"], body
    code, body = post(url, {"prompt": "hi", "max_tokens": 2, "seed": 1, "stop": ["\n"]})  # and it keeps serving
    assert code == 200 and body["usage"]["completion_tokens"] >= 1, body
    assert proc.poll() is None


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


def with_value(args: list, option: str, value) -> list:
    """``args`` with ``option``'s value replaced (mlx-lm's parsers refuse an option given twice)."""
    args = list(args)
    args[args.index(option) + 1] = value
    return args


def renamed_adapters(adapters: Path, path: Path, rename) -> Path:
    """The adapters of ``adapters`` saved to ``path`` under the names ``rename(name)``."""
    import mlx.core as mx

    mx.save_safetensors(str(path), {rename(k): v for k, v in mx.load(str(adapters / "adapters.safetensors")).items()})
    return path


def other_block(name: str) -> str:
    """The same tensor of the block before (the adapters train the last block only)."""
    return re.sub(r"blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) - 1}.", name, count=1)


@pytest.mark.parametrize("kind, words", [
    ("rank", ["(--fine-tune-type lora, --num-layers 1, rank 4)", "20 of its tensors have another shape",
              "proj_down.lora_a [192, 8] (the model's [192, 4])"]),
    ("other-blocks", ["20 of its 20 tensors name no parameter of the model: backbone.blocks.0.",
                      "none of the 20 tensors this run trains are in it"]),
    ("more-blocks", ["--num-layers 2", "20 of the 40 tensors this run trains are not in it (those would start fresh: "
                     "backbone.blocks.0."]),
    ("another-model", ["name no parameter of the model: model.layers.", "none of the 20 tensors"]),
])
def test_lora_resume_adapter_file_for_other_adapters_is_refused(kind, words, ckpt, lora_data, adapters, tmp_path,
                                                                capsys):
    # mlx-lm loaded the file with load_weights(strict=False): every one of these trained from fresh
    # adapters (or half of them) without a word; another rank's replaced the run's own adapters.
    resume = adapters / "adapters.safetensors"
    args = lora_args(ckpt, lora_data, "--adapter-path", tmp_path / "ad")
    if kind == "rank":
        (tmp_path / "rank4.yaml").write_text("lora_parameters: {rank: 4, dropout: 0.0, scale: 20.0}\n")
        args += ["--config", tmp_path / "rank4.yaml"]
    elif kind == "other-blocks":
        resume = renamed_adapters(adapters, tmp_path / "other.safetensors", other_block)
    elif kind == "more-blocks":
        args = with_value(args, "--num-layers", "2")
    else:  # a Llama's names
        resume = renamed_adapters(adapters, tmp_path / "llama.safetensors",
                                  lambda k: k.replace("backbone.blocks.", "model.layers.").replace(".mlstm_layer.",
                                                                                                    ".self_attn."))
    code, err = run_main([*args, "--resume-adapter-file", resume], capsys)
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"xlstm-metal: error: mlx-lm lora: --resume-adapter-file {resume} does not hold the "
                           "adapters this run trains"), err
    for word in words:
        assert word in last, last
    assert not (tmp_path / "ad").exists()  # refused before training or writing anything


def test_lora_resumes_adapters_that_fit(ckpt, lora_data, adapters, tmp_path, capsys):
    """Adapters of the same model and settings resume; a refused attempt (another rank) first
    leaves the --adapter-path free for the run that fits. Seed 1 initialises fresh adapters other
    than the earlier run's (seed 0), so only a resumed run keeps its lora_a."""
    import mlx.core as mx
    import numpy as np

    from xlstm_metal.cli import main

    resume = adapters / "adapters.safetensors"
    out = tmp_path / "resumed"
    args = with_value(lora_args(ckpt, lora_data, "--adapter-path", out, "--resume-adapter-file", resume), "--seed", "1")
    (tmp_path / "rank4.yaml").write_text("lora_parameters: {rank: 4, dropout: 0.0, scale: 20.0}\n")
    code, err = run_main([*args, "--config", tmp_path / "rank4.yaml"], capsys)
    assert code == 2 and "does not hold the adapters this run trains" in err, err
    assert not out.exists()

    assert main([str(a) for a in args]) == 0
    earlier = {k: np.array(v) for k, v in mx.load(str(resume)).items()}
    resumed = {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}
    assert resumed.keys() == earlier.keys()
    for name in earlier:  # one more step at --learning-rate 1e-5 from where the earlier run ended
        assert np.allclose(resumed[name], earlier[name], atol=1e-3), name
    fresh = tmp_path / "fresh"
    assert main([str(a) for a in with_value(lora_args(ckpt, lora_data, "--adapter-path", fresh), "--seed", "1")]) == 0
    started = {k: np.array(v) for k, v in mx.load(str(fresh / "adapters.safetensors")).items()}
    assert not all(np.allclose(started[k], earlier[k], atol=1e-3) for k in earlier if k.endswith("lora_a"))


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
    # MLX: a RuntimeError traceback, "Can't parse address no-such-host.invalid:5000"
    ('[["no-such-host.invalid:5000"], ["127.0.0.1:5001"]]', "1",
     ["host no-such-host.invalid (in no-such-host.invalid:5000) cannot be resolved"]),
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


def test_ring_host_names_come_back_as_addresses(tmp_path):
    # MLX resolves a name itself, but its first answer, IPv6 included, into an IPv4 socket.
    from xlstm_metal.distributed.comm import ring_hosts

    hosts = tmp_path / "hosts.json"
    hosts.write_text('[["localhost:5000"], ["127.0.0.1:5001", "LOCALHOST:5002"]]')
    assert ring_hosts({"MLX_HOSTFILE": str(hosts), "MLX_RANK": "0"}) == [["127.0.0.1:5000"],
                                                                         ["127.0.0.1:5001", "127.0.0.1:5002"]]


#: One ring process: joins the world (``world()``), sums its rank + 1 with the others', and
#: prints what MLX's ring backend read from the host file ``MLX_HOSTFILE`` named at its init.
RING_WORKER = """
import json, os, sys
import xlstm_metal
import mlx.core as mx
from xlstm_metal.distributed import comm
init, read = mx.distributed.init, []
def spy(*args, **kwargs):
    read.append(json.loads(open(os.environ["MLX_HOSTFILE"]).read()))
    return init(*args, **kwargs)
mx.distributed.init = spy
group = comm.world()
total = mx.distributed.all_sum(mx.array([group.rank() + 1.0]), group=group).item()
print(json.dumps({"size": group.size(), "sum": total, "mlx_read": read, "hostfile": os.environ["MLX_HOSTFILE"]}))
"""


def test_a_ring_of_host_names_runs_on_their_addresses(tmp_path):
    from distributed_helpers import free_port

    port = free_port(2)
    hosts = tmp_path / "hosts.json"
    hosts.write_text(f'[["localhost:{port}"], ["localhost:{port + 1}"]]')
    scratch = tmp_path / "tmp"  # where the addresses' host file is written (and removed)
    scratch.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", RING_WORKER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO,
                              env=repo_env(MLX_HOSTFILE=str(hosts), MLX_RANK=str(rank), TMPDIR=str(scratch)))
             for rank in range(2)]
    try:
        results = [(*p.communicate(timeout=60), p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for out, err, code in results:
        assert code == 0 and "Traceback" not in err, err[-3000:]
        got = json.loads(out.strip().splitlines()[-1])
        assert (got["size"], got["sum"]) == (2, 3.0), got
        assert got["mlx_read"] == [[[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]], got
        assert got["hostfile"] == str(hosts), got  # the user's file again once the ring is up
    assert not list(scratch.iterdir())


def test_ring_host_that_does_not_resolve_is_one_line_at_the_command_line(tmp_path):
    # A RuntimeError traceback from mx.distributed.init: "Can't parse address no-such-host.invalid:5000".
    hosts = tmp_path / "hosts.json"
    hosts.write_text('[["no-such-host.invalid:5000"], ["127.0.0.1:5001"]]')
    proc = xlstm_metal("generate", "--model", save_tiny(tmp_path / "m"), "--prompt", "hi", "-n", "2", "--temp", "0",
                       env={"MLX_RANK": "0", "MLX_HOSTFILE": str(hosts)}, timeout=60)
    assert_one_error_line(proc, f"MLX_HOSTFILE={hosts}: host no-such-host.invalid", "cannot be resolved")


def test_mlx_lm_generate_checks_the_ring_before_mlx_lms_own_init(ckpt, tmp_path):
    # mlx-lm generate calls mx.distributed.init() itself: MLX's traceback, "Can't parse address ..."
    hosts = tmp_path / "hosts.json"
    hosts.write_text('[["no-such-host.invalid:5000"], ["127.0.0.1:5001"]]')
    proc = xlstm_metal("mlx-lm", "generate", "--model", ckpt, "--prompt", "hi", "--max-tokens", "2",
                       env={"MLX_RANK": "0", "MLX_HOSTFILE": str(hosts)}, timeout=120)
    assert_one_error_line(proc, f"MLX_HOSTFILE={hosts}: host no-such-host.invalid", "cannot be resolved")


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
