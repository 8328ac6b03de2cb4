"""Collectives and helpers every rank calls at the same point (broadcasts, consistency checks,
shipping rank 0's files), on ``mx.distributed``."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx
import numpy as np

#: Bytes per collective when shipping files and byte strings.
_CHUNK = 64 << 20
#: Files at most this large are hashed whole to decide whether a rank already has them; larger
#: ones by size and their first and last MiB.
_HASH_WHOLE = 64 << 20


class DistributedError(RuntimeError):
    """The processes of a distributed run disagree or lost contact; the message says which."""


_WORLD: mx.distributed.Group | None = None

#: How MLX's backends word a collective that failed because a peer process is gone (the ring:
#: "[ring] connection to a peer was lost"; NCCL: "remote process exited or there was a network
#: error"; sockets: reset / broken pipe). Only these: any other error keeps its own traceback.
_PEER_LOSS = re.compile(r"connection to a peer was lost|remote process exited|network error"
                        r"|connection (reset|refused|closed)|broken pipe", re.IGNORECASE)


def world() -> mx.distributed.Group:
    """The global group: all processes ``mlx.launch`` started (size 1 outside it). The ring
    backend's environment is checked first (:func:`ring_hosts`): SettingError naming the variable.
    Host names in the ring's host file reach MLX as the IPv4 addresses they resolve to here."""
    global _WORLD
    if _WORLD is None:
        checked = _ring_hostfile()
        if checked is not None and len(checked[1]) == 1:
            # A world of one (``mlx.launch -n 1`` writes an empty host file): MLX's ring backend
            # failed to parse the empty file (a JSON traceback) and waited forever on a file of
            # one host; a process on its own needs no ring.
            saved = os.environ.pop("MLX_HOSTFILE")
            try:
                _WORLD = mx.distributed.init()
            finally:
                os.environ["MLX_HOSTFILE"] = saved
        elif checked is not None:
            with _join_deadline(len(checked[1])):
                _WORLD = _init_with_addresses(checked[1]) if checked[1] != checked[0] else mx.distributed.init()
        else:
            _WORLD = mx.distributed.init()
        if checked is not None and _WORLD.size() > 1:
            _watch_ring(_WORLD, checked[1])
    return _WORLD


#: Seconds a rank may live on once MLX's ring backend gave up on a collective (a peer process
#: gone) before :func:`_watch_ring` ends it; the error path of a main thread that got the
#: collective's RuntimeError ends the process well within it.
RING_FAILURE_GRACE_S = 3.0
#: Seconds between the ring watch's looks at this process's connections.
_RING_POLL_S = 0.5


def _watch_ring(group: mx.distributed.Group, hosts: list[list[str]]) -> None:
    """End this process, with a line naming the rank it lost, when MLX's ring backend gave up on
    a collective because a peer process is gone: the main thread of a tensor-parallel rank then
    waited forever (MLX's scheduler never finishes the failed task). Under ``mlx.launch`` the
    launcher's SIGTERM ended such a rank (see monitor.job); processes started otherwise (by
    hand, by another launcher) hung. The sign: a ring connection that was open after ``init``
    is closed by this process (the ring closes a connection after its failed sends / receives);
    a peer that merely finished (its side closed, ours still open) is no failure. The process
    gets SIGTERM (handlers unwind, partial outputs go; monitor.job ends a main thread stuck in
    native code) and, should it live on, exits with code 1."""
    import atexit
    import threading

    try:
        import psutil

        proc = psutil.Process()
    except Exception:  # noqa: BLE001 (no psutil here: no watch, as before)
        return
    rank, size = group.rank(), group.size()
    owners = {}
    for r, addresses in enumerate(hosts):
        for address in addresses:
            host, _, port = address.rpartition(":")
            owners[(host, int(port))] = r

    def ring_connections() -> dict[tuple, int | None]:
        """{(local, remote): peer rank or None where unknown} of this process's open ring connections."""
        found = {}
        for conn in proc.net_connections("tcp"):
            if not conn.raddr or conn.status not in (psutil.CONN_ESTABLISHED, psutil.CONN_CLOSE_WAIT):
                continue
            local, remote = (conn.laddr.ip, conn.laddr.port), (conn.raddr.ip, conn.raddr.port)
            if owners.get(local) == rank or owners.get(remote, rank) != rank:
                found[(local, remote)] = owners.get(remote)
        return found

    try:
        opened = ring_connections()
    except Exception:  # noqa: BLE001 (connections not readable here: no watch)
        return
    if not opened:
        return
    stop = threading.Event()
    atexit.register(stop.set)  # the group's sockets close as the interpreter ends: no failure

    def lost(peer: int | None) -> str:
        who = f"rank {peer}" if peer is not None else f"rank {1 - rank}" if size == 2 else "another process"
        return (f"xlstm-metal: error: rank {rank} of {size}: lost the connection to {who} in a collective "
                f"(MLX's ring backend gave up on it); {who} has probably died: stopping this process")

    def watch() -> None:
        failed_at, peer = None, None
        while not stop.wait(_RING_POLL_S):
            if failed_at is None:
                try:
                    now = ring_connections()
                except Exception:  # noqa: BLE001
                    continue
                gone = [key for key in opened if key not in now]
                if gone:
                    failed_at, peer = time.monotonic(), opened[gone[0]]
            elif time.monotonic() - failed_at >= RING_FAILURE_GRACE_S:
                break
        else:
            return
        import signal

        print(lost(peer), file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        # A handler that unwinds ends the process; monitor.job ends a main thread stuck in native
        # code after its SIGTERM_GRACE_S. Anything else: this process ends here.
        if not stop.wait(15.0):
            print(f"xlstm-metal: rank {rank} of {size}: the main thread did not end after SIGTERM; exiting",
                  file=sys.stderr, flush=True)
            os._exit(1)

    threading.Thread(target=watch, name="xlstm-ring-watch", daemon=True).start()


#: Seconds the processes of a ring have to join it (``XLSTM_RING_JOIN_TIMEOUT`` overrides).
RING_JOIN_TIMEOUT_S = 120.0
#: The watcher of :func:`_join_deadline`, a process of its own (MLX's ring ``init`` holds the GIL
#: while it waits: no thread of this process runs): args PID, seconds, message; ends when its
#: stdin does (the ring joined, or this process is gone) or kills PID once the time is up.
_JOIN_WATCHER = """
import os, select, signal, sys
pid, limit, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if not select.select([sys.stdin], [], [], limit)[0]:
    print(message, file=sys.stderr, flush=True)
    os.kill(pid, signal.SIGKILL)
"""


@contextlib.contextmanager
def _join_deadline(size: int):
    """End this process (one line; killed, exit status -9) when the ring's ``init`` has not
    returned within ``XLSTM_RING_JOIN_TIMEOUT`` seconds: MLX waited forever for a process that
    never joins (one that failed before joining, e.g. on an input only it was given, or a host
    file listing more processes than were started), and holds the GIL meanwhile, so a watcher
    thread could not run. SettingError for a value that is not a positive number."""
    import subprocess

    from ..errors import SettingError

    text = os.environ.get("XLSTM_RING_JOIN_TIMEOUT", "").strip()
    try:
        limit = float(text) if text else RING_JOIN_TIMEOUT_S
    except ValueError:
        limit = float("nan")
    if not 0 < limit < float("inf"):
        raise SettingError(f"XLSTM_RING_JOIN_TIMEOUT must be a positive number of seconds, got {text!r}")
    message = (f"xlstm-metal: error: rank {os.environ.get('MLX_RANK')} of {size}: not every process joined the ring "
               f"within {limit:g} s (MLX_HOSTFILE={os.environ.get('MLX_HOSTFILE')} lists {size}): start one process "
               "per entry, all given the same file (mlx.launch does), or set XLSTM_RING_JOIN_TIMEOUT to wait longer; "
               "stopping this process")
    try:
        watcher = subprocess.Popen([sys.executable, "-S", "-c", _JOIN_WATCHER, str(os.getpid()), str(limit), message],
                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    except OSError:  # no watcher: MLX waits as before
        watcher = None
    try:
        yield
    finally:
        if watcher is not None:
            watcher.stdin.close()
            watcher.wait()


def _init_with_addresses(hosts: list[list[str]]) -> mx.distributed.Group:
    """``mx.distributed.init()`` with the ring's host file replaced by ``hosts`` (addresses): a
    copy written whole to a new temporary file, named by ``MLX_HOSTFILE`` while MLX's ring backend
    reads it (its ``init`` reads the variable and the file, once; the group is then kept), and
    removed afterwards, ``MLX_HOSTFILE`` naming the user's file again."""
    saved = os.environ["MLX_HOSTFILE"]
    handle, path = tempfile.mkstemp(prefix="xlstm-ring-hosts-", suffix=".json")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(hosts, out)
        os.environ["MLX_HOSTFILE"] = path
        return mx.distributed.init()
    finally:
        os.environ["MLX_HOSTFILE"] = saved
        with contextlib.suppress(OSError):
            os.unlink(path)


#: A ring address in a host file: ``host:port``, the host an IPv4 address or a name (resolved to
#: one here: :func:`ring_hosts`).
_RING_ADDRESS = re.compile(r"^[^:\s]+:(\d{1,5})$")
_HOSTFILE_FORM = ('a JSON list with one list of "ip:port" addresses per process, e.g. '
                  '[["127.0.0.1:5000"], ["127.0.0.1:5001"]] (mlx.launch writes it)')


def ring_hosts(env: Mapping[str, str] | None = None) -> list[list[str]] | None:
    """The ring backend's hosts, one list of ``ip:port`` addresses per rank, from ``MLX_HOSTFILE``
    (which ``mlx.launch --backend ring`` writes) and ``MLX_RANK``, checked as MLX would read them:
    None where ``MLX_HOSTFILE`` is unset; ``[[]]`` (a world of one) for the empty file ``mlx.launch -n 1``
    writes. :class:`~xlstm_metal.errors.SettingError` naming the variable otherwise: MLX failed on a
    missing or malformed file with a RuntimeError traceback from deep inside ``mx.distributed.init``
    (an empty list: a crash on SIGFPE), waited forever with ``MLX_RANK`` not a number, and ran as one
    process without a word when ``MLX_RANK`` was unset. In a world of several processes a host
    given by name (``localhost:5000``) comes back as the IPv4 address it resolves to (see
    :func:`_resolve_ring_address`); one that does not resolve is a SettingError naming it."""
    checked = _ring_hostfile(env)
    return None if checked is None else checked[1]


def _ring_hostfile(env: Mapping[str, str] | None = None) -> tuple[list[list[str]], list[list[str]]] | None:
    """:func:`ring_hosts`' check: (the hosts as the file gives them, the same with names resolved),
    or None where ``MLX_HOSTFILE`` is unset."""
    from ..errors import SettingError

    env = os.environ if env is None else env
    name = env.get("MLX_HOSTFILE")
    if not name:
        return None
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SettingError(f"MLX_HOSTFILE={name}: cannot read the ring backend's host file "
                           f"({getattr(err, 'strerror', None) or err})") from None
    rank_text = env.get("MLX_RANK")
    if rank_text is None:
        raise SettingError(f"MLX_HOSTFILE={name} is set but MLX_RANK is not: start the processes with "
                           "mlx.launch, which sets both, or unset MLX_HOSTFILE to run one process")
    if not text.strip():
        hosts: Any = [[]]
    else:
        try:
            hosts = json.loads(text)
        except ValueError as err:
            raise SettingError(f"MLX_HOSTFILE={name} is not valid JSON ({err}): it must hold {_HOSTFILE_FORM}") from None
        good = (isinstance(hosts, list) and hosts and all(
            isinstance(h, list) and h and all(isinstance(a, str) and _RING_ADDRESS.match(a)
                                              and int(_RING_ADDRESS.match(a).group(1)) <= 65535 for a in h)
            for h in hosts))
        if not good:
            raise SettingError(f"MLX_HOSTFILE={name} must hold {_HOSTFILE_FORM}, got {text.strip()[:80]}")
    if not rank_text.strip().isdigit() or int(rank_text) >= len(hosts):
        raise SettingError(f"MLX_RANK={rank_text} must be a process number from 0 to {len(hosts) - 1} "
                           f"(MLX_HOSTFILE={name} lists {len(hosts)} process{'es' if len(hosts) > 1 else ''})")
    if len(hosts) == 1:  # a world of one: no ring, no address is used (world())
        return hosts, hosts
    resolved: dict[str, str] = {}
    return hosts, [[_resolve_ring_address(a, name, resolved) for a in h] for h in hosts]


def _resolve_ring_address(address: str, hostfile: str, resolved: dict[str, str]) -> str:
    """``host:port`` of a ring host file as ``ip:port``, the host's first IPv4 address (``resolved``:
    those found so far, by host). MLX's ring backend resolves a host itself (any address family,
    its first answer) but opens IPv4 sockets only, so a name answered with an IPv6 address first
    (``localhost`` where ``::1`` comes first, as on macOS) cannot work there, and a name that did
    not resolve ended in a RuntimeError traceback from ``mx.distributed.init`` ("Can't parse
    address ..."). SettingError naming the host for a name that does not resolve, or resolves to
    IPv6 addresses only."""
    import socket

    from ..errors import SettingError

    host, _, port = address.rpartition(":")
    if host not in resolved:
        try:
            ipaddress.IPv4Address(host)
            resolved[host] = host
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as err:
                why = getattr(err, "strerror", None) or str(err)
                try:
                    others = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
                except (socket.gaierror, UnicodeError):
                    others = set()
                if others:
                    raise SettingError(f"MLX_HOSTFILE={hostfile}: host {host} (in {address}) has no IPv4 address, "
                                       f"only {', '.join(sorted(others))}: MLX's ring backend connects over IPv4; "
                                       "give an IPv4 address") from None
                raise SettingError(f"MLX_HOSTFILE={hostfile}: host {host} (in {address}) cannot be resolved "
                                   f"({why}): give its IPv4 address or a name this machine resolves") from None
            resolved[host] = infos[0][4][0]
    return f"{resolved[host]}:{port}"


def launched() -> bool:
    """True when this process was started as one of several by ``mlx.launch`` (or mpirun)."""
    if any(os.environ.get(k) for k in ("MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLX_JACCL_COORDINATOR")):
        return True
    return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def launch_rank(env: Mapping[str, str] | None = None) -> tuple[int, int | None] | None:
    """(rank, world size) that ``mlx.launch`` (or mpirun) gave this process, read from the
    environment without joining the group; the size is None where the environment does not
    say. None outside such a launch."""
    env = os.environ if env is None else env
    try:
        if env.get("OMPI_COMM_WORLD_RANK"):
            return int(env["OMPI_COMM_WORLD_RANK"]), int(env.get("OMPI_COMM_WORLD_SIZE") or 0) or None
        if not env.get("MLX_RANK"):
            return None
        rank = int(env["MLX_RANK"])
    except ValueError:
        return None
    if (env.get("MLX_WORLD_SIZE") or "").isdigit():  # nccl
        return rank, int(env["MLX_WORLD_SIZE"])
    for var in ("MLX_HOSTFILE", "MLX_IBV_DEVICES"):  # ring, jaccl: a JSON list with one entry per rank
        try:
            hosts = json.loads(Path(env[var]).read_text() or "[[]]")  # (mlx.launch -n 1's: "rank 0 of several")
        except (KeyError, OSError, ValueError):
            continue
        if isinstance(hosts, list) and hosts:
            return rank, len(hosts)
    return rank, None


def joined_world() -> mx.distributed.Group | None:
    """The group of several processes this one has joined (:func:`world` was called), else
    None; never joins it itself."""
    return _WORLD if _WORLD is not None and _WORLD.size() > 1 else None


def process_rank() -> tuple[int, int | None] | None:
    """(rank, world size) of this process in a distributed run: the group's once it has been
    joined (:func:`world`), before that :func:`launch_rank`'s. None for a process on its own.
    Never joins the group itself (a status record reads it from another thread)."""
    if _WORLD is not None:
        return (_WORLD.rank(), _WORLD.size()) if _WORLD.size() > 1 else None
    return launch_rank()


def size_and_rank(group: mx.distributed.Group | None) -> tuple[int, int]:
    return (1, 0) if group is None else (group.size(), group.rank())


def is_main(group: mx.distributed.Group | None) -> bool:
    """Rank 0 (or no group): the process that writes files and prints."""
    return group is None or group.rank() == 0


# ------------------------------------------------------------------------------ collectives
def _bcast(array: mx.array, group: mx.distributed.Group) -> mx.array:
    """Rank 0's ``array`` on every rank (every rank passes an array of the same shape/dtype)."""
    if group.rank() != 0:
        array = mx.zeros_like(array)
    out = mx.distributed.all_sum(array, group=group)
    mx.eval(out)
    return out


def broadcast_bytes(data: bytes | None, group: mx.distributed.Group) -> bytes:
    """Rank 0's ``data`` on every rank (the others pass None)."""
    if group.size() == 1:
        return data or b""
    length = int(_bcast(mx.array([len(data) if group.rank() == 0 else 0], dtype=mx.int64), group).item())
    out = bytearray()
    for start in range(0, length, _CHUNK):
        n = min(_CHUNK, length - start)
        piece = np.frombuffer(data[start : start + n], dtype=np.uint8) if group.rank() == 0 else np.zeros(n, np.uint8)
        out += bytes(np.asarray(_bcast(mx.array(piece), group)))
    return bytes(out)


def broadcast_json(value: Any, group: mx.distributed.Group) -> Any:
    """Rank 0's JSON-serialisable ``value`` on every rank."""
    if group.size() == 1:
        return value
    text = json.dumps(value).encode() if group.rank() == 0 else None
    return json.loads(broadcast_bytes(text, group).decode())


def broadcast_arrays(arrays: dict[str, mx.array], group: mx.distributed.Group) -> dict[str, mx.array]:
    """Rank 0's values of ``arrays`` on every rank (same names, shapes and dtypes everywhere),
    in buckets of at most 64 MiB per collective."""
    if group.size() == 1:
        return arrays
    out: dict[str, mx.array] = {}
    bucket: list[str] = []

    def flush():
        flat = _bcast(mx.concatenate([arrays[k].reshape(-1) for k in bucket]), group)
        start = 0
        for k in bucket:
            out[k] = flat[start : start + arrays[k].size].reshape(arrays[k].shape)
            start += arrays[k].size
        bucket.clear()

    nbytes = 0
    for name, array in arrays.items():
        if bucket and (arrays[bucket[0]].dtype != array.dtype or nbytes + array.nbytes > _CHUNK):
            flush()
            nbytes = 0
        bucket.append(name)
        nbytes += array.nbytes
    if bucket:
        flush()
    mx.eval(list(out.values()))
    return out


def check_same(what: str, value: str, group: mx.distributed.Group) -> None:
    """Raise :class:`DistributedError` unless every rank passes the same ``value`` (a short
    description of ``what`` each rank holds: a fingerprint, a config)."""
    if group.size() == 1:
        return
    digest = hashlib.sha256(value.encode()).digest()
    gathered = mx.distributed.all_gather(mx.array(np.frombuffer(digest, np.uint8)[None]), group=group)
    rows = np.asarray(gathered)
    differ = [r for r in range(rows.shape[0]) if not np.array_equal(rows[r], rows[0])]
    if differ:
        raise DistributedError(
            f"the processes disagree on {what}: rank(s) {', '.join(map(str, differ))} differ from rank 0 "
            f"(rank {group.rank()} has {value[:200]!r})"
        )


def peer_lost(err: BaseException, what: str, group: mx.distributed.Group | None = None) -> DistributedError | None:
    """The :class:`DistributedError` for ``err`` when it is a collective of a distributed run
    that failed because another process is gone: names this rank, ``what`` happened ("the
    generation stopped after 12 tokens") and the peer (in a run of two, the other rank). None
    for any other error, and in a process on its own (default group: the joined world)."""
    group = group or _WORLD
    if group is None or group.size() == 1 or not isinstance(err, RuntimeError) or not _PEER_LOSS.search(str(err)):
        return None
    n, r = group.size(), group.rank()
    peer = f"rank {1 - r}" if n == 2 else "another process"
    return DistributedError(f"rank {r} of {n}: {what}: lost the connection to {peer} ({err}); "
                            f"it has probably died (mlx.launch reports each process's exit code)")


def agree(value: float, group: mx.distributed.Group | None, op: str = "max") -> float:
    """One value for all ranks: the max (or min) of each rank's ``value``."""
    if group is None or group.size() == 1:
        return value
    fn = mx.distributed.all_max if op == "max" else mx.distributed.all_min
    return float(fn(mx.array([value], dtype=mx.float32), group=group).item())


# ------------------------------------------------------------------------------ files
def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with open(path, "rb") as fh:
        if size <= _HASH_WHOLE:
            h.update(fh.read())
        else:
            h.update(fh.read(1 << 20))
            fh.seek(size - (1 << 20))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def _manifest(path: Path) -> dict[str, str] | None:
    """{relative file name: digest} of a file or directory (hidden entries skipped); None if
    ``path`` does not exist here."""
    if path.is_file():
        return {"": _file_digest(path)}
    if not path.is_dir():
        return None
    found = {}
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            file = Path(root) / name
            found[str(file.relative_to(path))] = _file_digest(file)
    return found


def share_path(path: str | os.PathLike | None, group: mx.distributed.Group, scratch: Path) -> Path | None:
    """Rank 0's file or directory ``path`` on every rank.

    A rank that already sees identical content under the same path (one machine, a shared file
    system, a copy) uses it as it is; any other rank receives the files from rank 0 into a new
    directory under ``scratch`` and gets that path. Every rank passes the same ``path`` (ranks
    other than 0 may pass None). Returns None when rank 0 passed None; where rank 0 has nothing
    under ``path``, no rank gets a path with anything under it.
    """
    if group.size() == 1:
        return None if path is None else Path(path)
    ours = _manifest(Path(path)) if path is not None else None
    theirs = broadcast_json(None if path is None else {"path": str(path), "files": ours}, group)
    if theirs is None:
        return None
    local = Path(theirs["path"])
    if theirs["files"] is None:
        # Rank 0 has nothing there (it reports that): every rank sees nothing, where a rank with
        # its own files there took them for rank 0's (and failed with a TypeError).
        if group.rank() == 0 or not local.exists():
            return local
        return Path(tempfile.mkdtemp(dir=scratch, prefix="shared-")) / (local.name or "data")  # absent
    need = 0 if group.rank() == 0 else int(_manifest(local) != theirs["files"])
    needed = mx.distributed.all_gather(mx.array([need], dtype=mx.int32), group=group)
    if not np.asarray(needed).any():
        return local
    # Only a rank that receives the files makes a folder for them (rank 0 and ranks that see
    # them already make none).
    target = Path(tempfile.mkdtemp(dir=scratch, prefix="shared-")) / (local.name or "data") if need else None
    if need and "" not in theirs["files"]:
        # A directory, made even when it holds no (visible) files: the rank then sees what rank
        # 0 sees (an empty directory), not a path that does not exist.
        target.mkdir(parents=True, exist_ok=True)
    for rel in theirs["files"]:
        src = local / rel if rel else local
        data = broadcast_bytes(src.read_bytes() if group.rank() == 0 else None, group)
        if need:
            dest = target / rel if rel else target
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
    return local if group.rank() == 0 else target


# ------------------------------------------------------------------------------ models
#: Parameters at most this large are compared by value between the ranks (check_same_model).
_SMALL_ARRAY = 16 << 10
_LATER_BLOCK = re.compile(r"(^|\.)blocks\.[1-9][0-9]*\.")


def _model_description(model, mode: str) -> dict[str, Any]:
    """What every rank splitting ``model`` must agree on: the split, the model's class, its
    configuration, its parameters' names, shapes and dtypes (read without loading weights) and
    the values of the small arrays of its first block and outside its blocks (norms, gate
    biases: a few KB each, read alone from a lazily loaded checkpoint), hashed: two checkpoints of one shape (two runs, two steps of one run)
    differ there."""
    import dataclasses

    from mlx.utils import tree_flatten

    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    config = json.loads(json.dumps(config, sort_keys=True, default=lambda o: getattr(o, "__dict__", str(o))))
    flat = tree_flatten(model.parameters())
    arrays = {name: f"{tuple(a.shape)} {a.dtype}".replace("mlx.core.", "") for name, a in flat}
    # Those of the first block and outside the blocks: a pipeline rank reads no other block's.
    small = [(name, a) for name, a in flat if a.nbytes <= _SMALL_ARRAY and not _LATER_BLOCK.search(name)]
    mx.eval([a for _, a in small])
    weights = {name: hashlib.sha1(np.asarray(a.reshape(-1).view(mx.uint8))).hexdigest()[:16] for name, a in small}
    return {"split": mode, "class": type(model).__name__, "config": config, "parameters": arrays, "weights": weights}


def _first_difference(ours: dict[str, Any], first: dict[str, Any]) -> str:
    """What differs between this rank's :func:`_model_description` and rank 0's, in words."""
    for key in ("split", "class"):
        if ours[key] != first[key]:
            return f": this rank's {key} is {ours[key]!r}, rank 0's {first[key]!r}"
    for part in ("config", "parameters", "weights"):
        mine, theirs = ours[part], first[part]
        if not isinstance(mine, dict) or not isinstance(theirs, dict):
            if mine != theirs:
                return f": this rank's {part} differs from rank 0's"
            continue
        key = next((k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)), None)
        if key is None:
            continue
        if part == "weights":
            return f": the values of {key} differ from rank 0's"
        what = "setting" if part == "config" else "parameter"
        return f": {what} {key} is {mine.get(key, 'absent')!s:.80} here, {theirs.get(key, 'absent')!s:.80} on rank 0"
    return ""


def check_same_model(model, mode: str, group: mx.distributed.Group) -> None:
    """ValueError on every rank unless every rank is about to split the same model the same
    way (``mode``: "tensor" or "pipeline"): the message names the ranks that differ from rank 0
    and, on those ranks, the first setting, parameter or weight that differs. Ranks that loaded
    different checkpoints (or one with another ``--dtype`` or ``--parallel``) split their own
    models and paired collectives of other models: rank 0 printed the garbage of mixed models
    with exit code 0, or the ranks waited for each other forever."""
    if group.size() == 1:
        return
    ours = _model_description(model, mode)
    first = broadcast_json(ours, group)
    differs = int(ours != first)
    flags = np.asarray(mx.distributed.all_gather(mx.array([differs], dtype=mx.int32), group=group)).reshape(-1)
    ranks = [r for r in range(flags.size) if flags[r]]
    if not ranks:
        return
    where = _first_difference(ours, first) if differs else ""
    names = ", ".join(map(str, ranks))
    raise ValueError(f"rank {group.rank()} of {group.size()}: the processes would split different models ({mode} "
                     f"parallel): rank{'s' if len(ranks) > 1 else ''} {names} loaded another model than rank 0{where}; "
                     "every process must load the same checkpoint with the same --dtype and --parallel")
