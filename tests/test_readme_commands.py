"""Every `xlstm-metal` command in README.md's code blocks, run as a shell runs it (offline, on the
packaged model), checking what the README says it does.

Each command of the README is a key of RUN (run here, with a check of the README's promise) or
of SKIPPED (with the reason). A command that is in neither (a new one, or one whose text
changed) fails test_every_readme_command_is_run_or_skipped: add it to one of the tables.
Placeholders (``path/or/hf-id``, ``ckpt``, ``p.txt``, ``data/``, ...) are replaced by the
packaged model or small files made here; PLACEHOLDERS lists them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from xlstm_metal.generation import DEFAULT_MODEL_DIR

from conftest import repo_env  # noqa: E402
from distributed_helpers import free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


# ------------------------------------------------------------------------------ parsing
def readme_commands(text: str) -> list[str]:
    """Shell lines of the README's fenced code blocks (not python ones) that run `xlstm-metal`,
    comments removed, backslash continuations joined."""
    commands = []
    for lang, body in re.findall(r"^```([\w-]*)\n(.*?)^```", text, flags=re.S | re.M):
        if lang.lower() in ("python", "py", "json", "yaml", "toml", "text"):
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            tokens = shlex.split(line, comments=True)
            if "xlstm-metal" in tokens:
                commands.append(normalize(line))
    return commands


OPERATORS = ("&&", "||", "|", ";")


def normalize(command: str) -> str:
    """A command as its shell words (quoting and spacing as written do not matter)."""
    return join_words(shlex.split(command, comments=True))


def join_words(tokens: list[str]) -> str:
    return " ".join(t if t in OPERATORS else shlex.quote(t) for t in tokens)


# ------------------------------------------------------------------------------ running
PROMPT = "To read a text file in Python,"


def placeholders(tmp: Path) -> dict[str, str]:
    """README placeholder word -> what it stands for here (files made in ``tmp`` if it exists)."""
    if not tmp.is_dir():
        return {"path/or/hf-id": str(DEFAULT_MODEL_DIR), "ckpt": str(DEFAULT_MODEL_DIR)}
    (tmp / "p.txt").write_text(PROMPT, encoding="utf-8")
    (tmp / "more.jsonl").write_text("".join(
        json.dumps({"text": f"Open the file with open(path). Line {i} reads the file and closes it."}) + "\n"
        for i in range(200)))
    (tmp / "samples.jsonl").write_text(json.dumps({"prompt": "import", "text": " os"}) + "\n"
                                       + json.dumps({"text": "loop loop loop loop loop"}) + "\n")
    runs = tmp / "runs" / "tune"  # a finished tune directory for `plot runs/tune`
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "trials.jsonl").write_text("".join(json.dumps(
        {"number": i, "status": "complete", "value": v, "params": {"chunk_size": c}, "metrics": {}}) + "\n"
        for i, (v, c) in enumerate([(3.0, 16), (5.0, 64)])))
    (tmp / "held-out.txt").write_text("Use the with statement to open a file; it closes the file again. " * 8)
    return {"path/or/hf-id": str(DEFAULT_MODEL_DIR), "ckpt": str(DEFAULT_MODEL_DIR), "p.txt": str(tmp / "p.txt"),
            "more.jsonl": str(tmp / "more.jsonl"), "samples.jsonl": str(tmp / "samples.jsonl"),
            "held-out.txt": str(tmp / "held-out.txt")}


@dataclass
class Run:
    """How to run one README command and what to check."""

    check: Callable[[subprocess.CompletedProcess, Path], None]
    stdin: str | None = None
    replace: dict[str, str] = field(default_factory=dict)  # word -> word (e.g. a shorter run)
    extra: list[str] = field(default_factory=list)  # appended to the xlstm-metal words
    slow: bool = False
    setup: Callable[[Path], None] | None = None  # makes what the command reads in tmp first


def float_export(tmp: Path) -> None:
    """runs/m/export as `train --export` leaves it: float weights (the packaged model, written
    dequantized by `xlstm-metal convert`), which mlx-lm's `convert -q` can quantize."""
    out = tmp / "runs" / "m" / "export"
    subprocess.run([sys.executable, "-m", "xlstm_metal", "convert", str(DEFAULT_MODEL_DIR), str(out)],
                   check=True, capture_output=True, env=repo_env())


def shell_line(command: str, tmp: Path, case: Run) -> str:
    """The README line with placeholders replaced; segments that install the package are
    dropped (the package under test is what runs)."""
    words = {**placeholders(tmp), **case.replace}
    segments: list[list[str]] = [[]]
    for token in shlex.split(command):
        if token in OPERATORS:
            segments += [[token], []]
        else:
            segments[-1].append(words.get(token, token))
    out: list[str] = []
    for segment in segments:
        if segment[:4] == ["python3", "-m", "pip", "install"]:
            continue  # with the operator that follows it
        if segment and segment[0] in OPERATORS and (not out or out[-1] in OPERATORS):
            continue
        if segment and segment[0] == "xlstm-metal":
            segment = segment + case.extra
        out += segment
    return join_words(out)


def run_readme(command: str, tmp: Path, case: Run) -> subprocess.CompletedProcess:
    shim = tmp / "bin" / "xlstm-metal"  # the command a `pip install` puts on PATH, for this checkout
    shim.parent.mkdir(exist_ok=True)
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m xlstm_metal "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    # mlx.launch (installed with MLX) on free ports: tests run side by side with other jobs.
    launcher = shim.parent / "mlx.launch"
    launcher.write_text(f'#!/bin/sh\nexec "{Path(sys.executable).parent / "mlx.launch"}" -p {free_port(4)} "$@"\n')
    launcher.chmod(launcher.stat().st_mode | stat.S_IEXEC)
    env = repo_env(PATH=f"{shim.parent}{os.pathsep}{os.environ.get('PATH', '')}",
                   XLSTM_METAL_BLAS_THREADS=os.environ.get("XLSTM_METAL_BLAS_THREADS", "1"),
                   XLSTM_RUNTIME_DIR=str(tmp / "runtime"),  # status records of `top`: this test's own
                   XLSTM_METAL_PROFILES=str(tmp / "profiles"))  # profiles `tune` saves: this test's own
    proc = subprocess.run(["bash", "-c", shell_line(command, tmp, case)], input=case.stdin, capture_output=True,
                          text=True, cwd=tmp, env=env, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


# ------------------------------------------------------------------------------ checks
def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]


def streams_text(proc, tmp):
    """generate prints a completion (text, then one newline) and nothing else on stdout."""
    ok(proc)
    assert proc.stdout.endswith("\n") and proc.stdout.strip(), repr(proc.stdout)


def verbose_seeded_sampling(proc, tmp):
    """-v adds prompt / generation speed and peak memory on stderr; -n caps the tokens."""
    streams_text(proc, tmp)
    stats = re.search(r"prompt: (\d+) tokens, [\d,.]+ tok/s \| generation: (\d+) tokens, [\d,.]+ tok/s \| "
                      r"peak memory: [\d.]+ GB", proc.stderr)
    assert stats, proc.stderr
    assert int(stats.group(1)) > 1 and 1 <= int(stats.group(2)) <= 200


def stops_at_blank_line(proc, tmp):
    """--stop "\\n\\n" ends the reply before the first blank line."""
    streams_text(proc, tmp)
    assert "\n\n" not in proc.stdout[:-1], repr(proc.stdout)


def describes_model(proc, tmp):
    """--info lists blocks, sizes, memory; --show-wiring the blocks and their cells."""
    ok(proc)
    out = proc.stdout
    for word in ("num_blocks", "embedding_dim", "parameters", "weights_bytes", "state_bytes_per_row",
                 "blocks.0: mLSTMBlock", "lm_head"):
        assert word in out, out


def chats(proc, tmp):
    """chat answers each turn, /reset forgets the conversation, Ctrl-D (end of input) quits."""
    ok(proc)
    assert "(conversation reset)" in proc.stderr and "/reset" in proc.stderr  # the help line
    assert proc.stdout.strip(), repr(proc.stdout)


def fine_tunes(proc, tmp):
    """train --init-from default fine-tunes the packaged model on JSON Lines, keeping its shape
    and tokenizer, and writes a checkpoint in --out."""
    ok(proc)
    (checkpoint,) = sorted((tmp / "runs" / "ft").glob("checkpoint-*"))
    packaged = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    tuned = json.loads((checkpoint / "config.json").read_text())
    assert {k: tuned[k] for k in ("embedding_dim", "num_blocks", "vocab_size")} == \
        {k: packaged[k] for k in ("embedding_dim", "num_blocks", "vocab_size")}
    assert (checkpoint / "tokenizer.json").read_bytes() == (DEFAULT_MODEL_DIR / "tokenizer.json").read_bytes()
    assert (tmp / "runs" / "ft" / "metrics.jsonl").is_file() and (tmp / "runs" / "ft" / "loss.png").is_file()


def top_snapshot(proc, tmp):
    """top --once prints one text snapshot of the machine and the jobs, then exits."""
    ok(proc)
    assert "CPU" in proc.stdout and "RAM" in proc.stdout and "MLX" in proc.stdout, proc.stdout


def top_json(proc, tmp):
    """top --json --once prints one JSON object: {"time", "interval", "machine", "jobs": [...]}."""
    ok(proc)
    snapshot = json.loads(proc.stdout)
    assert {"time", "interval", "machine", "jobs"} <= set(snapshot) and isinstance(snapshot["jobs"], list)


def memory_log(proc, tmp):
    """--mem-hard sets the watchdog's limit, --mem-log writes its samples as CSV."""
    streams_text(proc, tmp)
    rows = (tmp / "mem.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "hard_bytes" in header and len(rows) >= 2
    assert {int(r.split(",")[header.index("hard_bytes")]) for r in rows[1:]} == {12 * 10**9}


def draws_wiring(proc, tmp):
    """mad --show-wiring prints the lab model's wiring and draws one graph per distinct block."""
    ok(proc)
    assert "LabModel hybrid" in proc.stdout and "matrix_memory" in proc.stdout, proc.stdout
    assert (tmp / "hybrid.png").read_bytes()[:4] == b"\x89PNG"


def trains_data_parallel(proc, tmp):
    """Two processes train one run: one checkpoint directory and metrics.jsonl written by rank 0,
    every record marked with world_size 2."""
    ok(proc)
    run = tmp / "runs" / "dp"
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-0000003"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and {r["world_size"] for r in records} == {2}
    assert proc.stderr.count("done: 3 steps") == 1


def generates_like_one_process(proc, tmp):
    """Under mlx.launch -n 2 the text is printed once and equals a single process's."""
    streams_text(proc, tmp)
    assert "exited with code" not in proc.stderr, proc.stderr
    single = subprocess.run([sys.executable, "-m", "xlstm_metal", "generate", "--prompt", "def main():", "-n", "12",
                             "--temp", "0"], capture_output=True, text=True, timeout=300)
    assert proc.stdout == single.stdout


# ------------------------------------------------------------------------------ the tables
RUN: dict[str, Run] = {
    normalize('python3 -m pip install -e . && xlstm-metal generate --prompt "The Python interpreter"'):
        Run(streams_text, extra=["-n", "24"]),
    normalize('xlstm-metal generate --prompt "To open a file in Python,"'): Run(streams_text, extra=["-n", "24"]),
    normalize("xlstm-metal generate -m path/or/hf-id --prompt-file p.txt -n 200 --temp 0.8 --top-p 0.95 --seed 1 -v"):
        Run(verbose_seeded_sampling, replace={"200": "40"}),
    normalize('echo "Once upon" | xlstm-metal generate --prompt - --stop "\\n\\n"'): Run(stops_at_blank_line),
    normalize("xlstm-metal generate --info --show-wiring"): Run(describes_model),
    normalize("xlstm-metal chat -m ckpt"): Run(chats, stdin="What is a list?\n/reset\nHello\n", extra=["-n", "16"]),
    normalize("xlstm-metal train more.jsonl --text-field text --init-from default --out runs/ft --steps 500"):
        Run(fine_tunes, replace={"500": "2"},
            extra=["--seq-len", "64", "--batch-size", "2", "--eval-batches", "1", "--no-progress"], slow=True),
}

RUN.update({
    normalize("xlstm-metal top --once"): Run(top_snapshot),
    normalize("xlstm-metal top --json --once"): Run(top_json),
    normalize('xlstm-metal generate --prompt "def f" -n 20 --mem-hard 12GB --mem-log mem.csv'): Run(memory_log),
})

def lists_profiles(proc, tmp):
    """profile list shows the shipped profiles."""
    ok(proc)
    assert all(name in proc.stdout for name in ("exact-fp32", "fast-bf16", "nxai-parity")), proc.stdout


def profile_passes(proc, tmp):
    """profile check prints each block's error and PASS (exit 0) within the tolerance."""
    ok(proc)
    assert "block 0" in proc.stdout and "logits" in proc.stdout and "PASS" in proc.stdout, proc.stdout


def tunes_speed(proc, tmp):
    """tune writes its outputs and saves the winner as a profile for this device."""
    ok(proc)
    out = tmp / "runs" / "tune-speed"  # runs/tune holds the finished sweep `plot` reads
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    best = json.loads((out / "best.json").read_text())
    assert len(trials) == 4 and best["value"] == max(t["value"] for t in trials if t["status"] == "complete")
    assert (out / "summary.csv").is_file() and (out / "run_meta.json").is_file()
    assert len(list((tmp / "profiles").glob("tuned-*.json"))) == 1


def judges(proc, tmp):
    """judge writes one rating per record to ratings.jsonl and ratings.csv."""
    ok(proc)
    rows = [json.loads(line) for line in (tmp / "runs" / "ratings" / "ratings.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["distinct_1"] == 0.2 and rows[0]["perplexity"] > 1
    assert (tmp / "runs" / "ratings" / "ratings.csv").is_file()


def plots(proc, tmp):
    """plot writes the image."""
    ok(proc)
    assert (tmp / "tune.png").read_bytes()[:4] == b"\x89PNG"


RUN.update({
    normalize("xlstm-metal profile list"): Run(lists_profiles),
    normalize("xlstm-metal profile check nxai-parity --model ckpt"): Run(profile_passes),
    normalize('xlstm-metal generate --profile exact-fp32 --prompt "import os"'): Run(streams_text, extra=["-n", "12"]),
    normalize("xlstm-metal tune --objective speed --model ckpt --out runs/tune --mode ga --population 4 "
              "--generations 2"):
        Run(tunes_speed, replace={"4": "2", "runs/tune": "runs/tune-speed"},
            extra=["--prefill-length", "32", "--decode-tokens", "2", "--repeats", "1", "--no-progress"], slow=True),
    normalize("xlstm-metal judge --model ckpt --outputs samples.jsonl --out runs/ratings"): Run(judges),
    normalize("xlstm-metal plot runs/tune --out tune.png"): Run(plots),
})

def mlx_lm_generates(proc, tmp):
    """`xlstm-metal mlx-lm generate` runs mlx-lm's generate on our checkpoint (no
    --trust-remote-code: its model file is ours) and prints the completion between rulers."""
    ok(proc)
    assert proc.stdout.count("==========") == 2 and "Generation:" in proc.stdout, proc.stdout


def mlx_lm_converts(proc, tmp):
    """`xlstm-metal mlx-lm convert -q --q-bits 4` writes a 4-bit checkpoint (the i/f gate
    projections stay float) that loads here too."""
    ok(proc)
    from xlstm_metal import load_model

    assert "quantization" not in json.loads((tmp / "runs" / "m" / "export" / "config.json").read_text())
    config = json.loads((tmp / "runs" / "m" / "q4" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["model_file"] == "xlstm_mlx_lm.py"
    model = load_model(tmp / "runs" / "m" / "q4")
    import mlx.nn as nn

    assert isinstance(model.backbone.blocks[0].mlstm_layer.q, nn.QuantizedLinear)
    assert isinstance(model.backbone.blocks[0].mlstm_layer.igate_preact, nn.Linear)  # float


RUN.update({  # README "Use with mlx-lm"
    normalize('xlstm-metal mlx-lm generate --model runs/m/export --prompt "The for statement" --max-tokens 40'):
        Run(mlx_lm_generates, replace={"runs/m/export": str(DEFAULT_MODEL_DIR)}),
    normalize("xlstm-metal mlx-lm convert --hf-path runs/m/export --mlx-path runs/m/q4 -q --q-bits 4"):
        Run(mlx_lm_converts, setup=float_export),
})

RUN.update({  # several processes (README: Several processes and machines)
    normalize("mlx.launch -n 2 -- xlstm-metal train more.jsonl --out runs/dp --config tiny --batch-size 8 "
              "--seq-len 64 --steps 300"): Run(trains_data_parallel, replace={"300": "3"}, slow=True),
    normalize('mlx.launch -n 2 -- xlstm-metal generate --prompt "def main():" -n 40 --temp 0'):
        Run(generates_like_one_process, replace={"40": "12"}, slow=True),
    normalize('mlx.launch -n 2 -- xlstm-metal generate --parallel pipeline --prompt "def main():" -n 40 --temp 0'):
        Run(generates_like_one_process, replace={"40": "12"}, slow=True),
})


SKIPPED: dict[str, str] = {
    normalize("mlx.launch -n 2 -- xlstm-metal bench --shape 125m --parallel tensor --json"):
        "times a 125M-parameter model in two processes (minutes on a CPU); tests/test_distributed_inference.py "
        "checks tensor-parallel results and benchmarks/distributed_cpu.py runs this command",
    normalize("xlstm-metal convert NX-AI/xLSTM-7b xlstm-7b-4bit -q --q-bits 4 --q-group-size 64"):
        "downloads the 14 GB xLSTM-7b; tests/test_convert.py runs these flags on tiny checkpoints",
    normalize("xlstm-metal tune --objective train --data corpus/ --out runs/tune-train --trials 20 --backend ray "
              "--workers 2"):
        "20 training runs on a Ray cluster (minutes); tests/test_tune.py runs the train objective and the Ray "
        "backend on tiny budgets",
    normalize("xlstm-metal serve"): "serves until stopped; tests/test_serve.py starts `xlstm-metal serve`, "
                                    "sends requests and stops it with Ctrl-C (SIGINT)",
    normalize("xlstm-metal serve --model runs/m/export --host 0.0.0.0 --port 8000"):
        "serves until stopped on every interface; tests/test_serve.py runs the server on 127.0.0.1",
    normalize("xlstm-metal mlx-lm lora --model runs/m/export --train --data data/ --iters 100 "
              "--adapter-path runs/m/lora"):
        "needs a data/ directory of train/valid JSON Lines; tests/test_convert_roundtrips.py runs these flags "
        "(no --num-layers, as here) on a tiny model for 2 iterations and checks that the adapters change the output",
    normalize("xlstm-metal mlx-lm server --model runs/m/export --port 8081"):
        "serves until stopped; tests/test_serve.py serves the same model module through `xlstm-metal serve`",
    normalize("xlstm-metal train data/ --out runs/m --config pydoc-4m --max-time 600 --export runs/m/export"):
        "a 10-minute training run from scratch (its point is the time budget); tests/test_train_cli.py and "
        "tests/test_train_reliability.py run the same flags (--max-time, --export, --config) on tiny runs",
    normalize("xlstm-metal bench --shape 125m --prefill-lengths 512,2048 --decode-batches 1,8 --json"):
        "builds and times a 125M-parameter model (minutes on a CPU, not the packaged model); tests/test_bench.py "
        "runs these flags on a tiny config",
}

# The architecture lab.
RUN.update({
    normalize("xlstm-metal mad --arch hybrid --show-wiring hybrid.png"): Run(draws_wiring),
})
SKIPPED.update({
    normalize("xlstm-metal mad --arch mlstm --tasks in_context_recall --preset tiny"):
        "trains a model for minutes; tests/test_lab_mad.py runs this task at the tiny preset (slow tests) and "
        "tests/test_lab_cli.py the command with its flags on a short task",
    normalize("xlstm-metal evolve --budget 200000 --tasks in_context_recall --out runs/evolve"):
        "trains many candidates (minutes each); tests/test_lab_cli.py runs evolve on a short task",
    normalize("xlstm-metal train data/ --out runs/lab --arch runs/evolve/best-1.yaml"):
        "needs the evolve run above; tests/test_lab_cli.py trains an --arch model and reloads it",
})


# Quantization (issue 11).
def quantizes_and_generates(proc, tmp):
    """convert -q writes a 4-bit checkpoint (mlx-lm's quantization entry) that generate runs."""
    streams_text(proc, tmp)
    assert json.loads((tmp / "ckpt-4bit" / "config.json").read_text())["quantization"]["bits"] == 4
    assert re.search(r"4-bit, group 64, .* bits per weight", proc.stdout), proc.stdout


def checks_mixed(proc, tmp):
    """--q-recipe mixed-4-6 raises the (tied) embedding to 6 bits; --check prints the figures."""
    ok(proc)
    quantization = json.loads((tmp / "ckpt-mixed" / "config.json").read_text())["quantization"]
    assert quantization["bits"] == 4 and quantization["backbone.embeddings"]["bits"] == 6
    for words in ("perplexity  source", "mean KL(source || result)", "greedy agreement"):
        assert words in proc.stdout, proc.stdout


def writes_mxfp4(proc, tmp):
    """--q-mode mxfp4: MLX's float format (4 bits, groups of 32, uint8 scales, no biases)."""
    ok(proc)
    quantization = json.loads((tmp / "ckpt-mxfp4" / "config.json").read_text())["quantization"]
    assert (quantization["mode"], quantization["bits"], quantization["group_size"]) == ("mxfp4", 4, 32)
    assert "mxfp4, 4-bit, group 32" in proc.stdout, proc.stdout


RUN.update({
    normalize('xlstm-metal convert ckpt ckpt-4bit -q && xlstm-metal generate -m ckpt-4bit '
              '--prompt "To open a file in Python,"'): Run(quantizes_and_generates),
    normalize("xlstm-metal convert ckpt ckpt-mxfp4 -q --q-mode mxfp4"): Run(writes_mxfp4),
    normalize("xlstm-metal convert ckpt ckpt-mixed -q --q-recipe mixed-4-6 --check held-out.txt"):
        Run(checks_mixed, extra=["--check-greedy", "16"]),
})


def test_every_readme_command_is_run_or_skipped():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert commands, "no xlstm-metal commands found in README.md"
    unknown = [c for c in commands if c not in RUN and c not in SKIPPED]
    assert not unknown, ("README.md commands that this test neither runs nor skips (add each to RUN with a "
                         f"check, or to SKIPPED with the reason): {unknown}")
    stale = [c for c in (*RUN, *SKIPPED) if c not in commands]
    assert not stale, f"commands no longer in README.md (remove them here): {stale}"
    assert not set(RUN) & set(SKIPPED) and all(reason.strip() for reason in SKIPPED.values())


def test_parser_reads_blocks_comments_pipes_and_continuations():
    text = ("```bash\nxlstm-metal generate -p 'a b'   # a comment\necho hi | xlstm-metal chat \\\n  -m x\n"
            "pip install x\n```\n```python\nos.system('xlstm-metal generate')\n```\n")
    assert readme_commands(text) == ["xlstm-metal generate -p 'a b'", "echo hi | xlstm-metal chat -m x"]
    line = "python3 -m pip install -e . && xlstm-metal generate -m ckpt"
    assert shell_line(normalize(line), Path("/nonexistent"), Run(ok, extra=["-n", "3"])) == \
        f"xlstm-metal generate -m {DEFAULT_MODEL_DIR} -n 3"


@pytest.mark.parametrize("command", [pytest.param(c, marks=[pytest.mark.slow] if RUN[c].slow else [])
                                     for c in RUN])
def test_readme_command(command, tmp_path):
    case = RUN[command]
    if case.setup is not None:
        case.setup(tmp_path)
    case.check(run_readme(command, tmp_path, case), tmp_path)

