"""`xlstm-metal serve`: an OpenAI-compatible HTTP server and a chat page, on mlx-lm's server.

mlx-lm's server implements the protocol (``/v1/completions``, ``/v1/chat/completions`` with
and without SSE streaming, ``/v1/models``, ``/health``), batches concurrent requests and keeps
an LRU prompt cache. This package adds what an xLSTM needs around it:

- :class:`ModelProvider` loads through :func:`xlstm_metal.load_model` (every checkpoint format
  we read: Hugging Face, NX-AI native, the 2024 xLSTM, sharded, quantized) and serves it through
  :mod:`xlstm_metal.mlx_lm_model`; the tokenizer gets the BOS insertion and a chat template
  where the checkpoint lacks them.
- :class:`APIHandler` serves the chat page at ``/`` and refuses malformed requests (wrong types
  of ``messages``, ``prompt`` or ``stop``) with a 400 JSON error before they reach the
  generation thread, which a bad request must never stop. Every error is answered in OpenAI's
  shape (:func:`error_body`), mlx-lm's own ``{"error": "..."}`` included; a method a path does
  not take is a 405 with an Allow header (:func:`allowed_methods`).
- A request's left-out sampling fields default to the server's settings, else to the serving
  model's generation_config.json (:data:`MODEL_DEFAULTS`, :class:`_ModelDefaults`).
- :func:`make_server` / :func:`serve` start it on a host and port.

Recurrent states make the prompt cache cheap: an entry is one fixed-size state per block
whatever the conversation length, so a client re-sending the whole conversation pays only for
the new turn (BENCHMARKS.md, "Serving: prompt cache").
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import dataclasses
import functools
import gc
import io
import json
import logging
import math
import os
import pickle
import re
import select
import signal
import socket
import sys
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Callable, Iterator

import mlx.core as mx
from mlx_lm import server as mlx_server
from mlx_lm.models.cache import LRUPromptCache, PromptTrie, PromptTrieResult, make_prompt_cache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, apply_xtc, greedy_sampler
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, NaiveStreamingDetokenizer, SPMStreamingDetokenizer
from mlx_lm.tokenizer_utils import StreamingDetokenizer as MLXStreamingDetokenizer
from mlx_lm.tokenizer_utils import _byte_decoder  # the byte-level BPE alphabet mlx-lm's detokenizer reads

from ..checks import check_targets

#: The chat page, shipped in the package (one file: HTML, CSS and JavaScript, no CDN).
CHAT_PAGE = "chat.html"
#: The POST endpoints of mlx-lm's server.
POST_PATHS = ("/v1/completions", "/v1/chat/completions", "/chat/completions")
#: The chat page's paths, and every path GET (and HEAD) answers: ``/v1/models/<id>`` too (:func:`allowed_methods`).
PAGE_PATHS = ("/", "/index.html", "/chat")
GET_PATHS = PAGE_PATHS + ("/v1/models", "/health")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8080
#: Request parameters mlx-lm reads as numbers (its handler's attribute names).
FLOAT_PARAMETERS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                    "xtc_probability", "xtc_threshold")
INT_PARAMETERS = ("max_tokens", "top_k", "num_draft_tokens", "repetition_context_size", "presence_context_size",
                  "frequency_context_size", "top_logprobs", "seed")
#: OpenAI's bound on a logit_bias value.
MAX_LOGIT_BIAS = 100.0
#: OpenAI's ranges of its sampling fields (a value outside is a 400, as OpenAI's API answers it):
#: mlx-lm checked top_p's and temperature's lower bound only, and applied a temperature of 50 or a
#: presence_penalty of -100.
OPENAI_RANGES = {"temperature": (0, 2), "top_p": (0, 1), "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}
#: The request fields of both endpoints: OpenAI's, then mlx-lm's own. Any other is refused (a 400
#: naming it, as OpenAI refuses an unrecognized argument): ignored, a misspelt max_tokens gave a
#: 512-token reply. ``user`` and ``safety_identifier`` (who asks) and ``prompt_cache_key`` (a hint
#: for OpenAI's routing to its caches; this server reuses cached prompts by their tokens) change
#: no reply, nor do chat's ``prompt_cache_retention`` and ``prompt_cache_options`` (how long
#: OpenAI keeps a cached prompt, where its breakpoints are; this server's cache is an LRU of
#: ``--prompt-cache-size`` entries).
REQUEST_FIELDS = frozenset({
    "model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "seed", "user", "safety_identifier",
    "prompt_cache_key", "top_k", "min_p", "repetition_penalty", "repetition_context_size", "presence_context_size",
    "frequency_context_size", "xtc_probability", "xtc_threshold", "adapters", "draft_model", "num_draft_tokens",
})
#: /v1/chat/completions' own fields, and those of the legacy /v1/completions.
CHAT_FIELDS = REQUEST_FIELDS | {
    "messages", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
    "response_format", "metadata", "store", "service_tier", "modalities", "audio", "prediction", "reasoning_effort",
    "web_search_options", "chat_template_kwargs", "role_mapping", "verbosity", "prompt_cache_retention",
    "prompt_cache_options",
}
COMPLETION_FIELDS = REQUEST_FIELDS | {"prompt", "echo", "suffix", "best_of"}
#: Fields that change no reply, of OpenAI's types: strings, and objects (``metadata``'s values strings).
STRING_FIELDS = ("user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention")
OBJECT_FIELDS = ("metadata", "prompt_cache_options")
#: Fields this server cannot honour: their neutral values (null or a default that asks for
#: nothing), and why any other is refused.
UNSUPPORTED_FIELDS = {
    "response_format": ((None, {"type": "text"}), "this server generates free text only (no JSON mode or schema)"),
    "tool_choice": ((None, "auto", "none"), "the model decides whether to call a tool (auto), or gets no tools (none)"),
    "parallel_tool_calls": ((None, True), "the model's tool calls cannot be limited to one"),
    "functions": ((None, []), "deprecated by OpenAI; use tools"),
    "function_call": ((None,), "deprecated by OpenAI; use tool_choice"),
    "modalities": ((None, ["text"]), "this model writes text only"),
    "audio": ((None,), "this model writes text only"),
    "prediction": ((None,), "predicted outputs are not implemented"),
    "reasoning_effort": ((None,), "this model has no reasoning budget"),
    "verbosity": ((None, "medium"), "this model has no verbosity control (max_tokens bounds a reply)"),
    "web_search_options": ((None,), "this server does not search the web"),
    "store": ((None, False), "this server stores no completions"),
    "service_tier": ((None, "auto", "default"), "this server has one service tier"),
    "role_mapping": ((None,), "it formats chats for models without a chat template; this server always renders "
                              "the model's (or a plain User:/Assistant: one)"),
    "draft_model": ((None,), "speculative decoding (draft models) is not supported for xLSTM"),
    "num_draft_tokens": ((None,), "speculative decoding (draft models) is not supported for xLSTM"),
    "suffix": ((None, ""), "text insertion (a suffix after the completion) is not implemented"),
    "best_of": ((None, 1), "this server returns one choice per request and ranks none"),
}
#: Request fields whose default, where a request leaves them out, is the server's own setting (the
#: cli_args name here) when it has one, else the model's generation_config.json (vLLM's
#: ``--generation-config auto``), else this built-in value (mlx-lm's).
MODEL_DEFAULTS = {"max_tokens": ("max_tokens", 512), "temperature": ("temp", 0.0), "top_p": ("top_p", 1.0),
                  "top_k": ("top_k", 0), "min_p": ("min_p", 0.0), "repetition_penalty": ("repetition_penalty", 0.0)}
#: The largest request body read (a 413 beyond): a Content-Length of 10**12 made the handler
#: allocate that much at once (a MemoryError traceback, no response).
MAX_BODY_BYTES = 64 * 2**20
#: Seconds a connection may keep the server waiting on one read or write (its request line,
#: headers, body; a reply it does not read): the handler's socket timeout, ``request_timeout``
#: in :func:`server_args`. There was none: a client that connected and sent nothing, or sent a
#: Content-Length larger than its body, held a thread (and its connection) for ever.
REQUEST_TIMEOUT_S = 60.0
#: Connections served at once (``max_connections``; one more: a 503); there was no bound.
MAX_CONNECTIONS = 64
#: Choices of one request at most (its prompts times n; OpenAI's limit of n).
MAX_CHOICES = 128
#: The bound on the penalties' context sizes: MLX slices take 32-bit indices (a larger one failed in
#: the generation thread, a 500 for every request in flight with it).
MAX_CONTEXT_SIZE = 2**31 - 1
#: The deepest nesting of a request body's JSON: deeper bodies made Python's JSON decoder (or, a
#: little shallower, the chat template's rendering) raise RecursionError: a dropped connection or a
#: 500. OpenAI's own requests nest a few levels (tools' JSON schemas a few more).
MAX_JSON_DEPTH = 64
#: ``chat_template_kwargs`` keys that are not template variables but the names the chat template's
#: call and rendering already take (transformers' ``apply_chat_template`` and its template's
#: ``messages``): given again they failed as "got multiple values" (a 500), or changed what the call
#: returns (``tokenize``, ``return_dict``).
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens"})
#: The legacy completions' bound on ``logprobs`` (the most likely tokens listed per position), and
#: chat's on top_logprobs (OpenAI's; mlx-lm's 11).
MAX_COMPLETION_LOGPROBS, MAX_TOP_LOGPROBS = 5, 20
#: SentencePiece's space ("▁x" is " x"), and its byte-fallback tokens' names (<0xF0>: the byte 0xF0).
SPM_SPACE = "\u2581"
BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
#: Seconds between looks at a waiting request's client (gone?) while no token arrives.
POLL_S = 0.1
#: Seconds :meth:`Server.close` waits, in all, for the server's threads to end (a request in
#: flight is stopped at its next token).
CLOSE_S = 10.0


#: mlx-lm's handler attributes whose request field has another name (its messages name the attribute).
_FIELD_OF_ATTRIBUTE = {"requested_model": "model", "adapter": "adapters"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """An error answer in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: type
    ``invalid_request_error`` for a 4xx status, ``server_error`` otherwise; ``param`` names the
    request field at fault."""
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def _param_of(message: str) -> str | None:
    """The request field a refusal is about (OpenAI's ``param``), as its message names it first
    ("temperature must be ...", "messages[2].content must be ...", "suffix=... is not supported",
    "unrecognized request field: x"; mlx-lm's messages name its attribute, e.g. requested_model);
    None when the message names none ("Invalid JSON in request body ...")."""
    unknown = re.match(r"unrecognized request field: (\w+)", message)
    if unknown:
        return unknown[1]
    match = re.match(r"(\w+)((?:\[\d+\]|\.\w+)*)", message)
    if match is None:
        return None
    name = _FIELD_OF_ATTRIBUTE.get(match[1], match[1])
    return name + match[2] if name in CHAT_FIELDS | COMPLETION_FIELDS else None


def _resolved(name: str) -> str | None:
    """The absolute path a model or adapters name means as a local path (None: none can)."""
    try:
        return str(Path(name).expanduser().resolve())
    except (OSError, RuntimeError, ValueError):  # a NUL byte, a symlink loop
        return None


def is_allowed(name: str, allowed: Any) -> bool:
    """Whether a request may name the checkpoint or adapters ``name``: ``allowed`` None is any
    (mlx-lm's server loads whatever a request names: any directory of the server's, any Hugging
    Face id, downloaded), else ``name`` must be one of them, as written or as the same directory.
    Looked at before the name touches the file system or the network."""
    if allowed is None or name in allowed:
        return True
    path = _resolved(name)
    return path is not None and path in {_resolved(str(entry)) for entry in allowed}


def allowed_methods(path: str) -> tuple[str, ...]:
    """The HTTP methods ``path`` (without its query string) takes, as a 405's Allow header lists
    them; () for a path the server does not serve (a 404 whatever the method). OPTIONS (mlx-lm's
    CORS preflight) is answered on every path."""
    if path in POST_PATHS:
        return ("POST", "OPTIONS")
    if path in GET_PATHS or path.startswith("/v1/models/"):
        return ("GET", "HEAD", "OPTIONS")
    return ()


class ServeError(ValueError):
    """A model or server setting that cannot be served; the message names it."""


class AdapterError(ServeError):
    """LoRA adapters that cannot be loaded onto the model; the message names them."""


class ClientDisconnected(ConnectionError):
    """The client closed its connection before its reply was complete."""


class GenerationUnavailable(RuntimeError):
    """The generation thread has stopped for good (its error is in the server log)."""


class _InvalidRequest(ValueError):
    """A request refused before generation (a 400): mlx-lm's handler answered the ValueError of
    its checks with ``{"error": "..."}``; this one reaches :meth:`APIHandler.do_POST` (inside a
    :class:`_RequestFailed`), which answers in OpenAI's shape naming the field."""


class _RequestFailed(BaseException):
    """A request's error from before its reply started, carried past mlx-lm's handler (which
    answered any exception there with a 404 and a bare string) to :meth:`APIHandler.do_POST`.
    A BaseException so that mlx-lm's ``except Exception`` lets it through."""

    def __init__(self, error: Exception):
        super().__init__(error)
        self.error = error


class _ResponseQueue(Queue):
    """A request's queue of responses; ``finished`` once its last item (None or an error) is in.
    Its generation context (the first item) is kept in ``ctx``, and stopped at once when
    ``stopping()`` says the server is closing, so that closing never waits for a reply to run
    to max_tokens."""

    finished = False
    ctx: mlx_server.GenerationContext | None = None

    def __init__(self, stopping: Callable[[], bool] = lambda: False):
        super().__init__()
        self.stopping = stopping

    def put(self, item, block=True, timeout=None):
        if item is None or isinstance(item, Exception):
            self.finished = True
        elif isinstance(item, mlx_server.GenerationContext):
            self.ctx = item  # before stopping() is asked: stop_and_join sets _stop before it reads ctx
            if self.stopping():
                item.stop()
        super().put(item, block, timeout)


@dataclasses.dataclass
class _GenerationArguments(mlx_server.GenerationArguments):
    """mlx-lm's arguments of a request, and the fields (of :data:`MODEL_DEFAULTS`) that neither
    the request nor the server set: the generation thread takes them from the generation_config.json
    of the model it serves the request with (:meth:`_ModelDefaults._tokenize`)."""

    model_defaults: frozenset = frozenset()
    #: The request's prompt tokens, once the generation thread has tokenized it
    #: (:meth:`_WholePromptHistory._tokenize`): what its logits processors see before the reply.
    prompt_tokens: list | None = None


def server_args(model: str | os.PathLike, **overrides: Any) -> argparse.Namespace:
    """The settings mlx-lm's server reads (its ``cli_args``), with mlx-lm's defaults, except that
    the sampling defaults (:data:`MODEL_DEFAULTS`: max_tokens, temp, top_p, top_k, min_p,
    repetition_penalty) are None: set, they win over the model's generation_config.json.
    ``generation_config``: "auto" (each model's own file), "none" (no file), or a directory
    whose generation_config.json applies to every model."""
    args = dict(
        model=str(model), adapter_path=None, host=DEFAULT_HOST, port=DEFAULT_PORT, allowed_origins=["*"],
        draft_model=None, num_draft_tokens=3, trust_remote_code=False, log_level="INFO", chat_template="",
        use_default_chat_template=False, temp=None, top_p=None, top_k=None, min_p=None, max_tokens=None,
        repetition_penalty=None, generation_config="auto", chat_template_args={}, decode_concurrency=32,
        prompt_concurrency=8, prefill_step_size=2048,
        prompt_cache_size=10, prompt_cache_bytes=None, kv_bits=None, kv_group_size=64,
        quantized_kv_start=mlx_server.DEFAULT_QUANTIZED_KV_START, pipeline=False, dtype=None, profile=None,
        parallel=None,  # ours: "tensor" | "pipeline" | None under mlx.launch (xlstm_metal.distributed)
        # ours: the checkpoints (paths or Hugging Face ids) a request's ``model`` may name besides the
        # served one, and the adapter directories its ``adapters`` may: None is any (mlx-lm's way),
        # () none; `xlstm-metal serve` allows none unless --allowed-models / --allowed-adapters say so.
        allowed_models=None, allowed_adapters=None, request_timeout=REQUEST_TIMEOUT_S,
        max_connections=MAX_CONNECTIONS, max_tokens_limit=None,
    )
    unknown = set(overrides) - set(args)
    if unknown:
        raise TypeError(f"unknown server setting(s): {', '.join(sorted(unknown))}")
    args.update(overrides)
    return argparse.Namespace(**args)


def load_for_serving(path: str | os.PathLike, adapter_path: str | None = None, dtype: str | None = None,
                     profile: Any = None, parallel: str | None = None):
    """(mlx-lm model, mlx-lm TokenizerWrapper) for a checkpoint, through our loader.

    ``dtype`` defaults to float32 on CPUs and bfloat16 on GPUs (MLX's half-precision CPU matmul
    is slow). ``profile``: a HyperProfile (or its name / file) applied to the model; its dtype
    then decides. Under ``mlx.launch`` the model is split across the processes first
    (:func:`xlstm_metal.distributed.parallelize`: ``parallel`` "tensor", "pipeline" or None for
    the model's default). Raises :class:`ServeError` naming the problem.
    """
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_tokenizer as mlx_lm_tokenizer

    from ..checkpoint_files import chat_template, insert_bos
    from ..config import ConfigError
    from ..distributed import parallelize, world
    from ..generation.runner import default_dtype
    from ..generation.tokenizer import TokenizerError, load_tokenizer
    from ..loading import CheckpointError, check_tokenizer_fits, load_model, resolve_model_path
    from ..mlx_lm_model import from_xlstm_metal

    try:
        directory = resolve_model_path(path)
        ours = load_tokenizer(directory)
        if ours is None:
            raise ServeError(f"model {path} has no tokenizer.json; serving text needs one")
        if adapter_path is not None and world().size() > 1:
            raise ServeError("adapters are not supported with several processes (mlx.launch)")

        def split(model):  # several mlx.launch processes: each reads and keeps only its part
            return parallelize(model, parallel)

        if profile is not None:
            from ..profiles import ProfileError, apply_profile, load_profile

            try:
                profile = load_profile(profile)
                inner = apply_profile(load_model(directory, dtype=profile.dtype, prepare=split), profile)
            except ProfileError as err:
                raise ServeError(str(err)) from None
        else:
            inner = load_model(directory, dtype=dtype or default_dtype(), prepare=split)
        check_tokenizer_fits(ours, getattr(getattr(inner, "config", None), "vocab_size", None), directory)
        model = from_xlstm_metal(inner)
    except (CheckpointError, ConfigError, TokenizerError, TypeError, ValueError) as err:
        raise ServeError(str(err)) from None
    if adapter_path is not None:
        try:
            model = load_adapters(model, adapter_path)
        except (OSError, ValueError, KeyError) as err:
            raise AdapterError(f"cannot load adapters from {adapter_path}: {err}") from None
    elif profile is None and callable(getattr(model, "fuse_projections", None)):
        model.fuse_projections()  # one matmul for q|k|v|o|i|f and one for gate|up per block (a profile decides itself)
    model.eval()
    tokenizer = mlx_lm_tokenizer(directory, {}, eos_token_ids=ours.eos_token_ids or None)
    hf = tokenizer._tokenizer
    if ours.add_bos and hf.encode("a")[:1] != [ours.bos_token_id]:  # checkpoints we did not write
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise ServeError(f"the tokenizer of {path} does not insert the BOS token its model expects")
        insert_bos(backend, ours.bos_token_id)
    # Special tokens as our tokenizer reads them (config.json / generation_config.json too), so
    # the chat template writes the right BOS and EOS.
    for name, token_id in (("bos_token", ours.bos_token_id), ("eos_token", (ours.eos_token_ids or [None])[0])):
        current = getattr(hf, name, None)
        if token_id is not None and (current is None or hf.convert_tokens_to_ids(current) != token_id):
            setattr(hf, name, hf.convert_ids_to_tokens(token_id))
    if not tokenizer.has_chat_template:
        hf.chat_template = chat_template(ours.add_bos)
        tokenizer.has_chat_template = True
    _decode_exactly(tokenizer)
    _cover_padded_ids(tokenizer, int(getattr(getattr(inner, "config", None), "vocab_size", 0) or 0))
    return model, tokenizer


def _decode_exactly(tokenizer) -> None:
    """Where mlx-lm picked its naive detokenizer (a tokenizer neither byte-level BPE nor
    SentencePiece's "▁": a plain BPE with byte fallback, say), a reply's text is now the
    tokenizer's decode, through :class:`_DecodingDetokenizer`. The naive one held an unfinished
    character back by cutting the text's trailing U+FFFDs, and the tokenizer decodes a run of
    byte-fallback tokens that is no UTF-8 as a U+FFFD a byte: "X" then <0xF0> read "\ufffd\ufffd",
    the text shrank by the X, and the next segment repeated it ("XX😀" for "X😀"). Kept where the
    tokenizer's decode is not its backend's (a class of its own overriding decode, or transformers'
    clean_up_tokenization_spaces on): ours would then differ from it."""
    from transformers import PreTrainedTokenizerFast

    hf = tokenizer._tokenizer
    if type(tokenizer._detokenizer) is not NaiveStreamingDetokenizer or not isinstance(hf, PreTrainedTokenizerFast):
        return
    if type(hf).decode is not PreTrainedTokenizerFast.decode or type(hf)._decode is not PreTrainedTokenizerFast._decode:
        return
    if getattr(hf, "clean_up_tokenization_spaces", False):
        return
    tokenizer._detokenizer = _DecodingDetokenizer(hf.backend_tokenizer)


class _DecodingDetokenizer(MLXStreamingDetokenizer):
    """mlx-lm's streaming detokenizer interface over our
    :class:`~xlstm_metal.generation.tokenizer.StreamingDetokenizer`
    (tokenizers' DecodeStream): ``text`` is the tokenizer's decode of the tokens so far (special
    tokens' text included, as mlx-lm's ``tokenizer.decode`` writes it), less a character still
    unfinished at its end, and only grows; after :meth:`finalize` it is the whole decode.

    But where the decoder rewrites text already sent (a run of byte-fallback tokens that is no
    UTF-8): text sent stays and the reply goes on past it, as
    :class:`~xlstm_metal.generation.tokenizer.StreamingDetokenizer` does.

    Ids the tokenizer lacks (a model's vocabulary padded past it) add no text, as it decodes
    them. Built once per tokenizer; mlx-lm hands each request a shallow copy after
    :meth:`reset`, which gives the copy state of its own (the tokenizer alone is shared)."""

    def __init__(self, backend):
        from ..generation.tokenizer import Tokenizer

        self._tokenizer = Tokenizer(backend)
        self._size = backend.get_vocab_size(with_added_tokens=True)
        self.reset()

    def reset(self):
        self.offset, self.text, self.tokens = 0, "", []
        self._stream = self._tokenizer.detokenizer(skip_special_tokens=False)

    def add_token(self, token):
        token = int(token)
        self.tokens.append(token)
        if 0 <= token < self._size:
            self.text += self._stream.add(token)

    def finalize(self):
        self.text += self._stream.finalize()


def _cover_padded_ids(tokenizer, vocab_size: int) -> None:
    """Ids the model has past the tokenizer's (a vocabulary padded to a multiple of 64, as
    xLSTM-7b's 50,304 over GPT-NeoX's 50,277) add no text to a reply, as the tokenizer decodes
    them. mlx-lm's streaming detokenizers look each id up in a table of the tokenizer's size: its
    SentencePiece one failed on such an id (IndexError: a 500 for every request in the batch), its
    byte-level one wrote "!". The table grows by empty entries; every request's detokenizer is a
    shallow copy of this one, so it shares the table. Ours (:class:`_DecodingDetokenizer`, no
    table) passes over such ids itself."""
    detokenizer = tokenizer._detokenizer
    table = getattr(detokenizer, "tokenmap", None)
    if table is None or len(table) >= vocab_size:
        return
    empty = b"" if isinstance(detokenizer, SPMStreamingDetokenizer) else ""
    detokenizer.tokenmap = [*table, *([empty] * (vocab_size - len(table)))]


def model_generation_defaults(directory: str | os.PathLike,
                              setting: str = "auto") -> tuple[dict[str, Any], int | None]:
    """(defaults, max_length) for serving the checkpoint ``directory``: its generation_config.json
    read as `xlstm-metal generate` reads it (:func:`xlstm_metal.cli.generate.read_generation_config`),
    with ``setting`` "auto"; none with "none"; another directory's file with its path. Raises
    :class:`ServeError` naming a bad value."""
    from ..cli import UsageError
    from ..cli.generate import read_generation_config

    if setting == "none":
        return {}, None
    source = Path(directory) if setting == "auto" else Path(setting).expanduser()
    try:
        defaults, max_length = read_generation_config(source)
    except UsageError as err:
        raise ServeError(str(err)) from None
    if defaults.get("max_tokens") == 0:  # a request must ask for at least one token (mlx-lm's rule)
        raise ServeError(f"max_new_tokens must be >= 1 to serve, got 0 (from {source / 'generation_config.json'})")
    return defaults, max_length


class ModelProvider(mlx_server.ModelProvider):
    """mlx-lm's model provider, loading through :func:`load_for_serving`. A request's ``model``
    naming the served model (its path, its id in /v1/models, or mlx-lm's ``default_model``)
    gets it; another path is loaded in its place, as mlx-lm does."""

    def __init__(self, cli_args: argparse.Namespace):
        super().__init__(cli_args)
        #: Set once the generation thread has loaded the model (or failed: ``load_error``).
        self.ready = threading.Event()
        self.load_error: Exception | None = None
        #: The loaded model's :func:`model_generation_defaults`.
        self.generation_defaults: tuple[dict[str, Any], int | None] = ({}, None)
        #: The served model's ``created`` in /v1/models: when this server took it up. mlx-lm's was
        #: each request's time, a model "created" anew at every listing.
        self.created = int(time.time())
        served = str(cli_args.model)
        for alias in {served, str(Path(served).expanduser().resolve()), Path(served).name}:
            self._model_map.setdefault(alias, served)
            self._adapter_map.setdefault(alias, cli_args.adapter_path)
            self._draft_model_map.setdefault(alias, None)

    def load_default(self):
        """Runs first in mlx-lm's generation thread (MLX streams belong to a thread, so the
        model is loaded there); a failure is kept for :func:`make_server` to report."""
        try:
            super().load_default()
        except Exception as err:  # reported by make_server; the thread keeps serving errors
            self.load_error = err
        finally:
            self.ready.set()

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        """mlx-lm's, except that a request's ``adapters`` (``adapter_path``) apply to the model it
        names, the served one included, in place of that model's own adapters. mlx-lm took the
        served model's own adapters in their place: the field did nothing unless ``model`` named
        another checkpoint."""
        key = self.key_for(model_path, adapter_path, draft_model_path)
        if self.model_key != key:
            self._load(*key)
        return self.model, self.tokenizer

    def key_for(self, model_path, adapter_path=None, draft_model_path=None) -> tuple:
        """The ``model_key`` that :meth:`load` gives a request's model, adapters and draft model."""
        if adapter_path is None:
            adapter_path = self._adapter_map.get(model_path)
        model_path = self._model_map.get(model_path, model_path)
        draft_model_path = self._draft_model_map.get(draft_model_path, draft_model_path)
        if adapter_path is not None:  # one key per directory, however it was spelled
            adapter_path = str(Path(adapter_path).expanduser().resolve())
        return (model_path, adapter_path, draft_model_path)

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        if draft_model_path is not None:
            raise ServeError("speculative decoding (draft models) is not supported for xLSTM")
        from ..loading import CheckpointError, resolve_model_path

        try:
            directory = resolve_model_path(model_path)  # once: a Hugging Face id downloads here
        except CheckpointError as err:
            raise ServeError(str(err)) from None
        defaults = model_generation_defaults(directory, getattr(self.cli_args, "generation_config", "auto"))
        # Only now the served model goes: a request naming a bad path or a checkpoint with a bad
        # generation_config.json leaves it loaded.
        previous = self.model_key if self.model is not None else None
        self.reset()
        gc.collect()
        mx.clear_cache()
        try:
            model, tokenizer = load_for_serving(directory, adapter_path, self.cli_args.dtype,
                                                profile=getattr(self.cli_args, "profile", None),
                                                parallel=getattr(self.cli_args, "parallel", None))
        except Exception:
            # The model it replaced is loaded again: the failed request left none loaded (a
            # directory without tokenizer.json, adapters that do not fit), and the next request
            # paid the reload, or got a 503 ("not loaded yet") where it needs the tokenizer
            # before generation (echo with max_tokens 0).
            if previous is not None and previous != (model_path, adapter_path, draft_model_path):
                try:
                    self._load(*previous)
                except Exception as err:  # the next request tries again
                    logging.error("could not load %s again after a failed load: %s", previous[0], err)
            raise
        self.model_key = (model_path, adapter_path, draft_model_path)
        self.model, self.tokenizer = model, tokenizer
        self.processor = None
        self.draft_model = None
        self.generation_defaults = defaults
        if defaults[0] or defaults[1] is not None:
            logging.info("%s: request defaults from generation_config.json: %s%s", model_path, defaults[0],
                         f", max_length {defaults[1]}" if defaults[1] is not None else "")
        self.is_batchable = all(hasattr(c, "merge") for c in make_prompt_cache(model))
        #: The width of the logits (token ids a request's logit_bias and top_k may name); the
        #: last model loaded, read by the request handlers.
        self.vocab_size = int(model.config.vocab_size)


def _json_depth(value: Any) -> int:
    """How deep a parsed JSON value nests (a scalar 0, ``[]`` 1, ``[[1]]`` 2), without recursion."""
    depth, level = 0, [(value, 0)]
    while level:
        item, d = level.pop()
        if isinstance(item, (list, dict)):
            depth = max(depth, d + 1)
            level.extend((v, d + 1) for v in (item.values() if isinstance(item, dict) else item))
    return depth


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object with role and content")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{index}].role must be a string")
        content = message.get("content")
        parts_ok = isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
        )
        if not (isinstance(content, str) or parts_ok or (content is None and message["role"] == "assistant")):
            raise ValueError(f"messages[{index}].content must be a string or a list of text parts")
        texts = [content] if isinstance(content, str) else [p["text"] for p in content or ()]
        for text in texts:
            _check_unicode(text, f"messages[{index}].content")
        _check_tool_calls(message.get("tool_calls"), f"messages[{index}].tool_calls")


def _check_tool_calls(tool_calls: Any, name: str) -> None:
    """An assistant message's tool_calls as mlx-lm reads them in the generation thread (each
    ``function.arguments`` string parsed as JSON): a malformed one failed there, a 500."""
    if not tool_calls:
        return
    if not isinstance(tool_calls, list):
        raise ValueError(f"{name} must be a list of tool call objects")
    for index, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or not (function is None or isinstance(function, dict)):
            raise ValueError(f"{name}[{index}] must be an object whose function is an object")
        arguments = (function or {}).get("arguments")
        if isinstance(arguments, str) and arguments:
            try:
                parsed = json.loads(arguments)
            except ValueError as err:  # also a number past 4300 digits
                raise ValueError(f"{name}[{index}].function.arguments is not valid JSON: {err}") from None
            if not isinstance(parsed, dict):
                raise ValueError(f"{name}[{index}].function.arguments must be a JSON object, got {arguments[:80]!r}")


def _check_unicode(text: str, name: str) -> None:
    """JSON's \\ud800-style escapes can give a string no tokenizer can encode (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{name} is not valid Unicode: {err.reason} at position {err.start}") from None


class _PromptTrie(PromptTrie):
    """mlx-lm's trie, whose look for the shortest cached prompt extending a request's tokens
    copied the path at every step: quadratic in a cached prompt's length (one of 200k tokens
    held the generation thread ~20 s for each later request sharing only its BOS). The same
    result, each node visited once."""

    def search(self, model, tokens):
        current = self._trie.get(model)
        if current is None or not tokens:
            return super().search(model, tokens)
        index, last = 0, -1
        while index < len(tokens) and tokens[index] in current:
            current, index = current[tokens[index]], index + 1
            last = index - 1 if "__value__" in current else last
        if last == len(tokens) - 1:
            return PromptTrieResult(model, tokens, None, None, 0)
        longer, best, stack = None, None, [(current, 0, None)]  # a path: (token, rest) links
        while index and stack:
            node, depth, path = stack.pop()
            if "__value__" in node:
                best = (depth, path) if best is None or depth < best[0] else best
            elif best is None or depth < best[0]:
                stack.extend((child, depth + 1, (tok, path)) for tok, child in node.items())
        if best is not None:
            extra, path = [], best[1]
            while path:
                extra.append(path[0])
                path = path[1]
            longer = tokens[:index] + extra[::-1]
        return PromptTrieResult(model, None, tokens[:last + 1] if last > 0 else None, longer, index)


class _PromptCache(LRUPromptCache):
    """mlx-lm's prompt cache, whose hit leaves at least one prompt token to run: the model's
    next-token logits come from running one. mlx-lm returned an entry holding the whole prompt
    with nothing left to run (a prompt equal to an earlier one less its last token, e.g. "" after
    "x"), and its batch generator failed on the empty rest ("Sequence 4 has an empty prompt"):
    a 500, for every request in flight with it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._trie = _PromptTrie()

    def fetch_nearest_cache(self, model, tokens):
        cache, rest = super().fetch_nearest_cache(model, tokens)
        if len(rest) or not len(tokens):
            return cache, rest
        if len(tokens) == 1:
            return None, list(tokens)
        cache, rest = super().fetch_nearest_cache(model, tokens[:-1])  # a recurrent state cannot be trimmed
        return cache, [*rest, tokens[-1]]


class _MemoryAgreement:
    """A mixin of mlx-lm's ResponseGenerator: under mlx.launch every exchange of the next request
    (each turn of the generation loop, on every rank) also sums which ranks' memory watchdogs
    refuse work (past the hard limit, not yet back under the soft one), so rank 0 answers new
    requests with 503 while any rank is over: each rank refused on its own memory only, and a
    follower over its limit kept taking rank 0's requests. ``ranks_refusing``: how many ranks
    refused at the last exchange (0 outside mlx.launch)."""

    ranks_refusing = 0

    def _share_object(self, obj):
        """mlx-lm's exchange (rank 0's object, pickled, summed into every rank) with the
        watchdog flags in the same collective as the object's size."""
        if not self._is_distributed:
            return obj
        from ..monitor import current_job

        data = None if self._rank != 0 or obj is None else mx.array(pickle.dumps(obj))
        refusing = 1 if current_job().refusing() else 0
        head = mx.distributed.all_sum(mx.array([0 if data is None else data.size, refusing], dtype=mx.int32))
        size, self.ranks_refusing = head.tolist()  # (the exchange reads the size on the host anyway)
        if size == 0:
            return None
        if self._rank == 0:
            mx.eval(mx.distributed.all_sum(data))
            return obj
        return pickle.loads(mx.distributed.all_sum(mx.zeros(size, dtype=mx.uint8)))


class _ModelDefaults:
    """A mixin of mlx-lm's ResponseGenerator: a request's :attr:`_GenerationArguments.model_defaults`
    get the values of the model that serves it, once that model is loaded, which the handler
    cannot know (a request's ``model`` may name another checkpoint). Every process under
    mlx.launch runs it alike, so their samplers agree."""

    def _tokenize(self, tokenizer, request, args):
        tokenized = super()._tokenize(tokenizer, request, args)
        names = getattr(args, "model_defaults", ())
        if names:
            _apply_model_defaults(args, names, self.model_provider, len(tokenized[0]))
        return tokenized


class _WholePromptHistory:
    """A mixin of mlx-lm's ResponseGenerator: a request's logits processors (repetition, presence
    and frequency penalties) see the whole prompt before the reply. On mlx-lm's single-request
    path (--kv-bits, a model whose caches cannot be batched) they saw only the prompt tokens it
    ran after a prompt-cache hit, so the cached ones escaped the penalties; its batch path passes
    them (``all_tokens``), as :func:`_make_logits_processors` now does for both."""

    def _tokenize(self, tokenizer, request, args):
        tokenized = super()._tokenize(tokenizer, request, args)
        args.prompt_tokens = list(tokenized[0])
        return tokenized


_mlx_make_logits_processors = mlx_server._make_logits_processors


def _make_logits_processors(args) -> list:
    """mlx-lm's processors of ``args``, each fed the prompt tokens that its history lacks.

    mlx-lm calls a processor with the history of the tokens it ran (the prompt it was given, then
    each reply token). At the first call that history is the prompt's tail: what comes before it
    in ``args.prompt_tokens`` (the tokens a prompt cache held; the last of them, as many as the
    largest penalty context size) is put in front from then on. Where the history is the whole
    prompt already (the batch path) nothing changes."""
    processors = _mlx_make_logits_processors(args)
    prompt = getattr(args, "prompt_tokens", None)
    if not processors or not prompt:
        return processors
    # mlx-lm's penalties read only the last <context size> tokens of the history: the head put in
    # front of it need not be longer (it is copied at every token).
    logits_args = getattr(args, "logits", None)
    keep = max((getattr(logits_args, f"{name}_context_size", None) or 0
                for name in ("repetition", "presence", "frequency")), default=0)
    found: list = []  # [the missing head as an mx.array, or None], from the first call on

    def whole(tokens: mx.array) -> mx.array:
        if not found:
            cut = len(prompt) - tokens.shape[0]
            # Once per request, on the prompt alone (before any reply token is sampled).
            head = 0 < cut and tokens.tolist() == prompt[cut:]
            start = max(0, cut - keep) if keep > 0 else 0
            found.append(mx.array(prompt[start:cut], dtype=tokens.dtype) if head else None)
        return tokens if found[0] is None else mx.concatenate([found[0], tokens])

    def fed(processor):
        return lambda tokens, logits: processor(whole(tokens), logits)

    return [fed(processor) for processor in processors]


mlx_server._make_logits_processors = _make_logits_processors

_mlx_make_sampler = mlx_server._make_sampler


#: Temperatures below this sample greedily (vLLM's rule): the logits are divided by the temperature
#: in float32, and below ~1e-38 that overflowed (every token's scaled logit -inf, or NaN for a token
#: of probability 1): temperature 1e-39 drew tokens at random where it means "the likeliest".
GREEDY_TEMPERATURE = 1e-5


def _make_sampler(args, tokenizer):
    """mlx-lm's sampler of ``args``; a seeded request's draws from a random key of its own
    (:func:`_seeded_sampler`), so that it may share the batch with other requests and still give
    the same reply for the same seed. mlx-lm seeded MLX's global key instead, which every row of
    a batch draws from: it served a seeded request alone, the others waiting until it ended.
    A temperature under :data:`GREEDY_TEMPERATURE` takes the likeliest token."""
    if 0 < args.sampling.temperature < GREEDY_TEMPERATURE:
        args = dataclasses.replace(args, sampling=dataclasses.replace(args.sampling, temperature=0.0))
    sampler = _mlx_make_sampler(args, tokenizer)
    if args.seed is None or sampler is greedy_sampler:  # greedy: no draw to seed
        return sampler
    special = tokenizer.encode("\n") + list(tokenizer.eos_token_ids)  # mlx-lm's XTC exclusions
    return _seeded_sampler(args.sampling, args.seed, special)


mlx_server._make_sampler = _make_sampler


def _seeded_sampler(sampling, seed: int, xtc_special_tokens: list[int]) -> Callable[[mx.array], mx.array]:
    """mlx_lm.sample_utils.make_sampler's chain for ``sampling`` (top-p, min-p, XTC, top-k, then
    a categorical draw at the temperature), its random draws made with ``mx.random.key(seed)``,
    split at each draw as MLX splits its global key after ``mx.random.seed(seed)``: the tokens
    mlx-lm's one-request path gave a seeded request, whatever else is in the batch. The batch
    calls a row's own sampler on that row's logprobs alone, once per token."""
    key = mx.random.key(seed)

    def draw_key() -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        return sub

    def sampler(logprobs: mx.array) -> mx.array:
        if 0 < sampling.top_p < 1.0:
            logprobs = apply_top_p(logprobs, sampling.top_p)
        if sampling.min_p != 0.0:
            logprobs = apply_min_p(logprobs, sampling.min_p, 1)
        if sampling.xtc_probability > 0.0:
            # mlx-lm's XTC at probability 1 is its mask alone (its own draw, from the global key,
            # then never decides); whether the mask applies is drawn here, from this key.
            masked = apply_xtc(logprobs, 1.0, sampling.xtc_threshold, xtc_special_tokens)
            logprobs = mx.where(mx.random.uniform(0, 1, key=draw_key()) > sampling.xtc_probability, logprobs, masked)
        if sampling.top_k > 0:
            logprobs = apply_top_k(logprobs, sampling.top_k)
        return mx.random.categorical(logprobs * (1.0 / sampling.temperature), key=draw_key())

    return sampler


def _apply_model_defaults(args, names, provider, prompt_tokens: int) -> None:
    """``args``' fields ``names`` from ``provider.generation_defaults``; a max_length there is
    prompt + generated tokens (transformers' meaning), refused when the prompt fills it."""
    defaults, max_length = provider.generation_defaults
    for name in names:
        if name == "max_tokens" and max_length is not None:
            if prompt_tokens >= max_length:
                raise _InvalidRequest(
                    f"max_tokens is needed: the prompt is {prompt_tokens} tokens, but the model's "
                    f"generation_config.json sets max_length {max_length} (prompt + generated tokens), "
                    "which leaves no room to generate")
            args.max_tokens = max_length - prompt_tokens
        elif name not in defaults:
            continue
        elif name == "max_tokens":
            args.max_tokens = defaults[name]
        elif name == "repetition_penalty":
            args.logits.repetition_penalty = defaults[name]
        else:
            setattr(args.sampling, name, defaults[name])
    limit = getattr(getattr(provider, "cli_args", None), "max_tokens_limit", None)
    if "max_tokens" in names and limit is not None:  # the operator's bound caps the model's default too
        args.max_tokens = min(args.max_tokens, limit)
    if args.sampling.top_k >= getattr(provider, "vocab_size", math.inf):
        args.sampling.top_k = 0  # as the handler does: MLX's top-k refuses k >= vocabulary


def _release_thread_state() -> None:
    """Frees the calling thread's MLX streams and, from MLX 0.32.1 on, its random key
    (``mx.clear_streams``), while the thread still holds the GIL.

    The key is a C++ thread_local (seeded or sampling requests set it in the generation thread)
    whose destructor takes the GIL when the thread exits, after Python's ``join`` has already
    returned. Were the interpreter finalising by then, CPython would end the thread with
    pthread_exit inside that noexcept destructor: std::terminate, "terminate called without an
    active exception", exit code 134."""
    clear = getattr(mx, "clear_streams", None)  # MLX >= 0.31.2
    if clear is None:
        return
    try:
        clear()
    except Exception as err:  # the thread ends anyway; _join still waits for its exit
        logging.warning("could not free the generation thread's MLX streams: %s", err)


def _join(thread: threading.Thread | None, timeout: float | None = None) -> bool:
    """Join ``thread`` (None: none), for at most ``timeout`` seconds, and then, on Linux, wait
    until its OS thread has gone (``/proc/self/task/<tid>``; at most ``timeout``, or
    :data:`CLOSE_S`): ``join`` returns once the thread's Python state is deleted, before the
    C++ thread_local destructors run as it exits, and one of MLX's may take the GIL
    (:func:`_release_thread_state`). True when the thread has ended."""
    if thread is None:
        return True
    deadline = time.monotonic() + (CLOSE_S if timeout is None else timeout)
    thread.join(timeout)
    if thread.is_alive():
        return False
    task = Path(f"/proc/self/task/{thread.native_id}")
    while thread.native_id is not None and task.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)
    return True


#: Prompt positions per forward call when scoring a prompt (echo with logprobs): bounds the
#: logits held at once ([piece, vocab] float32).
SCORE_PIECE = 512


def prompt_logprobs(model, tokens: list[int], top_n: int = 0) -> tuple[list, list]:
    """Each of ``tokens``' log-probability given the tokens before it, and the ``top_n`` likeliest
    tokens there as (id, logprob), best first: ``(logprobs, tops)``, None for the first token
    (nothing comes before it). ``model`` is an mlx-lm model (``model(inputs [1, S], cache)`` ->
    logits [1, S, V]); the prompt runs in pieces of :data:`SCORE_PIECE` positions carrying the state."""
    logprobs: list = [None]
    tops: list = [None]
    ids = mx.array(tokens, dtype=mx.int32)[None]
    cache = make_prompt_cache(model)
    for start in range(0, len(tokens) - 1, SCORE_PIECE):
        stop = min(start + SCORE_PIECE, len(tokens) - 1)
        logits = model(ids[:, start:stop], cache=cache)[0].astype(mx.float32)
        check_targets(tokens[start + 1 : stop + 1], logits.shape[-1])  # take_along_axis reads past them
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(logp, ids[0, start + 1 : stop + 1, None], axis=-1)[:, 0]
        if top_n:
            best = mx.argpartition(-logp, top_n - 1, axis=-1)[:, :top_n]
            values = mx.take_along_axis(logp, best, axis=-1)
            mx.eval(chosen, best, values, cache)
            for row_ids, row_values in zip(best.tolist(), values.tolist()):
                tops.append(sorted(zip(row_ids, row_values), key=lambda t: -t[1]))
        else:
            mx.eval(chosen, cache)
            tops.extend([] for _ in range(stop - start))
        logprobs.extend(chosen.tolist())
    return logprobs, tops


@dataclasses.dataclass
class _ScoreJob:
    """A request's prompt to score on the generation thread (echo with logprobs)."""
    request: Any
    args: Any
    top_n: int


@dataclasses.dataclass
class _PromptScores:
    """The prompt's own tokens (a BOS the tokenizer put in front left out: it is context only),
    each one's logprob (None: nothing before it) and its likeliest tokens (None alike)."""
    tokens: list[int]
    logprobs: list
    tops: list


class _GenerationThread:
    """A mixin of mlx-lm's ResponseGenerator: the generation thread frees its MLX thread state
    before it ends (:func:`_release_thread_state`), and ``join`` / ``stop_and_join`` return once
    its OS thread has gone, within an optional bound, so that the process may exit right after."""

    def _run_generate(self) -> None:
        try:
            super()._run_generate()
        finally:
            _release_thread_state()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the generation loop to end; True when it has (False: ``timeout`` passed)."""
        return _join(self._generation_thread, timeout)

    def stop_and_join(self, timeout: float | None = None) -> bool:
        """End the generation loop after the request it is serving; True when it has ended."""
        self._stop = True
        return self.join(timeout)


class _TokenPrompts:
    """A mixin of mlx-lm's ResponseGenerator: a text completion's prompt may be token ids
    (OpenAI's legacy API; lm-eval's local-completions sends them), used as they are: no BOS is
    put before them, the client having tokenized the text."""

    def _tokenize(self, tokenizer, request, args):
        if request.request_type == "text" and isinstance(request.prompt, list):
            prompt = list(request.prompt)
            return prompt, [prompt], ["assistant"], "normal", None
        return super()._tokenize(tokenizer, request, args)


class _SeededInBatch:
    """A mixin of mlx-lm's ResponseGenerator: mlx-lm's batching test, but a seed keeps a request
    in the batch: it samples with a key of its own (:func:`_make_sampler`). On every rank under
    mlx.launch alike: a follower that served a seeded request alone ran other collectives than
    rank 0 (the exchange of the next request then failed, a 500)."""

    def _is_batchable(self, args) -> bool:
        return super()._is_batchable(dataclasses.replace(args, seed=None))


class ResponseGenerator(_GenerationThread, _MemoryAgreement, _WholePromptHistory, _ModelDefaults, _TokenPrompts,
                        _SeededInBatch, mlx_server.ResponseGenerator):
    """mlx-lm's generator, with stop sequences matched on the text (OpenAI's meaning), a
    request dropped once its client has gone, and a generation thread that survives an error;
    each request's tokens are counted for `xlstm-metal top`."""

    def __init__(self, model_provider, prompt_cache):
        #: The response queues of the requests the generation thread took (its thread only).
        self._taken: list[_ResponseQueue] = []
        self._taken_count = 0
        super().__init__(model_provider, prompt_cache)  # starts the generation thread
        self._generation_thread.name = "xlstm-serve-generation"

    def stop_and_join(self, timeout: float | None = None) -> bool:
        """End the generation loop, stopping the requests it holds at their next token (mlx-lm
        looked at its stop flag between requests only: closing waited for every reply to run to
        its end); True when the loop has ended within ``timeout`` seconds. Under mlx.launch the
        requests run to their end: mlx-lm cannot stop one on every rank."""
        self._stop = True
        if not self._is_distributed:
            for rqueue in list(self._taken):
                if rqueue.ctx is not None:
                    rqueue.ctx.stop()
        return super().stop_and_join(timeout)

    def _unavailable(self) -> GenerationUnavailable:
        if self._stop:
            return GenerationUnavailable("the server closed before this reply was complete")
        return GenerationUnavailable("the generation thread has stopped (see the server log)")

    def _generate(self) -> None:
        """mlx-lm's generation loop, started again after an exception. mlx-lm let the thread
        die: the requests in it never got a response, and every later one got 'generation
        thread died'. Here the requests the loop held (their state died with it) get the
        error, and the loop starts afresh with the requests still queued. A failure that took
        no request down with it would come back at once: the thread then stops, as under
        mlx.launch (every rank runs the loop), and /health says 503."""
        while True:
            taken = self._taken_count
            try:
                super()._generate()
                return
            except Exception as err:
                logging.exception("generation failed: %s", err)
                held, self._taken = [q for q in self._taken if not q.finished], []
                for rqueue in held:
                    rqueue.put(err)
                if self._stop or self._is_distributed or self._taken_count == taken:
                    self._generation_failed = True
                    return
                logging.warning("generation restarted; %d request(s) failed with the error", len(held))

    def _next_request(self, timeout=None):
        while True:
            request = super()._next_request(timeout)
            if request is None or not isinstance(request[1], _ScoreJob):
                break
            # A prompt to score runs here, on the generation thread (the one that runs the model),
            # between two decode steps of the requests in the batch.
            rqueue, job, _ = request
            try:
                rqueue.put(self._score(job))
            except Exception as err:
                rqueue.put(err)
            timeout = None  # then whatever else is queued, without waiting
        if request is not None:
            self._taken = [q for q in self._taken if not q.finished]
            self._taken.append(request[0])
            self._taken_count += 1
        return request

    def score_prompt(self, request, args, top_n: int) -> _PromptScores:
        """A text completion request's prompt scored by the served model (:func:`prompt_logprobs`),
        on the generation thread. Asked once the request's reply has started (its context came),
        so that the served model is the one loaded: a request naming another checkpoint leaves that
        one loaded, and a prompt scored before its reply was refused as another model's. The caller
        has asked :meth:`check_scoring` first."""
        rqueue: Queue = Queue()
        if not self.generation_available():
            raise self._unavailable()
        self.requests.put((rqueue, _ScoreJob(request, args, top_n), args))
        result = self._await_response(rqueue)
        if isinstance(result, Exception):
            raise result
        return result

    def check_scoring(self, args, what: str = "echo with logprobs scores the prompt") -> None:
        """Refuses (an :class:`_InvalidRequest`) to score the prompt of a request naming another
        model or other adapters than the served ones; ``what`` is what needs the served model."""
        provider, model_args = self.model_provider, args.model
        if provider.key_for(model_args.model, model_args.adapter, model_args.draft) != provider.key_for(
                "default_model"):
            raise _InvalidRequest(f"{what} with the model being served: this request names another model or "
                                  "other adapters (serve with --adapter-path to score with adapters)")

    def _score(self, job: _ScoreJob) -> _PromptScores:
        provider = self.model_provider
        if provider.model is None or provider.model_key != provider.key_for("default_model"):
            # A request for another model took its place after this reply started: rare, and only
            # with requests naming other models.
            raise _InvalidRequest("echo with logprobs: a request for another model replaced the served one "
                                  "before this prompt was scored; send it again")
        tokenizer, prompt = provider.tokenizer, job.request.prompt
        if isinstance(prompt, list):  # token ids, as they are (_TokenPrompts)
            tokens, context = list(prompt), 0
        else:
            tokens = list(tokenizer.encode(prompt))
            bare = list(tokenizer.encode(prompt, add_special_tokens=False))
            context = 1 if len(tokens) == len(bare) + 1 and tokens[1:] == bare else 0  # a BOS put in front
        logprobs, tops = prompt_logprobs(provider.model, tokens, job.top_n)
        return _PromptScores(tokens[context:], logprobs[context:], tops[context:])

    def _await_response(self, response_queue):
        while True:
            try:
                return response_queue.get(timeout=1.0)
            except Empty:
                if not self.generation_available():
                    raise self._unavailable() from None

    def generate(self, request, generation_args, progress_callback=None,
                 client_gone: Callable[[], bool] | None = None):
        """mlx-lm's ``(ctx, responses)``; ``client_gone`` is polled while the responses are
        awaited, and once it says True they end in :class:`ClientDisconnected`."""
        from ..monitor import current_job

        stop_words = [word for word in generation_args.stop_words if word]
        if stop_words:  # matched here, on the text; mlx-lm's token-level match is left the EOS ids
            generation_args = dataclasses.replace(generation_args, stop_words=[])
        ctx, responses = self._submit(request, generation_args, progress_callback, client_gone)
        if stop_words:
            responses = _stop_at_text(ctx, responses, stop_words)
        return ctx, current_job().track_requests(responses)

    def _submit(self, request, generation_args, progress_callback, client_gone):
        """mlx-lm's generate, awaiting the responses in :meth:`_responses`."""
        rqueue = _ResponseQueue(stopping=lambda: self._stop and not self._is_distributed)
        if not self.generation_available():
            raise self._unavailable()
        self.requests.put((rqueue, request, generation_args))
        # The context comes as soon as the generation thread takes the request; only then can the
        # request be stopped, so the client is not polled before it.
        ctx = self._await_response(rqueue)
        if isinstance(ctx, Exception):
            raise ctx
        return ctx, self._responses(rqueue, progress_callback, client_gone)

    def _responses(self, rqueue: Queue, progress_callback, client_gone) -> Iterator[Any]:
        """A request's responses. mlx-lm only noticed a client that left when a write to it
        failed: a non-streaming reply, written once at the end, kept its slot to max_tokens.
        The client is looked at (two system calls) while no token arrives, and at most every
        POLL_S while tokens do, not per token."""
        next_look = time.monotonic() + POLL_S
        finished = False  # whether a response has ended the reply (its finish_reason)
        while True:
            try:
                item = rqueue.get(timeout=POLL_S)
            except Empty:
                item = Empty
            if client_gone is not None and (item is Empty or time.monotonic() >= next_look):
                next_look = time.monotonic() + POLL_S
                if client_gone():
                    raise ClientDisconnected("the client closed the connection")
            if item is Empty:
                if not self.generation_available():
                    raise self._unavailable()
            elif item is None:
                if not finished and self._stop and not self._is_distributed:
                    # Closing stopped the reply (mlx-lm's one-request path, --kv-bits, ends
                    # it as if complete: the handler then said finish_reason "stop").
                    raise self._unavailable()
                return
            elif isinstance(item, Exception):
                raise item
            elif isinstance(item, tuple):  # prompt progress (processed, total)
                if progress_callback is not None:
                    progress_callback(*item)
            else:
                finished = finished or getattr(item, "finish_reason", None) is not None
                yield item


@dataclasses.dataclass
class _StopResponse(mlx_server.Response):
    """The response whose text completes a stop word (:func:`_stop_at_text`): the reply's text
    ends with its own, and the tokens after that text are no part of the reply's logprobs
    (:meth:`APIHandler.record_logprobs`)."""


def _settle_bytes(decoder: codecs.IncrementalDecoder, raw: bytes) -> tuple[str, str]:
    """One token's bytes through an incremental UTF-8 decoder (errors "replace"): ``(earlier,
    own)``, the text of earlier tokens' waiting bytes that this token's first byte settles (found
    invalid: 0xF0 0x9F then "y" gives the U+FFFD of the first two, which is theirs, with "y") and
    the text this token's bytes complete (a character it ends)."""
    if not raw or not decoder.getstate()[0]:  # nothing of earlier tokens waiting
        return "", decoder.decode(raw)
    first = decoder.decode(raw[:1])
    if decoder.getstate()[0].endswith(raw[:1]):  # the first byte waits itself: all given is theirs
        earlier, own = first, ""
    else:  # it was taken: the last character given holds it
        earlier, own = first[:-1], first[-1:]
    return earlier, own + decoder.decode(raw[1:])


def _stop_at_text(ctx, responses, stop_words: list[str]):
    """``responses`` up to the first stop word in their text, which ends the reply without it.

    mlx-lm matched stop words on token ids (``tokenizer.encode(word)``), which misses a word the
    model spells with other tokens (" syntax" mid-text is one token, "syntax" alone two), while
    its text filter removed every occurrence from the reply: "stop": "syntax" gave the whole
    max_tokens reply with each "syntax" cut out, finish_reason "length". Here the text is held
    back while its end could begin a stop word; the response whose text completes one (a
    :class:`_StopResponse`) carries the text before it, and the reply ends there (the handler
    then reports finish_reason "stop"). Each response keeps its own token and logprobs: the
    handler drops those of the tokens cut away.
    """
    text, sent = "", 0  # the reply's text so far; how much of it went out
    for response in responses:
        searched = max(0, len(text) - max(map(len, stop_words)) + 1)
        text += response.text
        hits = [i for i in (text.find(word, searched) for word in stop_words) if i >= 0]
        if hits:
            ctx.stop()  # the generation thread drops the request
            fields = {f.name: getattr(response, f.name) for f in dataclasses.fields(mlx_server.Response)}
            yield _StopResponse(**{**fields, "text": text[sent:min(hits)], "finish_reason": None})
            return
        if response.finish_reason is not None:
            # The handler drops the text of a "stop" response (an EOS): what was held goes out
            # with a response that does not stop, and the reply ends ("stop" is the handler's default).
            reason = response.finish_reason
            yield dataclasses.replace(response, text=text[sent:], finish_reason=None if reason == "stop" else reason)
            return
        held = max((n for word in stop_words for n in range(min(len(word) - 1, len(text)), 0, -1)
                    if text.endswith(word[:n])), default=0)
        safe = len(text) - held
        yield dataclasses.replace(response, text=text[sent:safe])
        sent = safe


def _template_errors() -> tuple[type[Exception], ...]:
    """The errors of a chat template that refuses its messages (jinja2 comes with transformers)."""
    try:
        from jinja2 import TemplateError
    except ImportError:
        return ()
    return (TemplateError,)


class _SharedScores:
    """The scored prompts of one request's choices (:meth:`APIHandler._answer_each`): each prompt is
    scored once, by the first of its choices to ask, and the others wait for that score. Each
    choice scored its prompt itself: n=128 with echo and logprobs ran the prompt through the model
    128 times, on the generation thread, between the decode steps of every request in flight."""

    def __init__(self):
        self._lock, self._scores = threading.Lock(), {}

    def get(self, key: Any, score: Callable[[], _PromptScores]) -> _PromptScores:
        with self._lock:
            future, first = self._scores.get(key), key not in self._scores
            if first:
                future = self._scores[key] = Future()
        if first:
            try:
                future.set_result(score())
            except BaseException as err:  # the others get the error too (the request fails with it)
                future.set_exception(err)
        return future.result()


class _HandlerGenerator:
    """The response generator as one request's handler sees it: ``generate`` also watches that
    handler's client (mlx-lm's handler calls ``generate`` without it)."""

    def __init__(self, generator: ResponseGenerator, handler: "APIHandler"):
        self._generator, self._handler = generator, handler

    def generate(self, request, generation_args, progress_callback=None):
        fields = {f.name: getattr(generation_args, f.name) for f in dataclasses.fields(generation_args)}
        generation_args = _GenerationArguments(**fields, model_defaults=self._handler.model_defaults)
        scoring = self._handler._echo and generation_args.logprobs  # the prompt's own logprobs come first
        try:
            if scoring:
                self._generator.check_scoring(generation_args)  # before a reply is generated
            ctx, responses = self._generator.generate(request, generation_args, progress_callback,
                                                      client_gone=self._handler.client_gone)
        except Exception as err:
            raise _RequestFailed(err) from err
        if scoring:  # once the reply has started: its model is loaded (ResponseGenerator.score_prompt)
            try:
                self._handler._prompt_scores = self._handler._score_prompt(self._generator, request, generation_args)
            except Exception as err:
                ctx.stop()  # (mlx-lm's handler stops it only once it has the responses)
                raise _RequestFailed(err) from err
        if generation_args.logprobs:
            responses = self._handler.record_logprobs(responses, any(generation_args.stop_words))
        return ctx, responses

    def __getattr__(self, name: str) -> Any:
        return getattr(self._generator, name)


class _Output:
    """What a copy of the handler writes (:meth:`APIHandler._answer_each`), as items on a queue:
    ``(index, "head", status)``, then each server-sent event's data (``"event"``) and comment (a
    keepalive while the prompt runs: ``"comment"``, its line) or, for a reply that is not a
    stream, the whole body at the end (``"body"``), then ``"end"``."""

    def __init__(self, index: int, items: Queue):
        self.index, self.items, self.buffer, self.events = index, items, b"", None

    def write(self, data: bytes) -> int:
        self.buffer += data
        if self.events is None:
            if b"\r\n\r\n" not in self.buffer:
                return len(data)
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.events = b"text/event-stream" in head.lower()
            self.items.put((self.index, "head", int(head.split(b" ", 2)[1])))
        while self.events and b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            if event.startswith(b"data: "):
                self.items.put((self.index, "event", event[len(b"data: "):]))
            elif event.startswith(b":"):
                self.items.put((self.index, "comment", event))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.buffer and not self.events:
            self.items.put((self.index, "body", self.buffer))
        self.items.put((self.index, "end", None))


def _sum_usage(usages: list[dict]) -> dict:
    """Replies' ``usage`` objects added up, field by field (nested ones too, e.g.
    ``prompt_tokens_details.cached_tokens``); a field not in every one is left out."""
    total = {}
    for name, value in usages[0].items():
        values = [usage.get(name) for usage in usages]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            total[name] = sum(values)
        elif all(isinstance(v, dict) for v in values):
            total[name] = _sum_usage(values)
    return total


def _choices_usage(usages: list[dict], n: int) -> dict:
    """The usage of a request's choices (prompt-major, ``n`` a prompt): their counts added up
    (:func:`_sum_usage`), but a prompt's own (prompt_tokens and its details) once, its first
    choice's, as OpenAI counts them: the prompt's n choices share it. Summed, n=128 reported
    128 times the prompt's tokens."""
    usage = _sum_usage(usages)
    prompts = _sum_usage(usages[::n])
    for name in ("prompt_tokens", "prompt_tokens_details"):
        if name in prompts:
            usage[name] = prompts[name]
    if "total_tokens" in usage:
        usage["total_tokens"] = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
    return usage


def stream_options_usage(options: Any, stream: bool) -> bool:
    """Whether a request's ``stream_options`` ask for a last usage chunk; a ValueError for options
    that are malformed, unknown or sent without streaming."""
    if options is None:
        return False
    if not stream:
        raise ValueError("stream_options is only allowed when stream is true")
    include_usage = options.get("include_usage", False) if isinstance(options, dict) else None
    if not isinstance(include_usage, bool):
        raise ValueError("stream_options must be an object whose include_usage is true or false")
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:  # e.g. vLLM's continuous_usage_stats: was ignored without a word
        raise ValueError(f"stream_options.{unknown[0]} is not supported (only include_usage)")
    return include_usage


class APIHandler(mlx_server.APIHandler):
    """mlx-lm's request handler, plus the chat page at ``/``, stricter request checks, and a
    generation stopped when its client leaves, streaming or not."""

    @property
    def timeout(self) -> float | None:
        """The connection's socket timeout (socketserver sets it before the request is read): the
        server's ``request_timeout``. A read or write that waits longer ends the connection (a
        body cut short: a 408). mlx-lm's handler had none."""
        cli_args = getattr(self.response_generator, "cli_args", None)
        return getattr(cli_args, "request_timeout", REQUEST_TIMEOUT_S)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in PAGE_PATHS:
            page = resources.files(__package__).joinpath(CHAT_PAGE).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self._write_body(page)
            return
        if path == "/v1/models" or path.startswith("/v1/models/"):  # /v1/modelsXYZ was the list too
            self.handle_models_request()
        elif path == "/health":  # with a query string it was a 404
            self.handle_health_check()
        else:
            self._method_not_allowed()  # a POST endpoint's 405, else a 404

    def do_HEAD(self):
        """GET's answer (status, headers, Content-Length) without its body: http.server answered
        501 to every HEAD, and monitors and link checkers probe with HEAD. It runs GET's code; the
        bodies go through :meth:`_write_body`, which drops them for HEAD."""
        self.do_GET()

    def do_OPTIONS(self):
        """mlx-lm's CORS preflight answer (204, its Access-Control headers), with an Allow header
        listing the methods of a path the server serves."""
        allowed = allowed_methods(self.path.split("?", 1)[0])
        self._set_completion_headers(204)
        if allowed:
            self.send_header("Allow", ", ".join(allowed))
        self.end_headers()

    def __getattr__(self, name: str) -> Any:
        """http.server's dispatch to ``do_<METHOD>`` for a method without one (PUT, DELETE, PATCH,
        ...): :meth:`_method_not_allowed`, where http.server answered 501 "Unsupported method"
        whatever the path."""
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _method_not_allowed(self) -> None:
        """405 Method Not Allowed, in OpenAI's error shape, with an Allow header listing the
        methods the path takes (:func:`allowed_methods`); a 404 for a path the server does not
        serve. The request's body, if any, is not read: the connection closes."""
        path = self.path.split("?", 1)[0]
        allowed = allowed_methods(path)
        if not allowed:
            self._not_found()
            return
        self.close_connection = True
        methods = ", ".join(allowed)
        self._send_body(405, error_body(405, f"method {self.command} is not allowed on {path} (it takes {methods})"),
                        {"Allow": methods})

    def handle_health_check(self):
        """``{"status": "ok"}``, or 503 ``unavailable``, as mlx-lm's, through :meth:`_send_body`:
        with a Content-Length (mlx-lm's had none), and without a body for HEAD."""
        healthy = self.response_generator.is_healthy
        self._send_body(200 if healthy else 503, json.dumps({"status": "ok" if healthy else "unavailable"}).encode())

    def do_POST(self):
        from ..monitor import current_job

        path = self.path.split("?", 1)[0]  # a query string (Azure-style clients add one) is not part of the path
        if path not in POST_PATHS:
            self._method_not_allowed()  # a GET path's 405 (it was a 404), else a 404
        elif current_job().refusing():  # the memory watchdog's hard limit (see README, Monitoring)
            self._error(503, "the server is over its memory limit; retry later")
        elif getattr(self.response_generator, "ranks_refusing", 0):  # under mlx.launch: another rank's
            self._error(503, f"the server is over its memory limit ({self.response_generator.ranks_refusing} of "
                             f"{mx.distributed.init().size()} processes); retry later")
        elif self._read_body():
            self.path = path
            current_job().update(phase="serve")
            try:
                choices = self._one_per_choice()
                if choices is None:
                    self._answer()
                else:
                    self._answer_each(*choices)
            except ConnectionError as err:  # the client left
                logging.debug("%s left before its reply: %s", self.address_string(), err)
                self.close_connection = True
            except _RequestFailed as failed:
                self._fail(failed.error)

    def _answer(self) -> None:
        """The read request through mlx-lm's handler, its failures answered in OpenAI's shape."""
        try:
            super().do_POST()
        except ConnectionError:  # the client left; mlx-lm's handler stopped its generation
            raise
        except _RequestFailed as failed:  # before the reply
            self._fail(failed.error)
        except Exception as err:  # during the reply (mlx-lm's handler let it end the connection, unanswered)
            self._fail(err)

    def _one_per_choice(self) -> tuple[list[dict], int] | None:
        """A request of several choices as one request per choice, in the choices' order, and
        ``n``; None for one choice. Several: ``n`` > 1 (each choice sampled on its own; with a
        ``seed``, choice j takes seed + j, so they differ and repeat), or on /v1/completions a
        ``prompt`` that is a list of several (strings or lists of token ids: OpenAI's legacy
        batch, which lm-eval's local-completions sends at ``batch_size`` > 1), prompt-major as
        OpenAI orders them."""
        body = json.loads(self.rfile.getvalue())
        n = body.get("n", 1)
        if n is None:
            n = 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
            raise _RequestFailed(_InvalidRequest(f"n must be an integer in 1..{MAX_CHOICES}, got {n!r}"))
        best_of = body.get("best_of")
        if self.path == "/v1/completions" and best_of is not None:
            # OpenAI's rule (best_of candidates, the best n of them returned). The choices leave n
            # out of their own requests: best_of 1 with n=3 passed each one's check for 1.
            if isinstance(best_of, bool) or not isinstance(best_of, int):
                raise _RequestFailed(_InvalidRequest(f"best_of must be an integer, got {best_of!r}"))
            if best_of < n:
                raise _RequestFailed(_InvalidRequest(
                    f"best_of ({best_of}) must be at least n ({n}): best_of candidates are generated and the "
                    "best n of them returned"))
        prompts = [None]
        prompt = body.get("prompt")
        if self.path == "/v1/completions" and isinstance(prompt, list) and len(prompt) > 1 and all(
                isinstance(p, (str, list)) for p in prompt):
            prompts = prompt
        if len(prompts) * n == 1:
            return None
        if len(prompts) * n > MAX_CHOICES:
            raise _RequestFailed(_InvalidRequest(
                f"prompt: {len(prompts)} prompts x n={n} is {len(prompts) * n} choices; at most {MAX_CHOICES}"))
        one = {name: value for name, value in body.items() if name not in ("n", "stream", "stream_options")}
        seed = body.get("seed")
        # seed + j wraps within the seeds MLX takes (0..2**64-1): seed 2**64-1 with n=2 was refused
        # for its choice 1; a seed out of range is still refused, by choice 0.
        return [{**one, **({} if p is None else {"prompt": p}),
                 **({"seed": (seed + j) % 2**64} if j and type(seed) is int else {})}
                for p in prompts for j in range(n)], n

    def _answer_each(self, requests: list[dict], n: int) -> None:
        """One choice per request of :meth:`_one_per_choice` (``index`` its place), usage summed
        (:func:`_choices_usage`). Each runs as a request of its own (every check, default and
        logprob of the one-choice path) on a copy of this handler whose output comes back here,
        not to the client; every copy is checked before any runs, then they run at once, so the
        generation thread batches them. A stream passes each copy's chunks on as they come, with
        the choice's index and one id. The first choice that fails answers the request (naming
        its prompt's index where there are several) and stops the rest."""
        body = json.loads(self.rfile.getvalue())
        stream = body.get("stream", False)
        if not isinstance(stream, bool):  # as one choice's check refuses it: bool() read "false" as a stream
            raise _RequestFailed(_InvalidRequest("stream must be of type bool"))
        try:
            include_usage = stream_options_usage(body.get("stream_options"), stream)
        except ValueError as err:
            raise _RequestFailed(_InvalidRequest(str(err))) from None
        snapshot, items, stop = dict(self.__dict__), Queue(), threading.Event()
        scores = _SharedScores()  # a prompt's choices share its score (echo with logprobs)

        def copy_for(index: int, output: Queue) -> APIHandler:
            handler = object.__new__(type(self))
            handler.__dict__.update(snapshot)
            # a stream's copy reports its usage too, for the sum
            sub = {**requests[index], **({"stream": True, "stream_options": {"include_usage": True}} if stream else {})}
            raw = json.dumps(sub).encode()
            handler.headers = copy.deepcopy(self.headers)
            handler.headers.replace_header("Content-Length", str(len(raw)))
            handler.rfile, handler.wfile, handler._headers_buffer = io.BytesIO(raw), _Output(index, output), []
            handler._shared_scores, handler._prompt_index = scores, index // n
            return handler

        def run(index: int) -> None:
            if stop.is_set():  # another choice failed, or the client left, before this one started
                items.put((index, "end", None))
                return
            handler = copy_for(index, items)
            watch = handler.client_gone
            handler.client_gone = lambda: stop.is_set() or watch()  # another choice failed, or the client left
            try:
                handler._answer()
            except BaseException as err:  # the client left (ConnectionError), or a failure outside the reply
                items.put((index, "failed", err))
            finally:
                handler.wfile.close()

        status: dict[int, int] = {}
        replies: dict[int, dict] = {}
        usages: dict[int, dict] = {}
        failure = None  # (index, status or None, the error's body or exception)
        shared: dict = {}  # the stream's id, object, created, model and system_fingerprint: the first chunk's
        ended = 0
        # Every choice's checks first, here (no generation; microseconds each): a choice the pool
        # starts only once others end (past decode_concurrency) was refused only after they had
        # run to max_tokens, a stream's error then coming after other choices' text.
        for index in range(len(requests)):
            checked = Queue()
            handler = copy_for(index, checked)
            handler._checks_only = True
            handler._answer()
            handler.wfile.close()
            answer = {kind: payload for _, kind, payload in checked.queue}
            if "head" in answer:  # refused: the error's status and body
                failure = (index, answer["head"], answer.get("body", b"{}"))
                ended = len(requests)
                break
        workers = max(1, min(len(requests), getattr(self.response_generator.cli_args, "decode_concurrency", 8)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="choice") as pool:
            try:
                for index in range(len(requests) if failure is None else 0):
                    pool.submit(run, index)
                while ended < len(requests):
                    index, kind, payload = items.get()
                    if kind == "end":
                        ended += 1
                    elif failure is not None:
                        continue  # the rest of the copies, stopping
                    elif kind == "failed":
                        if isinstance(payload, ConnectionError) and not stop.is_set():
                            raise payload
                        failure = (index, None, payload)
                    elif kind == "head":
                        status[index] = payload
                    elif status.get(index) != 200 or (kind == "event" and payload.startswith(b'{"error"')):
                        failure = (index, status.get(index), payload)
                    elif kind == "body":  # a whole reply
                        replies[index] = json.loads(payload)
                        replies[index]["choices"][0]["index"] = index
                    elif kind == "comment":
                        # A keepalive while a prompt runs: passed on (the stream starts, as one choice's does
                        # once its request is taken), so that a client does not wait on a long prompt with
                        # nothing, not even the status line, and give up.
                        if not self._streaming:
                            self._set_stream_headers(200)
                            self.end_headers()
                        self.wfile.write(payload + b"\n\n")
                        self.wfile.flush()
                    elif kind == "event" and payload != b"[DONE]":
                        chunk = json.loads(payload)
                        if not chunk["choices"]:  # the copy's usage chunk
                            usages[index] = chunk["usage"]
                            continue
                        if not self._streaming:
                            self._set_stream_headers(200)
                            self.end_headers()
                        if not shared:
                            shared = {name: chunk[name] for name in ("id", "object", "created", "model", "system_fingerprint")
                                      if name in chunk}
                        chunk["choices"][0]["index"] = index
                        chunk.update(shared)
                        chunk.pop("usage", None)
                        if include_usage:  # OpenAI's: null on every chunk but the last
                            chunk["usage"] = None
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                    if failure is not None:
                        stop.set()
            finally:
                stop.set()  # (every copy has ended here, but where the client left)
        if failure is not None:
            index, code, error = failure
            if code is None:
                self._fail(error)
                return
            reply = json.loads(error)
            error = reply.get("error")
            # Several prompts: name the one whose error it is: its prompt's, or a later prompt's refusal
            # (the fields all share passed the first one's checks; its tokens may not fit max_length).
            # "prompt 0: temperature must be ..." read as if that prompt were at fault, and a model
            # not found named whichever prompt's copy answered first.
            if isinstance(error, dict) and len(requests) > n and (
                    str(error.get("param") or "").startswith("prompt") or (code == 400 and index >= n)):
                error["message"] = f"prompt {index // n}: {error.get('message')}"
            self.close_connection = True
            if self._streaming:
                self.wfile.write(b"data: " + json.dumps(reply).encode() + b"\n\n")
                self.wfile.flush()
            else:  # (a copy whose stream failed at its start: a 500)
                self._send_body(500 if code == 200 else code, json.dumps(reply).encode())
            return
        parts = usages if stream else {index: reply["usage"] for index, reply in replies.items()}
        usage = _choices_usage([parts[index] for index in sorted(parts)], n)
        if stream:
            if include_usage:
                self.wfile.write(f"data: {json.dumps({**shared, 'choices': [], 'usage': usage})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            return
        merged = {**replies[0], "choices": [replies[i]["choices"][0] for i in range(len(requests))], "usage": usage}
        self._send_body(200, json.dumps(merged).encode())

    _streaming = False
    #: Whether the reply starts with the prompt (the legacy completions' echo), until it has.
    _echo = False
    #: Whether a chunk of this chat stream has carried the delta's role (the first one does).
    _role_sent = False
    #: The request's fields left to the model's generation_config.json (:meth:`_fill_defaults`).
    model_defaults: frozenset = frozenset()
    #: The responses (tokens) whose logprobs the next chunk (or the reply) carries.
    _pending: list | tuple = ()
    #: Whether the request asks for its prompt alone (echo with max_tokens 0: :meth:`_answer_prompt_only`).
    _prompt_only = False
    #: Whether the request is only checked, not answered (a choice's checks: :meth:`_answer_each`).
    _checks_only = False
    #: The echoed prompt's logprobs, until the first chunk (or the reply) carries them.
    _prompt_scores: _PromptScores | None = None
    #: A choice's copy (:meth:`_answer_each`): the request's scored prompts, and its prompt's index there.
    _shared_scores: _SharedScores | None = None
    _prompt_index = 0

    def _score_prompt(self, generator: ResponseGenerator, request, args) -> _PromptScores:
        """The request's prompt scored (:meth:`ResponseGenerator.score_prompt`); a choice's copy
        takes the score its prompt's first choice asked for (:class:`_SharedScores`)."""
        def score() -> _PromptScores:
            return generator.score_prompt(request, args, max(self.top_logprobs, 0))

        return score() if self._shared_scores is None else self._shared_scores.get(self._prompt_index, score)

    def _set_stream_headers(self, status_code: int = 200):
        self._streaming = True  # the status line is out: an error now goes as an event
        super()._set_stream_headers(status_code)

    def _fail(self, err: Exception) -> None:
        """Answers a request that was refused or failed in generation, in OpenAI's error shape:
        a 500 (400 for a request the checks refuse, 404 for a model that cannot be loaded, 400 for
        messages the chat template refuses, 503 when the generation thread has stopped); in a
        stream already under way, a last ``error`` event."""
        status, param, code = 500, None, None
        if isinstance(err, _InvalidRequest):
            status, param = 400, _param_of(str(err))
        elif isinstance(err, AdapterError):
            status, param = 400, "adapters"
        elif isinstance(err, ServeError):
            status, param, code = 404, "model", "model_not_found"
        elif isinstance(err, GenerationUnavailable):
            status = 503
        elif isinstance(err, _template_errors()):
            status, param = 400, "messages"
        message = str(err) if status != 500 else f"generation failed: {type(err).__name__}: {err}"
        if status == 500:
            logging.error("%s: %s", self.path, message, exc_info=err)
        body = error_body(status, message, param, code)
        self.close_connection = True
        try:
            if self._streaming:
                self.wfile.write(b"data: " + body + b"\n\n")
                self.wfile.flush()
                return
            self._headers_buffer = []  # mlx-lm's 200, not sent yet
            self._send_body(status, body)
        except OSError:  # the client left meanwhile
            pass

    def handle_completion(self, request, stop_words):
        if self._checks_only:
            return
        if self._prompt_only:
            return self._answer_prompt_only(request)
        shared = self.response_generator
        self.response_generator = _HandlerGenerator(shared, self)
        try:
            super().handle_completion(request, stop_words)
        finally:
            self.response_generator = shared

    def _answer_prompt_only(self, request) -> None:
        """``echo`` with ``max_tokens`` 0 (OpenAI's legacy way to score a text, HELM's): the prompt
        back as the text, with its logprobs where asked (:meth:`ResponseGenerator.score_prompt`),
        finish_reason "length" and no token generated."""
        generator = self.response_generator
        args = argparse.Namespace(model=mlx_server.ModelDescription(
            model=self.requested_model, draft=self.requested_draft_model, adapter=self.adapter))
        try:
            # Without logprobs the prompt is only counted, but with the served model's tokenizer too:
            # the refusal said "echo with logprobs" to a request that asked none.
            generator.check_scoring(args, "echo with logprobs scores the prompt" if self.logprobs
                                    else "echo with max_tokens 0 counts the prompt's tokens")
            tokenizer = generator.model_provider.tokenizer
            if tokenizer is None:
                raise GenerationUnavailable("the model is not loaded yet; retry")
            prompt = request.prompt
            count = len(prompt) if isinstance(prompt, list) else len(tokenizer.encode(prompt))
            if self.logprobs:
                self._prompt_scores = self._score_prompt(generator, request, args)
                self._start_logprobs()
        except Exception as err:
            raise _RequestFailed(err) from err
        response = self.generate_response("", "length", count, 0, 0)
        if self.stream:
            self._set_stream_headers(200)
            self.end_headers()
            self.wfile.write(f"data: {json.dumps(response)}\n\n".encode())
            if self.stream_options is not None and self.stream_options["include_usage"]:
                usage = self.completion_usage_response(count, 0, 0)
                self.wfile.write(f"data: {json.dumps(usage)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
        else:
            body = json.dumps(response).encode()
            self._set_completion_headers(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        self.wfile.flush()

    def client_gone(self) -> bool:
        """Whether the client closed its connection: its end reads EOF (or a reset), where a
        client still waiting for its reply has nothing more to send (HTTP/1.0: one request per
        connection)."""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            return not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):  # reset, or already closed
            return True

    def _read_body(self) -> bool:
        """Reads the body mlx-lm's do_POST then parses (from a buffer): False, with the error
        sent, for no or a bad Content-Length (a negative one: mlx-lm would read until the client
        closes), a body that is not UTF-8 (mlx-lm's decode raised in the handler thread: no
        response at all), not JSON or not a JSON object (mlx-lm answers those in its own shape)."""
        lengths = {value.strip() for value in self.headers.get_all("Content-Length", ())}
        if not lengths:
            self._error(411, "Content-Length header is required")
            return False
        # Digits, one value (RFC 9110): int() read "+2" and "1_0"; of two differing, the first won.
        length = int(next(iter(lengths))) if len(lengths) == 1 and re.fullmatch(r"[0-9]+", *lengths) else -1
        if length < 0:
            self._error(400, f"Invalid Content-Length header: {', '.join(sorted(lengths))}")
            return False
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read
            self._error(413, f"the request body is {length} bytes; this server reads at most {MAX_BODY_BYTES}")
            return False
        try:
            raw = self.rfile.read(length)
        except TimeoutError:  # a Content-Length beyond what the client sends: it waited for ever
            self.close_connection = True
            self._error(408, f"the request body did not arrive: Content-Length says {length} bytes, and none came "
                             f"for {self.timeout:g} s")
            return False
        if len(raw) < length:  # the client closed its end early
            self.close_connection = True
            self._error(400, f"the request body is {len(raw)} bytes; Content-Length says {length}")
            return False
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            self._error(400, f"the request body is not UTF-8: {err.reason} at byte {err.start}")
            return False
        except ValueError as err:  # a JSONDecodeError, or a number past Python's 4300 digits
            self._error(400, f"Invalid JSON in request body: {err}")
            return False
        except RecursionError:
            body = RecursionError
        if body is RecursionError or _json_depth(body) > MAX_JSON_DEPTH:
            self._error(400, f"the request body's JSON nests more than {MAX_JSON_DEPTH} levels deep")
            return False
        if not isinstance(body, dict):
            self._error(400, "Request should be a JSON dictionary (an object of request fields)")
            return False
        # A field set to null is left out, as OpenAI reads it (its SDK sends temperature=None so):
        # mlx-lm refused it ("temperature must be of type ('float', 'int')").
        known = CHAT_FIELDS | COMPLETION_FIELDS
        if any(value is None and name in known for name, value in body.items()):
            raw = json.dumps({name: value for name, value in body.items()
                              if value is not None or name not in known}).encode()
            self.headers.replace_header("Content-Length", str(len(raw)))  # mlx-lm reads that many bytes
        self.rfile = io.BytesIO(raw)
        return True

    def handle_chat_completions(self):
        return self._completion_request(super().handle_chat_completions)

    def handle_text_completions(self):
        return self._completion_request(super().handle_text_completions)

    def _completion_request(self, make: Callable[[], Any]) -> Any:
        """mlx-lm's request for the checked body; a failure is a 400 in OpenAI's shape (mlx-lm
        answered it in its own)."""
        try:
            return make()
        except Exception as err:
            raise _RequestFailed(_InvalidRequest(str(err) or type(err).__name__)) from None

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, headers too long) in OpenAI's shape
        too, where it sent an HTML page."""
        short = self.responses.get(code, ("error",))[0]
        self.log_error("code %d, message %s", code, message or short)
        body = error_body(code, message or short)
        self.send_response(code, message)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _not_found(self) -> None:
        self._error(404, f"not found: {self.path}")

    def _error(self, status: int, message: str) -> None:
        self._send_body(status, error_body(status, message))

    def _send_body(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        """A whole JSON answer: mlx-lm's headers (CORS, content type), ``headers``, its length, the body."""
        self._set_completion_headers(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._write_body(body)

    def _write_body(self, body: bytes) -> None:
        """Send ``body`` after the headers, except to a HEAD request (its answer is GET's headers alone)."""
        if self.command != "HEAD":
            self.wfile.write(body)

    def handle_models_request(self):
        """The served model (mlx-lm's version also lists the Hugging Face cache's mlx models, and
        fails when there is no such cache); ``/v1/models/<id>``: that model's object (OpenAI's
        retrieve) when it names the served one, as a request's ``model`` may, else a 404 (it
        answered the list, whatever the id)."""
        model_id = self._served_model_id
        created = getattr(self.response_generator.model_provider, "created", self.created)
        model = {"id": model_id, "object": "model", "created": created, "owned_by": "xlstm-metal"}
        request_path = self.path.split("?", 1)[0]
        if request_path == "/v1/models":
            self._send_body(200, json.dumps({"object": "list", "data": [model]}).encode())
            return
        asked = urllib.parse.unquote(request_path[len("/v1/models/"):])
        if asked == model_id or asked in self.response_generator.model_provider._model_map:
            self._send_body(200, json.dumps(model).encode())
        else:
            self._send_body(404, error_body(404, f"model {asked!r} not found; this server serves {model_id}",
                                            "model", "model_not_found"))

    def validate_model_parameters(self) -> None:
        """Refuses the request (a 400 in OpenAI's shape, from :meth:`do_POST`) when
        :meth:`_check_request` does."""
        try:
            self._check_request()
        except ValueError as err:
            raise _RequestFailed(_InvalidRequest(str(err))) from None

    def _check_request(self) -> None:
        """mlx-lm's checks, and what they let through to the generation thread: booleans as
        numbers, NaN and infinity, a top_k or logit_bias token id beyond the vocabulary (the
        first stopped the generation thread for good, the second crashed the process), a seed
        MLX cannot take, ``n`` other than 1 (mlx-lm returned one choice), malformed
        ``stream_options``, ``tools`` or ``chat_template_kwargs``, strings that are not Unicode, and
        ``adapters`` that are not a directory of adapters. A ValueError names what is wrong."""
        both = [self.body.get(name) for name in ("max_tokens", "max_completion_tokens")]
        if None not in both and both[0] != both[1]:  # mlx-lm took max_completion_tokens without a word
            raise ValueError(f"max_tokens ({both[0]!r}) and max_completion_tokens ({both[1]!r}) differ: "
                             "send one (max_tokens is the older name of max_completion_tokens)")
        self._fill_defaults()
        # echo with max_tokens 0: the prompt alone, scored where logprobs are asked (mlx-lm's check
        # wants one token at least; none is generated).
        self._prompt_only = (self.path == "/v1/completions" and type(self.max_tokens) is int
                             and self.max_tokens == 0 and self.body.get("echo") is True)
        if self._prompt_only:
            self.max_tokens = 1
        for name in FLOAT_PARAMETERS + INT_PARAMETERS:
            if isinstance(getattr(self, name), bool):
                sent = "max_completion_tokens" if name == "max_tokens" and isinstance(
                    self.body.get("max_completion_tokens"), bool) else name
                raise ValueError(f"{sent} must be a number, not a boolean")
        self._check_logit_bias()
        self._check_adapters()
        self._check_logprobs()
        for name in ("xtc_probability", "xtc_threshold"):  # mlx-lm took only a float: 0 was refused
            if type(getattr(self, name)) is int:
                setattr(self, name, float(getattr(self, name)))
        try:
            super().validate_model_parameters()
        except ValueError as err:
            if str(err).startswith("max_tokens") and self.body.get("max_completion_tokens") is not None:
                raise ValueError("max_completion_tokens" + str(err)[len("max_tokens"):]) from None  # the field sent
            raise
        self._check_model_allowed()
        sent = "max_completion_tokens" if self.body.get("max_completion_tokens") is not None else "max_tokens"
        if self.max_tokens > MAX_CONTEXT_SIZE:  # as the CLI's -n: a larger one ran until the client gave up
            raise ValueError(f"{sent} must be at most {MAX_CONTEXT_SIZE}, got {self.max_tokens}")
        limit = getattr(self.response_generator.cli_args, "max_tokens_limit", None)
        if limit is not None and "max_tokens" not in self.model_defaults and self.max_tokens > limit:
            raise ValueError(f"{sent} must be at most {limit} on this server (its --max-tokens-limit), "
                             f"got {self.max_tokens}")
        for name in ("repetition_context_size", "presence_context_size", "frequency_context_size"):
            if getattr(self, name) > MAX_CONTEXT_SIZE:
                raise ValueError(f"{name} must be at most {MAX_CONTEXT_SIZE}, got {getattr(self, name)}")
        for name in FLOAT_PARAMETERS:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name, (low, high) in OPENAI_RANGES.items():  # a value the request gives (not the server's --temp)
            if name in self.body and not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {getattr(self, name)}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in 0..2**64-1, got {self.seed}")
        vocab_size = getattr(self.response_generator.model_provider, "vocab_size", None)
        if vocab_size is not None and self.top_k >= vocab_size:
            self.top_k = 0  # every token is in the top k: the same as no top-k (MLX's top-k refuses k >= vocabulary)
        if self.top_p == 0 and "top_p" in self.body:
            # OpenAI's top_p 0: no probability mass beyond the most likely token, which top_k 1 keeps.
            # mlx-lm read 0 as "no top-p": a request narrowing its sampling to nothing sampled from all
            # of the vocabulary.
            self.top_k, self.top_p = 1, 1.0
            self.model_defaults -= {"top_k"}  # not the model's generation_config.json's top_k
        body = self.body
        stop = body.get("stop")
        if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)
        ):
            raise ValueError("stop must be a string or a list of strings")
        for word in [stop] if isinstance(stop, str) else stop or ():
            _check_unicode(word, "stop")
            if not word:  # it would stop nowhere (the CLI's --stop "" is refused too)
                raise ValueError("stop strings must not be empty")
        if self.path in ("/v1/chat/completions", "/chat/completions"):
            _check_messages(body.get("messages"))
        elif self.path == "/v1/completions":
            body["prompt"] = self._one_prompt(body.get("prompt"))
        if self.stream_options is not None:
            include_usage = stream_options_usage(self.stream_options, True)
            self.stream_options = {**self.stream_options, "include_usage": include_usage}
        tools = body.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ValueError("tools must be a list of objects")
        if self.chat_template_kwargs is not None and not isinstance(self.chat_template_kwargs, dict):
            raise ValueError("chat_template_kwargs must be an object")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(self.chat_template_kwargs or ()))
        if reserved:
            raise ValueError(f"chat_template_kwargs must not set {', '.join(reserved)}: the template's own "
                             "arguments (use the request's fields), not template variables")
        self._check_fields()

    def _fill_defaults(self) -> None:
        """The server's own setting for a field of :data:`MODEL_DEFAULTS` the request leaves out;
        without one, the built-in value stands in (for the checks) and the field is left to the
        model's generation_config.json, which the generation thread applies."""
        cli_args, body, left = self.response_generator.cli_args, self.body, set()
        for name, (setting, builtin) in MODEL_DEFAULTS.items():
            given = (body.get("max_completion_tokens") is not None or "max_tokens" in body
                     if name == "max_tokens" else name in body)
            if given:
                continue
            value = getattr(cli_args, setting, None)
            if value is None:
                value = builtin
                left.add(name)
            setattr(self, name, value)
        self.model_defaults = frozenset(left)

    def _validate(self, name, *args, **kwargs):
        """mlx-lm's check of one field, with OpenAI's bound on top_logprobs."""
        if name == "top_logprobs":
            kwargs["max_val"] = MAX_TOP_LOGPROBS
        return super()._validate(name, *args, **kwargs)

    def _check_fields(self) -> None:
        """Refuses a request field this server would otherwise ignore: one neither endpoint
        defines, one it defines but cannot honour (:data:`UNSUPPORTED_FIELDS`), stream_options
        without streaming, tools for a model that cannot call them. Honours the cheap ones:
        ``tool_choice: "none"`` drops the tools, ``echo`` puts the prompt before the reply."""
        body, chat = self.body, self.path != "/v1/completions"
        known, other = (CHAT_FIELDS, COMPLETION_FIELDS) if chat else (COMPLETION_FIELDS, CHAT_FIELDS)
        for name in body:
            if name not in known:
                hint = f" (a field of {'/v1/completions' if chat else '/v1/chat/completions'})" if name in other else ""
                raise ValueError(f"unrecognized request field: {name}{hint}")
        for name, (neutral, reason) in UNSUPPORTED_FIELDS.items():
            if body.get(name) not in neutral:
                raise ValueError(f"{name}={json.dumps(body[name])[:80]} is not supported: {reason}")
        stream_options_usage(body.get("stream_options"), bool(self.stream))
        # Fields that change no reply still take OpenAI's types: any value passed ("user": 5,
        # "metadata": "x"), where OpenAI answers a 400.
        for name in STRING_FIELDS:
            if name in body and not isinstance(body[name], str):
                raise ValueError(f"{name} must be a string, got {json.dumps(body[name])[:80]}")
        for name in OBJECT_FIELDS:
            value = body.get(name)
            if name in body and not (isinstance(value, dict) and (
                    name != "metadata" or all(isinstance(v, str) for v in value.values()))):
                kind = "an object of strings" if name == "metadata" else "an object"
                raise ValueError(f"{name} must be {kind}, got {json.dumps(value)[:80]}")
        if body.get("tool_choice") == "none":
            body["tools"] = None  # mlx-lm renders body["tools"] into the prompt
        tokenizer = self.response_generator.model_provider.tokenizer
        if body.get("tools") and tokenizer is not None and not tokenizer.has_tool_calling:
            raise ValueError("tools are not supported: this model's chat template has no tool calling")
        echo = body.get("echo")
        if echo is not None and not isinstance(echo, bool):
            raise ValueError(f"echo must be true or false, got {echo!r}")
        if echo and body.get("logprobs") not in (None, False) and self.response_generator._is_distributed:
            raise ValueError("echo with logprobs is not supported under mlx.launch (the prompt is scored on one process)")
        self._echo = echo is True

    def generate_response(self, text, finish_reason, *args, **kwargs) -> dict:
        """mlx-lm's response or chunk, with OpenAI's logprobs: for chat, ``content`` entries of
        token, logprob, bytes and the sorted ``top_logprobs`` (and mlx-lm's ``id``); for the legacy
        completions, tokens, token_logprobs, top_logprobs and text_offset. mlx-lm gave both
        endpoints entries of id and logprob only, or the first of an unsorted top list in place
        of the chosen token, and none at all when streaming."""
        if self._echo:  # the legacy completions' echo: the prompt, before the reply's first text
            text, self._echo = self._prompt_text + text, False
        response = super().generate_response(text, finish_reason, *args, **kwargs)
        response["model"] = self._response_model()
        choice = response["choices"][0]
        choice.pop("logprobs", None)
        if self.object_type.startswith("chat"):
            if self.stream:
                # OpenAI's deltas: the role in the first chunk only. mlx-lm put it in every one, and a
                # client adding the deltas up (the openai SDK's stream helper) got "assistantassistant...".
                if self._role_sent:
                    choice["delta"].pop("role", None)
                self._role_sent = True
            elif choice["message"].get("content") is None and not choice["message"].get("tool_calls"):
                # An empty reply (EOS first) is "", as OpenAI's (mlx-lm: null, which OpenAI sends
                # only beside tool calls; a client's content.strip() failed on it).
                choice["message"]["content"] = ""
        if self.logprobs:
            pending, self._pending = self._pending, []
            if self.object_type.startswith("chat"):
                choice["logprobs"] = self._chat_logprobs(pending)
            else:
                choice["logprobs"] = self._completion_logprobs(pending)
                if self._prompt_scores is not None:  # echo: the prompt's entries before the reply's
                    prompt = self._prompt_logprobs()
                    choice["logprobs"] = {key: prompt[key] + value for key, value in choice["logprobs"].items()}
        return response

    def completion_usage_response(self, *args, **kwargs) -> dict:
        """mlx-lm's last chunk of a stream with ``stream_options.include_usage`` (no choices, the
        usage), as a chunk of the stream's own object: ``chat.completion.chunk``, or
        ``text_completion`` on /v1/completions. mlx-lm said ``chat.completion`` on both."""
        response = super().completion_usage_response(*args, **kwargs)
        response["object"], response["model"] = self.object_type, self._response_model()
        return response

    def _response_model(self) -> str:
        """The ``model`` of a response: the request's, or where it named none (mlx-lm's
        ``default_model``) the served model's id, as /v1/models lists it."""
        return self._served_model_id if self.requested_model == "default_model" else self.requested_model

    @functools.cached_property
    def _served_model_id(self) -> str:
        """The served model's id in /v1/models: its resolved directory, or the name it was given.
        Looked up once per request (a handler serves one): every streamed chunk names it."""
        served = str(self.response_generator.cli_args.model)
        path = Path(served).expanduser()
        return str(path.resolve()) if path.exists() else served

    def record_logprobs(self, responses, stop_words: bool = False) -> Iterator[Any]:
        """``responses``, each kept for the logprobs of the next chunk (an EOS is no part of the reply).

        With ``stop_words`` the logprobs describe the returned text's tokens only (OpenAI's): a
        token is kept from the chunks until the text given out reaches it (:func:`_stop_at_text`
        holds back text that could begin a stop word), and the tokens at or after the cut before
        a stop word are dropped (they were listed, the stop word's own included). A token's
        place is where its text starts in the reply (:meth:`_text_counter`); one whose text
        starts before the cut and runs past it is kept: part of its text is returned, and its
        entry is the one that gives that text. A token adding no character (the first bytes of
        a character split across tokens) starts where that character does."""
        eos = self._start_logprobs()
        if not stop_words:
            for response in responses:
                if response.token not in eos:
                    self._pending.append(response)
                yield response
            return
        added, start, given = self._text_counter(), 0, 0  # the next token's start; the text given out
        held: list = []  # (start, response) of the tokens whose text has not gone out yet
        cut = False
        for response in responses:
            if response.token not in eos:
                before, count = added(self._piece(response.token)[1])
                held.append((start + before, response))
                start += count
            given += len(response.text)
            cut = isinstance(response, _StopResponse)
            self._pending.extend(r for at, r in held if at < given)
            held = [(at, r) for at, r in held if at >= given]
            yield response
        if not cut:  # the reply ended whole (max_tokens, an EOS): its last tokens are its own
            self._pending.extend(r for _, r in held)

    def _start_logprobs(self) -> set[int]:
        """Sets up what a reply's logprobs are written with (each token's text and bytes, the
        text_offset count); returns the EOS ids."""
        tokenizer = self.response_generator.model_provider.tokenizer
        eos, self._pieces, self._pending = set(tokenizer.eos_token_ids), {}, []
        detokenizer = tokenizer.detokenizer
        self._byte_level = isinstance(detokenizer, BPEStreamingDetokenizer)
        # SentencePiece's (Llama's, Mistral's tokenizer.json): each token's bytes, byte-fallback
        # tokens (<0xF0>) as their byte, "▁" as it is (a space in the text).
        self._spm_bytes = detokenizer.tokenmap if isinstance(detokenizer, SPMStreamingDetokenizer) else None
        self._trim_space = self._byte_level or (self._spm_bytes is not None and detokenizer.trim_space)
        self._offset = len(self._prompt_text)
        self._text_added = self._text_counter()  # for text_offset
        return eos

    def _piece(self, token: int) -> tuple[str, list[int]]:
        """A token's text and bytes: a byte-level BPE token's own bytes (part of a character, at
        times); a SentencePiece token's, as mlx-lm's detokenizer reads them: a byte-fallback
        token (``<0xF0>``) is its byte, "▁" a space ("▁x" is " x"); else its text's UTF-8, but a
        byte-fallback token is its byte there too. Decoded alone through the tokenizer's
        decoder, a byte-fallback token is "\\ufffd" unless its byte is a whole character, and a
        SentencePiece decoder's Strip drops a token's leading space ("▁x" is "x"). An id the
        tokenizer lacks (a model's vocabulary padded past it; a prompt of ids may name one, the
        model may pick one) has no name and decodes to "": its name failed the byte lookup, a 500."""
        if token not in self._pieces:
            tokenizer = self.response_generator.model_provider.tokenizer
            name, decoder = tokenizer.convert_ids_to_tokens(token), _byte_decoder()
            if self._byte_level and name is not None and all(c in decoder for c in name):
                raw = bytes(decoder[c] for c in name)
            elif self._spm_bytes is not None and token < len(self._spm_bytes):
                raw = self._spm_bytes[token].replace(SPM_SPACE.encode(), b" ")
            else:
                text = tokenizer.decode([token], clean_up_tokenization_spaces=False)
                byte = BYTE_FALLBACK_TOKEN.fullmatch(name or "")
                # a byte-fallback token (the decoder reads it as a byte), not a text that looks like one
                raw = bytes([int(byte[1], 16)]) if byte and text != name else text.encode()
            self._pieces[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self._pieces[token]

    @staticmethod
    def _top(response) -> list[tuple[int, float]]:
        """The response's most likely tokens (mlx-lm's top_logprobs, unsorted): (id, logprob), best first."""
        return sorted(((t["id"], t["logprob"]) for t in response.top_tokens), key=lambda t: -t[1])

    def _chat_logprobs(self, responses) -> dict:
        def entry(token, logprob):
            text, raw = self._piece(token)
            return {"token": text, "logprob": logprob, "bytes": raw}

        return {"content": [{**entry(r.token, r.logprob), "id": r.token,
                             "top_logprobs": [entry(t, lp) for t, lp in self._top(r)]} for r in responses],
                "refusal": None}

    def _completion_logprobs(self, responses) -> dict:
        """The legacy shape: ``top_logprobs`` maps the text of the N most likely tokens, and of the
        chosen one (OpenAI: up to N + 1 entries), to their logprobs; ``text_offset`` counts
        characters from the start of the prompt (:meth:`_text_counter`)."""
        tokens, offsets, tops = [], [], []
        for r in responses:
            text, raw = self._piece(r.token)
            before, added = self._text_added(raw)
            tokens.append(text)
            offsets.append(self._offset + before)
            tops.append(self._top_texts(self._top(r), r.token, r.logprob))
            self._offset += added
        return {"tokens": tokens, "token_logprobs": [r.logprob for r in responses], "top_logprobs": tops,
                "text_offset": offsets}

    def _top_texts(self, top: list[tuple[int, float]], token: int, logprob: float) -> dict[str, float]:
        """A legacy ``top_logprobs`` entry: the text of each of the likeliest tokens (best first)
        and of the chosen one, to its logprob; of tokens with one text, the likelier."""
        entry: dict[str, float] = {}
        for other, value in [*top, (token, logprob)]:
            entry.setdefault(self._piece(other)[0], value)
        return entry

    def _prompt_logprobs(self) -> dict:
        """The echoed prompt's legacy logprobs (:meth:`_completion_logprobs`' shape): its tokens
        from the first, whose logprob and top_logprobs are null where nothing comes before it (no
        BOS), and text_offset counting the prompt's characters from 0 (a space a SentencePiece
        tokenizer puts before the first word, not in the prompt, is not counted)."""
        scores, self._prompt_scores = self._prompt_scores, None
        prompt = self._prompt_text
        decoder, offset, started = codecs.getincrementaldecoder("utf-8")("replace"), 0, False
        tokens, offsets, tops = [], [], []
        for token, logprob, top in zip(scores.tokens, scores.logprobs, scores.tops):
            text, raw = self._piece(token)
            earlier, own = _settle_bytes(decoder, bytes(raw))
            added, before = earlier + own, len(earlier)
            if not started and added:
                if added[0] == " " and not prompt.startswith(" "):
                    added, before = added[1:], max(before - 1, 0)
                started = True
            tokens.append(text)
            offsets.append(offset + before)
            tops.append(None if logprob is None else self._top_texts(top, token, logprob))
            offset += len(added)
        return {"tokens": tokens, "token_logprobs": list(scores.logprobs), "top_logprobs": tops,
                "text_offset": offsets}

    def _text_counter(self) -> Callable[[list[int]], tuple[int, int]]:
        """A count of the characters each next token's bytes add to the reply's text, so that a
        token's text_offset is the length of the text decoded from the tokens before it (OpenAI's,
        vLLM's): the characters they complete. A token holding part of a character (a byte-level
        BPE splits an emoji or a CJK character over several) adds nothing and the one completing
        it adds the character; bytes that can never form one add a U+FFFD each, as the
        detokenizer decodes them. The token's own string (its bytes decoded with replacement)
        was counted before: "\\ufffd" for each part, so the offsets ran past the text. mlx-lm's
        byte-level detokenizer drops the reply's leading space, its SentencePiece one (Llama's
        Strip decoder) that of each text it puts out until one is left, and so does the count;
        the SentencePiece one reads "▁" as a space, whole or spelled in byte-fallback tokens.
        Each reply's tokens are counted by a counter of their own, from the first.

        The count returns ``(before, added)``: of the ``added`` characters, the first ``before``
        come from the bytes of earlier tokens, found invalid only at this token's first byte
        (0xF0 0x9F then "y": the U+FFFD of the first two bytes and "y" both appear at "y"), so
        they belong before this token's offset."""
        decoder, started = codecs.getincrementaldecoder("utf-8")("replace"), False

        def added(raw: list[int]) -> tuple[int, int]:
            nonlocal started
            earlier, own = _settle_bytes(decoder, bytes(raw))
            text, before = earlier + own, len(earlier)
            if self._spm_bytes is not None:
                text = text.replace(SPM_SPACE, " ")
            if text and not started:
                if self._trim_space and text[0] == " ":
                    text, before = text[1:], max(before - 1, 0)
                started = bool(text) or self._spm_bytes is None
            return before, len(text)

        return added

    def _check_logprobs(self) -> None:
        """OpenAI's logprobs: on /v1/completions (the legacy API) the number of most likely tokens
        to list per position, 0..5 (true: 0); for chat, true or false, with top_logprobs needing
        true. mlx-lm took only true or false on both."""
        if self.logprobs is None:
            self.logprobs = False
        if self.path == "/v1/completions":
            n = self.logprobs
            if n is True or n is False:
                n = 0 if n else None
            elif not isinstance(n, int) or not 0 <= n <= MAX_COMPLETION_LOGPROBS:
                raise ValueError(f"logprobs must be an integer in 0..{MAX_COMPLETION_LOGPROBS} on /v1/completions "
                                 f"(the most likely tokens to list per position), got {n!r}")
            self.logprobs, self.top_logprobs = n is not None, -1 if n is None else n
        elif self.top_logprobs is None:
            self.top_logprobs = -1
        elif type(self.body.get("top_logprobs")) is int and self.top_logprobs < 0:  # mlx-lm took -1: its "none"
            raise ValueError(f"top_logprobs must be an integer >= 0, got {self.top_logprobs}")
        elif isinstance(self.top_logprobs, int) and self.top_logprobs > 0 and self.logprobs is not True:
            raise ValueError("top_logprobs needs logprobs: true")

    def _check_model_allowed(self) -> None:
        """A request's ``model`` naming a checkpoint other than the served one: refused (a 404,
        model_not_found, before the name reaches the file system or the Hub) unless the server's
        ``allowed_models`` lists it. mlx-lm loaded any directory of the server's, or downloaded
        any Hugging Face id, in place of the served model, for any client."""
        model, cli_args = self.requested_model, self.response_generator.cli_args
        if model in self.response_generator.model_provider._model_map:  # the served model's names
            return
        if not is_allowed(model, getattr(cli_args, "allowed_models", None)):
            raise _RequestFailed(ServeError(
                f"model {model!r} is not served here: this server serves {self._served_model_id} (other "
                "checkpoints only where its operator allows them: xlstm-metal serve --allowed-models)"))

    def _check_adapters(self) -> None:
        """mlx-lm's ``adapters``: a directory of LoRA adapters on the server (as mlx_lm.lora
        writes them) for this request, loaded onto the model in place of its own; one the
        server's ``allowed_adapters`` (or its own ``adapter_path``) names."""
        if self.adapter is None:
            return
        if not isinstance(self.adapter, str) or not self.adapter:
            raise ValueError(f"adapters must be the path of a directory of LoRA adapters, got {self.adapter!r}")
        cli_args = self.response_generator.cli_args
        allowed = getattr(cli_args, "allowed_adapters", None)
        own = getattr(cli_args, "adapter_path", None)
        if not is_allowed(self.adapter, None if allowed is None else [*allowed, *([own] if own else [])]):
            raise ValueError(f"adapters {self.adapter!r} are not allowed here: a request may name only the server's "
                             "own adapters (--adapter-path) and those its operator allows (--allowed-adapters)")
        path = Path(self.adapter).expanduser()
        if not all((path / name).is_file() for name in ("adapter_config.json", "adapters.safetensors")):
            raise ValueError(f"adapters: {self.adapter} is not a directory of LoRA adapters "
                             "(adapter_config.json and adapters.safetensors, as mlx_lm.lora writes them)")
        if self.response_generator.model_provider.is_distributed:
            raise ValueError("adapters are not supported with several processes (mlx.launch)")

    def _one_prompt(self, prompt: Any) -> str | list[int]:
        """A /v1/completions prompt as OpenAI's legacy API takes it: a string or token ids, each
        also as a list of one (lm-eval's local-completions sends ``[text]`` or ``[[ids]]``); ids
        outside the vocabulary are refused. (Several prompts: :meth:`_answer_each`.)"""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            _check_unicode(prompt, "prompt")
            return prompt
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            for token in prompt:
                self._check_token_id(token, "prompt")
            return prompt
        raise ValueError("prompt must be a string or a list of token ids")

    @functools.cached_property
    def _prompt_text(self) -> str:
        """The /v1/completions prompt as text: token ids decoded by the served model's tokenizer."""
        prompt = self.body.get("prompt") or ""
        if isinstance(prompt, list):
            return self.response_generator.model_provider.tokenizer.decode(prompt)
        return prompt

    def _check_token_id(self, token: int, field: str) -> None:
        """A ValueError naming ``field`` for a token id outside the served model's vocabulary
        (negative ones only, before a model is loaded)."""
        vocab_size = getattr(self.response_generator.model_provider, "vocab_size", None)
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise ValueError(f"{field} token id {token} is not in the vocabulary (0..{vocab_size - 1})"
                             if vocab_size is not None else f"{field} token id {token} is negative")

    def _check_logit_bias(self) -> None:
        """logit_bias maps token ids (JSON keys: strings) to biases in -100..100, as OpenAI's."""
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise ValueError("logit_bias must be an object mapping token ids to numbers")
        checked = {}
        for key, value in bias.items():
            # ASCII digits only: int() also read " 3", "3_0" (30) and "٣"; and "03" after "3"
            # overwrote its bias without a word.
            token = int(key) if re.fullmatch(r"-?[0-9]{1,20}", key) else None
            if token is None or token in checked:
                raise ValueError(f"logit_bias keys must be distinct token ids, got {key!r}")
            self._check_token_id(token, "logit_bias")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS
            ):
                raise ValueError(f"logit_bias values must be numbers in -100..100, got {value!r} for {key}")
            checked[token] = float(value)
        self.logit_bias = checked

    def log_message(self, format: str, *args: Any) -> None:
        logging.debug("%s - %s", self.address_string(), format % args)


class _HTTPServer(ThreadingHTTPServer):
    """The HTTP server. Each request runs in a daemon thread (they never enter MLX: the
    generation thread does) that :meth:`Server.close` joins for a bounded time: ThreadingMixIn's
    own join, in server_close, had no bound, and a client holding a connection open without
    sending its request (a browser's preconnect) held close, and with it the exit, forever."""

    daemon_threads = True
    block_on_close = False
    # The listen backlog (socketserver's default is 5): the accepting thread is slowed while
    # generation runs, and a burst of ~30 clients overflowed the queue, whose extra connections
    # the kernel reset ("Connection reset by peer" before any status line).
    request_queue_size = max(socket.SOMAXCONN, 128)
    max_connections: int | None = MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        #: The request threads not yet seen ended (the serving thread's; close reads it once that stopped).
        self.request_threads: list[threading.Thread] = []
        self._refusing = threading.Semaphore(MAX_CONNECTIONS)

    def handle_error(self, request, client_address) -> None:
        """A client that left, at debug level (socketserver printed a traceback)."""
        err = sys.exc_info()[1]
        if isinstance(err, ConnectionError):
            logging.debug("%s left: %s", client_address, err)
        else:
            super().handle_error(request, client_address)

    def process_request(self, request, client_address) -> None:
        self.request_threads = [t for t in self.request_threads if t.is_alive()]
        if self.max_connections is not None and len(self.request_threads) >= self.max_connections:
            if self._refusing.acquire(blocking=False):  # off the accepting thread; a flood is just closed
                threading.Thread(target=self._refuse, args=(request,), daemon=True).start()
            else:
                self.shutdown_request(request)
            return
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name="xlstm-serve-request", daemon=True)
        self.request_threads.append(thread)
        thread.start()

    def _refuse(self, request: socket.socket) -> None:
        """A 503, after reading what came within 1 s (closed unread, the connection is reset)."""
        body = error_body(503, f"the server is serving its most connections ({self.max_connections}); retry later")
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        try:
            request.settimeout(1.0)
            if select.select([request], [], [], 1.0)[0]:
                request.recv(65536)
            request.sendall(head.encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)
        self._refusing.release()


#: The servers made and not yet closed, which :func:`_close_open_servers` closes at exit.
_OPEN_SERVERS: set["Server"] = set()
_OPEN_LOCK = threading.Lock()
_exit_hook_registered = False


def _close_open_servers() -> None:
    """Close the servers still open as the interpreter exits (a script that never called
    :meth:`Server.close`). It runs in threading's shutdown, before the non-daemon threads are
    joined: mlx-lm's generation thread is one, and its loop, never told to stop, held the exit
    forever."""
    with _OPEN_LOCK:
        servers = list(_OPEN_SERVERS)
    if not servers:
        return
    # A Ctrl-C that came before Server.serve_forever's own close (the command line's first one
    # just after "serving on", on a loaded machine) ends here: a second one during this close
    # raised KeyboardInterrupt in threading's shutdown, which then left the generation thread
    # inside MLX at exit ("terminate called without an active exception", an abort).
    with _second_interrupt_exits(until_exit=True):
        for server in servers:
            server.close()


def _close_at_exit(server: "Server") -> None:
    global _exit_hook_registered
    with _OPEN_LOCK:
        if not _exit_hook_registered:
            try:
                # CPython's hook run before the non-daemon threads are joined (concurrent.futures
                # stops its workers with it); atexit's functions run only after that join.
                threading._register_atexit(_close_open_servers)
            except RuntimeError:  # made during the exit itself: close() is the caller's
                return
            _exit_hook_registered = True
        _OPEN_SERVERS.add(server)


def _exit_now(signum, frame) -> None:
    """A second Ctrl-C (SIGINT handler): end the process at once with 130."""
    print("\ninterrupted again: stopping at once", file=sys.stderr, flush=True)
    os._exit(128 + signal.SIGINT)


@contextlib.contextmanager
def _second_interrupt_exits(until_exit: bool = False) -> Iterator[None]:
    """While the server closes after Ctrl-C (up to :data:`CLOSE_S`), a second Ctrl-C ends the
    process at once with 130, and with ``until_exit`` (the command line) also afterwards, while
    the interpreter's shutdown joins threads. It raised KeyboardInterrupt inside ``close()`` or
    that join instead, which left the generation thread inside MLX as the interpreter exited:
    "terminate called without an active exception" and an abort (exit 134), or a hang, as a
    terminal's Ctrl-C under ``timeout`` sends SIGINT twice. Main thread only (where Python runs
    signal handlers), default handler only."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, _exit_now)
    try:
        yield
    finally:
        if not until_exit:
            signal.signal(signal.SIGINT, signal.default_int_handler)


class Server:
    """A running server: ``url``, ``close()``; a context manager. One left open is closed as
    the interpreter exits."""

    def __init__(self, httpd: _HTTPServer, generator: ResponseGenerator):
        self.httpd, self.generator = httpd, generator
        host, port = httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread: threading.Thread | None = None
        self.closed = False
        _close_at_exit(self)

    def serve_forever(self, *, interrupt_exits: bool = False) -> None:
        """Serve until Ctrl-C (KeyboardInterrupt, raised once the server closed); a second Ctrl-C
        while it closes ends the process at once, and with ``interrupt_exits`` (the command line)
        any later one too, until the process ends."""
        try:
            self.httpd.serve_forever()
        finally:
            with _second_interrupt_exits(until_exit=interrupt_exits):
                self.close()

    def start(self) -> "Server":
        """Serve from a background thread (tests, notebooks)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="xlstm-serve-http", daemon=True)
        self._thread.start()
        return self

    def threads(self) -> list[threading.Thread]:
        """The server's threads, ended or not: serving, generation, requests."""
        own = [t for t in (self._thread, self.generator._generation_thread) if t is not None]
        return own + list(self.httpd.request_threads)

    def close(self, timeout: float = CLOSE_S) -> None:
        """Stop serving: no new connection, the requests in flight stopped at their next token
        (their clients get a 503, or an error event ending the stream; one served on mlx-lm's
        one-request path too, where it got the reply so far as if complete, finish_reason
        "stop"), and the server's threads ended, waiting at most ``timeout`` seconds in all. The
        generation thread, the one in MLX, is joined to its OS thread's end; a request thread
        still waiting on its client is left to exit with the process (a daemon, outside MLX)."""
        with _OPEN_LOCK:
            if self.closed:
                return
            self.closed = True
            _OPEN_SERVERS.discard(self)
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(left())
        self.httpd.server_close()
        if not self.generator.stop_and_join(left()):
            logging.warning("the generation thread did not end within %.0f s of closing the server", timeout)
        for thread in self.httpd.request_threads:
            thread.join(left())

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_server(cli_args: argparse.Namespace) -> Server:
    """Load the model (errors surface here, as :class:`ServeError`), bind ``host:port``
    (port 0: any free port) and return the :class:`Server`, not yet serving."""
    try:
        httpd = _HTTPServer((cli_args.host, cli_args.port), _handler_factory(None))
    except OSError as err:
        raise ServeError(f"cannot listen on {cli_args.host}:{cli_args.port}: {err.strerror or err}") from None
    provider = ModelProvider(cli_args)
    generator = ResponseGenerator(provider, _PromptCache(cli_args.prompt_cache_size))
    try:
        provider.ready.wait()
    except BaseException:  # Ctrl-C while loading: the generation thread would hold the exit
        generator.stop_and_join(CLOSE_S)
        httpd.server_close()
        raise
    if provider.load_error is not None:
        generator.stop_and_join()
        httpd.server_close()
        err = provider.load_error
        raise ServeError(str(err) if isinstance(err, ServeError) else f"cannot load {cli_args.model}: {err}")
    httpd.RequestHandlerClass = _handler_factory(generator)
    httpd.max_connections = getattr(cli_args, "max_connections", MAX_CONNECTIONS)
    return Server(httpd, generator)


def follow(cli_args: argparse.Namespace) -> None:
    """Ranks other than 0 under ``mlx.launch``: load this rank's part of the model and take part in
    every generation rank 0's server runs (mlx-lm's generation loop shares each request with all
    ranks); no HTTP server. Returns when the generation loop ends; raises :class:`ServeError`
    when the model cannot be loaded."""
    provider = ModelProvider(cli_args)
    generator = _Follower(provider, _PromptCache(cli_args.prompt_cache_size))
    provider.ready.wait()
    if provider.load_error is not None:
        generator.stop_and_join()
        err = provider.load_error
        raise ServeError(str(err) if isinstance(err, ServeError) else f"cannot load {cli_args.model}: {err}")
    generator.join()


class _Follower(_GenerationThread, _MemoryAgreement, _WholePromptHistory, _ModelDefaults, _TokenPrompts,
                _SeededInBatch, mlx_server.ResponseGenerator):
    """mlx-lm's generator on a rank other than 0, with the model's request defaults as rank 0's,
    tokenizing each request as rank 0 does: a prompt of token ids went to the tokenizer, which
    refused it, and the follower dropped a request rank 0 ran (their collectives then differ)."""


def _handler_factory(generator):
    fingerprint = mlx_server.get_system_fingerprint()

    def handler(*args, **kwargs):
        return APIHandler(generator, *args, system_fingerprint=fingerprint, **kwargs)

    return handler
