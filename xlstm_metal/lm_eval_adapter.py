"""An lm-evaluation-harness model adapter: ``--model xlstm-metal``.

Importing this module registers the adapter in lm_eval's model registry. lm-eval 0.4.x finds
models only in its own registry (it reads no plug-in entry points), so from the shell run its CLI
through ``xlstm-metal-lm-eval``, which registers the adapter and then hands every argument to
lm_eval's own command line::

    pip install 'xlstm-metal[eval]'
    xlstm-metal-lm-eval --model xlstm-metal --model_args pretrained=PATH,dtype=float32 \\
        --tasks lambada_openai --batch_size 1
    xlstm-metal-lm-eval run --model xlstm-metal --model_args pretrained=PATH \\
        --include_path my_tasks/ --tasks my_task           # a local task YAML

or from Python: ``import xlstm_metal.lm_eval_adapter`` then ``lm_eval.simple_evaluate(model=
"xlstm-metal", model_args="pretrained=PATH", tasks=[...])``.

model_args: ``pretrained`` (checkpoint directory or Hugging Face id; default the packaged
model), ``dtype`` (float32 default), ``profile`` (a HyperProfile name or file),
``max_length`` (a context window, as lm-eval's transformers models have one: a context is cut
from the left to fit it, and rolling log-likelihoods score windows of it, each from a fresh state;
default none: the recurrent state carries across the whole text). Log-likelihoods are exact sums
of the model's token log-probabilities (context with BOS, continuation without, a pair split as
lm-eval's own models split it: trailing whitespace moved to the continuation, whose ids are the
pair's encoded whole past the context's; where the
tokenizer inserts no BOS, an empty context and a rolling text start from lm-eval's prefix token,
the BOS id else the EOS id, so every continuation or text token is scored); generation is
greedy unless ``temperature`` > 0 is asked for, and takes ``top_k``, ``top_p``, ``min_p``,
``repetition_penalty`` and ``seed`` as well.

``--batch_size N`` (a positive integer; default 1): ``loglikelihood`` and
``loglikelihood_rolling`` score up to N requests (or rolling windows) in one forward pass, longest
first so that little is padded, each right-padded to the longest (the model is causal, so padding
never reaches a real position's logits) and results in the requests' order: the same scores as one
at a time, to float32 round-off. Texts longer than :data:`xlstm_metal.judge.SCORE_PIECE` tokens
still run in pieces of that many carrying the batched state, so memory stays bounded (the
log-probabilities of a piece: N x SCORE_PIECE x vocabulary float32). Batches share each forward
pass's fixed costs (on a 2-core CPU, the packaged model, 64 requests of 20-300 tokens: 9.4 s one
at a time, 5.4 s in batches of 8; benchmarks/score_batches.py). ``auto`` / ``auto:N`` take a fixed
:data:`AUTO_BATCH_SIZE` (``--max_batch_size`` caps it): MLX has no out-of-memory error to probe for
a largest size, as lm-eval's transformers models do. ``generate_until`` runs up to N requests
with the same sampling settings at a time: each prompt prefilled alone from its own zero state (no
padding), the rows decoding together, each stopping at its own ``until``, ``max_gen_toks`` or EOS;
answers in the requests' order, greedy ones token for token those of one request at a time (see
:meth:`XLSTMMetalLM.generate_until` for seeded sampling).
"""

from __future__ import annotations

import re
import sys
from typing import Any, NamedTuple

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .checks import is_integer
from .generation import SamplingParams, xLSTMRunner
from .judge import batched_token_logprobs

#: The batch size ``batch_size="auto"`` takes (at most ``max_batch_size``): enough rows to fill a
#: GPU's matrix units on short requests, while a piece's log-probabilities (8 x SCORE_PIECE x
#: vocabulary float32: 1.6 GB at a 50k vocabulary) stay small beside any model that fits.
AUTO_BATCH_SIZE = 8


def _whole_number(value: object) -> int | None:
    """An int, NumPy integer or decimal string (``"12"``, ``"-1"``) as an int; None for anything else
    (a bool, a float, ``"4.5"``, None)."""
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return int(value) if is_integer(value) else None


def _positive_int(value: object, name: str, or_auto: str = "") -> int:
    number = int(value.strip()) if isinstance(value, str) and value.strip().isdecimal() else value
    if not is_integer(number) or number < 1:
        raise ValueError(f"{name} must be a positive integer{or_auto}, got {value!r}")
    return int(number)


def parse_batch_size(batch_size: int | str | None, max_batch_size: int | str | None = None) -> int:
    """lm-eval's ``batch_size`` (an int, a numeric string, ``auto`` or ``auto:N``; None: 1) as a
    positive int; ``auto`` is :data:`AUTO_BATCH_SIZE`, at most ``max_batch_size``. ValueError
    naming a value that is none of these."""
    cap = AUTO_BATCH_SIZE if max_batch_size is None else _positive_int(max_batch_size, "max_batch_size")
    if batch_size is None:
        return 1
    if isinstance(batch_size, str) and batch_size.strip().startswith("auto"):
        # auto:N re-detects N times in lm-eval's transformers models; here it is the one fixed size
        if not re.fullmatch(r"auto(:\d+(\.\d*)?)?", batch_size.strip()):
            raise ValueError(f"batch_size must be a positive integer, 'auto' or 'auto:N', got {batch_size!r}")
        return min(AUTO_BATCH_SIZE, cap)
    return _positive_int(batch_size, "batch_size", ", 'auto' or 'auto:N'")


class _Generation(NamedTuple):
    """A generate_until request as the adapter runs it."""

    prompt: list[int]  # with BOS, cut to max_length
    max_tokens: int
    until: list[str]
    params: SamplingParams  # every greedy request's alike
    seed: Any  # the request's seed (default 0); 0 for greedy ones


@register_model("xlstm-metal", "xlstm_metal")
class XLSTMMetalLM(LM):
    """lm_eval's LM interface over an xLSTM-Metal model."""

    def __init__(self, pretrained: str | None = None, dtype: str = "float32", profile: str | None = None,
                 max_length: int | None = None, batch_size: int | str | None = 1,
                 max_batch_size: int | str | None = None, **kwargs: Any):
        super().__init__()
        self.batch_size = parse_batch_size(batch_size, max_batch_size)
        # lm-eval adds device (and batch_size, max_batch_size) to every model's arguments; anything else
        # is a model_arg we would ignore
        unknown = sorted(set(kwargs) - {"device"})
        if unknown:
            raise ValueError(f"unknown model_args {unknown}: xlstm-metal takes pretrained, dtype, profile, max_length")
        if max_length is not None:
            # model_args arrive as text or numbers: "4.5" failed in int() naming neither the argument
            # nor the fix, True ran as 1 and 4.5 as 4
            number = _whole_number(max_length)
            if number is None or number < 2:
                raise ValueError(f"max_length must be an integer of at least 2 tokens, got {max_length!r}")
            max_length = number
        from .loading import load

        packaged = pretrained is None
        if packaged:
            from .assets import default_model_path

            pretrained = str(default_model_path())
        model, tokenizer = load(pretrained, dtype=dtype)
        if packaged:
            from .assets import for_this_device

            for_this_device(model)  # as generate runs it (see for_this_device)
        if tokenizer is None:
            raise ValueError(f"{pretrained} has no tokenizer.json; lm-eval needs one")
        if profile:
            from .profiles import apply_profile

            apply_profile(model, profile)
        self.model, self.tok = model, tokenizer
        self.runner = xLSTMRunner(model, tokenizer)
        self.max_length = max_length
        self.pretrained = str(pretrained)

    # ------------------------------------------------------------------ scoring
    def _rows(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The (context, continuation) token ids one loglikelihood request scores."""
        # Without a BOS token and a context the first continuation token had no prediction and was
        # only context (token_logprobs): unscored. lm-eval's models start such a request from their
        # prefix token.
        # As lm-eval's own models split a pair (HFLM._encode_pair), so scores compare with theirs:
        # the context's trailing whitespace goes to the continuation, and the continuation's ids
        # are those of the pair encoded whole past the context's, a word tokenized as in running
        # text (encoded apart, "Answer: " + "Paris" scored a lone space token, then "Paris").
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        plain = self.tok.encode(context, add_special_tokens=False) if context else []
        cont = self.tok.encode(context + continuation, add_special_tokens=False)[len(plain):]
        ctx = self.tok.encode(context, add_special_tokens=True) or self._prefix()
        if cont and self.max_length is not None:  # the window holds max_length predictions after one context token
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_length {self.max_length}")
            ctx = ctx[max(0, len(ctx) + len(cont) - self.max_length - 1):]
        return ctx, cont

    def _prefix(self) -> list[int]:
        """lm-eval's prefix token (its models' ``prefix_token_id``: the BOS id, else the first EOS
        id), as a list; empty where the tokenizer has neither."""
        if self.tok.bos_token_id is not None:
            return [self.tok.bos_token_id]
        return self.tok.eos_token_ids[:1]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        rows = [self._rows(*req.args[:2]) for req in requests]
        scored = iter(batched_token_logprobs(self.model, [row for row in rows if row[1]], self.batch_size))
        out = []
        for _, cont in rows:
            if not cont:
                out.append((0.0, True))
            else:
                lp, greedy = next(scored)
                out.append((float(np.sum(lp)), bool(np.all(greedy))))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        rows, owners = [], []  # (context, tokens) to score, and the request each belongs to
        for index, req in enumerate(requests):
            (text,) = req.args[:1]
            ids = self.tok.encode(text, add_special_tokens=True)
            if ids == self.tok.encode(text, add_special_tokens=False):
                # no BOS inserted: the first token was only context (unscored); lm-eval's models
                # score every token after their prefix token
                ids = self._prefix() + ids
            if len(ids) < 2:  # the prefix (BOS), or the first token without one, is only context
                continue
            if self.max_length is None:  # the whole text; the state carries
                windows = [(ids[:1], ids[1:])]
            else:  # lm-eval's windows, as its transformers models score them, each from a fresh state
                windows = [lm_utils.make_disjoint_window(w)
                           for w in lm_utils.get_rolling_token_windows(ids[1:], ids[0], self.max_length, 1)]
            rows += windows
            owners += [index] * len(windows)
        out = [0.0] * len(requests)
        for index, (lp, _) in zip(owners, batched_token_logprobs(self.model, rows, self.batch_size)):
            out[index] += float(np.sum(lp))
        return out

    # ------------------------------------------------------------------ generation
    def _generation(self, req) -> _Generation:
        """One generate_until request's settings; ValueError / TypeError naming one it cannot
        honour."""
        context, gen_kwargs = req.args[0], req.args[1] if len(req.args) > 1 else {}
        if not isinstance(context, str):
            raise TypeError(f"a generate_until context must be a string, got {type(context).__name__}")
        if not isinstance(gen_kwargs, dict):  # None failed as "'NoneType' object is not iterable"
            raise TypeError(f"generate_until's generation settings must be a dict, got {type(gen_kwargs).__name__}")
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None)
        if isinstance(until, str):
            until = [until]
        if until is not None and (not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until)):
            # an int failed as "'in <string>' requires string as left operand" after generating
            raise TypeError(f"until must be a string or a list of strings, got {until!r}")
        asked = gen_kwargs.pop("max_gen_toks", 256)
        max_tokens = _whole_number(asked)
        if max_tokens is None or max_tokens < 0:  # int() read 2.7 as 2 and failed on None naming nothing
            raise ValueError(f"max_gen_toks must be an integer >= 0, got {asked!r}")
        temperature = gen_kwargs.pop("temperature", 0.0)
        temperature = 0.0 if temperature is None else temperature  # SamplingParams checks it is a number
        do_sample = gen_kwargs.pop("do_sample", None)
        if do_sample is not None and not isinstance(do_sample, bool):
            raise TypeError(f"do_sample must be true or false, got {do_sample!r}")
        sampling = {name: gen_kwargs.pop(name) for name in ("top_k", "top_p", "min_p", "repetition_penalty", "seed")
                    if name in gen_kwargs}
        if gen_kwargs:  # they were dropped without a word
            raise ValueError(f"generation settings {sorted(gen_kwargs)} are not supported (xlstm-metal takes until, "
                             "max_gen_toks, do_sample, temperature, top_k, top_p, min_p, repetition_penalty, seed)")
        seed = sampling.pop("seed", 0)
        params = SamplingParams(temperature, **sampling)  # checks each setting (float() read "0.5" as 0.5)
        if do_sample and params.greedy:
            # sampling asked for at temperature 0 (or none given) ran greedy without a word;
            # transformers refuses it too
            raise ValueError(f"do_sample is true but temperature is {temperature!r}: give a temperature > 0 "
                             "(or do_sample false for greedy answers)")
        if do_sample is False:
            params = SamplingParams(0.0, **sampling)
        if params.greedy:  # top_k, top_p and min_p pick nothing then: greedy requests batch together
            params = SamplingParams(repetition_penalty=params.repetition_penalty)
            seed = 0  # unused (greedy rows draw nothing)
        # an empty context without a BOS gave no tokens ("prompt 0 is empty"): start from the prefix token
        prompt = self.tok.encode(context, add_special_tokens=True) or self._prefix()
        if not prompt:
            raise ValueError("an empty generate_until context: the tokenizer has no BOS or EOS token to start from")
        if self.max_length is not None:  # the context's end, with room for the answer
            prompt = prompt[-max(1, self.max_length - max_tokens):]
        return _Generation(prompt, max_tokens, list(until or []), params, seed)

    def generate_until(self, requests) -> list[str]:
        """Each request's continuation, in the requests' order, up to its first ``until`` string,
        EOS or ``max_gen_toks`` tokens.

        Requests with the same sampling settings (every greedy request alike) run ``batch_size`` at
        a time through :meth:`xLSTMRunner.generate <xlstm_metal.generation.xLSTMRunner.generate>`:
        each prompt prefilled alone from its own zero state, the rows decoding together, each
        stopping on its own. A sampled row draws from the key its request's ``seed`` (default 0;
        ``null``: fresh randomness) gives it alone, so answers are those of one request at a time
        wherever a batched decode step rounds as a one-row step does (the tests check it on CPU;
        another back-end could turn a near-tie the other way).
        """
        jobs = [self._generation(req) for req in requests]
        groups: dict[SamplingParams, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.params, []).append(index)
        out: list[str | None] = [None] * len(jobs)
        for params, indices in groups.items():
            indices.sort(key=lambda i: -jobs[i].max_tokens)  # similar lengths decode together; stable
            for first in range(0, len(indices), self.batch_size):
                batch = [jobs[i] for i in indices[first:first + self.batch_size]]
                rows = self.runner.generate(
                    [job.prompt for job in batch], max_tokens=[job.max_tokens for job in batch],
                    row_stops=[job.until or None for job in batch], seed=[job.seed for job in batch],
                    temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                    repetition_penalty=params.repetition_penalty)
                for i, job, ids in zip(indices[first:], batch, rows):
                    text = self.tok.decode(ids)
                    for stop in job.until:  # the stop string itself is not part of the answer
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    out[i] = text
        return out

    @property
    def tokenizer_name(self) -> str:  # lm-eval's --apply_chat_template asks first (a NotImplementedError traceback)
        raise ValueError("--apply_chat_template: the xlstm-metal adapter renders no chat template; leave it out")

    def get_model_info(self) -> dict:
        return {"model": "xlstm-metal", "pretrained": self.pretrained}


def main() -> None:
    """``xlstm-metal-lm-eval``: lm_eval's command line with ``--model xlstm-metal`` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm-eval"
    try:
        cli_evaluate()
    except ValueError as err:  # bad model_args, checkpoint or task: a traceback and exit 1 before
        print(f"xlstm-metal-lm-eval: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
