"""`xlstm-metal tune`: search inference settings (speed) or training hyperparameters (train).

    xlstm-metal tune --objective speed --shape 125m --out runs/tune-speed --mode ga --population 8 --generations 4
    xlstm-metal tune --objective speed --model ckpt --out runs/t --save-outputs --prompt-file prompts.txt
    xlstm-metal tune --objective train --data corpus/ --out runs/tune-train --trials 20 --token-budget 200000
    xlstm-metal tune ... --backend ray --workers 4 --cpus-per-trial 2      # or --ray-address HOST:PORT
    xlstm-metal tune --out runs/t --resume          # continue an interrupted sweep with its saved settings
    xlstm-metal tune --out runs/t --resume --trials 40      # ... and a larger trial budget

Every speed trial is checked against the float32 reference within the tolerance of --profile
(default: exact-fp32 on CPUs, fast-bf16 on GPUs) and rejected when it fails; the winner is saved
as a profile for this device (--profile-name, default tuned-<device>), usable as
`--profile NAME` by generate, chat, serve, bench and train. A speed sweep searches what its
--metric times: --metric decode leaves the prompt's kernel, chunk size and piece length, --metric
prefill the step kernel, at the base profile's values. Outputs in --out: run_meta.json,
trials.jsonl, summary.csv, best.json, study.db (Optuna), outputs/ with --save-outputs,
profile.json (speed), trials/trial-NNNN/ training runs (train).

--resume continues the sweep in --out with the flags saved in its run_meta.json: a flag left out
takes the saved value, a flag given must equal it (exit 2 otherwise), except those that may change:
the budget (--trials, --generations; --population with --mode random, where it only sizes the
budget), --profile-name, and where the trials run (--backend, --ray-address, --workers,
--cpus-per-trial, --gpus-per-trial: with --backend given, the backend flags are the ones given now,
defaults for those left out). --no-progress applies to one run only.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

from . import (
    UsageError, check_apart_from_data, check_kept_by_overwrite, check_output_path, check_text_field, check_vocab_size,
    finite_float, harden_parser, large_int, read_tokenizer, seed_value,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tune", help="tune inference settings or training hyperparameters (Optuna, Ray)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Flags that a sweep saves default to None (store_true flags too): on --resume, None is
    # "not given", so the saved value is taken; given, even at its usual default, it is checked.
    p.add_argument("--objective", choices=("speed", "train"), default=None,
                   help="what to tune (required, unless --resume takes it from the saved sweep)")
    p.add_argument("--out", required=True, help="run directory")
    s = p.add_argument_group("search")
    s.add_argument("--mode", choices=("random", "ga"), default=None,
                   help="random search or the genetic NSGA-II sampler (default: random)")
    s.add_argument("--trials", type=int, default=None,
                   help="trial budget (default: population x generations, in either mode)")
    s.add_argument("--population", type=int, default=None,
                   help="trials per generation (ga; default 10); without --trials, population x generations is the "
                        "trial budget")
    s.add_argument("--generations", type=int, default=None,
                   help="generations (default 5); without --trials, population x generations is the trial budget")
    s.add_argument("--seed", type=seed_value, default=None, help="(default 0)")
    s.add_argument("--resume", action="store_true", help="continue the sweep in --out (its study.db) with the flags "
                   "saved in its run_meta.json: flags left out take the saved values, flags given must equal them "
                   "except the budget (--trials, ...; never below the trials already run), --profile-name and the "
                   "backend's (see above); one sweep runs in an --out at a time")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out, and a saved profile of the same name")
    b = p.add_argument_group("backend")
    b.add_argument("--backend", choices=("local", "ray"), default=None, help="(default: local)")
    b.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    b.add_argument("--workers", type=int, default=None, help="trials at once on Ray (default 2)")
    b.add_argument("--cpus-per-trial", type=finite_float, default=None, help="on Ray (default 1)")
    b.add_argument("--gpus-per-trial", type=finite_float, default=None, help="on Ray (default 0)")
    o = p.add_argument_group("outputs")
    o.add_argument("--save-outputs", action="store_true", default=None,
                   help="write each trial's greedy continuations of --prompt-file to outputs/trial-NNNN.jsonl")
    o.add_argument("--prompt-file", default=None,
                   help="prompts: one per line, or JSON Lines with a 'prompt' field")
    o.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens per continuation of --save-outputs (default 32)")
    o.add_argument("--no-progress", action="store_true")
    sp = p.add_argument_group("speed objective")
    src = sp.add_mutually_exclusive_group()
    src.add_argument("--model", "-m", default=None, help="checkpoint directory")
    src.add_argument("--shape", default=None, help="random weights of a named shape (7b, 1.3b, 125m) or config.json "
                     "(default without --model: 125m)")
    sp.add_argument("--metric", choices=("prefill", "decode", "both"), default=None,
                    help="prefill tok/s, decode tok/s, or their geometric mean (default); only the settings "
                         "of what it times are searched")
    sp.add_argument("--prefill-length", type=int, default=None, help="(default 512; --metric prefill or both)")
    sp.add_argument("--decode-batch", type=int, default=None, help="(default 1; --metric decode or both)")
    sp.add_argument("--decode-tokens", type=int, default=None, help="(default 32; --metric decode or both)")
    sp.add_argument("--repeats", type=int, default=None,
                    help="prefill timings per trial, best kept (default 2; --metric prefill or both)")
    sp.add_argument("--profile", default=None,
                    help="base profile: weight dtype and tolerance (default: exact-fp32 on CPUs, fast-bf16 on GPUs)")
    sp.add_argument("--profile-name", default=None,
                    help="name of the saved winner (default: tuned-<device>); one that another run saved during the "
                         "sweep is kept (the winner stays in --out)")
    tr = p.add_argument_group("train objective")
    tr.add_argument("--data", nargs="+", default=None, help="text files, directories or .jsonl files")
    tr.add_argument("--text-field", default=None, help="(default: text)")
    tr.add_argument("--tokenizer", default=None, help="tokenizer.json (default: train a BPE into --out)")
    tr.add_argument("--vocab-size", type=int, default=None, help="vocabulary of a BPE trained here (default 512)")
    tr.add_argument("--token-budget", type=large_int, default=None, help="training tokens per trial (default 100000)")
    tr.add_argument("--param-budget", type=large_int, default=None, help="largest model (parameters; default 2000000)")
    tr.add_argument("--seq-len", type=int, default=None, help="(default 64)")
    tr.add_argument("--val-fraction", type=finite_float, default=None, help="(default 0.1)")
    tr.add_argument("--max-depth", type=int, default=None, help="largest number of blocks searched (default 4)")
    p.set_defaults(func=run)
    return p


def read_prompts(path: str) -> list[str]:
    """Prompts of a file: JSON Lines records' "prompt" (or "text") field, else one per non-empty line."""
    from ..jsonfiles import check_unicode, read_jsonl

    file = Path(path)
    prompts = []
    if file.suffix == ".jsonl":
        for n, record in read_jsonl(file, UsageError):
            value = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise UsageError(f"{file}:{n}: a record needs a string 'prompt' (or 'text') field")
            check_unicode(value, f"{file}:{n}: the prompt", UsageError)  # (every trial failed on one)
            prompts.append(value)
    else:
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"prompt file not found: {file}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot read prompt file {file}: {err}") from None
        # Lines as a text file has them (read_text makes \r\n \n): splitlines() also cut a prompt at
        # U+2028 / U+0085 / form feeds inside it.
        prompts = [line for line in text.split("\n") if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {file} holds no prompts")
    return prompts


def _device_slug() -> str:
    import mlx.core as mx

    from ..benchmark import environment

    env = environment()
    name = env.get("device_name") if mx.default_device() == mx.gpu else env.get("processor") or env.get("machine")
    kind = "gpu" if mx.default_device() == mx.gpu else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", f"{kind}-{name or ''}".lower()).strip("-")
    return f"tuned-{slug}"


#: Options of one objective, backend or output and their defaults: given where they do not
#: apply, they are a usage error (never silently ignored); left out, they take these values.
SPEED_DEFAULTS = dict(metric="both", prefill_length=512, decode_batch=1, decode_tokens=32, repeats=2)
TRAIN_DEFAULTS = dict(text_field="text", vocab_size=512, token_budget=100_000, param_budget=2_000_000, seq_len=64,
                      val_fraction=0.1, max_depth=4)
RAY_DEFAULTS = dict(workers=2, cpus_per_trial=1.0, gpus_per_trial=0.0)
OUTPUTS_DEFAULTS = dict(max_new_tokens=32)
#: The speed options of one measurement: given where --metric does not take it, a usage error.
METRIC_OPTIONS = {"prefill": ("prefill_length", "repeats"), "decode": ("decode_batch", "decode_tokens")}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _groups(args: argparse.Namespace) -> list:
    """(defaults, whether they apply, verbs, where) of each group of options above."""
    return [(SPEED_DEFAULTS, args.objective == "speed", ("belongs", "belong"), "to --objective speed"),
            (TRAIN_DEFAULTS, args.objective == "train", ("belongs", "belong"), "to --objective train"),
            (RAY_DEFAULTS, args.backend == "ray", ("applies", "apply"), "only with --backend ray"),
            (OUTPUTS_DEFAULTS, args.save_outputs, ("applies", "apply"), "only with --save-outputs")]


def _check_applicable(args: argparse.Namespace) -> None:
    """UsageError naming the options given where they have no effect (another objective's,
    those of a measurement --metric leaves out, as --decode-tokens with --metric prefill, Ray's
    without --backend ray, --max-new-tokens without --save-outputs); then the defaults of those
    left out are filled in (a --vocab-size given is checked, as train checks it)."""
    vocab_size = args.vocab_size
    if args.objective == "speed":  # (another objective's options are named below)
        metric = args.metric or SPEED_DEFAULTS["metric"]
        for measured, names in METRIC_OPTIONS.items():
            given = [_flag(name) for name in names if getattr(args, name) is not None]
            if given and metric not in (measured, "both"):
                raise UsageError(f"{', '.join(given)} {'sets' if len(given) == 1 else 'set'} the {measured} "
                                 f"measurement, and --metric {metric} measures {metric} alone: leave "
                                 f"{'it' if len(given) == 1 else 'them'} out, or use --metric {measured} or both")
    for defaults, applies, verbs, where in _groups(args):
        given = [_flag(name) for name in defaults if getattr(args, name) is not None]
        if given and not applies:
            raise UsageError(f"{', '.join(given)} {verbs[len(given) > 1]} {where}")
        for name, value in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    check_vocab_size(vocab_size, f"--tokenizer {args.tokenizer}" if args.tokenizer else None)


#: --population / --generations when left out.
SEARCH_DEFAULTS = dict(population=10, generations=5)


def _check_search(args: argparse.Namespace) -> None:
    """--population and --generations size the trial budget only without --trials (and
    --population is the genetic sampler's generation size): given where they change nothing,
    a UsageError names them; then the defaults of those left out are filled in."""
    if args.trials is not None:
        unused = [_flag(name) for name in ("population", "generations")
                  if getattr(args, name) is not None and not (name == "population" and args.mode == "ga")]
        if unused:
            raise UsageError(f"{', '.join(unused)} would be ignored: --trials {args.trials} sets the trial budget "
                             f"(--mode {args.mode}); leave out one or the other")
    for name, value in SEARCH_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


#: The flags of a sweep, saved in its run_meta.json ("cli": "given", the flags given, with paths
#: made absolute; "used", every flag's value in the sweep, None where it does not apply) and taken
#: from there by --resume where left out. --out, --resume, --overwrite and --no-progress are
#: flags of one run (as are the memory watchdog's).
SAVED_FLAGS = ("objective", "mode", "trials", "population", "generations", "seed", "backend", "ray_address", "workers",
               "cpus_per_trial", "gpus_per_trial", "save_outputs", "prompt_file", "max_new_tokens", "model", "shape",
               "metric", "prefill_length", "decode_batch", "decode_tokens", "repeats", "profile", "profile_name",
               "data", "text_field", "tokenizer", "vocab_size", "token_budget", "param_budget", "seq_len",
               "val_fraction", "max_depth")
RUN_FLAGS = ("out", "resume", "overwrite", "no_progress")
#: Defaults of the saved flags whose parser default is None (so that --resume sees whether they were given).
LATE_DEFAULTS = dict(mode="random", seed=0, backend="local", save_outputs=False)
#: Where the trials run: may change on --resume; with --backend given, none of them is taken from the saved run.
BACKEND_FLAGS = ("backend", "ray_address", "workers", "cpus_per_trial", "gpus_per_trial")
#: Paths: saved absolute; a path given on --resume equals the saved one if it names the same file.
PATH_FLAGS = ("prompt_file", "model", "shape", "profile", "data", "tokenizer")


def _changeable(mode: str | None) -> tuple[str, ...]:
    """The saved flags that --resume may change: the budget (--population sizes only the budget
    of a random search; it is the genetic search's generation size), the name of the saved
    winner, and where the trials run (not what they draw or measure)."""
    return ("trials", "generations", *(("population",) if mode == "random" else ()), "profile_name", *BACKEND_FLAGS)


def _normalized(name: str, value):
    """A flag's value as saved: an existing path made absolute (a data list element-wise)."""
    if name not in PATH_FLAGS or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_normalized(name, v) for v in value]
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _same(a, b) -> bool:
    import os

    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a == b:
        return True
    try:
        return isinstance(a, str) and isinstance(b, str) and os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _shown(value) -> str:
    if value is None:
        return "(not given)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def _read_saved_flags(out: Path) -> dict | None:
    """The "cli" record of OUT/run_meta.json; None for a file of a version that saved none."""
    from ..jsonfiles import read_json_object

    path = out / "run_meta.json"
    cli = read_json_object(path, UsageError).get("cli")
    if cli is None:
        return None
    if not (isinstance(cli, dict) and isinstance(cli.get("given"), dict) and isinstance(cli.get("used"), dict)):
        raise UsageError(f"{path}: 'cli' must be an object of 'given' and 'used' objects, got {cli!r} "
                         "(corrupted file?)")
    _check_saved_values({**{k: cli["used"][k] for k in ("profile", "profile_name") if cli["used"].get(k) is not None},
                         **{k: v for k, v in cli["given"].items() if k in SAVED_FLAGS}}, path)
    return cli


def _check_saved_values(saved: dict, path: Path) -> None:
    """The saved flags must be what this parser makes of them: a value of another type or out
    of range (a file edited by hand, "trials": "x") was a TypeError traceback mid-sweep."""
    class Refusing(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(f"{path}: a saved flag is invalid ({message}; corrupted file?)")

    argv = ["--out", "x"]
    for name, value in saved.items():
        if isinstance(value, list) or value is True:
            argv += [_flag(name), *map(str, value if isinstance(value, list) else [])]
        else:
            argv.append(f"{_flag(name)}={value}")
    parsed = vars(harden_parser(add_parser(Refusing().add_subparsers())).parse_args(argv))
    wrong = [name for name, value in saved.items() if parsed[name] != value]  # "trials": "5", "shape": 5
    if wrong:
        raise UsageError(f"{path}: saved flag {_flag(wrong[0])} {saved[wrong[0]]!r} is invalid (corrupted file?)")


def _take_saved_flags(args: argparse.Namespace, saved: dict, out: Path) -> None:
    """--resume: UsageError naming every flag given with a value other than the saved one
    (except those of :func:`_changeable`); then the flags left out take the saved values (the
    first run's flags, as given; a budget given now replaces the saved one; --backend given
    now brings its own backend flags)."""
    used, first = saved["used"], saved["given"]
    mode = args.mode if args.mode is not None else used.get("mode")
    changeable = _changeable(mode)
    if args.objective is not None and args.objective != used.get("objective"):  # first: the other flags follow it
        raise UsageError(f"--objective {args.objective} (saved: {_shown(used.get('objective'))}): {out} holds a "
                         f"{used.get('objective')} sweep, not {args.objective}; leave out --objective (the saved one "
                         "is taken) or start a new --out")
    differ = [f"{_flag(name)} {_shown(_normalized(name, getattr(args, name)))} (saved: {_shown(used.get(name))})"
              for name in SAVED_FLAGS if getattr(args, name) is not None and name not in changeable
              and not _same(_normalized(name, getattr(args, name)), used.get(name))]
    if differ:
        raise UsageError(
            f"--resume continues the sweep in {out} with the settings saved in its run_meta.json, and "
            f"{'this flag differs' if len(differ) == 1 else 'these flags differ'}: {'; '.join(differ)}. Leave "
            f"{'it' if len(differ) == 1 else 'them'} out (the saved value is taken) or start a new --out; only "
            "--trials, --generations (--population with --mode random), --profile-name and the backend's flags "
            "(--backend, --ray-address, --workers, --cpus-per-trial, --gpus-per-trial) may change on resume")
    trials_now = args.trials is not None
    budget_now = args.generations is not None or (args.population is not None and mode == "random")
    backend_now = args.backend is not None
    for name in SAVED_FLAGS:
        if getattr(args, name) is not None or first.get(name) is None:
            continue
        if trials_now and (name == "generations" or (name == "population" and mode == "random")):
            continue  # they sized the saved budget; --trials sets it now
        if name == "trials" and budget_now:
            continue
        if name in BACKEND_FLAGS and backend_now:
            continue
        setattr(args, name, first[name])
    for name in ("profile", "profile_name"):  # their defaults depend on the device: the sweep's own are kept
        if getattr(args, name) is None and name not in first and used.get(name) is not None:
            setattr(args, name, used[name])


def _flags_record(args: argparse.Namespace, given: dict, profile: str, profile_name: str | None) -> dict:
    """The "cli" record of run_meta.json (see :data:`SAVED_FLAGS`)."""
    used = {name: _normalized(name, getattr(args, name)) for name in SAVED_FLAGS}
    for defaults, applies, _verbs, _where in _groups(args):
        if not applies:
            used.update(dict.fromkeys(defaults))
    if args.objective == "speed" and not args.model and not args.shape:
        used["shape"] = "125m"
    used.update(profile=_normalized("profile", profile), profile_name=profile_name)
    return {"given": given, "used": used}


def _positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _absolute_shape(shape: str) -> str:
    """--shape as the objective keeps it: a named shape as given, a config file or checkpoint
    directory made absolute (shape_config reads a named shape first)."""
    from ..benchmark import SHAPES

    if shape.lower() in SHAPES or not Path(shape).expanduser().exists():
        return shape
    return str(Path(shape).expanduser().resolve())


def _saved_search(out: Path) -> tuple[str, ...]:
    """The settings a speed sweep in ``out`` searched (its run_meta.json's space): a sweep of an
    older version, which searched every setting whatever --metric timed, goes on searching them
    (a changed space could not be resumed). () where the file holds none."""
    from ..jsonfiles import read_json_object

    objective = read_json_object(out / "run_meta.json", UsageError).get("objective")
    space = objective.get("space") if isinstance(objective, dict) else None
    return tuple(name for name in space if name != "blas_threads") if isinstance(space, dict) else ()


def _saved_by_sweep(profile_path: Path, out: Path) -> bool:
    """Whether the profile at ``profile_path`` is the one the sweep in ``out`` saved: the same
    settings as the copy the sweep keeps in ``out/profile.json`` (a profile edited since, or
    another sweep's, is not)."""
    import json

    try:
        return json.loads(profile_path.read_text(encoding="utf-8")) == json.loads(
            (out / "profile.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def _file_bytes(path: Path) -> bytes | None:
    """The bytes of ``path``; None where there is no file (or none that can be read)."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    from ..profiles import ProfileError, load_profile, save_profile, shipped_profile_names, user_profile_dir
    from ..tuning import SpeedObjective, SweepError, SweepSettings, TrainObjective, run_sweep
    from ..tuning.sweep import check_out_dir

    if args.resume and args.overwrite:
        raise UsageError("--resume continues the sweep in --out; --overwrite replaces it: give one")
    if args.resume:
        out = Path(args.out).expanduser()
        try:
            check_output_path(out, "--out", directory=True)
            check_out_dir(out, resume=True, overwrite=False)
        except SweepError as err:
            raise UsageError(str(err)) from None
        saved = _read_saved_flags(out)
        if saved is not None:
            _take_saved_flags(args, saved, out)
        elif args.objective is None:
            raise UsageError(f"{out / 'run_meta.json'} holds no saved flags (an older xlstm-metal wrote it): give the "
                             "first run's flags again with --resume")
    elif args.objective is None:
        raise UsageError("--objective is required (speed or train), unless --resume continues a sweep")
    given = {name: _normalized(name, getattr(args, name)) for name in SAVED_FLAGS if getattr(args, name) is not None}
    for name, value in LATE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    text_field_given = args.text_field is not None
    _check_search(args)
    _check_applicable(args)
    _positive(args, "trials", "population", "generations", "workers", "cpus_per_trial", "max_new_tokens",
              "prefill_length", "decode_batch", "decode_tokens", "repeats", "token_budget",
              "param_budget", "seq_len", "max_depth")
    if args.gpus_per_trial < 0:
        raise UsageError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    if args.ray_address and args.backend != "ray":
        raise UsageError("--ray-address needs --backend ray")
    if args.save_outputs and not args.prompt_file:
        raise UsageError("--save-outputs needs --prompt-file")
    if args.prompt_file and not args.save_outputs:
        raise UsageError("--prompt-file is only read with --save-outputs")
    if args.mode == "ga" and args.population < 2:
        raise UsageError(f"--population must be >= 2 for --mode ga, got {args.population}")
    if args.backend == "ray":
        try:
            importlib.import_module("ray")
        except ImportError:
            raise UsageError("--backend ray needs Ray: pip install 'xlstm-metal[tune]'") from None
    try:
        importlib.import_module("optuna")
    except ImportError:
        raise UsageError("tune needs Optuna: pip install 'xlstm-metal[tune]'") from None
    out = Path(args.out).expanduser()
    try:
        check_output_path(out, "--out", directory=True)
        check_out_dir(out, resume=args.resume, overwrite=args.overwrite)
    except SweepError as err:
        raise UsageError(str(err)) from None
    if args.overwrite and out.is_dir():  # e.g. the tokenizer the last sweep trained into OUT/tokenizer/
        from ..tuning.sweep import OUTPUT_DIRS, OUTPUT_FILES

        # Every input read after the deletion: --profile OUT/profile.json (the last sweep's winner as the
        # base) was deleted before the first trial, and each trial failed on it.
        inputs = (("--tokenizer", args.tokenizer), ("--model", args.model), ("--shape", args.shape),
                  ("--profile", args.profile), ("--prompt-file", args.prompt_file),
                  *(("--data", path) for path in args.data or ()))
        check_kept_by_overwrite(out, inputs, lambda name: name in OUTPUT_FILES + OUTPUT_DIRS, where="--out",
                                new="the sweep")
    prompts = read_prompts(args.prompt_file) if args.save_outputs else None

    import mlx.core as mx

    default_profile = "fast-bf16" if mx.default_device() == mx.gpu else "exact-fp32"
    try:
        base = load_profile(args.profile or default_profile)
    except ProfileError as err:
        raise UsageError(str(err)) from None
    # The objective's paths are kept in run_meta.json and compared on --resume: a relative one
    # (--profile my.json, --shape tiny.json, --model ckpt) refused a resume from another directory.
    base_path = str(Path(base.source).resolve()) if base.source else base.name
    profile_path = winner_name = None
    if args.objective == "speed":
        speed_only = ("data", "tokenizer")
        for name in speed_only:
            if getattr(args, name):
                raise UsageError(f"--{name} belongs to --objective train")
        if args.save_outputs and not args.model:
            raise UsageError("--save-outputs with --objective speed needs --model (a checkpoint with a tokenizer)")
        model = None
        if args.model:
            from ..loading import CheckpointError, resolve_model_path

            try:  # absolute, as the train objective's paths are: kept in run_meta.json for --resume
                model = str(resolve_model_path(args.model).resolve())
            except CheckpointError as err:
                raise UsageError(str(err)) from None
            if args.save_outputs:  # every trial writes continuations with it
                read_tokenizer(model, "--save-outputs", missing=f"--save-outputs: {model} has no tokenizer.json")
        elif args.shape:
            from ..benchmark import config_recipe, shape_config

            try:
                config_recipe(shape_config(args.shape))  # the trials quantize a quantized checkpoint's shape
            except (FileNotFoundError, ValueError) as err:
                raise UsageError(f"--shape: {err}") from None
        name = _device_slug() if args.profile_name is None else args.profile_name
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name.endswith(".json"):
            raise UsageError(f"--profile-name must be a plain name (letters, digits, '.', '_', '-'; no path "
                             f"and no .json), got {name!r}")
        if name in shipped_profile_names():
            raise UsageError(f"--profile-name {name!r} is a shipped profile's name; choose another")
        profile_path, winner_name = user_profile_dir() / f"{name}.json", name
        found = _file_bytes(profile_path)  # what may be replaced is decided now: see after the sweep
        # Before the sweep: a profile directory that cannot be written failed only after the last trial.
        check_output_path(profile_path, "the winner's profile", directory=False)
        if profile_path.exists() and not args.overwrite and not args.resume:
            raise UsageError(f"profile {profile_path} exists; pass --overwrite to replace it or --profile-name")
        if profile_path.exists() and args.resume and not _saved_by_sweep(profile_path, out):
            # --overwrite (which replaces --out) cannot come with --resume: only the sweep's own profile is replaced.
            raise UsageError(f"profile {profile_path} exists and was not saved by the sweep in {out} (it differs from "
                             f"{out / 'profile.json'}); resuming would replace it: pass another --profile-name "
                             "(--overwrite replaces a profile only when a sweep starts anew)")
        objective = SpeedObjective(model=model, shape=_absolute_shape(args.shape or "125m"), base_profile=base_path,
                                   metric=args.metric, prefill_length=args.prefill_length,
                                   decode_batch=args.decode_batch, decode_tokens=args.decode_tokens,
                                   repeats=args.repeats, seed=args.seed,
                                   searched=_saved_search(out) if args.resume else ())
        if model is not None:
            from ..loading import CheckpointError

            try:  # before the sweep: every trial would fail on it (the loaded model is the trials' cache)
                objective._base()
            except CheckpointError as err:
                raise UsageError(f"--model: {err}") from None
    else:
        for flag in ("model", "shape", "profile_name"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')} belongs to --objective speed")
        if not args.data:
            raise UsageError("--objective train needs --data")
        if not 0 < args.val_fraction < 1:
            raise UsageError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
        if args.seq_len < 2:  # every trial would fail on it
            raise UsageError(f"--seq-len must be >= 2 (an input and its next token), got {args.seq_len}")
        # A trial trains at least 2 steps of its batch (up to the largest searched), so a smaller
        # budget would be overrun, not kept (--token-budget 5 trained 2 full batches).
        smallest = 2 * max(TrainObjective.batches) * args.seq_len
        if args.token_budget < smallest:
            raise UsageError(f"--token-budget must be >= {smallest:,} (2 steps of {max(TrainObjective.batches)} "
                             f"sequences of --seq-len {args.seq_len}, the largest batch searched), got "
                             f"{args.token_budget:,}")
        from ..training.data import DataError, load_documents, load_tokenizer_file

        check_apart_from_data((("--out", out),), args.data)  # (its own files in --out are all it replaces)
        check_text_field(args.text_field if text_field_given else None, args.data, "--data")

        try:
            load_documents(args.data, args.text_field)
            if args.tokenizer:
                load_tokenizer_file(args.tokenizer)
        except DataError as err:
            raise UsageError(str(err)) from None
        objective = TrainObjective(data=tuple(str(Path(d).resolve()) for d in args.data),
                                   tokenizer=str(Path(args.tokenizer).resolve()) if args.tokenizer else None,
                                   vocab_size=args.vocab_size, token_budget=args.token_budget,
                                   param_budget=args.param_budget, seq_len=args.seq_len, val_fraction=args.val_fraction,
                                   text_field=args.text_field, seed=args.seed, base_profile=base_path,
                                   max_depth=args.max_depth, runs_dir=str((out / "trials").resolve()))
    flags = _flags_record(args, given, args.profile or default_profile, winner_name)
    settings = SweepSettings(mode=args.mode, trials=args.trials, population=args.population,
                             generations=args.generations, seed=args.seed, backend=args.backend,
                             ray_address=args.ray_address, workers=args.workers, cpus_per_trial=args.cpus_per_trial,
                             gpus_per_trial=args.gpus_per_trial, prompts=prompts, max_new_tokens=args.max_new_tokens,
                             progress=not args.no_progress)
    try:
        result = run_sweep(objective, out, settings, resume=args.resume, overwrite=args.overwrite,
                           argv=["xlstm-metal", *sys.argv[1:]], cli=flags)
    except SweepError as err:
        raise UsageError(str(err)) from None
    counts = {}
    for r in result.trials:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if result.best is None:
        print(f"no trial completed ({summary}); see {out / 'trials.jsonl'}", file=sys.stderr)
        return 1
    best = result.best
    print(f"{len(result.trials)} trials ({summary}); best {objective.metric} {best['value']:.6g} "
          f"(trial {best['number']}): {best['params']}", file=sys.stderr)
    if args.objective == "speed":
        import json

        if _file_bytes(profile_path) != found:
            # Another run (a sweep of the same --profile-name, by default tuned-<device>) saved it while this one
            # ran: it was replaced without a word, though --overwrite was never given for it.
            raise UsageError(f"profile {profile_path} was written by another run during this sweep and is kept; this "
                             f"sweep's winner is not saved as a profile: resume it with --resume --profile-name "
                             f"ANOTHER to save it (its trials are in {out})")
        winner = objective.profile_for(best["params"], name=profile_path.stem)
        winner = winner.replace(description=f"{winner.description}; {objective.metric} {best['value']:.1f} tok/s "
                                            f"in {out}")
        from ..training.data import atomic_write_text

        atomic_write_text(out / "profile.json", json.dumps(winner.to_dict(), indent=2) + "\n")
        try:
            path = save_profile(winner, profile_path, overwrite=True)
        except ProfileError as err:
            raise UsageError(str(err)) from None
        print(f"saved the winner as profile {winner.name!r}: {path} (use --profile {winner.name})", file=sys.stderr)
    return 0
