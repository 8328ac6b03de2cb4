"""Starting local multi-process runs for the distributed tests: free ports, mlx.launch, ring env."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path


def free_port(count: int = 2) -> int:
    """A port P with P .. P+count-1 free on 127.0.0.1 (the ring backend takes one per rank)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 60000 - count)
        sockets = []
        try:
            for p in range(port, port + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free ports")


def launch_cmd(n: int, command: list[str]) -> list[str]:
    """``mlx.launch -n N -p PORT --backend ring -- command`` on this machine."""
    launcher = Path(sys.executable).parent / "mlx.launch"
    return [str(launcher), "-n", str(n), "-p", str(free_port(n)), "--backend", "ring", "--", *map(str, command)]


def ring_env(rank: int, n: int, port: int, tmp: Path) -> dict[str, str]:
    """The environment mlx.launch gives rank ``rank`` of ``n`` local ring processes (for tests
    that start, watch or kill the ranks themselves)."""
    hostfile = tmp / f"ring-{port}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(n)]))
    return {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}


def run_two_ranks(tmp_path: Path, commands: list[list], *, envs: list[dict] | None = None,
                  inputs: list[str] | None = None, cwds: list | None = None,
                  timeout: float = 90) -> list[tuple[int, str, str]]:
    """``commands[r]`` as rank r of a 2-process ring started by hand (no mlx.launch), with
    ``envs[r]`` added to its environment, ``inputs[r]`` on its stdin (from a file: no rank waits
    for us) and ``cwds[r]`` as its directory: [(exit code, stdout, stderr)] per rank; a rank
    still running after ``timeout`` seconds fails the test (killed)."""
    port = free_port(2)
    procs = []
    try:
        for r, cmd in enumerate(commands):
            stdin = tmp_path / f"stdin-{port}-{r}"
            stdin.write_text(inputs[r] if inputs else "")
            with open(stdin) as handle:
                procs.append(subprocess.Popen(list(map(str, cmd)), env={**ring_env(r, 2, port, tmp_path),
                                                                         **(envs[r] if envs else {})},
                                              cwd=cwds[r] if cwds else None, stdin=handle, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        return [(p.returncode, out, err) for p in procs for out, err in [p.communicate(timeout=timeout)]]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def assert_memory_stop(rank: int, hit: int, code: int, err: str, prefix: str = "",
                       forbidden: tuple[str, ...] = ("Traceback",)) -> None:
    """One rank of two after rank ``hit`` reached its hard memory limit (XLSTM_MEM_HARD_MB=2):
    exit 3, none of ``forbidden`` on its stderr ``err``, and its line: the limit for rank
    ``hit``, the agreement to stop for the other (each after ``prefix``)."""
    assert code == 3, (rank, err[-2000:])
    assert not any(text in err for text in forbidden), err[-2000:]
    if rank == hit:
        assert f"{prefix}rank {rank} of 2: memory" in err and "reached the hard limit 2.0 MB " \
            "(XLSTM_MEM_HARD_MB=2); stopped cleanly" in err, err[-2000:]
    else:
        assert f"{prefix}rank {rank} of 2: rank {hit} reached its hard memory limit: every process " \
            "stopped cleanly" in err, err[-2000:]
