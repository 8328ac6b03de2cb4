"""xLSTMRunner: prompt -> tokens, for any model following the package contract
``model(input_ids [B, S], state) -> (logits [B, S, V], state)``.

Prefill feeds the prompt in bounded pieces (the model's chunkwise kernel runs on each, the state
carries over), so memory does not grow with the prompt length. Decode runs one compiled step
per token (forward of one token + sampling, all on device); the host only reads the sampled
ids, one step behind the device (the next step is queued before the current token is read).

Batches of prompts with different lengths: each row is prefilled alone, the per-row states are
concatenated along the batch axis, and all rows decode together, each ending at its own EOS, stops
and max_tokens (``generate``'s ``row_stops`` and list of ``max_tokens``). Rows never mix, so each
row's output equals what the prompt gets alone (sampling uses per-row keys, see sampling.make_keys).
"""

from __future__ import annotations

import inspect
import numbers
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from ..checks import bad_token_ids, is_integer
from ..kernels.cpu import decode_step as cpu_decode_step
from .sampling import SamplingParams, make_keys, mark_seen, sample, seen_from_ids, split_keys
from .tokenizer import StreamingDetokenizer, Tokenizer

#: Default prefill piece: long enough to keep the chunkwise kernel efficient, short enough that
#: the piece's logits [S, V] stay small (S * 50304 * 4 bytes = 400 MB at 2048).
DEFAULT_PREFILL_CHUNK = 2048

Prompt = str | Sequence[int] | mx.array
Stop = str | int | Sequence[str | int] | None


@dataclass
class GenerationChunk:
    """One streamed step.

    token: the id generated at this step (a stop id included; None for a closing chunk that
        only flushes held-back text).
    text: new text that is safe to show (may be ""; never a broken UTF-8 character; stop
        strings and stop/EOS tokens are not shown).
    finish_reason: None while generating, then "stop" (EOS / stop id / stop string) or
        "length" (max_tokens reached).
    """

    token: int | None
    text: str
    finish_reason: str | None
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float


@dataclass
class _Session:
    """Recurrent state of a conversation: ``state`` covers the first ``length`` tokens of
    ``history`` except ``pending`` (the last sampled token, fed at the start of the next call).
    ``history`` may grow past ``length`` (a stream appends to it), so a session is one
    immutable snapshot and replacing it is a single assignment (safe under Ctrl-C)."""

    state: Any = None
    pending: list[int] = field(default_factory=list)
    history: list[int] = field(default_factory=list)
    length: int = 0
    keys: mx.array | None = None

    def tokens(self) -> list[int]:
        return self.history[: self.length]


class _RowTracker:
    """Per-row bookkeeping on the host: stop ids, stop strings, streamed text. Keeps only the
    text not yet handed out, so each token costs O(1) however long the generation."""

    def __init__(self, tokenizer: Tokenizer | None, stop_ids: set[int], stop_strings: list[str],
                 context: Sequence[int] = ()):
        self.stop_ids = stop_ids
        self.stop_strings = stop_strings
        # A stop string may still be completing in the last len-1 characters: hold them back.
        self.hold = max((len(s) for s in stop_strings), default=1) - 1
        self.detok: StreamingDetokenizer | None = tokenizer.detokenizer(context=context) if tokenizer else None
        self.tokens: list[int] = []
        self.buffer = ""  # decoded, not yet handed out
        self.finish_reason: str | None = None

    def add(self, token: int) -> str:
        """Record ``token``; returns text now safe to show."""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self._flush(final=True)
        self.tokens.append(token)
        if self.detok is not None:
            self.buffer += self.detok.add(token)
        return self._flush(final=False)

    def finish(self) -> str:
        """Generation ended for length: everything still held back."""
        if self.finish_reason is None:
            self.finish_reason = "length"
        return self._flush(final=True)

    def _flush(self, final: bool) -> str:
        if self.detok is not None and final:
            self.buffer += self.detok.finalize()
        if self.stop_strings:
            hits = [i for i in (self.buffer.find(s) for s in self.stop_strings) if i >= 0]
            if hits:
                piece, self.buffer = self.buffer[: min(hits)], ""
                self.finish_reason = "stop"
                return piece
        end = len(self.buffer) if final else max(0, len(self.buffer) - self.hold)
        piece, self.buffer = self.buffer[:end], self.buffer[end:]
        return piece


def default_dtype() -> str:
    """bfloat16 on a GPU (Metal / CUDA), float32 on CPU (MLX's CPU half matmul is a slow fallback)."""
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


def _peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


def _split_stop(stop: Stop, vocab_size: int | None = None) -> tuple[set[int], list[str]]:
    """``stop`` -> (stop ids, stop strings). Ids may be NumPy integers; an id outside
    [0, ``vocab_size``) could never be sampled, so it is refused rather than ignored."""
    if stop is None:
        return set(), []
    if isinstance(stop, (bytes, bytearray, memoryview)) or (
            not isinstance(stop, (str, int, Iterable)) and not is_integer(stop)):  # b"\n" ran as stop id 10
        raise TypeError(f"stop must be a str, a token id or a list of them, got {type(stop).__name__}")
    items = [stop] if isinstance(stop, (str, int)) or is_integer(stop) else list(stop)
    ids, strings = set(), []
    for item in items:
        if isinstance(item, bool):
            raise TypeError(f"stop items must be str or int, got {item!r}")
        if is_integer(item):
            if item < 0 or (vocab_size is not None and item >= vocab_size):
                bounds = "ids are >= 0" if vocab_size is None else f"the vocabulary is [0, {vocab_size})"
                raise ValueError(f"stop id {item} can never be generated: {bounds}")
            ids.add(int(item))
        elif isinstance(item, str):
            if not item:
                raise ValueError("stop strings must not be empty")
            strings.append(item)
        else:
            raise TypeError(f"stop items must be str or int, got {type(item).__name__}")
    return ids, strings


def _is_array(value: Any) -> bool:
    """An MLX or NumPy array (anything with ndim, shape and tolist), not a list."""
    return isinstance(value, mx.array) or all(hasattr(value, a) for a in ("ndim", "shape", "tolist"))


class _Step(NamedTuple):
    """One decode step of :meth:`xLSTMRunner._decode`: the tokens per row on the host and on the
    device, the state before feeding them, the keys and seen-token marks after them."""

    host: list[int]
    state: Any
    keys: mx.array
    tok: mx.array
    seen: mx.array


def _take_rows(tree: Any, rows: list[int], batch: int) -> Any:
    """Each array of ``tree`` at ``rows`` of its first axis; None where a leaf is not an array
    with ``batch`` rows first (a state of another layout: the batch stays as it is)."""
    leaves = [leaf for _, leaf in tree_flatten(tree)]
    if not all(isinstance(a, mx.array) and a.ndim and a.shape[0] == batch for a in leaves):
        return None
    index = mx.array(rows)
    return tree_map(lambda a: a[index], tree)


def _concat_states(states: list[Any]) -> Any:
    """Per-row states (list per block of tuples of [1, ...] arrays) -> one [B, ...] state."""
    if len(states) == 1:
        return states[0]
    return [
        tuple(mx.concatenate([s[b][j] for s in states], axis=0) for j in range(len(states[0][b])))
        for b in range(len(states[0]))
    ]


class xLSTMRunner:
    """Generation with an xLSTM model.

    Args:
        model: a loaded model (``model(input_ids, state) -> (logits, state)``), or a checkpoint
            directory / Hugging Face id to load.
        tokenizer: needed for text prompts, stop strings and streamed text; loaded with the
            model when ``model`` is a path.
        dtype: weight dtype when loading from a path ("float32" / "bfloat16" / "float16";
            default: :func:`default_dtype`).
        prefill_chunk_size: prompt tokens per forward during prefill (default:
            min(config.max_inference_chunksize, 2048)).
        compile: compile the decode step with ``mx.compile``.

    Stateful use (chat): ``stream(..., keep_state=True)`` / :meth:`generate_next_token`
    continue from the runner's session state and feed only the new tokens;
    :meth:`reset_state` starts over.
    """

    def __init__(
        self,
        model: nn.Module | str | os.PathLike,
        tokenizer: Tokenizer | None = None,
        *,
        dtype: str | None = None,
        prefill_chunk_size: int | None = None,
        compile: bool = True,
    ):
        if isinstance(model, (str, os.PathLike)):
            from ..loading import load

            model, loaded_tokenizer = load(model, dtype=dtype or default_dtype())
            tokenizer = tokenizer or loaded_tokenizer
        if not callable(model):
            raise TypeError(f"model must be a callable MLX model or a path, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = getattr(model, "config", None)
        if prefill_chunk_size is None:
            prefill_chunk_size = min(getattr(self.config, "max_inference_chunksize", DEFAULT_PREFILL_CHUNK),
                                     DEFAULT_PREFILL_CHUNK)
        if not is_integer(prefill_chunk_size) or prefill_chunk_size <= 0:
            raise ValueError(f"prefill_chunk_size must be a positive integer, got {prefill_chunk_size!r}")
        self.prefill_chunk_size = int(prefill_chunk_size)
        self.compile = compile
        # Models that can return only the last position's logits ([B, 1, V]) skip the
        # lm_head over the rest of each prefill piece (a quarter of the FLOPs of a 162M model).
        try:
            self._last_only = "last_only" in inspect.signature(model.__call__).parameters
        except (TypeError, ValueError):
            self._last_only = False
        self._steps: dict[SamplingParams, Any] = {}
        self._session = _Session()

    # ------------------------------------------------------------------ helpers
    @property
    def vocab_size(self) -> int:
        size = getattr(self.config, "vocab_size", None)
        if size is None:
            raise AttributeError("model.config has no vocab_size")
        return int(size)

    def _eos_ids(self) -> set[int]:
        if self.tokenizer is not None:
            return set(self.tokenizer.eos_token_ids)
        eos = getattr(self.config, "eos_token_id", None)
        if eos is None:
            return set()
        return {eos} if isinstance(eos, int) else set(eos)

    def encode(self, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
        """A prompt (text, id list, or 1-D / [1, S] integer array: MLX or NumPy) -> list of ids,
        each checked against the vocabulary (an id outside it would index past the embedding)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or a tokenizer")
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            # Iterating bytes gives ints: b"hi" would run as token ids 104, 105.
            raise TypeError(f"a prompt must be text, a list of token ids or an array, got {type(prompt).__name__} "
                            "(decode bytes to str first)")
        if _is_array(prompt):
            if prompt.ndim == 2 and prompt.shape[0] == 1:
                prompt = prompt[0]
            if prompt.ndim != 1:
                raise ValueError(f"an array prompt must be 1-D or [1, S], got shape {tuple(prompt.shape)}")
            prompt = prompt.tolist()
        if not isinstance(prompt, Iterable):
            raise TypeError(f"a prompt must be text, a list of token ids or an array, got {type(prompt).__name__}")
        ids = list(prompt)
        vocab = getattr(self.config, "vocab_size", None)
        bad = bad_token_ids(ids, vocab)
        if bad:
            wrong = [i for i in bad if not is_integer(i)]
            if wrong:
                raise ValueError(f"token ids must be integers, got {wrong[0]!r}")
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return [int(i) for i in ids]

    def _special_stops(self, ids: set[int], strings: list[str]) -> tuple[set[int], list[str]]:
        """Stop strings that are the text of a special token (``<|im_end|>``) as that token's id:
        the text streamed skips special tokens, so such a string never showed and never stopped."""
        if not strings or self.tokenizer is None:
            return ids, strings
        special = {t.content: i for i, t in self.tokenizer.backend.get_added_tokens_decoder().items() if t.special}
        return ids | {special[s] for s in strings if s in special}, [s for s in strings if s not in special]

    def _params(self, temperature, top_k, top_p, min_p, repetition_penalty) -> SamplingParams:
        # SamplingParams checks each value's kind before it converts it (float() read "0.5" as 0.5).
        return SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)

    def prefill(self, ids: Sequence[int], state: Any = None) -> tuple[mx.array, Any]:
        """Feed ``ids`` (one row) in pieces of ``prefill_chunk_size``.

        Returns the logits of the last token [1, V] and the state after all of ``ids``.
        """
        if not len(ids):
            raise ValueError("nothing to feed: the prompt is empty")
        n, step = len(ids), self.prefill_chunk_size
        if callable(getattr(self.model, "prefill", None)):  # bounded memory, layer by layer
            return self.model.prefill(mx.array([list(ids)], dtype=mx.int32), state, chunk_size=step)
        logits = None
        for start in range(0, n, step):
            piece = mx.array([list(ids[start:start + step])], dtype=mx.int32)
            if self._last_only:
                logits, state = self.model(piece, state, last_only=True)
            else:
                logits, state = self.model(piece, state)
            logits = logits[:, -1]
            if start + step < n:
                # Materialise the carried state so the graph (and memory) stays one piece long.
                mx.eval(state)
        return logits, state

    def _step_fn(self, params: SamplingParams):
        """One decode step, compiled per sampling configuration:
        (tokens [B], state, keys [B, 2], seen [B, V]) -> (next tokens [B], state, keys, seen)."""
        fn = self._steps.get(params)
        if fn is not None:
            return fn
        model = self.model

        def pick(logits, keys, seen):
            use = None
            if not params.greedy:
                keys, use = split_keys(keys)
            nxt = sample(logits[:, -1], params, use, seen if params.uses_history else None)
            if params.uses_history:
                seen = mark_seen(seen, nxt)
            return nxt, keys, seen

        def step(tokens, state, keys, seen):
            logits, state = model(tokens[:, None], state)
            nxt, keys, seen = pick(logits, keys, seen)
            return nxt, state, keys, seen

        # The weights are implicit inputs (not constants), so a later weight update is seen.
        if not self.compile:
            graph_step = step
        elif isinstance(model, nn.Module):
            graph_step = mx.compile(step, inputs=model.state)
        else:
            graph_step = mx.compile(step)
        fn = graph_step
        if cpu_decode_step.unsupported_reason(model) is None:
            # The model's step as one C call on the CPU (kernels/cpu/decode_step.py); each call
            # falls back to the graph where the model or the state is not what it computes.
            pick_fn = mx.compile(pick) if self.compile else pick

            def fn(tokens, state, keys, seen):
                out = cpu_decode_step.decode_step(model, tokens[:, None], state)
                if out is None:
                    return graph_step(tokens, state, keys, seen)
                nxt, keys, seen = pick_fn(out[0], keys, seen)
                return nxt, out[1], keys, seen

        self._steps[params] = fn
        return fn

    def _first_token(self, logits, params, keys, seen):
        use = None
        if not params.greedy:
            keys, use = split_keys(keys)
        tok = sample(logits, params, use, seen if params.uses_history else None)
        if params.uses_history:
            seen = mark_seen(seen, tok)
        return tok, keys, seen

    def _decode(self, logits, state, params, keys, seen, max_tokens) -> Iterator[_Step]:
        """Yields a :class:`_Step` per step: the tokens per row (on the host and the device), the
        state before feeding them, the keys and seen-token marks after them."""
        tok, keys, seen = self._first_token(logits, params, keys, seen)
        yield from self._decode_from(tok, state, params, keys, seen, max_tokens)

    def _decode_from(self, tok, state, params, keys, seen, max_tokens) -> Iterator[_Step]:
        """:meth:`_decode` from a sampled token ``tok`` [B] not yet fed (yielded first)."""
        mx.async_eval(tok)
        step = self._step_fn(params)
        defer = getattr(self.model, "defer_state", None)
        if defer is not None:  # on CUDA at 16+ rows: C written once every few steps (xLSTMLarge.defer_state)
            state = defer(state)
        for t in range(max_tokens):
            if t + 1 < max_tokens:
                # Queue the next step before reading this token: the device never waits on us.
                nxt, new_state, new_keys, new_seen = step(tok, state, keys, seen)
                mx.async_eval(nxt, new_state, new_keys, new_seen)
            host = tok.tolist()
            yield _Step(host, state, keys, tok, seen)
            if t + 1 < max_tokens:
                tok, state, keys, seen = nxt, new_state, new_keys, new_seen

    def _start_keys(self, seed, batch_size, params, session_keys=None):
        if params.greedy:
            return mx.zeros((batch_size, 2), dtype=mx.uint32)
        if seed is None and session_keys is not None:
            return session_keys
        return make_keys(seed, batch_size)

    # ------------------------------------------------------------------ public API
    def reset_state(self) -> None:
        """Forget the conversation: the next stateful call starts from the zero state."""
        self._session = _Session()

    @property
    def session_tokens(self) -> list[int]:
        """Every token of the conversation so far (prompts and generated, stop tokens included)."""
        return self._session.tokens()

    def stream(
        self,
        prompt: Prompt,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Stop = None,
        keep_state: bool = False,
    ) -> Iterator[GenerationChunk]:
        """Generate for one prompt, yielding a :class:`GenerationChunk` per token.

        With ``keep_state`` the prompt continues the session (only its tokens, plus the last
        token of the previous call, are fed; text prompts after the first are encoded without
        BOS) and the session advances as tokens are yielded, so stopping early (even with
        Ctrl-C) leaves it consistent.
        """
        # a NumPy integer too, as generate takes one (np.int64(3) was refused here alone)
        if isinstance(max_tokens, bool) or not is_integer(max_tokens) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
        max_tokens = int(max_tokens)
        params = self._params(temperature, top_k, top_p, min_p, repetition_penalty)
        stop_ids, stop_strings = _split_stop(stop, getattr(self.config, "vocab_size", None))
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        stop_ids, stop_strings = self._special_stops(stop_ids, stop_strings)
        session = self._session if keep_state else _Session()
        ids = self.encode(prompt, add_special_tokens=not session.length)
        feed = session.pending + ids
        history = session.tokens() + ids
        if not feed:
            raise ValueError("the prompt is empty")
        if max_tokens == 0 and not keep_state:
            return

        mx.reset_peak_memory()
        tic = time.perf_counter()
        logits, state = self.prefill(feed, session.state)
        keys = self._start_keys(seed, 1, params, session.keys if keep_state else None)
        seen = seen_from_ids([history], self.vocab_size) if params.uses_history else mx.zeros((1, 1), mx.bool_)
        if max_tokens == 0:
            mx.eval(state)
            self._session = _Session(state, [], history, len(history), session.keys if params.greedy else keys)
            return
        tracker = _RowTracker(self.tokenizer, stop_ids | self._eos_ids(), stop_strings, context=history[-8:])
        prompt_time = gen_start = None
        n = 0
        asked, shown = list(history), []  # the conversation before this reply; the reply's text as shown

        def keep_as_shown():
            # The session holds the reply as shown (text the user never saw would condition the
            # next turn); its tokens are fed with the next prompt.
            reply = self.encode("".join(shown), add_special_tokens=False)
            self._session = _Session(after_prompt, reply, asked + reply, len(asked) + len(reply), self._session.keys)

        try:
            for decoded in self._decode(logits, state, params, keys, seen, max_tokens):
                token, fed_state, step_keys = decoded.host[0], decoded.state, decoded.keys
                now = time.perf_counter()
                if prompt_time is None:
                    prompt_time, gen_start = now - tic, now
                    after_prompt = fed_state if keep_state and stop_strings else None  # (a stop string may end it)
                if not getattr(tracker.detok, "pending", False):
                    clean = (fed_state, len(history))  # every token before this one shown as text
                n += 1
                history.append(token)
                if keep_state:
                    self._session = _Session(fed_state, [token], history, len(history),
                                             session.keys if params.greedy else step_keys)
                text = tracker.add(token)
                if tracker.finish_reason is None and n == max_tokens:
                    text += tracker.finish()
                shown.append(text)
                if keep_state and tracker.finish_reason == "stop" and token not in tracker.stop_ids:
                    keep_as_shown()  # neither the stop string nor what its token carried after it
                elapsed = now - gen_start
                yield GenerationChunk(
                    token=token,
                    text=text,
                    finish_reason=tracker.finish_reason,
                    prompt_tokens=len(feed),
                    generation_tokens=n,
                    prompt_tps=len(feed) / prompt_time if prompt_time > 0 else float("inf"),
                    generation_tps=(n - 1) / elapsed if elapsed > 0 else 0.0,
                    peak_memory_gb=_peak_memory_gb(),
                )
                if tracker.finish_reason is not None:
                    return
        finally:
            if keep_state and tracker.finish_reason is None and self._session.history is history:  # (no reset since)
                # Stopped (Ctrl-C, close()) with text not shown: held back for a stop string, or a
                # character's first bytes: the session goes back to the text shown.
                if tracker.buffer:
                    keep_as_shown()
                elif getattr(tracker.detok, "pending", False):
                    self._session = _Session(clean[0], [], history, clean[1], self._session.keys)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        max_tokens: int | Sequence[int] = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | Sequence[int | None] | None = None,
        stop: Stop = None,
        row_stops: Sequence[Stop] | None = None,
    ) -> list[int] | list[list[int]]:
        """Generated ids for one prompt (-> list[int]) or a batch (list of prompts ->
        list[list[int]]; prompts may differ in length).

        Generation of a row ends at an EOS / stop id (not included in the result), at a stop
        string (the ids up to the token that completed it), or after ``max_tokens``. With
        ``temperature=0`` the result is greedy. ``seed``: an int gives row r the seed
        ``seed + r``; a list gives one seed per row (None: a fresh one for that row).

        For a batch, ``max_tokens`` may be a list (one limit per row) and ``row_stops`` a list of
        one ``stop`` per row (each row stops at its own and at ``stop``). Each row is prefilled
        alone and the rows decode together until the last one ends, so a row gets what its
        prompt gets alone with the same settings and seed (a row whose ``max_tokens`` is 0 is
        not run).
        """
        if not isinstance(prompts, (str, Iterable)) and not _is_array(prompts):
            # None or a bare int failed as "'NoneType' object is not iterable"
            raise TypeError(f"prompts must be a prompt (text, a list of token ids or an array) or a list of "
                            f"prompts, got {type(prompts).__name__}")
        single = isinstance(prompts, str) or _is_array(prompts) or (
            isinstance(prompts, Sequence) and len(prompts) > 0 and all(isinstance(i, numbers.Number) for i in prompts)
        )
        rows = [self.encode(prompts)] if single else [self.encode(p) for p in prompts]
        if not rows:
            raise ValueError("no prompts given")
        per_row_limits = not single and not isinstance(max_tokens, (str, bytes)) and (
            isinstance(max_tokens, Iterable) or _is_array(max_tokens))
        limits = self._per_row("max_tokens", max_tokens, len(rows)) if per_row_limits else [max_tokens] * len(rows)
        for limit in limits:
            if isinstance(limit, bool) or not is_integer(limit) or limit < 0:
                raise ValueError(f"max_tokens must be an integer >= 0{' (or a list of one per prompt)' * (not single)}, "
                                 f"got {limit!r}")
        limits = [int(limit) for limit in limits]
        for r, ids in enumerate(rows):
            if not ids:
                raise ValueError(f"prompt {r} is empty")
        params = self._params(temperature, top_k, top_p, min_p, repetition_penalty)
        vocab = getattr(self.config, "vocab_size", None)
        shared_ids, shared_strings = _split_stop(stop, vocab)
        if row_stops is None:
            per_row = [(set(), [])] * len(rows)
        else:
            per_row = [_split_stop(s, vocab) for s in self._per_row("row_stops", row_stops, len(rows))]
        stops = [(shared_ids | ids, shared_strings + [s for s in strings if s not in shared_strings])
                 for ids, strings in per_row]
        if self.tokenizer is None and any(strings for _, strings in stops):
            raise ValueError("stop strings need a tokenizer")
        stops = [self._special_stops(ids, strings) for ids, strings in stops]
        results: list[list[int]] = [[] for _ in rows]
        run = [r for r in range(len(rows)) if limits[r] > 0]  # rows with tokens to generate
        if not run:
            return results[0] if single else results
        if len(run) < len(rows) and seed is not None:  # the rows run keep their seeds
            seeds = ([int(seed) + r for r in range(len(rows))] if is_integer(seed)
                     else self._per_row("seed", seed, len(rows)))
            seed = [seeds[r] for r in run]
        tokens = self._generate_rows([rows[r] for r in run], [limits[r] for r in run], [stops[r] for r in run],
                                     params, seed)
        for r, ids in zip(run, tokens):
            results[r] = ids
        return results[0] if single else results

    @staticmethod
    def _per_row(name: str, values: Any, n: int) -> list[Any]:
        """``values``, a list (or array) of one value per prompt, as a list of ``n``."""
        if isinstance(values, (str, bytes)) or not (isinstance(values, Iterable) or _is_array(values)):
            raise TypeError(f"{name} must be a list of one value per prompt, got {type(values).__name__}")
        values = values.tolist() if _is_array(values) else list(values)
        if len(values) != n:
            raise ValueError(f"got {len(values)} {name} values for {n} prompts")
        return values

    def _generate_rows(self, rows: list[list[int]], limits: list[int], stops: list[tuple[set[int], list[str]]],
                       params: SamplingParams, seed: Any) -> list[list[int]]:
        """Rows (each non-empty, each with a limit > 0) prefilled one by one, decoded together: one
        host read per step, to see which rows have ended; the decode runs until all have."""
        logits_rows, states = [], []
        for ids in rows:
            logits, state = self.prefill(ids)
            logits_rows.append(logits)
            states.append(state)
            if len(rows) > 1:
                mx.eval(logits, state)
        logits = mx.concatenate(logits_rows, axis=0) if len(rows) > 1 else logits_rows[0]
        state = _concat_states(states)
        keys = self._start_keys(seed, len(rows), params)
        seen = seen_from_ids(rows, self.vocab_size) if params.uses_history else mx.zeros((len(rows), 1), mx.bool_)
        eos = self._eos_ids()
        trackers = [_RowTracker(self.tokenizer if strings else None, ids | eos, strings, prompt[-8:])
                    for prompt, (ids, strings) in zip(rows, stops)]
        rows_run = list(range(len(rows)))  # the rows the decode runs (those not ended when it started)
        steps, done = self._decode(logits, state, params, keys, seen, max(limits)), 0
        for decoded in iter(lambda: next(steps, None), None):  # (steps is replaced when rows leave)
            done += 1
            for r, token in zip(rows_run, decoded.host):
                tracker = trackers[r]
                if tracker.finish_reason is None:
                    tracker.add(token)
                    if tracker.finish_reason is None and done == limits[r]:
                        tracker.finish()
            live = [i for i, r in enumerate(rows_run) if trackers[r].finish_reason is None]
            if not live:
                break
            if 2 * len(live) <= len(rows_run):
                # Half the rows have ended: the rest decode without them (the C step's time and a
                # GEMV's rows grow with the batch), from this step's token, state, keys and marks.
                taken = _take_rows((decoded.tok, decoded.state, decoded.keys, decoded.seen), live, len(rows_run))
                if taken is not None:
                    steps.close()
                    rows_run = [rows_run[i] for i in live]
                    tok, state, keys, seen = self._step_fn(params)(*taken)
                    steps = self._decode_from(tok, state, params, keys, seen, max(limits[r] for r in rows_run) - done)
        return [t.tokens for t in trackers]

    def generate_next_token(
        self,
        input_ids: Prompt | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
    ) -> int:
        """Stateful single step: feed ``input_ids`` (after the previously returned token) into
        the session and return the next token, which is fed on the next call."""
        params = self._params(temperature, top_k, top_p, min_p, repetition_penalty)
        session = self._session
        ids = [] if input_ids is None else self.encode(input_ids, add_special_tokens=not session.length)
        feed = session.pending + ids
        if not feed:
            raise ValueError("nothing to feed: give input_ids (the session is empty)")
        history = session.tokens() + ids
        logits, state = self.prefill(feed, session.state)
        keys = self._start_keys(seed, 1, params, session.keys)
        seen = seen_from_ids([history], self.vocab_size) if params.uses_history else None
        tok, keys, _ = self._first_token(logits, params, keys, seen)
        mx.eval(tok, state, keys)
        token = int(tok.item())
        history.append(token)
        self._session = _Session(state, [token], history, len(history), session.keys if params.greedy else keys)
        return token

    def get_model_info(self) -> dict[str, Any]:
        """Architecture, sizes, parameter count, dtype and weight memory of the model."""
        return model_info(self.model)


# ---------------------------------------------------------------------- model description
def _block_list(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        for holder in (getattr(model, "backbone", None), model):
            if holder is not None and isinstance(holder, nn.Module):
                for value in holder.children().values():
                    if isinstance(value, list) and value and all(isinstance(v, nn.Module) for v in value):
                        return list(value)
        return []
    return list(blocks)


def _parameter_rows(model: nn.Module) -> list[tuple[str, int, int, int, str]]:
    """(key, stored elements, represented weights, bytes, dtype) per parameter: a quantized
    matrix represents its unpacked elements, its scales and biases none
    (:func:`~xlstm_metal.quantization.represented_weights`)."""
    from ..quantization import represented_weights

    represented = represented_weights(model)
    return [(key, int(value.size), int(represented[key]), int(value.nbytes), str(value.dtype).replace("mlx.core.", ""))
            for key, value in tree_flatten(model.parameters())]


def _block_type_name(block: nn.Module) -> str:
    """A block's class name; the last block of a pipeline stage (a generated subclass) by its
    own class's."""
    from ..distributed.pipeline import _HandsOff

    kind = type(block)
    if issubclass(kind, _HandsOff):
        kind = next(c for c in kind.__mro__[1:] if c is not _HandsOff and not issubclass(c, _HandsOff))
    return kind.__name__


def _state_bytes(state) -> int:
    return int(sum(a.nbytes for _, a in tree_flatten(state)))


def _all_gather_json(obj: Any, group: mx.distributed.Group) -> list[Any]:
    """Every rank's ``obj`` (JSON), in rank order, on every rank (a collective)."""
    import json

    import numpy as np

    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8).astype(np.int32)
    lengths = mx.distributed.all_gather(mx.array([data.size], dtype=mx.int32), group=group).tolist()
    padded = np.zeros(max(lengths), dtype=np.int32)
    padded[: data.size] = data
    gathered = np.array(mx.distributed.all_gather(mx.array(padded)[None], group=group))
    return [json.loads(bytes(row[:n].astype(np.uint8)).decode()) for row, n in zip(gathered, lengths)]


def _tensor_factors(model: nn.Module, size: int) -> dict[str, float]:
    """Under a tensor-parallel split (:func:`xlstm_metal.distributed.shard_model`): parameter
    key -> (the whole model's elements) / (this rank's) for the split parameters; the others
    are replicated (1). Heads and FFN width split evenly; the vocabulary by rows, the last
    rank's tail being zero padding."""
    from ..distributed.tensor import FFN_UP, PROJECTIONS, VocabShardedEmbedding, VocabShardedLinear

    vocab = {path: m.vocab_size / m.weight.shape[0] for path, m in model.named_modules()
             if isinstance(m, (VocabShardedEmbedding, VocabShardedLinear))}
    factors = {}
    for key, *_ in _parameter_rows(model):
        owner, _, leaf = key.rpartition(".")
        parent, _, name = owner.rpartition(".")
        if owner in vocab:
            factors[key] = vocab[owner]
        elif not owner.startswith("backbone.blocks."):
            continue
        elif (parent.endswith(".mlstm_layer") and name in (*PROJECTIONS, "multihead_norm")) or (
                parent.endswith(".ffn") and name in FFN_UP):
            factors[key] = size  # split by output: every element is one rank's
        elif name in ("out_proj", "proj_down") and leaf != "bias":
            factors[key] = size  # split by input; the bias is added after the all-sum, on every rank
    return factors


def model_sizes(model: nn.Module) -> dict[str, Any]:
    """The model's stored elements (``stored``), represented weights (``parameters``), weight
    bytes (``bytes``), elements per dtype (``dtypes``), state bytes of one row
    (``state_bytes_per_row``, None without ``make_state``) and block class names
    (``block_types``), for the whole model.

    A model split across processes (``model.parallel``, see :mod:`xlstm_metal.distributed`)
    counts every rank's share once and each replicated part once, as the unsplit model does, and
    adds ``rank``: this process's own figures (same keys) and ``parallel``. Under a pipeline
    split every rank must call this at the same point (the ranks exchange their shares)."""
    rows = _parameter_rows(model)
    blocks = _block_list(model)
    state_fn = getattr(model, "make_state", None)
    state = state_fn(1) if callable(state_fn) else None

    def sizes(rows, state_bytes, block_types, factor=lambda key: 1):
        dtypes: Counter = Counter()
        for key, stored, _, _, dtype in rows:
            dtypes[dtype] += round(stored * factor(key))
        return {"stored": sum(round(r[1] * factor(r[0])) for r in rows),
                "parameters": sum(round(r[2] * factor(r[0])) for r in rows),
                "bytes": sum(round(r[3] * factor(r[0])) for r in rows),
                "dtypes": dict(dtypes), "state_bytes_per_row": state_bytes, "block_types": block_types}

    own_types = [_block_type_name(b) for b in blocks]
    own = sizes(rows, None if state is None else _state_bytes(state), own_types)
    split = getattr(model, "parallel", None)
    if not split:
        return own
    if split["mode"] == "tensor":
        factors = _tensor_factors(model, split["size"])
        # Each block's state holds this rank's heads: an even share.
        whole = sizes(rows, None if state is None else own["state_bytes_per_row"] * split["size"], own_types,
                      lambda key: factors.get(key, 1))
    else:
        from ..distributed import world
        from ..distributed.pipeline import PipelineGap

        held = [i for i, b in enumerate(blocks) if not isinstance(b, PipelineGap)]
        prefix = next(f"{name}.blocks." for name in ("backbone", "xlstm_block_stack") if name in model)
        in_blocks = [r for r in rows if r[0].startswith(prefix)]
        share = sizes(in_blocks, None if state is None else sum(_state_bytes(state[i]) for i in held),
                      {str(i): own_types[i] for i in held})
        if state is not None:  # the gaps' placeholder states are not this rank's
            own["state_bytes_per_row"] = share["state_bytes_per_row"]
        shares = _all_gather_json(share, world())
        whole = sizes([r for r in rows if not r[0].startswith(prefix)], None, None)
        for part in shares:
            for key in ("stored", "parameters", "bytes"):
                whole[key] += part[key]
            for dtype, n in part["dtypes"].items():
                whole["dtypes"][dtype] = whole["dtypes"].get(dtype, 0) + n
        if state is not None:
            whole["state_bytes_per_row"] = sum(part["state_bytes_per_row"] for part in shares)
        types = {int(i): name for part in shares for i, name in part["block_types"].items()}
        whole["block_types"] = [types[i] for i in range(len(blocks))]
    return {**whole, "rank": own, "parallel": dict(split)}


def model_info(model: nn.Module) -> dict[str, Any]:
    """Generic description of a model that follows the package contract. A model split across
    processes is described whole (every rank's share counted once), with ``parallel`` and this
    rank's share (``this_rank_*``) after it; see :func:`model_sizes`."""
    sizes = model_sizes(model)
    config = getattr(model, "config", None)
    info: dict[str, Any] = {"architecture": type(model).__name__, "num_blocks": len(sizes["block_types"])}
    kinds = Counter(sizes["block_types"])
    info["block_types"] = dict(kinds)
    for name in ("embedding_dim", "num_heads", "qk_head_dim", "v_head_dim", "ffn_dim", "vocab_size",
                 "chunk_size", "inference_state_dtype"):
        value = getattr(config, name, None)
        if value is not None:
            info[name] = value
    if "num_heads" not in info:
        # 2024 xLSTM configs nest the heads per block kind (mlstm_block.mlstm.num_heads ...).
        for kind in ("mlstm", "slstm"):
            layer = getattr(getattr(config, f"{kind}_block", None), kind, None)
            if getattr(layer, "num_heads", None) is not None and any(kind in k.lower() for k in kinds):
                info[f"{kind}_num_heads"] = layer.num_heads
    if getattr(config, "slstm_at", None) is not None:
        info["slstm_at"] = list(config.slstm_at)
    from ..quantization import describe, describe_layers, quantization_config

    quantization = quantization_config(model)
    info["parameters"] = sizes["parameters"] if quantization is not None else sizes["stored"]
    dtypes = Counter(sizes["dtypes"])
    # packed quantized weights and a float format's scales: described by "quantization"
    dtypes.pop("uint32", None)
    dtypes.pop("uint8", None)
    info["dtype"] = dtypes.most_common(1)[0][0] if dtypes else "n/a"
    if quantization is not None:
        layers = describe_layers(quantization)
        info["quantization"] = (f"{describe(quantization)}, "
                                f"{8.0 * sizes['bytes'] / max(sizes['parameters'], 1):.2f} bits per weight (as loaded)"
                                + (f"; {layers}" if layers else ""))
    info["weights_bytes"] = sizes["bytes"]
    if sizes["state_bytes_per_row"] is not None:
        info["state_bytes_per_row"] = sizes["state_bytes_per_row"]
    split = sizes.get("parallel")
    if split:
        own = sizes["rank"]
        if split["mode"] == "pipeline":
            first, end = split["blocks"]
            what = f"block {first}" if end - first == 1 else f"blocks {first}-{end - 1}"
        else:
            what = f"1/{split['size']} of the heads, FFN width and vocabulary"
        info["parallel"] = f"{split['mode']}, {split['size']} processes"
        info["this_rank"] = f"{split['rank']} of {split['size']}: {what}"
        info["this_rank_parameters"] = own["parameters"] if quantization is not None else own["stored"]
        info["this_rank_weights_bytes"] = own["bytes"]
        if own["state_bytes_per_row"] is not None:
            info["this_rank_state_bytes_per_row"] = own["state_bytes_per_row"]
    return info


def format_model_info(info: dict[str, Any]) -> str:
    """:func:`model_info` as aligned text."""

    def fmt(key: str, value: Any) -> str:
        if key.endswith("_bytes") or key.endswith("_bytes_per_row"):
            return f"{value / 2**20:,.2f} MiB"
        if key.endswith("parameters"):
            return f"{value:,} ({value / 1e6:,.2f} M)"
        if isinstance(value, dict):
            return ", ".join(f"{n} x {k}" for k, n in value.items())
        return str(value)

    width = max(len(k) for k in info)
    return "\n".join(f"{k:<{width}}  {fmt(k, v)}" for k, v in info.items())


def wiring_text(model: nn.Module) -> str:
    """The model's blocks and each block's cells, as text. Uses ``model.wiring()`` /
    ``model.describe()`` when the model provides one, else walks the module tree (identical
    consecutive blocks are shown once with their index range)."""
    for name in ("wiring", "describe"):
        fn = getattr(model, name, None)
        if callable(fn):
            text = fn()
            if isinstance(text, str) and text:
                return text
    lines = [type(model).__name__]
    _walk(model, "", lines, "  ")
    return "\n".join(lines)


def _signature(module: nn.Module) -> str:
    parts = []
    for name, child in module.children().items():
        if isinstance(child, nn.Module):
            parts.append(f"{name}:{type(child).__name__}({_signature(child)})")
        elif isinstance(child, (list, tuple)):
            parts.append(f"{name}:[{','.join(_signature(c) if isinstance(c, nn.Module) else '?' for c in child)}]")
    return ";".join(parts)


def _describe_leaf(module: nn.Module) -> str:
    shapes = [f"{k}{tuple(v.shape)}" for k, v in module.items() if isinstance(v, mx.array)]
    return f"{type(module).__name__}" + (f" [{', '.join(shapes)}]" if shapes else "")


def _walk(module: nn.Module, prefix: str, lines: list[str], indent: str) -> None:
    for name, child in module.children().items():
        if isinstance(child, nn.Module):
            lines.append(f"{indent}{prefix}{name}: {_describe_leaf(child)}")
            _walk(child, "", lines, indent + "  ")
        elif isinstance(child, (list, tuple)):
            mods = [c for c in child if isinstance(c, nn.Module)]
            # Group consecutive identical blocks: a 32-block model prints one block.
            groups: list[tuple[int, int, nn.Module]] = []
            for i, m in enumerate(mods):
                if groups and type(m) is type(groups[-1][2]) and _signature(m) == _signature(groups[-1][2]):
                    groups[-1] = (groups[-1][0], i, groups[-1][2])
                else:
                    groups.append((i, i, m))
            for first, last, m in groups:
                label = f"{name}.{first}" if first == last else f"{name}.{first}-{last}"
                lines.append(f"{indent}{label}: {_describe_leaf(m)}")
                _walk(m, "", lines, indent + "  ")
