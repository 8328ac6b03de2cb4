"""The memory watchdog's CSV (--mem-log) of a process that is one rank of several: a last
``rank`` column tells the rows of the ranks sharing the file apart; the header stays the
file's own when it is appended to. The launched 2-rank run: tests/test_distributed_memlog.py."""

from __future__ import annotations

import csv
import json
import threading
import time

import pytest

from xlstm_metal.monitor.watchdog import (
    CSV_FIELDS,
    CSV_FIELDS_RANKED,
    MemorySample,
    MemoryWatchdog,
    WatchdogConfig,
    job_rank,
)

TOTAL = 100 * 10**9


def rank_env(rank: int, size: int = 2) -> dict[str, str]:
    return {"MLX_RANK": str(rank), "MLX_WORLD_SIZE": str(size)}


def sampler():
    return MemorySample(time.time(), 1000, 1000, 10, 20, 30)


def log_rows(config: WatchdogConfig, samples: int = 2) -> None:
    wd = MemoryWatchdog(config, sampler=sampler, clear_cache=lambda: None)
    try:
        for _ in range(samples):
            wd.sample()
    finally:
        wd.close()


def read(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_job_rank_is_set_only_for_one_of_several_processes(tmp_path):
    assert job_rank({}) is None
    assert job_rank(rank_env(1)) == (1, 2)
    assert job_rank(rank_env(0, 1)) is None  # mlx.launch -n 1: a process on its own
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["127.0.0.1:5002"]]))
    assert job_rank({"MLX_RANK": "2", "MLX_HOSTFILE": str(hosts)}) == (2, 3)
    assert WatchdogConfig.from_sources(env=rank_env(1), total=TOTAL).rank == (1, 2)
    assert WatchdogConfig.from_sources(env={}, total=TOTAL).rank is None


def test_ranks_share_one_file_with_one_header_and_a_rank_column(tmp_path):
    log = tmp_path / "mem.csv"
    configs = [WatchdogConfig.from_sources(log=str(log), env=rank_env(r), total=TOTAL) for r in range(2)]
    for config in configs:  # both checked before either wrote: the ranks start together
        log_rows(config)
    rows = read(log)
    assert tuple(rows[0]) == CSV_FIELDS_RANKED and CSV_FIELDS_RANKED[:-1] == CSV_FIELDS
    assert [r[-1] for r in rows[1:]] == ["0", "0", "1", "1"]
    assert all(len(r) == len(CSV_FIELDS_RANKED) for r in rows)
    # A later distributed job appends to it; so does a process on its own, its rank empty.
    log_rows(WatchdogConfig.from_sources(log=str(log), env=rank_env(1), total=TOTAL), 1)
    log_rows(WatchdogConfig.from_sources(log=str(log), env={}, total=TOTAL), 1)
    rows = read(log)
    assert [r[-1] for r in rows[1:]] == ["0", "0", "1", "1", "1", ""]
    assert all(len(r) == len(CSV_FIELDS_RANKED) for r in rows) and rows.count(rows[0]) == 1


def test_a_log_without_the_rank_column_is_refused_by_a_rank_and_left_as_it_was(tmp_path):
    log = tmp_path / "mem.csv"
    log_rows(WatchdogConfig.from_sources(log=str(log), env={}, total=TOTAL))
    before = log.read_bytes()
    assert tuple(read(log)[0]) == CSV_FIELDS
    with pytest.raises(ValueError, match=r"--mem-log .*mem.csv is the memory log of a process on its own \(no "
                                         r"rank column\); this process is rank 1 of 2, whose rows name their rank: "
                                         r"give a new file"):
        WatchdogConfig.from_sources(log=str(log), env=rank_env(1), total=TOTAL)
    # Still appended to by a process on its own, with its own columns.
    log_rows(WatchdogConfig.from_sources(log=str(log), env={}, total=TOTAL), 1)
    rows = read(log)
    assert log.read_bytes().startswith(before) and len(rows) == 4
    assert all(len(r) == len(CSV_FIELDS) for r in rows)
    # The refusal where the file appeared after the check (another job made it meanwhile).
    other = tmp_path / "late.csv"
    config = WatchdogConfig.from_sources(log=str(other), env=rank_env(1), total=TOTAL)
    log_rows(WatchdogConfig.from_sources(log=str(other), env={}, total=TOTAL), 1)
    with pytest.raises(ValueError, match="no rank column"):
        MemoryWatchdog(config, sampler=sampler, clear_cache=lambda: None)
    assert len(read(other)) == 2


def test_ranks_creating_the_file_at_once_write_one_whole_header(tmp_path):
    """Each of the processes that all found no file creates it: one header, before every row."""
    for attempt in range(5):
        log = tmp_path / f"mem{attempt}.csv"
        configs = [WatchdogConfig.from_sources(log=str(log), env=rank_env(r, 8), total=TOTAL) for r in range(8)]
        barrier = threading.Barrier(len(configs))
        errors = []

        def run(config):
            try:
                barrier.wait()
                log_rows(config, 1)
            except BaseException as err:  # noqa: BLE001 -- reported below
                errors.append(err)

        threads = [threading.Thread(target=run, args=(c,)) for c in configs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        rows = read(log)
        assert tuple(rows[0]) == CSV_FIELDS_RANKED and sorted(r[-1] for r in rows[1:]) == list("01234567")
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no header file left
