"""Lines of a launched `generate` / `chat` (`mlx.launch -n 2 --backend ring`) come once, from
rank 0, as the generated text does: the -v statistics line and chat's help and notes were
printed by every rank."""

import re
import subprocess
import sys

from distributed_helpers import launch_cmd  # noqa: E402
from test_distributed_inference import tiny_checkpoint  # noqa: E402

STATS = re.compile(r"^prompt: \d+ tokens, .* \| generation: .* \| peak memory: [\d.]+ GB \(rank 0 of 2\)$",
                   re.MULTILINE)


def launched(args, stdin=None):
    cmd = launch_cmd(2, [sys.executable, "-m", "xlstm_metal", *map(str, args)])
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=180)
    assert "exited with code" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def test_generate_verbose_prints_its_statistics_once(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    proc = launched(["generate", "-m", ckpt, "-p", "the quick", "-n", "12", "--temp", "0", "-v"])
    assert len(STATS.findall(proc.stderr)) == 1, proc.stderr  # the memory figure says whose it is
    assert proc.stdout.strip()


def test_chat_prints_its_help_notes_and_statistics_once(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    proc = launched(["chat", "-m", ckpt, "-n", "4", "--temp", "0", "-v"],
                    stdin="the quick\n/reset\n/help\n/rest\nbrown fox\n/quit\n")
    err = proc.stderr
    # At the start, for /help and in the /rest hint; each the launched chat's help
    assert err.count("commands: /reset clears the conversation, /quit exits (under mlx.launch") == 3, err
    assert err.count("(unknown command /rest: did you mean /reset?") == 1, err
    assert err.count("(conversation reset)") == 1, err
    assert len(STATS.findall(err)) == 2, err  # one per reply
