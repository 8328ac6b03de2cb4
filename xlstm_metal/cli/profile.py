"""`xlstm-metal profile`: list, show and check HyperProfiles.

    xlstm-metal profile list
    xlstm-metal profile show fast-bf16
    xlstm-metal profile check exact-fp32 --model path/to/checkpoint [--reference mlx|nxai]

`check` runs the model under the profile beside the float32 reference, prints the relative
error of each block's output and state and of the logits, and exits 1 when any exceeds the
profile's tolerance.
"""

from __future__ import annotations

import argparse
import json

from . import UsageError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile", help="list, show and check HyperProfiles (numerics + speed settings)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="profile_command", metavar="ACTION")
    sub.add_parser("list", help="the profiles known by name (shipped and tuned)")
    show = sub.add_parser("show", help="print a profile's JSON")
    show.add_argument("name", help="profile name or .json file")
    check = sub.add_parser("check", help="compare a model under the profile with the float32 reference")
    check.add_argument("name", help="profile name or .json file")
    check.add_argument("--model", "-m", default=None, help="checkpoint directory (default: the packaged model)")
    check.add_argument("--reference", choices=("auto", "mlx", "nxai"), default="auto",
                       help="float32 reference: NX-AI's PyTorch model when installed (auto), or ours")
    check.add_argument("--decode-steps", type=int, default=4, help="decode steps compared after the prompt")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)
    return p


def add_profile_argument(parser: argparse.ArgumentParser) -> None:
    """``--profile NAME|FILE`` for commands that run a model (generate, chat, serve, bench, train, judge)."""
    parser.add_argument("--profile", default=None, metavar="NAME|FILE",
                        help="HyperProfile: dtype, state dtype, kernels, chunk sizes, eps, soft caps "
                             "(`xlstm-metal profile list`); explicit flags win over it")


def profile_from_args(args: argparse.Namespace, **flags):
    """The --profile (None without one) with every flag the user gave (not None) replacing the
    profile's field: dtype, state_dtype, chunk_size, prefill_chunk, fuse, or chunkwise_kernel
    (-> kernels["chunkwise"]). UsageError for an unknown or invalid profile."""
    from ..profiles import ProfileError, load_profile

    if not getattr(args, "profile", None):
        return None
    changes = {k: v for k, v in flags.items() if v is not None}
    try:
        profile = load_profile(args.profile)
        kernel = changes.pop("chunkwise_kernel", None)
        if kernel is not None:
            changes["kernels"] = {**profile.kernels, "chunkwise": kernel}
        return profile.replace(**changes) if changes else profile
    except ProfileError as err:
        raise UsageError(str(err)) from None


def apply_cli_profile(model, profile):
    """apply_profile with UsageError for a profile the model cannot take."""
    from ..profiles import ProfileError, apply_profile

    try:
        return apply_profile(model, profile)
    except ProfileError as err:
        raise UsageError(str(err)) from None


def apply_training_profile(model, profile, kernel: str, from_scratch: bool) -> None:
    """``train --profile``: the profile's chunk size, eps values and soft caps on the model
    (weights stay float32 for the optimizer, the training kernel is ``kernel``); for a model
    trained from scratch also its gate initialisation."""
    from ..profiles import init_gates

    apply_cli_profile(model, profile.replace(dtype="float32", fuse=False,
                                             kernels={**profile.kernels, "chunkwise": kernel}))
    if from_scratch:
        init_gates(model, profile.init)


def run(args: argparse.Namespace) -> int:
    import sys

    from ..profiles import ProfileError, load_profile, profile_files, read_profile, user_profile_dir

    try:
        if args.profile_command == "list":
            rows = [("name", "version", "dtype", "state", "kernels (chunkwise / sequence / step)", "chunk",
                     "tolerance", "device")]
            bad = []
            # The name column is what --profile takes (the file's name); a profile whose "name"
            # field differs says so. An invalid user file is reported after the others.
            for key, path in sorted(profile_files().items()):
                try:
                    prof = read_profile(path)
                except ProfileError as err:
                    bad.append(str(err))
                    continue
                k = prof.kernels
                dev = (prof.device or {}).get("device_name") or (prof.device or {}).get("device") or "any"
                rows.append((key if prof.name == key else f"{key} (named {prof.name})", str(prof.version),
                             prof.dtype, prof.state_dtype, f"{k['chunkwise']} / {k['sequence']} / {k['step']}",
                             str(prof.chunk_size or "model"), f"{prof.max_rel_error:g}", str(dev)))
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for row in rows:  # plain columns: names are never cut, pipes stay readable
                print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            print(f"(tuned profiles are saved in {user_profile_dir()})")
            for message in bad:
                print(f"invalid: {message}", file=sys.stderr)
            return 1 if bad else 0
        if args.profile_command == "show":
            print(json.dumps(load_profile(args.name).to_dict(), indent=2))
            return 0
        if args.profile_command == "check":
            return _check(args, load_profile(args.name))
    except ProfileError as err:
        raise UsageError(str(err)) from None
    raise UsageError("give an action: profile list | show NAME | check NAME --model M")


def _check(args: argparse.Namespace, profile) -> int:
    from ..config import ConfigError
    from ..loading import CheckpointError, resolve_model_path
    from ..profiles.check import check_profile

    if args.decode_steps < 0:
        raise UsageError(f"--decode-steps must be >= 0, got {args.decode_steps}")
    if args.model is None:
        from ..assets import default_model_path

        source = default_model_path()
    else:
        try:
            source = resolve_model_path(args.model)
        except CheckpointError as err:
            raise UsageError(str(err)) from None
    try:
        result = check_profile(source, profile, reference=args.reference, decode_steps=args.decode_steps)
    except (CheckpointError, ConfigError) as err:
        raise UsageError(str(err)) from None
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"profile {profile.name} (v{profile.version}) against {result.reference} reference; "
              f"tolerance {result.tolerance:g} (max relative error)")
        print(f"{'':10} {'output':>12} {'state':>12}")
        for name, out, state in result.rows():
            flag = "ok" if max(out, state or 0.0) <= result.tolerance else "FAIL"
            state_text = f"{state:12.3e}" if state is not None else " " * 12
            print(f"{name:10} {out:12.3e} {state_text}  {flag}")
        print(("PASS" if result.passed else "FAIL") + f": max error {result.max_error:.3e} "
              f"{'<=' if result.passed else '>'} {result.tolerance:g}")
    return 0 if result.passed else 1
