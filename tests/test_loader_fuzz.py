"""Property-based fuzzing of the loader (Hypothesis): config.json, the safetensors header and
data, a sharded checkpoint's index and tokenizer.json are corrupted in random ways. Every case
must end in the loader's own error (exit 2 and a one-line message from `xlstm-metal generate`)
or, where the damage left a valid checkpoint, in a normal run: never a traceback, never a hang.

Bounded: a fixed number of examples per file, derandomized (the same cases on every run), and
an alarm that fails any case running past HANG_S seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct

import pytest

hypothesis = pytest.importorskip("hypothesis")
from conftest import tiny_model  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_tokenizer import train_tiny_tokenizer  # noqa: E402

from xlstm_metal.cli import main  # noqa: E402
from xlstm_metal.loading import save_model  # noqa: E402

HANG_S = 60
# XLSTM_METAL_FUZZ_EXAMPLES=500 explores further (still derandomized unless XLSTM_METAL_FUZZ_SEED).
FUZZ = settings(max_examples=int(os.environ.get("XLSTM_METAL_FUZZ_EXAMPLES", 10)),
                derandomize="XLSTM_METAL_FUZZ_SEED" not in os.environ, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A single-file and a sharded checkpoint of a tiny model, each with tokenizer.json."""
    root = tmp_path_factory.mktemp("fuzz")
    tokenizer = train_tiny_tokenizer()
    model = tiny_model(3, vocab_size=tokenizer.get_vocab_size())
    for name, shard_bytes in (("single", 2**31), ("sharded", 60_000)):
        save_model(model, root / name, max_shard_bytes=shard_bytes)
        tokenizer.save(str(root / name / "tokenizer.json"))
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    return root


@pytest.fixture
def work(pristine, tmp_path):
    """A fresh copy of both checkpoints for one example."""
    def fresh(name: str):
        target = tmp_path / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(pristine / name, target)
        return target

    return fresh


@contextlib.contextmanager
def alarm(seconds: int):
    def hung(signum, frame):
        raise TimeoutError(f"loader case ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_generate(checkpoint, capsys, must_fail: bool = False) -> None:
    """The property: exit 0 (the damage was harmless) or exit 2 with the loader's one-line
    message; any other exception escapes main() and fails the example."""
    with alarm(HANG_S):
        code = main(["generate", "-m", str(checkpoint), "-p", "the quick", "-n", "2", "--temp", "0"])
    out, err = capsys.readouterr()
    hypothesis.event(f"exit {code}")
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.startswith("xlstm-metal: error: ") and "Traceback" not in err, err
    assert not (must_fail and code == 0), "a broken file was accepted"


# ------------------------------------------------------------------------------ byte-level damage
DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 0.99)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 0.999), st.integers(1, 255)), min_size=1, max_size=6)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("replace"), st.binary(max_size=64)),
)


def damage_bytes(data: bytes, how) -> bytes:
    kind, arg = how
    if kind == "truncate":
        return data[: int(len(data) * arg)]
    if kind == "append":
        return data + arg
    if kind == "replace":
        return arg
    buf = bytearray(data)
    for where, xor in arg:
        buf[int(where * len(buf))] ^= xor
    return bytes(buf)


def must_fail_bytes(how) -> bool:
    """Damage no file survives: cutting it short or replacing it with other bytes."""
    return how[0] in ("truncate", "replace")


# ------------------------------------------------------------------------------ structured damage
def mutate_tree(node, edits):
    """Apply (path-choice, action, value) edits to a JSON tree; returns the new tree."""
    for choice, action, value in edits:
        parent, key = None, None
        cursor = node
        for step in choice:  # walk down a few levels, picking children by index
            if isinstance(cursor, dict) and cursor:
                key = sorted(cursor, key=str)[step % len(cursor)]
            elif isinstance(cursor, list) and cursor:
                key = step % len(cursor)
            else:
                break
            parent, cursor = cursor, cursor[key]
        if parent is None:
            node = value if action == "set" else node
        elif action == "delete":
            del parent[key]
        elif action == "set":
            parent[key] = value
        elif action == "add" and isinstance(parent, dict):
            parent[f"{key}_x"] = value
    return node


EDITS = st.lists(st.tuples(st.lists(st.integers(0, 50), min_size=1, max_size=4),
                           st.sampled_from(["set", "delete", "add"]), JSON), min_size=1, max_size=3)


JSON_FILES = [("single", "config.json"), ("sharded", "model.safetensors.index.json"), ("single", "tokenizer.json")]


@pytest.mark.parametrize("kind, name", JSON_FILES)
@FUZZ
@given(edits=EDITS)
def test_json_file_values(work, capsys, kind, name, edits):
    """Values set, deleted and added anywhere in config.json, the shard index, tokenizer.json."""
    checkpoint = work(kind)
    path = checkpoint / name
    path.write_text(json.dumps(mutate_tree(json.loads(path.read_text()), edits)))
    run_generate(checkpoint, capsys)


@pytest.mark.parametrize("kind, name", [*JSON_FILES, ("sharded", "model-00001-of-*.safetensors")])
@FUZZ
@given(how=DAMAGE)
def test_file_bytes(work, capsys, kind, name, how):
    """Any file cut short, overwritten, extended or with flipped bytes."""
    checkpoint = work(kind)
    (path,) = checkpoint.glob(name)
    path.write_bytes(damage_bytes(path.read_bytes(), how))
    run_generate(checkpoint, capsys, must_fail=must_fail_bytes(how))


def split_safetensors(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


@FUZZ
@given(edits=EDITS)
def test_safetensors_header_fields(work, capsys, edits):
    """dtype, shape, data_offsets and the tensor entries themselves edited in the header."""
    checkpoint = work("single")
    path = checkpoint / "model.safetensors"
    header, body = split_safetensors(path.read_bytes())
    text = json.dumps(mutate_tree(header, edits)).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    run_generate(checkpoint, capsys)


@FUZZ
@given(how=DAMAGE, in_header=st.booleans())
def test_safetensors_bytes(work, capsys, how, in_header):
    """Bytes of the header (its length field included) or of the whole file damaged."""
    checkpoint = work("single")
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    n = 8 + struct.unpack("<Q", data[:8])[0]
    head, body = (data[:n], data[n:]) if in_header else (data, b"")
    path.write_bytes(damage_bytes(head, how) + body)
    # Flipped data bytes may still be finite weights: a valid (if different) checkpoint.
    run_generate(checkpoint, capsys, must_fail=must_fail_bytes(how))
