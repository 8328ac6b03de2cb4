"""Training data: text sources -> tokens -> packed [B, S+1] windows, with a held-out split.

Sources are text files, directories (walked recursively, hidden entries skipped) and JSON
Lines files (``*.jsonl``, ``*.ndjson``, any case; :func:`given_jsonl`) whose records hold the text under a field (``text`` by default).
Documents are tokenized, wrapped as ``[BOS] doc [EOS]`` and concatenated in a seeded shuffled
order; the last ``val_fraction`` of that token stream is the validation split (so validation
is made of documents the model never trains on, bar the one document cut at the boundary).

Training windows are non-overlapping slices of ``seq_len + 1`` tokens (inputs = first S,
targets = last S). Each epoch starts the slicing at a seeded random offset and visits the
windows in a seeded random order, so the data position is just (epoch, batch index): a run
resumed from a checkpoint sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..jsonfiles import check_unicode

#: Special tokens of tokenizers trained here; their ids (0, 1, 2) match xLSTMConfig's defaults.
BOS_TOKEN, PAD_TOKEN, EOS_TOKEN = "<|bos|>", "<|pad|>", "<|eos|>"
SPECIAL_TOKENS = (BOS_TOKEN, PAD_TOKEN, EOS_TOKEN)
#: Smallest vocabulary of a byte-level BPE trained here: the 256 bytes and the special tokens.
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)


class DataError(ValueError):
    """Training data that cannot be used; the message names the file or the setting."""


# ------------------------------------------------------------------------------ reading text
@dataclass(frozen=True)
class Document:
    source: str  # file path, or "path:line" for a JSON Lines record
    text: str


def _read_unicode(path: Path) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped), newlines as they are.
    DataError for a file that cannot be read (a broken link, no permission, ...), one holding NUL
    bytes anywhere (binary: the check looked at the first 8 KiB only, and a NUL further on was
    trained on), or one that is not UTF-8 (naming the byte in the file: with a BOM it was 3 short)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise DataError(f"cannot read data file {path}: {err.strerror or err}") from None
    if b"\x00" in raw:
        raise DataError(f"{path} looks binary (it contains NUL bytes); give text, JSON Lines or a directory of them")
    skip = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # a byte-order mark is no text (Windows tools write one)
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start + skip}); binary file?") from None


def _read_text(path: Path) -> str:
    # Newlines as Python's text mode reads them: "\r\n" and "\r" become "\n".
    return _read_unicode(path).replace("\r\n", "\n").replace("\r", "\n")


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    # Records end at "\n" only: splitlines() also splits at U+2028, U+2029 and U+0085, which JSON
    # strings may hold unescaped, and text mode at a lone "\r", which is JSON whitespace ("\r\n"
    # line ends leave a "\r" that json.loads skips).
    lines = _read_unicode(path).split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{number}: record has no {text_field!r} field (has {keys}); set --text-field")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{number}: field {text_field!r} is {type(text).__name__}, not a string")
        check_unicode(text, f"{path}:{number}: field {text_field!r}", DataError)
        yield Document(f"{path}:{number}", text)


def _files_under(directory: Path, strict: bool = True) -> list[Path]:
    """The files in ``directory`` and its subdirectories (hidden entries skipped), sorted by name.
    Links to directories are followed (their files were skipped without a word, while links to
    files were read), bar one to a directory being walked (a cycle: its files are read there).
    ``strict``: DataError for a directory that cannot be listed (it was skipped without a word), a
    broken link (a FileNotFoundError traceback) and an entry that is no file (a FIFO: reading it
    waited forever); otherwise (:func:`holds_jsonl`) those are left out / listed as they are."""
    files: list[Path] = []

    def walk(folder: Path, chain: frozenset) -> None:
        try:
            names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
        except OSError as err:
            if strict:
                raise DataError(f"cannot list data directory {folder}: {err.strerror or err}") from None
            return
        for name in names:
            path = folder / name
            if path.is_dir():
                real = path.resolve()
                if real not in chain:
                    walk(path, chain | {real})
            elif path.is_file() or not strict:
                files.append(path)
            elif path.is_symlink():
                raise DataError(f"{path} in data directory {directory} is a broken link (to {os.readlink(path)})")
            else:
                raise DataError(f"{path} in data directory {directory} is not a regular file (a FIFO, socket or "
                                "device?); give text or JSON Lines files")

    walk(directory, frozenset({directory.resolve()}))
    return files


#: Suffixes of JSON Lines files (any case): read record by record, the text under a field.
JSONL_SUFFIXES = (".jsonl", ".ndjson")


def is_jsonl(path: Path) -> bool:
    """Whether ``path`` names a JSON Lines file (:data:`JSONL_SUFFIXES`, any case: data.JSONL too;
    read as plain text, its records' JSON syntax would be trained on)."""
    return path.suffix.lower() in JSONL_SUFFIXES


def given_jsonl(path: Path) -> bool:
    """A .json file given as data whose first line is a JSON object: JSON Lines (datasets' to_json)."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        with open(path, "rb") as fh:
            return isinstance(json.loads(fh.readline(1 << 20)), dict)
    except (OSError, ValueError):
        return False


def holds_jsonl(paths: Iterable[str | os.PathLike]) -> bool:
    """Whether any of ``paths`` is, or (a directory) holds, a JSON Lines file (:func:`is_jsonl`): the only files
    whose records a text field is read from. Missing paths count as not holding one."""
    for raw in paths:
        path = Path(raw).expanduser()
        files = _files_under(path, strict=False) if path.is_dir() else [path]
        if any(is_jsonl(file) for file in files) or given_jsonl(path):
            return True
    return False


def data_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The files ``paths`` name (directories walked recursively), in a stable order. DataError
    for a missing path, an empty directory, or a file reached twice (given twice, or given and
    inside a given directory, after resolving links): its documents would be read twice, and
    the copies could land in both the training and the validation split."""
    files: list[Path] = []
    seen: dict[Path, str] = {}  # resolved file -> how it was reached first
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = _files_under(path)
            if not found:
                raise DataError(f"directory {path} holds no files")
        elif path.is_file():
            found = [path]
        elif path.exists():
            raise DataError(f"data path {path} is not a regular file or directory (a FIFO, socket or device?); "
                            "give text or JSON Lines files, or directories of them")
        else:
            raise DataError(f"data path not found: {path}")
        for file in found:
            how = str(file) if file == path else f"{file} in directory {path}"
            key = file.resolve()
            if key in seen:
                raise DataError(f"data file {key} is given twice ({seen[key]}, then {how}): its documents would be "
                                "read twice, and copies could land in both the training and the validation split; "
                                "give it once")
            seen[key] = how
            files.append(file)
    return files


def iter_documents(paths: Iterable[str | os.PathLike], text_field: str = "text") -> Iterator[Document]:
    """Documents of text files, JSON Lines files (:func:`is_jsonl`) and directories of them, in a stable order.

    Raises DataError for a missing path, an empty directory, a file given twice (:func:`data_files`),
    a binary or non-UTF-8 file, or a JSON Lines record without the text field.
    """
    paths = list(paths)
    given = {Path(p).expanduser() for p in paths}
    for file in data_files(paths):
        if is_jsonl(file) or (file in given and given_jsonl(file)):
            yield from _read_jsonl(file, text_field)
        else:
            yield Document(str(file), _read_text(file))


def load_documents(paths: Iterable[str | os.PathLike], text_field: str = "text") -> list[Document]:
    """All non-blank documents of ``paths`` (see :func:`iter_documents`); DataError if none."""
    paths = list(paths)
    if not paths:
        raise DataError("no training data given")
    docs = [d for d in iter_documents(paths, text_field) if d.text.strip()]
    if not docs:
        raise DataError(f"no text found in {', '.join(map(str, paths))} (every file and record is empty or blank)")
    return docs


# ------------------------------------------------------------------------------ tokenizers
def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = True):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``.

    Ids 0, 1, 2 are ``<|bos|>``, ``<|pad|>``, ``<|eos|>``. Byte-level: any text encodes, and
    decoding restores it exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise DataError(f"tokenizer vocab size must be >= {MIN_BPE_VOCAB} (256 bytes + specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_config_dict(tokenizer, model_max_length: int = 1_000_000) -> dict:
    """tokenizer_config.json contents for a tokenizer trained by :func:`train_bpe_tokenizer`."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_tokenizer(tokenizer, directory: str | os.PathLike, config: dict | None = None) -> None:
    """Write tokenizer.json (+ tokenizer_config.json when ``config`` is given) atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "tokenizer.json", tokenizer.to_str())
    if config is not None:
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2))


def load_tokenizer_file(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json file or a directory holding one."""
    from tokenizers import Tokenizer

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # plain Exceptions from tokenizers, and its Rust panics (BaseException)
        raise DataError(f"cannot read tokenizer {path}: {err}") from None


# ------------------------------------------------------------------------------ token streams
def tokenize_documents(
    tokenizer, docs: list[Document], bos_id: int | None, eos_id: int | None, batch: int = 256
) -> list[np.ndarray]:
    """Token ids of each document as int32 arrays, ``[bos] ids [eos]`` (either may be None)."""
    out = []
    for start in range(0, len(docs), batch):
        encodings = tokenizer.encode_batch([d.text for d in docs[start : start + batch]], add_special_tokens=False)
        for enc in encodings:
            ids = enc.ids
            if bos_id is not None:
                ids = [bos_id] + ids
            if eos_id is not None:
                ids = ids + [eos_id]
            out.append(np.asarray(ids, dtype=np.int32))
    return out


def split_stream(
    doc_tokens: list[np.ndarray], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) token streams: documents shuffled (seeded), the last
    ``val_fraction`` of the concatenated tokens held out."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"validation fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(doc_tokens))
    stream = np.concatenate([doc_tokens[i] for i in order]) if doc_tokens else np.zeros(0, np.int32)
    n_val = int(round(len(stream) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(stream):
        # A fraction of a small stream that rounds to no token held out nothing: the run trained
        # without validation, said to be --val-fraction 0's. One token is too few for a window,
        # which validation_windows refuses, naming the split's size.
        n_val = 1
    return stream[: len(stream) - n_val], stream[len(stream) - n_val :]


@dataclass
class DataPosition:
    """Where the training batches are: the next batch is ``batch`` of ``epoch``."""

    epoch: int = 0
    batch: int = 0


class PackedBatches:
    """Batches of packed windows over one token stream.

    ``next()`` -> (inputs [B, S] int32, targets [B, S] int32) as numpy arrays; ``position``
    says which batch comes next and can be set to resume.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int, name: str = "training"):
        if seq_len < 2:
            raise DataError(f"sequence length must be >= 2, got {seq_len}")
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        self.stream = np.ascontiguousarray(stream, dtype=np.int32)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        # The worst-case offset (seq_len - 1) must still leave one full batch.
        usable = len(self.stream) - 1 - (seq_len - 1)
        if usable // seq_len < batch_size:
            raise DataError(
                f"{name} split has {len(self.stream)} tokens: too few for one batch of {batch_size} x "
                f"{seq_len + 1} tokens; give more data, or lower --batch-size / --seq-len"
            )
        self.position = DataPosition()
        self._epoch_cache: tuple[int, int, np.ndarray] | None = None

    def _epoch_plan(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self.seq_len))
            n_windows = (len(self.stream) - 1 - offset) // self.seq_len
            self._epoch_cache = (epoch, offset, rng.permutation(n_windows))
        return self._epoch_cache[1], self._epoch_cache[2]

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        _, order = self._epoch_plan(self.position.epoch if epoch is None else epoch)
        return len(order) // self.batch_size

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        pos = self.position
        if pos.batch >= self.batches_per_epoch(pos.epoch):
            pos.epoch, pos.batch = pos.epoch + 1, 0
        offset, order = self._epoch_plan(pos.epoch)
        starts = offset + order[pos.batch * self.batch_size : (pos.batch + 1) * self.batch_size] * self.seq_len
        windows = self.stream[starts[:, None] + np.arange(self.seq_len + 1)[None, :]]
        pos.batch += 1
        return windows[:, :-1], windows[:, 1:]


def validation_windows(stream: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping [N, seq_len + 1] windows of the validation stream."""
    if seq_len < 2:
        raise DataError(f"sequence length must be >= 2, got {seq_len}")
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise DataError(
            f"validation split has {len(stream)} tokens: too few for one window of {seq_len + 1}; "
            "raise --val-fraction, give more data, or lower --seq-len"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    starts = np.arange(n) * seq_len
    return stream[starts[:, None] + np.arange(seq_len + 1)[None, :]]
