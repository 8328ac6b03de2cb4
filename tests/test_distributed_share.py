"""share_path under `mlx.launch -n 2` (ring backend): a rank that does not see rank 0's files
(another machine) receives them, and a directory stays a directory even when it holds no
visible files.

This file is also the worker: ``mlx.launch -n 2 -- python tests/test_distributed_share.py OUT``.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from distributed_helpers import launch_cmd  # noqa: E402


def _worker(out: Path) -> None:
    import xlstm_metal  # noqa: F401,I001  (first: preloads the BLAS)
    del xlstm_metal

    from xlstm_metal.distributed import broadcast_json, comm, world

    group = world()
    tmp = Path(broadcast_json(tempfile.mkdtemp() if group.rank() == 0 else None, group))  # one for all
    cases = {"empty": [], "hidden_only": [".notes"], "one_file": ["a.txt"]}
    if group.rank() == 0:
        for name, files in cases.items():
            (tmp / name).mkdir()
            for f in files:
                (tmp / name / f).write_text("x")
        (tmp / "rank1_only").mkdir()  # rank 0 takes it for absent (below)
        (tmp / "rank1_only" / "stale.txt").write_text("y")
    broadcast_json(None, group)  # the files exist before any rank looks
    own = comm._manifest
    if group.rank() == 0:
        comm._manifest = lambda path: None if path.name == "rank1_only" else own(path)
    missing = comm.share_path(tmp / "rank1_only", group, Path(tempfile.mkdtemp()))
    seen_missing = {"exists": missing.exists(), "moved": str(missing) != str(tmp / "rank1_only")}
    comm._manifest = own
    if group.rank() == 1:
        comm._manifest = lambda path: None  # as on another machine: rank 1 sees none of them
    scratch = Path(tempfile.mkdtemp())
    seen = {"rank1_only": seen_missing}
    for name in cases:
        path = comm.share_path(tmp / name, group, scratch)
        seen[name] = {"is_dir": path.is_dir(), "moved": str(path) != str(tmp / name),
                      "files": sorted(p.name for p in path.iterdir()) if path.is_dir() else None}
    (out.parent / f"rank{group.rank()}.json").write_text(json.dumps(seen))  # one machine: one folder
    broadcast_json(None, group)  # every rank is done with the files
    shutil.rmtree(scratch, ignore_errors=True)
    if group.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        out.write_text(json.dumps([json.loads((out.parent / f"rank{r}.json").read_text())
                                   for r in range(group.size())]))


def test_a_rank_sees_what_rank0_sees_empty_directories_and_absent_paths_too(tmp_path):
    """An empty directory (or one holding only hidden files, which share_path skips) reached rank
    1 as a path that did not exist: `train DATA EMPTYDIR` failed there with 'data path not found:
    /tmp/xlstm-dist-.../EMPTYDIR' while rank 0 named the real problem. Now rank 1 gets an empty
    directory of its own, like rank 0's. And where rank 0 has nothing, a rank with its own files
    under that path (another machine) failed with a TypeError traceback in share_path; now it
    gets a path with nothing there, like rank 0 (which reports it)."""
    out = tmp_path / "views.json"
    proc = subprocess.run(launch_cmd(2, [sys.executable, __file__, out]), capture_output=True, text=True,
                          timeout=300)
    assert out.is_file(), proc.stdout[-2000:] + proc.stderr[-4000:]
    rank0, rank1 = json.loads(out.read_text())
    assert rank0.pop("rank1_only") == {"exists": True, "moved": False}  # (it told itself it had none)
    assert rank1.pop("rank1_only") == {"exists": False, "moved": True}
    assert rank0 == {"empty": {"is_dir": True, "moved": False, "files": []},
                     "hidden_only": {"is_dir": True, "moved": False, "files": [".notes"]},
                     "one_file": {"is_dir": True, "moved": False, "files": ["a.txt"]}}
    assert rank1 == {"empty": {"is_dir": True, "moved": True, "files": []},
                     "hidden_only": {"is_dir": True, "moved": True, "files": []},
                     "one_file": {"is_dir": True, "moved": True, "files": ["a.txt"]}}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _worker(Path(sys.argv[1]))
