"""Tokenizer of a checkpoint directory: encode / decode / streaming detokenization.

Wraps a ``tokenizers.Tokenizer`` read from ``tokenizer.json`` and adds what generation needs
from the checkpoint's other files: the BOS id and whether to insert it
(``force_bos_token_insert`` in config.json, else ``add_bos_token`` in tokenizer_config.json),
and the EOS / stop ids (generation_config.json, config.json, tokenizer_config.json, in that
order of precedence).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from ..checks import bad_token_ids, is_integer
from ..pathnames import file_present
from ..jsonfiles import read_json_object

TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be read; the message names the file."""


def _present(path: Path) -> bool:
    """Whether the checkpoint holds the file ``path`` (False: nothing by that name); TokenizerError
    for a directory or a broken symlink there (:func:`pathnames.file_present`)."""
    return file_present(path, TokenizerError)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, TokenizerError) if _present(path) else {}


def _as_id_list(value: Any, where: str = "token id") -> list[int] | None:
    """config values like 2, [2, 3] or None -> list of ints (None when absent). ``where`` names
    the field and its file in the error ("eos_token_id in DIR/generation_config.json")."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TokenizerError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise TokenizerError(f"{where} must be an integer or a list of integers, got {value!r}")


def _token_ids(ids: Any) -> list[int]:
    # "12" decoded as ids 1, 2, 4.7 as 4, -1 failed as OverflowError (ids past the tokenizer: a padded vocab)
    if hasattr(ids, "tolist"):  # NumPy / MLX arrays
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"token ids must be a sequence of integers, got {type(ids).__name__}")
    ids = list(ids)
    bad = bad_token_ids(ids)
    if bad:
        raise ValueError(f"token ids must be integers >= 0, got {bad[0]!r}")
    return [int(i) for i in ids]


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> token ids for one checkpoint.

    Attributes:
        bos_token_id: id inserted at the start of a prompt when ``add_bos`` (or None).
        eos_token_ids: ids that end generation.
        pad_token_id: padding id (or None); generation does not need it.
        add_bos: whether :meth:`encode` prepends ``bos_token_id`` by default.
    """

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        pad_token_id: int | None = None,
        add_bos: bool = False,
    ):
        self._tok = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids: list[int] = list(dict.fromkeys(int(i) for i in eos_token_ids))
        self.pad_token_id = pad_token_id
        if add_bos and bos_token_id is None:
            raise TokenizerError("BOS insertion is requested but no bos_token_id is configured")
        self.add_bos = bool(add_bos)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read ``tokenizer.json`` plus config.json / generation_config.json /
        tokenizer_config.json (each optional) from a checkpoint directory."""
        directory = Path(path)
        tok_path = directory / TOKENIZER_FILE
        if not _present(tok_path):
            raise TokenizerError(f"no {TOKENIZER_FILE} in {directory}")
        try:
            hf = _HFTokenizer.from_file(str(tok_path))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # plain Exceptions from the Rust side, and its panics (BaseException)
            raise TokenizerError(f"cannot read {tok_path}: {err}") from None
        config = _read_json(directory / "config.json")
        gen_config = _read_json(directory / "generation_config.json")
        tok_config = _read_json(directory / "tokenizer_config.json")

        sources = ((gen_config, directory / "generation_config.json"), (config, directory / "config.json"))

        def special_id(field: str) -> int | None:
            for source, file in sources:
                if source.get(field) is not None:
                    ids = _as_id_list(source[field], f"{field} in {file}")
                    return ids[0] if ids else None
            content = _token_content(tok_config.get(field.replace("_id", "")))
            return hf.token_to_id(content) if content is not None else None

        bos = special_id("bos_token_id")
        pad = special_id("pad_token_id")
        eos: list[int] = []
        for source, file in sources:
            ids = _as_id_list(source.get("eos_token_id"), f"eos_token_id in {file}")
            if ids is not None:
                eos = ids
                break
        else:
            content = _token_content(tok_config.get("eos_token"))
            if content is not None and hf.token_to_id(content) is not None:
                eos = [hf.token_to_id(content)]
        name, source = (("force_bos_token_insert", config) if "force_bos_token_insert" in config
                        else ("add_bos_token", tok_config))
        add_bos = source.get(name, False)
        if not isinstance(add_bos, bool) and add_bos is not None:  # "false" would read as true
            file = "config.json" if source is config else "tokenizer_config.json"
            raise TokenizerError(f"{name} in {directory / file} must be true or false, got {add_bos!r}")
        add_bos = bool(add_bos)
        vocab = hf.get_vocab_size(with_added_tokens=True)
        for name, ids in (("bos_token_id", [bos] if bos is not None else []), ("eos_token_id", eos)):
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise TokenizerError(f"{name} {bad} is outside the tokenizer's vocabulary of {vocab} in {directory}")
        return cls(hf, bos_token_id=bos, eos_token_ids=eos, pad_token_id=pad, add_bos=add_bos and bos is not None)

    # ------------------------------------------------------------------ basics
    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. With ``add_special_tokens`` the tokenizer's own template runs
        and, when ``add_bos``, BOS is prepended (never twice). Use ``False`` for text that
        continues an earlier prompt (chat turns after the first)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:  # lone surrogates (undecodable bytes Python kept from argv / stdin) are not text
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"text is not valid Unicode: {err.reason} at character {err.start}") from None
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(_token_ids(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def detokenizer(self, skip_special_tokens: bool = True, context: Sequence[int] = ()) -> "StreamingDetokenizer":
        """A fresh :class:`StreamingDetokenizer`; ``context`` = ids already shown to the user
        (so a continuation's first word gets its leading space right)."""
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens, context=context)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
                f"eos_token_ids={self.eos_token_ids}, add_bos={self.add_bos})")


class StreamingDetokenizer:
    """Turns generated ids into text pieces as they arrive, never emitting a broken UTF-8
    sequence (a multi-byte character split across tokens is held back until complete).

    ``add(id) -> str`` returns the new text (possibly ""); ``finalize() -> str`` returns what
    is still held back. The concatenation of all pieces equals ``decode(ids)``, but where the
    decoder rewrites text already returned: ByteFallback reads a run of byte tokens that is no
    UTF-8 as a U+FFFD a byte, so "X" (<0x58>, returned) then <0xF0> and "y" decode as
    "\ufffd\ufffdy". Text returned stays; the pieces go on with the decode's characters past
    it ("X\ufffdy": as long as the decode), and decoding continues after those ids (DecodeStream
    failed on them, "Invalid prefix", and on every later id).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, context: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = _token_ids(context)
        for _ in range(3):  # ends inside a character (at most 3 of its bytes): the stream re-emitted all the context
            if context and tokenizer.decode(context, skip_special_tokens).endswith("\ufffd"):
                context = context[:-1]
        # DecodeStream (tokenizers >= 0.21) does the incremental work in Rust; the context ids
        # only prime it and are never emitted.
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens) if context \
            else DecodeStream(skip_special_tokens=skip_special_tokens)
        self._context = context
        self.ids: list[int] = []
        self._pieces: list[str] = []
        self.pending = False  # the last id returned nothing: a character's first bytes (or a skipped special id)

    @property
    def text(self) -> str:
        """All text returned so far."""
        return "".join(self._pieces)

    def add(self, token_id: int) -> str:
        if not is_integer(token_id) or token_id < 0:  # as _token_ids, without a list per token
            raise ValueError(f"token ids must be integers >= 0, got {token_id!r}")
        token_id = int(token_id)
        self.ids.append(token_id)
        try:
            piece = self._stream.step(self._tokenizer.backend, int(token_id))
        except Exception as err:  # tokenizers raises a bare Exception
            if not str(err).startswith("Invalid prefix"):
                raise
            # The decoder rewrote text already returned (see the class): go on past it.
            self._stream = DecodeStream(ids=self._context + self.ids, skip_special_tokens=self._skip)
            return self.finalize()
        self.pending = piece is None
        if piece is None:
            return ""
        self._pieces.append(piece)
        return piece

    def finalize(self) -> str:
        """Text not yet returned (e.g. trailing bytes that never formed a valid character,
        shown as U+FFFD); after this, ``self.text`` is the decode of all ids (as long as it,
        where the decoder rewrote text already returned)."""
        rest = self._full_text()[len(self.text):]
        if rest:
            self._pieces.append(rest)
        return rest

    def _full_text(self) -> str:
        if not self._context:
            return self._tokenizer.decode(self.ids, skip_special_tokens=self._skip)
        # Same priming as the stream: text of context+ids minus text of context.
        both = self._tokenizer.decode(self._context + self.ids, skip_special_tokens=self._skip)
        prefix = self._tokenizer.decode(self._context, skip_special_tokens=self._skip)
        return both[len(prefix):] if both.startswith(prefix) else self._tokenizer.decode(self.ids, self._skip)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer of a checkpoint directory, or None when it has no tokenizer.json."""
    directory = Path(path)
    if not _present(directory / TOKENIZER_FILE):
        return None
    return Tokenizer.from_dir(directory)
