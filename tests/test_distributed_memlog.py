"""--mem-log under `mlx.launch -n 2` (ring backend): both ranks write the one CSV, each row
naming its rank (they appended to it with no rank column: the rows could not be told apart)."""

import csv
import os
import subprocess
import sys

from xlstm_metal.monitor.watchdog import CSV_FIELDS, CSV_FIELDS_RANKED

from distributed_helpers import launch_cmd  # noqa: E402
from test_distributed_inference import tiny_checkpoint  # noqa: E402


def test_both_ranks_rows_are_in_the_log_told_apart_by_their_rank(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    log = tmp_path / "mem.csv"
    cmd = [sys.executable, "-m", "xlstm_metal", "generate", "-m", ckpt, "-p", "the quick", "-n", "8", "--temp", "0",
           "--parallel", "pipeline", "--mem-log", log]
    env = {**os.environ, "XLSTM_MEM_POLL_MS": "20"}
    for run in range(2):  # the second run appends, under the same header
        proc = subprocess.run(launch_cmd(2, cmd), capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0 and "exited with code" not in proc.stderr, proc.stderr[-3000:]
        with open(log, newline="") as fh:
            rows = list(csv.reader(fh))
        assert tuple(rows[0]) == CSV_FIELDS_RANKED and CSV_FIELDS_RANKED[:len(CSV_FIELDS)] == CSV_FIELDS
        assert rows.count(rows[0]) == 1 and all(len(r) == len(CSV_FIELDS_RANKED) for r in rows)
        ranks = [r[-1] for r in rows[1:]]
        assert set(ranks) == {"0", "1"}, ranks
        assert all(int(r[CSV_FIELDS.index("usage_bytes")]) > 0 for r in rows[1:])
        if run == 0:
            first = len(rows)
    assert len(rows) > first
