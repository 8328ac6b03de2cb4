"""A tuning sweep: Optuna asks for parameters, an objective evaluates them, here or on Ray.

Search: ``mode="random"`` (Optuna's RandomSampler) or ``mode="ga"`` (its genetic NSGA-II
sampler, ``population`` trials per generation). Both are seeded per trial, so a sweep with the
same seed and objective repeats exactly, and a resumed one never redraws a finished point. The
study lives in ``OUT/study.db`` (Optuna's SQLite storage), so ``resume=True`` continues an
interrupted sweep; trials that were running when it stopped are marked ``interrupted`` and do not
count against the budget: their points are drawn again (the same seed slot), so an interrupted and
resumed sweep evaluates the same points as an uninterrupted one.

Backends: ``local`` runs trials one after another in this process; ``ray`` runs ``workers``
trials at once as Ray tasks with ``cpus_per_trial`` / ``gpus_per_trial`` each, on a local
cluster started (and shut down) here, or on the cluster at ``ray_address``.

Outputs in OUT, rewritten atomically after every trial: ``run_meta.json`` (settings, objective,
environment, argv; ``cli``: the command line's flags, which ``xlstm-metal tune --resume`` takes), ``trials.jsonl`` (one record per finished trial), ``summary.csv`` (the same,
flat), ``best.json`` (the best complete trial) and, with prompts, ``outputs/trial-NNNN.jsonl``
(greedy continuations; the format ``xlstm-metal judge --outputs`` reads).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..monitor import MemoryLimitExceeded, current_job
from ..training.data import atomic_write_text
from .objectives import COMPLETE, Objective, ObjectiveError

OUTPUT_FILES = ("run_meta.json", "trials.jsonl", "summary.csv", "best.json", "study.db", "study.db-wal", "study.db-shm",
                "profile.json")
OUTPUT_DIRS = ("outputs", "trials", "tokenizer")
STUDY_NAME = "xlstm-metal-tune"


class SweepError(ValueError):
    """Bad sweep settings or output directory; the message names the problem."""


@dataclass
class SweepSettings:
    """How to search (see the module docstring). ``trials``: the budget (default: population x
    generations, for either mode, so both searches get the same number of trials)."""

    mode: str = "random"
    trials: int | None = None
    population: int = 10
    generations: int = 5
    seed: int = 0
    backend: str = "local"
    ray_address: str | None = None
    workers: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    prompts: list[str] | None = None
    max_new_tokens: int = 32
    progress: bool = True

    @property
    def budget(self) -> int:
        return self.trials if self.trials is not None else self.population * self.generations

    def validate(self) -> None:
        if self.mode not in ("random", "ga"):
            raise SweepError(f"mode must be 'random' or 'ga', got {self.mode!r}")
        if self.backend not in ("local", "ray"):
            raise SweepError(f"backend must be 'local' or 'ray', got {self.backend!r}")
        for name in ("population", "generations", "workers", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise SweepError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mode == "ga" and self.population < 2:
            raise SweepError(f"the genetic search needs population >= 2, got {self.population}")
        if self.trials is not None and self.trials < 1:
            raise SweepError(f"trials must be >= 1, got {self.trials}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise SweepError("cpus_per_trial must be > 0 and gpus_per_trial >= 0")
        if self.ray_address is not None and self.backend != "ray":
            raise SweepError("ray_address needs backend 'ray'")


@dataclass
class SweepResult:
    out_dir: Path
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


# ------------------------------------------------------------------------------ files
def check_out_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: resuming needs OUT/study.db and OUT/run_meta.json (written before the
    first trial); a new run needs an empty (or new) OUT unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SweepError(f"--out {out_dir} is a file")
    if resume:
        for name in ("study.db", "run_meta.json"):
            if not (out_dir / name).is_file():
                raise SweepError(f"nothing to resume: {out_dir / name} does not exist")
        return
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise SweepError(f"--out {out_dir} is not empty; use --resume to continue that sweep or --overwrite")


def _clear(out_dir: Path) -> None:
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for name in OUTPUT_DIRS:
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ------------------------------------------------------------------------------ one trial
def run_trial(objective: Objective, params: dict[str, Any], number: int, prompts: list[str] | None,
              max_new_tokens: int) -> dict[str, Any]:
    """Evaluate one trial (here or in a Ray worker): the objective's record plus timing and
    where it ran; an exception becomes status "error" with its message."""
    started = time.time()
    try:
        record = objective.evaluate({**params, "_trial": number}, prompts=prompts, max_new_tokens=max_new_tokens)
    except MemoryLimitExceeded:
        raise  # the memory watchdog stops the whole sweep (resumable), not just this trial
    except Exception as err:  # a trial's failure must not end the sweep
        record = {"status": "error", "value": None, "reason": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc(limit=5)}
    finished = time.time()
    record.update(started=started, finished=finished, duration_s=finished - started,
                  worker={"pid": os.getpid(), "host": socket.gethostname()})
    return record


def _trial_record(trial) -> dict[str, Any]:
    """A finished Optuna trial as the trials.jsonl record."""
    import optuna

    rec = dict(trial.user_attrs.get("record", {}))
    status = rec.pop("status", None)
    if status is None:
        status = {optuna.trial.TrialState.FAIL: "interrupted"}.get(trial.state, trial.state.name.lower())
    out = {"number": trial.number, "status": status,
           "value": trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None,
           "params": dict(trial.params)}
    rec.pop("value", None)
    out["reason"] = rec.pop("reason", None)
    for key in ("started", "finished", "duration_s", "worker"):
        out[key] = rec.pop(key, None)
    out["metrics"] = rec
    return out


def best_record(records: list[dict[str, Any]], direction: str) -> dict[str, Any] | None:
    """The complete record with the best value (ties: the earliest trial)."""
    done = [r for r in records if r["status"] == COMPLETE and r["value"] is not None]
    if not done:
        return None
    sign = -1 if direction == "maximize" else 1
    return min(done, key=lambda r: (sign * r["value"], r["number"]))


def _summary_csv(records: list[dict[str, Any]]) -> str:
    param_keys = sorted({k for r in records for k in r["params"]})
    metric_keys = sorted({k for r in records for k, v in r["metrics"].items()
                          if not isinstance(v, (dict, list)) and k != "traceback"})
    cols = ["number", "status", "value", *[f"param_{k}" for k in param_keys], *metric_keys, "duration_s", "reason"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(cols)
    for r in records:
        writer.writerow([r["number"], r["status"], "" if r["value"] is None else r["value"],
                         *[r["params"].get(k, "") for k in param_keys],
                         *["" if r["metrics"].get(k) is None else r["metrics"].get(k) for k in metric_keys],
                         "" if r["duration_s"] is None else round(r["duration_s"], 4), r["reason"] or ""])
    return buf.getvalue()


def write_outputs(study, objective: Objective, out_dir: Path) -> SweepResult:
    """trials.jsonl, summary.csv and best.json from the study's finished trials."""
    import optuna

    finished = [t for t in study.get_trials(deepcopy=False)
                if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)]
    records = [_json_safe(_trial_record(t)) for t in sorted(finished, key=lambda t: t.number)]
    atomic_write_text(out_dir / "trials.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(out_dir / "summary.csv", _summary_csv(records))
    best = best_record(records, objective.direction)
    if best is not None:
        best = {"objective": objective.name, "metric": objective.metric, "direction": objective.direction, **best}
        atomic_write_text(out_dir / "best.json", json.dumps(best, indent=2) + "\n")
    return SweepResult(out_dir=out_dir, trials=records, best=best)


# ------------------------------------------------------------------------------ the sweep
def _sampler(settings: SweepSettings, number: int):
    """A sampler seeded by (seed, trial number): the same point for the same trial, resumed or
    not. The genetic sampler reads its population from the study, so it keeps no state."""
    import optuna

    seed = (settings.seed * 1_000_003 + number) % (2**32)
    if settings.mode == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.NSGAIISampler(population_size=settings.population, seed=seed)


def _interrupted(trial) -> bool:
    """A trial that was running when a sweep stopped: failed without a record of its own."""
    import optuna

    return trial.state == optuna.trial.TrialState.FAIL and "record" not in trial.user_attrs


def _counted(study) -> int:
    """Trials that count against the budget: all but the interrupted ones, whose points are
    drawn again (same seed slot) when the sweep resumes."""
    return sum(not _interrupted(t) for t in study.get_trials(deepcopy=False))


def _free_slot(study) -> int:
    """The lowest seed slot no counted trial holds: an interrupted trial's is drawn again. With
    trials at once (Ray) a later slot can finish before an earlier one is interrupted, so the
    count of counted trials was a held slot (its point ran twice, the interrupted one's never)."""
    held, order = set(), 0
    for trial in study.get_trials(deepcopy=False):
        if _interrupted(trial):
            continue
        slot = trial.user_attrs.get("slot")
        held.add(slot if isinstance(slot, int) else order)  # (a sweep of an older version kept none)
        order += 1
    return min(set(range(len(held) + 1)) - held)


def _ask(study, objective: Objective, settings: SweepSettings):
    number = _free_slot(study)
    study.sampler = _sampler(settings, number)
    trial = study.ask()
    trial.set_user_attr("slot", number)
    return trial, objective.suggest(trial)


def _tell(study, trial, record: dict[str, Any], out_dir: Path) -> None:
    import optuna

    outputs = record.pop("outputs", None)
    if outputs is not None:
        lines = "".join(json.dumps({"trial": trial.number, **o}) + "\n" for o in outputs)
        (out_dir / "outputs").mkdir(exist_ok=True)
        atomic_write_text(out_dir / "outputs" / f"trial-{trial.number:04d}.jsonl", lines)
    trial.set_user_attr("record", _json_safe(record))
    if record.get("status") == COMPLETE and record.get("value") is not None:
        study.tell(trial, float(record["value"]))
    else:  # rejected (outside tolerance, over budget) or error: recorded, never ranked
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


def search(objective: Objective, settings: SweepSettings | None = None) -> list[dict[str, Any]]:
    """The same search as :func:`run_sweep` (samplers, seeding, local backend) in memory: no
    files, no SQLite. Returns the trial records in order (status, value, params, metrics)."""
    import optuna

    settings = settings or SweepSettings()
    settings.validate()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=objective.direction, sampler=_sampler(settings, 0))
    records = []
    while _counted(study) < settings.budget:
        trial, params = _ask(study, objective, settings)
        record = run_trial(objective, params, trial.number, settings.prompts, settings.max_new_tokens)
        record.pop("outputs", None)
        trial.set_user_attr("record", _json_safe(record))
        if record.get("status") == COMPLETE and record.get("value") is not None:
            study.tell(trial, float(record["value"]))
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        records.append(_json_safe(_trial_record(study.trials[trial.number])))
    return records


def _settings_record(settings: SweepSettings) -> dict[str, Any]:
    return {k: v for k, v in asdict(settings).items() if k != "prompts"}


def _meta(objective: Objective, settings: SweepSettings, argv: list[str] | None) -> dict[str, Any]:
    import optuna

    from ..benchmark import environment

    return {"objective": objective.meta(), "settings": _settings_record(settings),
            "prompts": len(settings.prompts or []), "budget": settings.budget,
            "sampler": "RandomSampler" if settings.mode == "random" else "NSGAIISampler",
            "optuna": optuna.__version__, "environment": environment(), "argv": argv or sys.argv,
            "started": time.time()}


#: Settings that decide which points are drawn: a resumed sweep must keep them (population: the
#: genetic search's only; random search ignores it).
_SAMPLING_SETTINGS = ("mode", "seed", "population")


def _check_resume_matches(meta: dict[str, Any], objective: Objective, settings: SweepSettings, out_dir: Path) -> None:
    """Refuse to resume with a different objective (metric, model, lengths, search space, ...)
    or sampler (mode, seed, population): its values would be ranked beside the earlier trials'
    as if they measured the same thing, and the seeded draws would no longer repeat."""
    stored = meta.get("objective", {})
    current = json.loads(json.dumps(_json_safe(objective.meta())))
    for key in ("base_settings", "config"):  # unknown for a sweep of a version that kept none
        if key not in stored:
            current.pop(key, None)
    home = out_dir.resolve()

    def own_file(value: Any) -> bool:  # e.g. the tokenizer trained into OUT: the run's own, wherever OUT is now
        return (isinstance(value, str) and value != "" and Path(value).exists()
                and Path(value).resolve().is_relative_to(home))

    def same_file(a: Any, b: Any) -> bool:  # a path spelt another way (relative / absolute)
        try:
            return isinstance(a, str) and isinstance(b, str) and a != "" and b != "" and os.path.samefile(a, b)
        except OSError:
            return False

    def change(key: str, old: Any, new: Any) -> str:  # of a dict (a config) only what differs
        if isinstance(old, dict) and isinstance(new, dict):
            return "; ".join(change(f"{key}.{k}", old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                             if old.get(k) != new.get(k))
        return f"{key} {old!r} -> {new!r}"

    changed = [change(key, stored.get(key), current.get(key)) for key in sorted(set(stored) | set(current))
               if stored.get(key) != current.get(key) and not own_file(current.get(key))
               and not same_file(stored.get(key), current.get(key))]
    old_settings = meta.get("settings", {})
    keys = _SAMPLING_SETTINGS if settings.mode == "ga" else tuple(k for k in _SAMPLING_SETTINGS if k != "population")
    changed += [f"{key} {old_settings[key]!r} -> {getattr(settings, key)!r}" for key in keys
                if key in old_settings and old_settings[key] != getattr(settings, key)]
    if changed:
        raise SweepError(f"cannot resume {out_dir} with other settings than it was run with ({'; '.join(changed)}); "
                         "resume with the same settings (only the budget may change) or start a new --out")


def sqlite_storage(path: Path):
    """Optuna's SQLite storage at ``path`` in WAL mode without an fsync per commit (Optuna
    commits ~15 times per trial; at 16 ms per fsync here that was most of a cheap trial's time).
    A crash can lose the last commits, never corrupt the file."""
    import optuna
    from sqlalchemy import event

    storage = optuna.storages.RDBStorage(f"sqlite:///{Path(path).resolve()}")

    def pragmas(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # pooled connections were opened without the pragmas
    return storage


def run_sweep(objective: Objective, out_dir: str | os.PathLike, settings: SweepSettings | None = None, *,
              resume: bool = False, overwrite: bool = False, argv: list[str] | None = None,
              cli: dict[str, Any] | None = None) -> SweepResult:
    """Run (or resume) a sweep of ``objective`` into ``out_dir``; returns every record and the best.
    ``cli``: the command line's flags, kept in run_meta.json (replacing those saved, on resume).
    SweepError where another sweep runs in ``out_dir`` now (see :func:`lock_out_dir`)."""
    settings = settings or SweepSettings()
    settings.validate()
    out_dir = Path(out_dir)
    check_out_dir(out_dir, resume=resume, overwrite=overwrite)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_out_dir(out_dir)
    try:
        return _run_sweep(objective, out_dir, settings, resume, argv, cli, created)
    finally:
        os.close(lock)


def lock_out_dir(out_dir: Path) -> int:
    """Hold ``out_dir`` for one sweep: a descriptor of the directory, flock-ed (the kernel lets go
    when the process ends, however it ends); close it to release. SweepError where another sweep
    holds it: a second run on the same --out (a --resume in another terminal) marked the running
    sweep's trial interrupted, so the first one stopped with a traceback at its next result, and
    an --overwrite deleted the study under it."""
    import fcntl

    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SweepError(f"--out {out_dir} is in use by another sweep running now (xlstm-metal tune, or its "
                         "--resume); wait for it to end, or give another --out") from None
    except OSError:  # a file system without flock: run unguarded, as before
        pass
    return fd


def _run_sweep(objective: Objective, out_dir: Path, settings: SweepSettings, resume: bool,
               argv: list[str] | None, cli: dict[str, Any] | None, created: bool) -> SweepResult:
    """:func:`run_sweep` once ``out_dir`` is held."""
    import optuna

    # The last sweep's outputs wait aside until prepare() passes (it deleted them, then refused).
    aside = None if resume else Path(tempfile.mkdtemp(prefix=".replaced-", dir=out_dir))
    for name in () if resume else OUTPUT_FILES + OUTPUT_DIRS:
        if (out_dir / name).exists():
            os.replace(out_dir / name, aside / name)
    meta_path = out_dir / "run_meta.json"
    meta = None
    if resume:  # before prepare(), which may write into OUT (a tokenizer)
        from ..jsonfiles import read_json_object

        meta = read_json_object(meta_path, SweepError)
        if not isinstance(meta.get("objective"), dict):
            raise SweepError(f"{meta_path}: 'objective' must be an object, got {meta.get('objective')!r} "
                             "(corrupted file?)")
        if meta["objective"].get("objective") != objective.name:
            raise SweepError(f"{out_dir} holds a {meta['objective'].get('objective')} sweep, not {objective.name}")
    try:
        objective.prepare(out_dir)
    except ObjectiveError as err:  # no trial could run: leave --out as it was found
        if not resume:
            _clear(out_dir)
            for path in aside.iterdir():
                os.replace(path, out_dir / path.name)
            aside.rmdir()
            if created and not any(out_dir.iterdir()):
                out_dir.rmdir()
        raise SweepError(str(err)) from None
    if aside is not None:
        shutil.rmtree(aside)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from sqlalchemy.exc import SQLAlchemyError

    storage = None
    try:
        storage = sqlite_storage(out_dir / "study.db")
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction=objective.direction,
                                    sampler=_sampler(settings, 0), load_if_exists=resume)
    except SQLAlchemyError as err:
        if storage is not None:
            storage.engine.dispose()
        raise SweepError(f"{out_dir / 'study.db'} cannot be read as an Optuna study (corrupted file?): "
                         f"{getattr(err, 'orig', None) or err}") from None
    try:
        if meta is not None:
            _check_resume_matches(meta, objective, settings, out_dir)
            ran = sum(not _interrupted(t) and t.state != optuna.trial.TrialState.RUNNING
                      for t in study.get_trials(deepcopy=False))
            if settings.budget < ran:  # nothing would run, and run_meta.json would say a budget below its trials
                raise SweepError(f"the trial budget {settings.budget} is below the {ran} trials the sweep in {out_dir} "
                                 f"has run: give a budget of at least {ran} (--trials) to resume it")
            meta.setdefault("resumed", []).append({"at": time.time(), "argv": argv or sys.argv})
            meta["budget"] = settings.budget
            meta["settings"] = _settings_record(settings)  # the budget, backend, ... of this run
        else:
            meta = _meta(objective, settings, argv)
        if cli is not None:
            meta["cli"] = cli
        atomic_write_text(meta_path, json.dumps(_json_safe(meta), indent=2) + "\n")
        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # interrupted by the last stop

        from tqdm import tqdm

        done = _counted(study)
        result = write_outputs(study, objective, out_dir)
        with tqdm(total=settings.budget, initial=min(done, settings.budget), desc=f"tune {objective.name}",
                  unit="trial", file=sys.stderr, disable=None if settings.progress else True) as bar:
            def finished(trial, record):
                nonlocal result
                _tell(study, trial, record, out_dir)
                result = write_outputs(study, objective, out_dir)
                bar.update(1)
                if result.best is not None:
                    bar.set_postfix_str(f"best {objective.metric} {result.best['value']:.4g} (trial {result.best['number']})")
                job = current_job()  # `xlstm-metal top`; between trials a memory-watchdog safe point
                best = result.best and f"best {objective.metric} {result.best['value']:.4g} (trial {result.best['number']})"
                # Trials of the budget (interrupted ones are drawn again and count not; done exceeded total).
                job.update(phase="tune", done=_counted(study), total=settings.budget, unit="trials", message=best)
                job.check(note=f"finished trials are in {out_dir}; continue with --resume")

            if settings.backend == "local":
                while _counted(study) < settings.budget:
                    trial, params = _ask(study, objective, settings)
                    finished(trial, run_trial(objective, params, trial.number, settings.prompts, settings.max_new_tokens))
            else:
                _run_on_ray(study, objective, settings, finished)
        meta["finished"] = time.time()
        meta["trials"] = len(result.trials)
        atomic_write_text(meta_path, json.dumps(_json_safe(meta), indent=2) + "\n")
        return result
    finally:  # its pooled connection kept study.db-wal/-shm beside the file until garbage collection
        storage.engine.dispose()


def _run_on_ray(study, objective: Objective, settings: SweepSettings, finished) -> None:
    try:
        import ray
    except ImportError:
        raise SweepError("--backend ray needs Ray: pip install 'xlstm-metal[tune]'") from None
    started_here = not ray.is_initialized()
    before = _child_pids()
    if started_here:
        if settings.ray_address:
            ray.init(address=settings.ray_address, log_to_driver=False)
        else:
            # A small local cluster of our own: no dashboard, a small object store.
            cpus = max(1, int(round(settings.cpus_per_trial * settings.workers)))
            ray.init(address="local", num_cpus=cpus, num_gpus=int(settings.gpus_per_trial * settings.workers) or None,
                     include_dashboard=False, log_to_driver=False, object_store_memory=80 * 1024 * 1024)
    try:
        remote = ray.remote(num_cpus=settings.cpus_per_trial, num_gpus=settings.gpus_per_trial, max_retries=0)(run_trial)
        pending: dict[Any, Any] = {}
        objective_ref = ray.put(objective)
        while True:
            while len(pending) < settings.workers and _counted(study) < settings.budget:
                trial, params = _ask(study, objective, settings)
                ref = remote.remote(objective_ref, params, trial.number, settings.prompts, settings.max_new_tokens)
                pending[ref] = trial
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                trial = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as err:  # the worker died: the trial is an error, the sweep goes on
                    record = {"status": "error", "value": None, "reason": f"{type(err).__name__}: {err}"}
                finished(trial, record)
    finally:
        if started_here:
            ours = _children_since(before)
            raylets = _raylet_pids(ours)  # named while they still run
            ray.shutdown()
            _reap(ours + _late_workers(raylets, {proc.pid for proc in ours}))


def _child_pids() -> set[int]:
    import psutil  # a dependency of Ray

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _children_since(before: set[int]) -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]


def _raylet_pids(processes: list) -> set[str]:
    import psutil

    pids = set()
    for proc in processes:
        try:
            if proc.name() == "raylet":
                pids.add(str(proc.pid))
        except psutil.Error:
            pass
    return pids


def _late_workers(raylets: set[str], known: set[int]) -> list:
    """Workers our raylet started after our processes were listed (it keeps a pool of idle
    ones): orphaned by ray.shutdown(), they carry RAY_RAYLET_PID in their environment."""
    import psutil

    late = []
    if not raylets:
        return late
    for proc in psutil.process_iter():
        try:
            if proc.pid not in known and proc.environ().get("RAY_RAYLET_PID") in raylets:
                late.append(proc)
        except psutil.Error:  # gone, or another user's process
            pass
    return late


def _reap(processes: list, timeout: float = 30.0) -> None:
    """Wait for the processes of the Ray cluster started here to end after ray.shutdown()
    (workers exit asynchronously); any still running after ``timeout`` is killed."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


__all__ = ["SweepError", "SweepResult", "SweepSettings", "best_record", "run_sweep", "run_trial", "search",
           "write_outputs"]
