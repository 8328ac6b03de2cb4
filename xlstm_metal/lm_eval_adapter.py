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
of the model's token log-probabilities (context with BOS, continuation without); generation is
greedy unless ``temperature`` > 0 is asked for, and takes ``top_k``, ``top_p``, ``min_p``,
``repetition_penalty`` and ``seed`` as well.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model


@register_model("xlstm-metal", "xlstm_metal")
class XLSTMMetalLM(LM):
    """lm_eval's LM interface over an xLSTM-Metal model."""

    def __init__(self, pretrained: str | None = None, dtype: str = "float32", profile: str | None = None,
                 max_length: int | None = None, batch_size: int | str | None = 1, **kwargs: Any):
        super().__init__()
        # lm-eval adds these to every model's arguments; anything else is a model_arg we would ignore
        unknown = sorted(set(kwargs) - {"max_batch_size", "device"})
        if unknown:
            raise ValueError(f"unknown model_args {unknown}: xlstm-metal takes pretrained, dtype, profile, max_length")
        if max_length is not None:
            max_length = int(max_length)  # model_args arrive as text or numbers
            if max_length < 2:
                raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        from .generation import xLSTMRunner
        from .loading import load

        packaged = pretrained is None
        if packaged:
            from .assets import default_model_path

            pretrained = str(default_model_path())
        model, tokenizer = load(pretrained, dtype=dtype)
        if packaged:
            from .assets import for_this_device

            for_this_device(model)  # quantized on disk, dequantized on CPUs
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
    def _score(self, context: str, continuation: str) -> tuple[float, bool]:
        from .judge import token_logprobs

        # Without a BOS token and a context the first continuation token has no prediction and
        # is only context (token_logprobs).
        ctx = self.tok.encode(context, add_special_tokens=True)
        cont = self.tok.encode(continuation, add_special_tokens=False)
        if not cont:
            return 0.0, True
        if self.max_length is not None:  # the window holds max_length predictions after one context token
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_length {self.max_length}")
            ctx = ctx[max(0, len(ctx) + len(cont) - self.max_length - 1):]
        lp, greedy = token_logprobs(self.model, ctx, cont, return_greedy=True)
        return float(np.sum(lp)), bool(np.all(greedy))

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return [self._score(*req.args[:2]) for req in requests]

    def loglikelihood_rolling(self, requests) -> list[float]:
        from .judge import token_logprobs

        out = []
        for req in requests:
            (text,) = req.args[:1]
            ids = self.tok.encode(text, add_special_tokens=True)
            if len(ids) < 2:  # BOS, or the first token without one, is only context
                out.append(0.0)
            elif self.max_length is None:
                out.append(float(np.sum(token_logprobs(self.model, ids[:1], ids[1:]))))
            else:  # lm-eval's windows, as its transformers models score them
                windows = lm_utils.get_rolling_token_windows(ids[1:], ids[0], self.max_length, 1)
                out.append(sum(float(np.sum(token_logprobs(self.model, *lm_utils.make_disjoint_window(w))))
                               for w in windows))
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = gen_kwargs.pop("until", None)
            if isinstance(until, str):
                until = [until]
            max_tokens = int(gen_kwargs.pop("max_gen_toks", 256))
            temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
            if not gen_kwargs.pop("do_sample", temperature > 0):
                temperature = 0.0
            sampling = {name: gen_kwargs.pop(name) for name in ("top_k", "top_p", "min_p", "repetition_penalty", "seed")
                        if name in gen_kwargs}
            if gen_kwargs:  # they were dropped without a word
                raise ValueError(f"generation settings {sorted(gen_kwargs)} are not supported (xlstm-metal takes until, "
                                 "max_gen_toks, do_sample, temperature, top_k, top_p, min_p, repetition_penalty, seed)")
            prompt = self.tok.encode(context, add_special_tokens=True)
            if self.max_length is not None:  # the context's end, with room for the answer
                prompt = prompt[-max(1, self.max_length - max_tokens):]
            ids = self.runner.generate(prompt, max_tokens=max_tokens, temperature=temperature,
                                       stop=list(until) if until else None, **{"seed": 0, **sampling})
            text = self.tok.decode(ids)
            for stop in until or []:  # the stop string itself is not part of the answer
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out

    def get_model_info(self) -> dict:
        return {"model": "xlstm-metal", "pretrained": self.pretrained}


def main() -> None:
    """``xlstm-metal-lm-eval``: lm_eval's command line with ``--model xlstm-metal`` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm-eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
