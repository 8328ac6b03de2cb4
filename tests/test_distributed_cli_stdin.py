"""stdin under `mlx.launch`: it copies its own stdin to every process and never closes it, so
`printf 'The cat' | mlx.launch -n 2 -- xlstm-metal generate --prompt -` waited forever for the
end of the prompt, and a piped `chat` never ended at the end of its input."""

import re
import subprocess
import sys

from distributed_helpers import free_port, launch_cmd, ring_env  # noqa: E402
from test_distributed_inference import tiny_checkpoint  # noqa: E402

MESSAGE = "xlstm-metal: error: --prompt - reads the prompt until stdin ends, and under mlx.launch it never does"


def test_prompt_from_stdin_is_a_usage_error_on_every_rank(tmp_path):
    """Two ranks whose stdin stays open, as mlx.launch leaves it: each exits 2 at once with a
    message pointing to --prompt-file, no traceback (they read stdin forever)."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    port = free_port(2)
    procs = [subprocess.Popen([sys.executable, "-m", "xlstm_metal", "generate", "-m", str(ckpt), "--prompt", "-",
                               "-n", "12"], env=ring_env(rank, 2, port, tmp_path), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    try:
        for p in procs:
            p.stdin.write("The cat")  # and never closed
            p.stdin.flush()
        results = []
        for p in procs:
            results.append((p.wait(timeout=60), p.stdout.read(), p.stderr.read()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                f.close()
    for code, out, err in results:
        assert code == 2, err[-2000:]
        assert "Traceback" not in err and out == ""
        assert MESSAGE in err and "give the prompt with --prompt-file FILE" in err, err


def test_piped_prompt_under_mlx_launch_ends(tmp_path):
    """The reported command line itself: mlx.launch ends (a rank's exit 2, the message) instead
    of hanging. (mlx.launch ends the other rank with SIGTERM once one has failed: whichever
    rank exits first reports the 2.)"""
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    cmd = launch_cmd(2, [sys.executable, "-m", "xlstm_metal", "generate", "-m", ckpt, "--prompt", "-", "-n", "12"])
    proc = subprocess.run(cmd, input="The cat", capture_output=True, text=True, timeout=120)
    assert re.search(r"Node with rank [01] exited with code 2\b", proc.stderr), proc.stderr[-2000:]
    assert MESSAGE in proc.stderr and "Traceback" not in proc.stderr


def test_launched_chat_says_that_only_quit_ends_it(tmp_path):
    """Piped turns ending with /quit end a launched chat; its first line says that Ctrl-D and
    the end of piped input do not (and `chat --help` says so)."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    cmd = launch_cmd(2, [sys.executable, "-m", "xlstm_metal", "chat", "-m", ckpt, "-n", "5", "--temp", "0"])
    proc = subprocess.run(cmd, input="the quick\n/quit\n", capture_output=True, text=True, timeout=120)
    assert "exited with code" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "/quit exits (under mlx.launch stdin never ends: neither Ctrl-D nor the end of piped input does)" \
        in proc.stderr, proc.stderr
    assert proc.stdout.strip()
    single = subprocess.run([sys.executable, "-m", "xlstm_metal", "chat", "-m", str(ckpt), "-n", "5", "--temp", "0"],
                            input="the quick\n/quit\n", capture_output=True, text=True, timeout=120)
    assert "/quit or Ctrl-D exits" in single.stderr and "under mlx.launch" not in single.stderr
    assert single.stdout == proc.stdout
    usage = subprocess.run([sys.executable, "-m", "xlstm_metal", "chat", "--help"], capture_output=True, text=True,
                           timeout=60)
    assert "Under mlx.launch only /quit ends the chat" in usage.stdout
