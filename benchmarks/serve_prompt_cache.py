"""Prompt caching of `xlstm-metal serve` on a 20-turn conversation.

A chat client re-sends the whole conversation every turn. With the prompt cache (mlx-lm's LRU
cache of our recurrent states: one fixed-size state per block, whatever the conversation's
length) the server feeds only the tokens it has not seen; without it (--prompt-cache-size 0)
it feeds the whole conversation each time. Both servers run side by side and get the same greedy
conversation, turn by turn in alternation.

    python benchmarks/serve_prompt_cache.py [--model DIR] [--turns 20] [--max-tokens 48]

Writes benchmarks/results/serve_prompt_cache.json and .png; `python benchmarks/report.py`
puts the table into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import xlstm_metal  # noqa: F401,I001  (first: binds OpenBLAS before mlx)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUESTIONS = [
    "How do I open a file in Python?", "What does the with statement do?", "How do I read a file line by line?",
    "How can I write text to a file?", "What is a list comprehension?", "How do I sort a list of tuples?",
    "What is the difference between a list and a tuple?", "How do I use a dictionary?",
    "How do I iterate over a dictionary?", "What is a generator?", "How do I define a class?",
    "What does __init__ do?", "How do exceptions work?", "How do I raise an exception?",
    "What is the os module for?", "How do I join paths?", "What does json.dumps return?",
    "How do I parse command line arguments?", "What is a decorator?", "How do I time a function?",
]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def streamed_turn(url: str, messages: list[dict], max_tokens: int) -> tuple[str, dict, float, float]:
    """(reply, usage, seconds to the first token, seconds in all) of one streamed request."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first, text, usage = None, "", {}
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter() - start
                    text += piece
    return text, usage, first or float("nan"), time.perf_counter() - start


def conversation(servers: dict, turns: int, max_tokens: int) -> dict[str, list[dict]]:
    """The same greedy conversation against each server, turn by turn in alternation (so both
    meet the same load on a shared machine); every server gets the first server's history."""
    messages, records = [], {name: [] for name in servers}
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        replies = {}
        for name, server in servers.items():
            reply, usage, ttft, seconds = streamed_turn(server.url, messages, max_tokens)
            cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
            replies[name] = reply
            records[name].append({
                "turn": turn + 1, "prompt_tokens": usage["prompt_tokens"], "cached_tokens": cached,
                "fed_tokens": usage["prompt_tokens"] - cached, "completion_tokens": usage["completion_tokens"],
                "ttft_s": ttft, "seconds": seconds, "cache_entries": len(server.generator.prompt_cache),
                "cache_bytes": server.generator.prompt_cache.nbytes,
            })
            print(f"turn {turn + 1:2d} {name:9s}: prompt {usage['prompt_tokens']:5d}  cached {cached:5d}  "
                  f"first token {ttft * 1000:7.1f} ms  all {seconds * 1000:7.1f} ms", file=sys.stderr)
        first = next(iter(replies.values()))
        records[next(iter(servers))][-1]["same_reply_everywhere"] = all(r == first for r in replies.values())
        messages.append({"role": "assistant", "content": first})
    return records


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, style in (("cached", "-o"), ("uncached", "--s")):
        runs = result["runs"][name]
        turns = [r["turn"] for r in runs]
        left.plot(turns, [r["fed_tokens"] for r in runs], style, label=name, markersize=3)
        right.plot(turns, [r["ttft_s"] * 1000 for r in runs], style, label=name, markersize=3)
    left.set(xlabel="turn", ylabel="prompt tokens fed", title="tokens the server fed per turn")
    right.set(xlabel="turn", ylabel="ms", title="time to the first token")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the packaged model)")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", default=str(RESULTS / "serve_prompt_cache.json"))
    args = parser.parse_args()

    import mlx.core as mx
    import mlx_lm

    from xlstm_metal.assets import default_model_path
    from xlstm_metal.serve import make_server, server_args

    model = args.model or str(default_model_path())
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/serve_prompt_cache.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "model": "the packaged model" if args.model is None else model, "turns": args.turns,
        "max_tokens": args.max_tokens, "device": str(mx.default_device()), "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__, "host": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()})",
        "loadavg_1m": os.getloadavg()[0], "runs": {},
    }
    from contextlib import ExitStack

    with ExitStack() as stack:
        servers = {}
        for name, cache_size in (("cached", 10), ("uncached", 0)):
            servers[name] = stack.enter_context(
                make_server(server_args(model, port=0, prompt_cache_size=cache_size)).start())
            post(servers[name].url, {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4})
            servers[name].generator.prompt_cache.trim_to(n_sequences=0)
        result["runs"] = conversation(servers, args.turns, args.max_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
