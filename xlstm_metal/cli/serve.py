"""`xlstm-metal serve`: an OpenAI-compatible HTTP server (mlx-lm's) and a chat page at /."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from . import UsageError
from .profile import add_profile_argument, profile_from_args

DESCRIPTION = """\
Serve an xLSTM model over HTTP: /v1/completions and /v1/chat/completions (OpenAI's API,
streaming with "stream": true), /v1/models, /health, and a chat page at /. Built on mlx-lm's
server: concurrent requests are batched, and prompt prefixes are cached (a recurrent state per
block, whatever the conversation's length), so a chat client that re-sends the conversation
pays only for the new turn. Without --model the small packaged model is served."""


#: Prompt tokens per forward pass without --prefill-step-size or a profile's prefill_chunk.
DEFAULT_PREFILL_STEP = 2048


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with a chat page",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", help="checkpoint directory or Hugging Face id (default: the packaged model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="weight dtype (default: bfloat16 on a GPU / Metal, float32 on CPU)")
    add_profile_argument(parser)
    parser.add_argument("--adapter-path", help="LoRA adapters trained with mlx_lm.lora (or `xlstm-metal mlx-lm lora`)")
    # A request's defaults: these flags where given, else the model's generation_config.json (as
    # `generate` reads it, and vLLM's --generation-config auto), else mlx-lm's values.
    parser.add_argument("--generation-config", default="auto", metavar="auto|none|DIR",
                        help="where requests' defaults for the fields below come from: auto = each served "
                             "model's generation_config.json, none = only these flags and the built-in "
                             "values, DIR = the generation_config.json in DIR (default: auto)")
    parser.add_argument("--max-tokens", type=int, help="default max_tokens of a request (default: the model's "
                        "max_new_tokens, or what its max_length leaves after the prompt, else 512)")
    parser.add_argument("--temp", "--temperature", type=float,
                        help="default temperature, in [0, 2] (default: the model's when it sets do_sample, else 0, greedy)")
    parser.add_argument("--top-p", type=float, help="default top_p (default: the model's, else 1.0)")
    parser.add_argument("--top-k", type=int, help="default top_k (default: the model's, else 0 = off)")
    parser.add_argument("--min-p", type=float, help="default min_p (default: the model's, else 0)")
    parser.add_argument("--repetition-penalty", type=float,
                        help="default repetition_penalty (default: the model's, else off)")
    parser.add_argument("--decode-concurrency", type=int, default=32,
                        help="requests decoded together in one batch (default: 32)")
    parser.add_argument("--prompt-concurrency", type=int, default=8,
                        help="prompts prefilled together in one batch (default: 8)")
    parser.add_argument("--prompt-cache-size", type=int, default=10,
                        help="conversation states kept for prefix reuse (default: 10; 0 turns caching off)")
    parser.add_argument("--prefill-step-size", type=int, default=None,
                        help="prompt tokens per forward pass (default: the --profile's prefill_chunk, else 2048)")
    parser.add_argument("--allowed-origins", default="*", help="CORS origins, comma-separated (default: *)")
    parser.add_argument("--allowed-models", metavar="MODEL[,MODEL...]|*",
                        help="checkpoints (directories or Hugging Face ids) a request's \"model\" may name besides "
                             "--model, loaded in its place; * for any (mlx-lm's server: any directory of this "
                             "machine, any Hugging Face id, downloaded) (default: none)")
    parser.add_argument("--allowed-adapters", metavar="DIR[,DIR...]|*",
                        help="LoRA adapter directories a request's \"adapters\" may name besides --adapter-path; "
                             "* for any (default: none)")
    parser.add_argument("--request-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="the longest a client may keep the server waiting on one read or write (a request "
                             "not sent, a body shorter than its Content-Length) before its connection is closed "
                             "(default: 60)")
    parser.add_argument("--max-connections", type=int, default=64, metavar="N",
                        help="connections served at once; one more gets a 503 (default: 64)")
    parser.add_argument("--max-tokens-limit", type=int, metavar="N",
                        help="the largest max_tokens a request may ask; caps the default too (default: none)")
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="server log level (default: WARNING)")
    from ..distributed import add_parallel_argument

    add_parallel_argument(parser)  # under mlx.launch: rank 0 serves HTTP, every rank computes
    parser.set_defaults(func=run)
    return parser


def allowed_origins(args: argparse.Namespace) -> list[str]:
    """--allowed-origins as a list; spaces around the commas dropped (an origin " http://b.org"
    matched no request's Origin header, so that site was refused without a word)."""
    return [origin.strip() for origin in args.allowed_origins.split(",")]


def allowed_names(setting: str | None) -> list[str] | None:
    """--allowed-models / --allowed-adapters as a list (spaces around the commas dropped; not
    given: none); None for * (any)."""
    names = [name.strip() for name in (setting or "").split(",") if name.strip()]
    return None if "*" in names else names


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    for name in ("decode_concurrency", "prompt_concurrency", "prefill_step_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_tokens", "max_tokens_limit", "max_connections"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_tokens_limit is not None and (args.max_tokens or 0) > args.max_tokens_limit:
        raise UsageError(f"--max-tokens {args.max_tokens} is above --max-tokens-limit {args.max_tokens_limit}")
    if not (args.request_timeout > 0 and math.isfinite(args.request_timeout)):
        raise UsageError(f"--request-timeout must be a number of seconds > 0, got {args.request_timeout}")
    if args.prompt_cache_size < 0:
        raise UsageError(f"--prompt-cache-size must be >= 0, got {args.prompt_cache_size}")
    from .generate import SAMPLING_RULES  # generate's rules, but mlx-lm's 0 = no repetition penalty

    checks = {name: SAMPLING_RULES[name] for name in ("top_p", "top_k", "min_p")}
    # A request is held to OpenAI's [0, 2]; the default it gets must be a value it could send.
    checks["temp"] = (lambda x: 0 <= x <= 2, "in [0, 2], the range a request's temperature is held to")
    checks["repetition_penalty"] = (lambda x: x >= 0 and math.isfinite(x), "a finite number >= 0 (0 or 1 = off)")
    for name, (ok, rule) in checks.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            raise UsageError(f"--{name.replace('_', '-')} must be {rule}, got {value}")
    if "" in allowed_origins(args):
        raise UsageError(f"--allowed-origins {args.allowed_origins!r} has an empty origin; give comma-separated "
                         "origins (e.g. http://localhost:3000,https://example.org) or *")
    setting = args.generation_config
    if setting not in ("auto", "none") and not (Path(setting).expanduser() / "generation_config.json").is_file():
        raise UsageError(f"--generation-config must be auto, none or a directory holding generation_config.json; "
                         f"{setting} has none")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from ..generation import DEFAULT_MODEL_DIR

    try:
        from ..serve import ServeError, follow, make_server, server_args
    except ImportError as err:
        raise UsageError(f"serving needs mlx-lm ({err}): pip install 'xlstm-metal[serve]'") from None

    if args.model is None and not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise UsageError(f"no --model given and the packaged default model is not installed ({DEFAULT_MODEL_DIR})")
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(message)s")
    # As in generate and chat, the profile's prompt piece length unless the flag is given (serve
    # prefilled 2048 tokens per pass whatever the profile said).
    profile = profile_from_args(args, dtype=args.dtype, prefill_chunk=args.prefill_step_size)
    prefill_step_size = args.prefill_step_size or (profile and profile.prefill_chunk) or DEFAULT_PREFILL_STEP
    cli_args = server_args(
        args.model or DEFAULT_MODEL_DIR, host=args.host, port=args.port, dtype=args.dtype, profile=profile,
        adapter_path=args.adapter_path, generation_config=args.generation_config, max_tokens=args.max_tokens,
        temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        decode_concurrency=args.decode_concurrency, prompt_concurrency=args.prompt_concurrency,
        prompt_cache_size=args.prompt_cache_size, prefill_step_size=prefill_step_size,
        allowed_origins=allowed_origins(args), log_level=args.log_level, parallel=args.parallel,
        allowed_models=allowed_names(args.allowed_models), allowed_adapters=allowed_names(args.allowed_adapters),
        request_timeout=args.request_timeout, max_connections=args.max_connections,
        max_tokens_limit=args.max_tokens_limit,
    )
    from ..distributed import world

    if world().rank() != 0:  # mlx.launch: rank 0 alone listens; the others follow its requests
        try:
            follow(cli_args)
        except ServeError as err:
            raise UsageError(str(err)) from None
        return 0
    from ..monitor import current_job

    print(f"loading {cli_args.model} ...", file=sys.stderr, flush=True)
    current_job().update(phase="load", model=str(cli_args.model))
    try:
        server = make_server(cli_args)
    except ServeError as err:
        raise UsageError(str(err)) from None
    current_job().update(phase="idle", unit="requests")
    print(f"serving on {server.url}  (chat page: {server.url}/ , API: {server.url}/v1)  Ctrl-C stops",
          file=sys.stderr, flush=True)
    server.serve_forever(interrupt_exits=True)  # Ctrl-C: KeyboardInterrupt after the server closed
    return 0
