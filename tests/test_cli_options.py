"""Checks every xlstm-metal parser gets where it is built (`xlstm_metal.cli.harden_parser`): a
single-valued option given twice is refused, integers stay in the range MLX computes with, and
text options refuse an empty value. Each is tried on every option of every subcommand."""

from __future__ import annotations

import argparse
import re

import pytest

from xlstm_metal.cli import INT_LIMIT, any_text, build_parser, main
from xlstm_metal.cli.top import main as xltop_main


def parse_error(argv, capsys, parser=None) -> str:
    """stderr of a parse of ``argv`` that must exit with code 2."""
    with pytest.raises(SystemExit) as exit_:
        (parser or build_parser()).parse_args([str(a) for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def subcommand_parsers():
    """(argv prefix, parser) of every subcommand, nested ones (``profile check``) included."""
    todo = [([], build_parser())]
    found = []
    while todo:
        prefix, parser = todo.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found.append(([*prefix, name], sub))
                    todo.append(([*prefix, name], sub))
    return found


#: Action classes meant to repeat (left alone) and to hold one value (refused twice).
REPEATING = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction)
SINGLE = (argparse._StoreAction, argparse._StoreConstAction, argparse.BooleanOptionalAction)


def a_value(action) -> list[str]:
    """Command-line words that give ``action`` a value its type accepts."""
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(next(iter(action.choices)))]
    if getattr(action.type, "__name__", "") in ("finite_float", "float"):
        return ["0.5"]
    return ["1"]  # ints, int lists, seeds, and any text


def single_valued_options():
    cases = []
    for prefix, parser in subcommand_parsers():
        for action in parser._actions:
            if action.option_strings and isinstance(action, SINGLE) and not isinstance(action, REPEATING):
                cases.append(pytest.param(prefix, action, id=" ".join([*prefix, action.option_strings[0]])))
    return cases


CASES = single_valued_options()


def test_every_subcommand_is_covered():
    commands = {" ".join(prefix) for prefix, _ in subcommand_parsers()}
    assert {"generate", "chat", "serve", "train", "convert", "bench", "top", "tune", "profile check", "judge",
            "plot", "mad", "evolve"} <= commands
    covered = {" ".join(case.values[0]) for case in CASES}
    assert commands - covered <= {"profile", "profile list", "profile show", "mlx-lm"}  # those have no such option
    assert len(CASES) > 150


@pytest.mark.parametrize("prefix,action", CASES)
def test_single_valued_option_given_twice_is_refused(prefix, action, capsys):
    # The first spelling, then the last (--max-tokens, then -n): the same option either way.
    # (A --X/--no-X pair: --X, then --no-X, a contradiction as well as a repeat.)
    first, last = action.option_strings[0], action.option_strings[-1]
    err = parse_error([*prefix, first, *a_value(action), last, *a_value(action)], capsys)
    name = "/".join(action.option_strings)
    assert f"argument {name}: given more than once" in err.splitlines()[-1], err
    # Once is not "more than once" (other required arguments may still be missing).
    try:
        build_parser().parse_args([*prefix, first, *a_value(action)])
    except SystemExit:
        pass
    assert "given more than once" not in capsys.readouterr().err


@pytest.mark.parametrize("argv,option", [
    (["generate", "-p", "hi", "--max-tokens=5", "--max-tokens", "9"], "--max-tokens/-n"),
    (["generate", "-p", "hi", "-n5", "--max-tokens=9"], "--max-tokens/-n"),
    (["generate", "-p", "hi", "--max-tok", "5", "-n", "9"], "--max-tokens/-n"),  # an abbreviation is the option
    (["chat", "--temp", "0", "--temperature", "1"], "--temperature/--temp"),
    (["train", "d.txt", "--out", "r", "--fuse-projections", "--no-fuse-projections"],
     "--fuse-projections/--no-fuse-projections"),
    (["judge", "--outputs", "a.jsonl", "--outputs", "b.jsonl", "--out", "r"], "--outputs"),
    (["generate", "-p", "hi", "--mem-hard", "5GB", "--mem-hard", "6GB"], "--mem-hard"),
    (["generate", "-p", "hi", "-v", "--verbose"], "--verbose/-v"),
])
def test_repeats_are_refused_in_every_spelling(argv, option, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = None
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and f"argument {option}: given more than once" in err, err
    assert list(tmp_path.iterdir()) == []


def test_values_that_look_like_options_are_values():
    parser = build_parser()
    args = parser.parse_args(["generate", "--prompt=--max-tokens", "--max-tokens", "2"])
    assert (args.prompt, args.max_tokens) == ("--max-tokens", 2)
    args = parser.parse_args(["generate", "-p=-n", "-n", "3"])
    assert (args.prompt, args.max_tokens) == ("-n", 3)
    args = parser.parse_args(["generate", "-p", "hi", "--stop=--stop", "--stop", "x", "--stop", "x"])
    assert args.stop == ["--stop", "x", "x"]  # append: meant to repeat
    # One parser parses again and again: nothing of an earlier parse counts in the next.
    for n in ("4", "5"):
        assert parser.parse_args(["generate", "-p", "hi", "-n", n]).max_tokens == int(n)


def test_xltop_refuses_repeats(capsys):
    with pytest.raises(SystemExit) as exit_:
        xltop_main(["--once", "--once"])
    assert exit_.value.code == 2
    assert "argument --once: given more than once" in capsys.readouterr().err


@pytest.fixture
def mlx_lm_model(tmp_path):
    pytest.importorskip("mlx_lm")
    import shutil

    from xlstm_metal.assets import DEFAULT_MODEL_DIR

    return shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "model")


def test_mlx_lm_options_given_twice_are_refused(mlx_lm_model, tmp_path, capsys):
    before = argparse.ArgumentParser.parse_known_args
    with pytest.raises(SystemExit) as exit_:
        main(["mlx-lm", "generate", "--model", str(mlx_lm_model), "--prompt", "hi", "--max-tokens", "3",
              "-m", "4"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --max-tokens/-m: given more than once (as --max-tokens, then as -m)" in err, err
    assert argparse.ArgumentParser.parse_known_args is before  # argparse is as it was afterwards


def test_mlx_lm_model_given_twice_is_refused(mlx_lm_model, tiny_model_dir, capsys):
    # --trust-remote-code was decided for the first --model while mlx-lm loaded the last.
    code = main(["mlx-lm", "generate", "--model", str(mlx_lm_model), "--model", str(tiny_model_dir),
                 "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "the model is given more than once" in err and str(tiny_model_dir) in err, err
    code = main(["mlx-lm", "convert", "--hf-path", str(mlx_lm_model), f"--model={tiny_model_dir}"])
    assert code == 2 and "--hf-path" in capsys.readouterr().err


def mlx_lm_counts():
    from xlstm_metal.cli.mlxlm import COUNT_MINIMUMS

    return [pytest.param(command, option, minimum, id=f"{command} {option}")
            for command, options in COUNT_MINIMUMS.items() for option, minimum in options.items()]


@pytest.mark.parametrize("command,option,minimum", mlx_lm_counts())
def test_mlx_lm_counts_below_their_minimum_are_refused(command, option, minimum, mlx_lm_model, capsys):
    # mlx-lm's parsers took any integer: `generate --max-tokens -3` generated without a limit, a
    # negative --top-k turned top-k off, `lora --num-layers -5` trained every layer.
    model = ["--model", str(mlx_lm_model)]
    with pytest.raises(SystemExit) as exit_:
        main(["mlx-lm", command, *model, option, str(minimum - 1)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"mlx_lm.{command}: error: argument {option}") and \
        last.endswith(f": must be >= {minimum}{' (-1: all)' if minimum == -1 else ''}, got {minimum - 1}"), err


def test_mlx_lm_count_minimums_are_accepted(capsys):
    # The smallest value of each still parses, on mlx-lm's own parsers, as the integer given;
    # lora's -1 keeps its meaning ("all").
    pytest.importorskip("mlx_lm")
    from mlx_lm.generate import setup_arg_parser
    from mlx_lm.lora import build_parser as lora_parser

    from xlstm_metal.cli.mlxlm import COUNT_MINIMUMS, hardened_mlx_lm_parsers

    before = argparse.ArgumentParser.parse_known_args
    for command, make in (("generate", setup_arg_parser), ("lora", lora_parser)):
        minimums = COUNT_MINIMUMS[command]
        with hardened_mlx_lm_parsers(command):
            args = make().parse_args([w for option, low in minimums.items() for w in (option, str(low))])
        for option, low in minimums.items():
            assert getattr(args, option[2:].replace("-", "_")) == low, option
    assert argparse.ArgumentParser.parse_known_args is before
    with hardened_mlx_lm_parsers("generate"):
        args = setup_arg_parser().parse_args(["-m", "7", "--top-k", "40", "--seed", str(2**64 - 1), "--temp", "0.7",
                                              "--top-p", "1", "--min-p", "0"])
    assert (args.max_tokens, args.top_k, args.seed) == (7, 40, 2**64 - 1)  # the largest seed MLX takes
    assert (args.temp, args.top_p, args.min_p) == (0.7, 1.0, 0.0)  # the ends of the ranges are in them


def mlx_lm_maximums():
    from xlstm_metal.cli.mlxlm import COUNT_MAXIMUMS

    return [pytest.param(command, option, maximum, id=f"{command} {option}")
            for command, options in COUNT_MAXIMUMS.items() for option, maximum in options.items()]


@pytest.mark.parametrize("command,option,maximum", mlx_lm_maximums())
def test_mlx_lm_counts_above_their_maximum_are_refused(command, option, maximum, mlx_lm_model, capsys):
    # generate --seed 2**64 (and -1) was a TypeError traceback from mx.random.seed; server
    # --port 99999 listened on port 34463.
    with pytest.raises(SystemExit) as exit_:
        main(["mlx-lm", command, "--model", str(mlx_lm_model), option, str(maximum + 1)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"mlx_lm.{command}: error: argument {option}: must be <= {maximum}, " \
                                           f"got {maximum + 1}", err


@pytest.mark.parametrize("command,option,value,message", [
    # Each ran to exit 0: a negative --temp sampled the least likely tokens, NaN sampled garbage,
    # --top-p 5 and --min-p -0.5 turned their filter off.
    ("generate", "--temp", "-1", "must be >= 0, got -1"),
    ("generate", "--temp", "nan", "must be a finite number, got 'nan'"),
    ("generate", "--top-p", "5", "must be in [0, 1], got 5"),
    ("generate", "--min-p", "-0.5", "must be in [0, 1], got -0.5"),
    ("generate", "--xtc-threshold", "0.7", "must be in [0, 0.5], got 0.7"),
    ("server", "--temp", "inf", "must be a finite number, got 'inf'"),
    ("server", "--top-p", "1.5", "must be in [0, 1], got 1.5"),
    ("lora", "--learning-rate", "nan", "must be a finite number, got 'nan'"),
])
def test_mlx_lm_real_numbers_out_of_range_are_refused(command, option, value, message, mlx_lm_model, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["mlx-lm", command, "--model", str(mlx_lm_model), option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"mlx_lm.{command}: error: argument {option}: {message}", err


@pytest.mark.parametrize("command,flag", [("generate", "--model"), ("server", "--model"), ("lora", "--model"),
                                          ("fuse", "--model"), ("convert", "--hf-path")])
def test_mlx_lm_model_that_is_a_file_is_a_usage_error(command, flag, tmp_path, capsys):
    # mlx-lm read FILE/config.json: a NotADirectoryError traceback (server: a dead generation
    # thread behind a server that went on listening).
    pytest.importorskip("mlx_lm")
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not a directory")
    assert main(["mlx-lm", command, flag, str(model)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"xlstm-metal: error: mlx-lm {command}: model path {model} is a file; give the " \
                          "checkpoint directory", err


@pytest.mark.parametrize("text,message", [
    (": : - [", "--config {config} is not valid YAML: line 1, column 1: expected <block end>, but found ':'"),
    ("[1, 2]\n", "--config {config} must hold a YAML mapping of options (name: value), got a list"),
    ("", "--config {config} must hold a YAML mapping of options (name: value), got nothing"),
], ids=["bad-yaml", "list", "empty"])
def test_mlx_lm_lora_config_that_is_no_mapping_is_a_usage_error(text, message, mlx_lm_model, tmp_path, capsys):
    # Each was a traceback (a YAMLError; AttributeError: 'list' / 'NoneType' object has no attribute 'items').
    import yaml

    config = tmp_path / "lora.yaml"
    config.write_text(text)
    before = yaml.load
    assert main(["mlx-lm", "lora", "--model", str(mlx_lm_model), "--train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "xlstm-metal: error: mlx-lm lora: " + message.format(config=config), err
    assert yaml.load is before  # PyYAML is as it was afterwards


# ---------------------------------------------------------------------- integers MLX can hold
HUGE = "99999999999999999999"


@pytest.mark.parametrize("argv,option", [
    # Each was a traceback: std::bad_cast, an OverflowError, or "Maximum allowed dimension exceeded";
    # train --steps failed at step 101, after checkpoints and metrics were written.
    (["generate", "-p", "hi", "--prefill-chunk-size", HUGE], "--prefill-chunk-size"),
    (["bench", "--config", "{model}", "--prefill-lengths", str(INT_LIMIT + 1)], "--prefill-lengths"),
    (["bench", "--config", "{model}", "--prefill-chunk", HUGE], "--prefill-chunk"),
    (["bench", "--config", "{model}", "--decode-batches", HUGE], "--decode-batches"),
    (["train", "{data}", "--out", "run", "--steps", HUGE], "--steps"),
    (["train", "{data}", "--out", "run", "--vocab-size", HUGE], "--vocab-size"),
    (["mad", "--arch", "mlstm", "--tasks", "in_context_recall", "--epochs", HUGE], "--epochs"),
    (["profile", "check", "exact-fp32", "-m", "{model}", "--decode-steps", HUGE], "--decode-steps"),
])
def test_integers_beyond_32_bits_are_usage_errors(argv, option, tiny_model_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data.txt"
    data.write_text("the quick brown fox\n" * 40)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    err = parse_error([a.format(model=tiny_model_dir, data=data) for a in argv], capsys)
    assert f"argument {option}" in err and ("must be between" in err or "at most" in err), err
    assert list(work.iterdir()) == []


def test_integer_limits():
    parser = build_parser()
    assert parser.parse_args(["generate", "-n", str(INT_LIMIT)]).max_tokens == INT_LIMIT
    assert parser.parse_args(["generate", "-n", "-3"]).max_tokens == -3  # (the command names the range)
    # Parameter budgets are counted in Python: beyond 32 bits they are fine.
    assert parser.parse_args(["evolve", "--budget", "7000000000", "--out", "x"]).budget == 7_000_000_000
    args = parser.parse_args(["tune", "--objective", "train", "--out", "x", "--param-budget", "7000000000",
                              "--token-budget", "9000000000"])
    assert (args.param_budget, args.token_budget) == (7_000_000_000, 9_000_000_000)


# ---------------------------------------------------------------------- empty text
@pytest.mark.parametrize("argv,option", [
    # Each was read as "not given" (or as the working directory) and silently replaced.
    (["bench", "--config", ""], "--config"),                      # benchmarked the 125m shape
    (["serve", "--host", ""], "--host"),                          # listened on every interface
    (["serve", "--model", ""], "--model/-m"),                     # served the packaged model
    (["train", "d.txt", "--out", "r", "--init-from", ""], "--init-from"),  # trained from scratch
    (["train", "d.txt", "--out", "r", "--export", ""], "--export"),        # exported nothing
    (["train", "", "--out", "r"], "data"),                        # trained on the working directory
    (["generate", "-p", "hi", "--profile", ""], "--profile"),     # ran without the profile
    (["mad", "--arch", "mlstm", "--out", ""], "--out"),           # wrote to mad-runs/...
    (["judge", "--outputs", "a.jsonl", "--out", ""], "--out"),    # wrote into the working directory
    (["generate", "-p", "hi", "--mem-log", ""], "--mem-log"),     # logged nothing
])
def test_empty_values_are_refused(argv, option, capsys):
    err = parse_error(argv, capsys)
    assert f"argument {option}: must not be empty" in err, err


def test_empty_values_where_they_mean_something():
    parser = build_parser()
    assert parser.parse_args(["generate", "-p", ""]).prompt == ""  # generation from BOS alone
    assert parser.parse_args(["evolve", "--budget", "5", "--out", "x", "--start", ""]).start == ""  # documented
    texts = [a for _, p in subcommand_parsers() for a in p._actions if a.type is any_text]
    assert len(texts) == 3  # generate's and chat's --prompt, evolve's --start


def test_verbose_stats_give_no_generation_rate_for_a_single_token(capsys):
    """The generation rate counts the tokens after the first (which comes with the prompt): with
    -n 1 the stats said "generation: 1 tokens, 0.0 tok/s"."""
    assert main(["generate", "-p", "The Python interpreter", "-n", "1", "--temp", "0", "-v"]) == 0
    err = capsys.readouterr().err
    assert "generation: 1 token (a rate needs 2 or more) | peak memory:" in err and "0.0 tok/s" not in err
    assert main(["generate", "-p", "The Python interpreter", "-n", "3", "--temp", "0", "-v"]) == 0
    assert re.search(r"generation: 3 tokens, [\d,]+\.\d tok/s \| peak memory", capsys.readouterr().err)
