"""`xlstm-metal convert`: dtype and quantized round trips, the 2024 xLSTM, --check figures, bad
input (exit 2, nothing written)."""

import json
import math
import shutil

import io
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import tiny_model
from mlx.utils import tree_flatten
from test_tokenizer import train_tiny_tokenizer
from test_training import V, fresh_model, pattern_stream, small_cfg

import xlstm_metal
from xlstm_metal.assets import DEFAULT_MODEL_DIR
from xlstm_metal.cli import main
from xlstm_metal.generation import load_tokenizer, xLSTMRunner
from xlstm_metal.loading import load_model, save_model
from xlstm_metal.quantization import dequantize_model, fidelity, quantization_config, quantize_model
from xlstm_metal.training.trainer import Trainer

IDS = mx.array([[0, 5, 17, 33, 2, 90, 41, 8, 64, 3, 77, 12]])

# Written for this test (not from the packaged model's training corpus): held-out prose in the
# style of the Python documentation the model was trained on.
HELD_OUT = """\
The pathlib module offers classes representing filesystem paths with semantics appropriate for
different operating systems. A path object can be created from a string, joined with other parts
using the slash operator, and queried for its name, suffix and parent directory. Reading the
contents of a file is as simple as calling the read_text method, which opens the file, returns its
contents as a string and closes it again. When a program needs to write data, it should open the
file in a with statement, so that the file is closed even if an exception is raised inside the
block. The open function returns a file object whose methods depend on the mode: in text mode, the
write method accepts strings and encodes them with the given encoding, while in binary mode it
accepts bytes-like objects. If the file does not exist, opening it for reading raises
FileNotFoundError; a program that expects this case can catch the exception and create a default
configuration instead. The json module converts between Python objects and their JSON text form:
dumps returns a string, and loads parses one back into dictionaries, lists, strings and numbers.
Django uses settings modules to configure a project; each setting is a module-level constant, and
the framework reads them once at start-up. A view function takes a request object and returns a
response, and the URL configuration maps each path to the view that handles it. Templates separate
the presentation from the logic: the template language offers variables, filters and tags, and a
context dictionary supplies the values a template displays.
"""


@pytest.fixture(scope="module")
def tok_ckpt(tmp_path_factory):
    """A tiny xLSTM-Large checkpoint with a tokenizer and generation config (float32)."""
    path = tmp_path_factory.mktemp("src")
    hf = train_tiny_tokenizer()
    save_model(tiny_model(3, vocab_size=hf.get_vocab_size(), tie_word_embeddings=False), path)
    hf.save(str(path / "tokenizer.json"))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.0}))
    return path


def convert(*argv):
    return main(["convert", *map(str, argv)])


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_float_dtype_round_trip(tok_ckpt, tmp_path, dtype, capsys):
    assert convert(tok_ckpt, tmp_path / "out", "--dtype", dtype) == 0
    printed = capsys.readouterr().out
    bits = 32 if dtype == "float32" else 16
    # The source's bits are those it stores (float32), not those --dtype loaded it in.
    assert f"{dtype} float weights" in printed and f"{bits:.2f} bits per weight (source: 32.00)" in printed
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "xlstm_mlx_lm.py"]
    # save_model rewrote the tokenizer (BOS insertion in its post-processor): it encodes as the source's does.
    assert load_tokenizer(out).encode("the model") == load_tokenizer(tok_ckpt).encode("the model")
    model = load_model(out)
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {getattr(mx, dtype)}
    expected, _ = load_model(tok_ckpt, dtype=dtype)(IDS)
    assert mx.array_equal(model(IDS)[0], expected)
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("flags, bits", [(["-q", "--q-bits", "4"], 4), (["-q", "--q-bits", "8", "--q-group-size", "32"], 8),
                                         (["-q", "--q-recipe", "mixed-4-8"], 4)])
def test_quantized_round_trip_loads_and_generates(tok_ckpt, tmp_path, flags, bits, capsys):
    out = tmp_path / "q"
    assert convert(tok_ckpt, out, *flags) == 0
    printed = capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["quantization_config"] == config["quantization"]
    if "mixed-4-8" in flags:
        assert config["quantization"]["lm_head"]["bits"] == 8 and "recipe mixed-4-8" in printed
    assert config["quantization"]["backbone.blocks.0.mlstm_layer.igate_preact"] is False

    # The written checkpoint equals the same quantization done in memory.
    in_memory = load_model(tok_ckpt)
    assert quantize_model(in_memory, recipe=(None if "mixed-4-8" not in flags else "mixed-4-8"),
                          bits=None if "mixed-4-8" in flags else bits,
                          group_size=32 if "32" in flags else None) == config["quantization"]
    loaded, tokenizer = xlstm_metal.load(out)
    assert mx.array_equal(loaded(IDS)[0], in_memory(IDS)[0])
    size = (out / "model.safetensors").stat().st_size
    assert f"{size / 1e6:.2f} MB" in printed and "bits per weight (source: 32.00)" in printed

    # generate (CLI, fused, greedy) writes what the runner gives with the loaded checkpoint: float32
    # on both sides and fused as the CLI fuses it (on a GPU the bf16 default, and fused against
    # unfused products, differ at round-off, and this tiny model's top two logits come within 1e-3).
    loaded, tokenizer = xlstm_metal.load(out, dtype="float32")
    loaded.fuse_projections()
    expected = tokenizer.decode(xLSTMRunner(loaded, tokenizer).generate("the model", max_tokens=12, temperature=0))
    assert main(["generate", "-m", str(out), "--prompt", "the model", "-n", "12", "--temp", "0",
                 "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip().endswith(expected.strip())


def test_quantized_checkpoint_in_chat_and_bench(tok_ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "q"
    assert convert(tok_ckpt, out, "-q") == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n/quit\n"))
    assert main(["chat", "-m", str(out), "-n", "5", "--temp", "0"]) == 0
    capsys.readouterr()
    assert main(["bench", "--config", str(out), "--prefill-lengths", "16", "--decode-tokens", "4"]) == 0
    assert "4-bit weights (group 64)" in " ".join(capsys.readouterr().out.split())
    assert main(["generate", "-m", str(out), "--info"]) == 0
    info = capsys.readouterr().out
    params = sum(v.size for _, v in tree_flatten(load_model(tok_ckpt).parameters()))
    assert f"{params:,}" in info and "4-bit, group 64" in info and "uint32" not in info


def test_overwrite_replaces_and_quantized_source_dequantizes(tok_ckpt, tmp_path, capsys):
    out = tmp_path / "q"
    assert convert(tok_ckpt, out, "-q", "--q-bits", "8") == 0
    assert convert(tok_ckpt, out, "-q", "--q-bits", "4", "--overwrite") == 0
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert leftovers(tmp_path) == []
    # A quantized source converted without -q is written dequantized, with equal logits.
    assert convert(out, tmp_path / "float") == 0
    assert "the source is quantized: dequantizing" in capsys.readouterr().err
    restored = load_model(tmp_path / "float")
    assert quantization_config(restored) is None
    assert mx.allclose(restored(IDS)[0], load_model(out)(IDS)[0], rtol=1e-5, atol=1e-5)


def test_2024_xlstm_converts(tmp_path, capsys):
    model = xlstm_metal.create_xlstm_model(vocab_size=100, num_layers=2, signature=(1, 1), inp_dim=64,
                                           head_dim=16, head_num=4, seed=1)
    save_model(model, tmp_path / "src")
    assert convert(tmp_path / "src", tmp_path / "q", "-q", "--q-bits", "8", "--q-group-size", "32") == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["xlstm_block_stack.blocks.0.xlstm.mlstm_cell.igate"] is False
    loaded = load_model(tmp_path / "q")
    assert type(loaded).__name__ == "xLSTMLMModel"
    assert isinstance(loaded.token_embedding, nn.QuantizedEmbedding)
    quantize_model(model, bits=8, group_size=32)
    ids = mx.array([[1, 5, 9, 33, 70, 2]])
    assert mx.array_equal(loaded(ids)[0], model(ids)[0])
    reference = load_model(tmp_path / "src")(ids)[0]
    assert mx.allclose(loaded(ids)[0], reference, atol=0.05) and not mx.array_equal(loaded(ids)[0], reference)


def test_check_figures(tok_ckpt, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(HELD_OUT)
    assert convert(tok_ckpt, tmp_path / "same", "--check", text, "--check-greedy", "40", "--json") == 0
    same = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["check"]
    # The perplexity the check reports is the model's, computed here in one pass.
    ids = load_tokenizer(tok_ckpt).encode(HELD_OUT)
    logits = load_model(tok_ckpt)(mx.array([ids[:-1]]))[0][0].astype(mx.float32)
    nll = mx.logsumexp(logits, -1) - mx.take_along_axis(logits, mx.array(ids[1:])[:, None], -1)[:, 0]
    assert same["tokens"] == len(ids) - 1
    assert same["ppl_reference"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert same["ppl_candidate"] == pytest.approx(same["ppl_reference"], rel=1e-6)
    assert abs(same["kl"]) < 1e-6 and same["top1"] == 1.0
    assert same["greedy_agree"] == same["greedy_prefix"] == same["greedy_tokens"] == 40

    assert convert(tok_ckpt, tmp_path / "q2", "-q", "--q-bits", "2", "--q-group-size", "32", "--check", text,
                   "--check-greedy", "40") == 0
    printed = capsys.readouterr().out
    assert "perplexity  source" in printed and "greedy agreement" in printed
    reference, candidate = load_model(tok_ckpt), load_model(tmp_path / "q2")
    low = fidelity(reference, candidate, ids, greedy_tokens=40, piece=37)  # pieces carry the state
    assert low["ppl_reference"] == pytest.approx(same["ppl_reference"], rel=1e-4)
    assert low["kl"] > 1e-3 and low["ppl_candidate"] != pytest.approx(low["ppl_reference"], rel=1e-3)
    shown = re.search(r"result ([\d.]+) .*\n  mean KL\(source \|\| result\)\s+([\d.]+)", printed)
    assert float(shown.group(1)) == pytest.approx(low["ppl_candidate"], rel=1e-4)
    assert float(shown.group(2)) == pytest.approx(low["kl"], rel=1e-3, abs=1e-5)


def test_8bit_perplexity_within_1_percent_of_float_on_held_out_text():
    """The packaged (trained) model: 8-bit costs < 1% perplexity, 4-bit costs more than 8-bit.
    (A packaged model shipped quantized is dequantized first: that float model is the reference.
    The shipped one is 4-bit with group 64, so the candidates use group 32: a grid its weights do
    not already lie on.)"""

    def packaged_float():
        return dequantize_model(load_model(DEFAULT_MODEL_DIR, dtype="float32"))

    reference = packaged_float()
    ids = load_tokenizer(DEFAULT_MODEL_DIR).encode(HELD_OUT)
    results = {}
    for bits in (8, 4):
        candidate = packaged_float()
        quantize_model(candidate, bits=bits, group_size=32)
        results[bits] = fidelity(reference, candidate, ids, greedy_tokens=8)
    base = results[8]["ppl_reference"]
    assert 5 < base < 200  # a trained model on in-domain prose
    assert abs(results[8]["ppl_candidate"] / base - 1) < 0.01
    assert results[4]["kl"] > results[8]["kl"] > 0


def test_check_8bit_within_1_percent_of_a_trained_float_model(tmp_path, capsys):
    """`convert -q --q-bits 8 --check` on held-out text, from a float32 source trained here (seeded;
    its weights lie on no quantization grid, unlike the dequantized packaged model above): perplexity
    within 1% of the source's at groups 32 and 64, while 4-bit moves it by more than 1%, so the
    bound tells 8 from 4 bits apart."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    stream = pattern_stream(8000)
    model = fresh_model()
    Trainer(model, stream[:6000], stream[6000:6500], small_cfg(steps=60, eval_every=60), tmp_path / "run",
            tmp_path, progress=False).train()
    save_model(model, tmp_path / "src")
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t1"))  # "t<id>" is token id
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(str(tmp_path / "src" / "tokenizer.json"))
    text = tmp_path / "held_out.txt"
    text.write_text(" ".join(f"t{i}" for i in stream[6500:]))  # after the training and validation parts
    change = {}
    for bits, group in ((8, 32), (8, 64), (4, 64)):
        assert convert(tmp_path / "src", tmp_path / f"q{bits}g{group}", "-q", "--q-bits", bits, "--q-group-size",
                       group, "--check", text, "--check-greedy", "16", "--json") == 0
        check = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["check"]
        assert check["tokens"] == len(stream) - 6500  # BOS + the text, less the last
        assert check["ppl_reference"] < V / 4  # trained: far below uniform (97) on text it never saw
        change[bits, group] = check["ppl_candidate"] / check["ppl_reference"] - 1
    assert abs(change[8, 32]) < 0.01 and abs(change[8, 64]) < 0.01
    assert change[4, 64] > 0.01


@pytest.mark.parametrize("argv_tail, message", [
    (["{missing}", "{out}"], "model directory not found"),
    (["{src}", "{out}", "--q-bits", "4"], "only apply with -q"),
    (["{src}", "{out}", "-q", "--q-recipe", "mixed-4"], "unknown recipe"),
    (["{src}", "{out}", "-q", "--q-recipe", "{typo}"], "no quantizable layer"),
    (["{src}", "{out}", "-q", "--q-recipe", "{badjson}"], "not valid JSON"),
    (["{src}", "{out}", "-q", "--q-group-size", "128"], "no layer could be quantized"),
    (["{src}", "{out}", "--check", "{missing}"], "--check file not found"),
    (["{src}", "{out}", "--check", "{empty}"], "fewer than 2 tokens"),
    (["{src}", "{out}", "--check-tokens", "10"], "needs --check"),
    (["{src}", "{out}", "--check-dtype", "bfloat16"], "--check-dtype needs --check"),
    (["{notok}", "{out}", "--check", "{text}"], "has no tokenizer.json"),
    (["{existing}", "{out}"], "no config.json"),  # a directory that is not a checkpoint
    (["{src}", "{existing}"], "already exists; pass --overwrite"),
    (["{src}", "{file}", "--overwrite"], "is not a directory"),
    (["{src}", "{src}", "--overwrite"], "is the source checkpoint"),
    (["{noconfig}", "{out}"], "no config.json"),
    (["{src}", "{out}", "-q", "--q-bits", "7"], "invalid choice"),
])
def test_bad_input_exits_2_and_writes_nothing(tok_ckpt, tmp_path, capsys, argv_tail, message):
    src = tmp_path / "src"
    shutil.copytree(tok_ckpt, src)
    names = {
        "src": src, "out": tmp_path / "out", "missing": tmp_path / "missing", "file": tmp_path / "file.txt",
        "existing": tmp_path / "existing", "noconfig": tmp_path / "noconfig", "notok": tmp_path / "notok",
        "typo": tmp_path / "typo.json", "badjson": tmp_path / "bad.json", "empty": tmp_path / "empty.txt",
        "text": tmp_path / "text.txt",
    }
    names["file"].write_text("x")
    names["existing"].mkdir()
    (names["existing"] / "keep.txt").write_text("mine")
    names["noconfig"].mkdir()
    shutil.copytree(tok_ckpt, names["notok"], ignore=shutil.ignore_patterns("tokenizer.json"))
    names["typo"].write_text(json.dumps({"backbone.blocks.*.ffn.proj_dwn": 4}))
    names["badjson"].write_text("{bits: 4")
    names["empty"].write_text("")
    names["text"].write_text(HELD_OUT)
    before = sorted(p.name for p in tmp_path.iterdir())
    src_files = {p.name: p.read_bytes() for p in src.iterdir()}
    try:
        code = convert(*[a.format(**names) for a in argv_tail])
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT, no temporary directory
    assert {p.name: p.read_bytes() for p in src.iterdir()} == src_files
    assert (names["existing"] / "keep.txt").read_text() == "mine" and names["file"].read_text() == "x"


def test_overwrite_never_deletes_the_source_or_other_data(tok_ckpt, tmp_path, capsys):
    """--overwrite replaces OUT as a whole: OUT holding the source, files that are no checkpoint,
    or subdirectories is refused (it deleted them all), and nothing is touched."""
    def tree(root):
        return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}

    outer = tmp_path / "outer"
    shutil.copytree(tok_ckpt, outer / "src")
    (outer / "notes.txt").write_text("mine")
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("a")
    (data / "sub" / "b.txt").write_text("b")
    prev = tmp_path / "prev"
    assert convert(tok_ckpt, prev) == 0
    (prev / "adapters").mkdir()
    (prev / "adapters" / "adapters.safetensors").write_bytes(b"x")
    capsys.readouterr()
    before = tree(tmp_path)
    for src, out, message in ((outer / "src", outer, "contains the source checkpoint"),
                              (tok_ckpt, data, "is not a checkpoint directory"),
                              (tok_ckpt, prev, "is not a checkpoint directory"),
                              (tok_ckpt, tmp_path, "is not a checkpoint directory")):
        assert convert(src, out, "--overwrite") == 2
        assert message in capsys.readouterr().err
        assert tree(tmp_path) == before
    # An empty directory, and a checkpoint (a previous conversion), are replaced.
    (tmp_path / "empty").mkdir()
    assert convert(tok_ckpt, tmp_path / "empty", "--overwrite") == 0
    shutil.rmtree(prev / "adapters")
    assert convert(tok_ckpt, prev, "-q", "--overwrite") == 0
    assert json.loads((prev / "config.json").read_text())["quantization"]["bits"] == 4
    assert leftovers(tmp_path) == []


def test_slow_tokenizer_files_are_copied_with_their_config(tok_ckpt, tmp_path, capsys):
    """A source whose tokenizer is vocab.json + merges.txt (no tokenizer.json): OUT keeps its
    tokenizer_config.json (the class, special tokens, chat template), which transformers needs."""
    src = tmp_path / "src"
    shutil.copytree(tok_ckpt, src, ignore=shutil.ignore_patterns("tokenizer.json", "tokenizer_config.json"))
    (src / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3}))
    (src / "merges.txt").write_text("#version: 0.2\na b\n")
    tok_config = {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "model_max_length": 2048,
                  "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    (src / "tokenizer_config.json").write_text(json.dumps(tok_config))
    assert convert(src, tmp_path / "out", "--dtype", "bfloat16") == 0
    out = tmp_path / "out"
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
def test_source_bits_per_weight_of_a_tied_checkpoint(tmp_path, capsys, dtype):
    """A tied checkpoint stores its LM head for transformers; the source's bits per weight count
    it once, with or without --dtype (--dtype read the stored tensors and counted it twice)."""
    save_model(tiny_model(2, tie_word_embeddings=True), tmp_path / "src")
    assert "lm_head.weight" in mx.load(str(tmp_path / "src" / "model.safetensors"))
    flags = [] if dtype is None else ["--dtype", dtype]
    assert convert(tmp_path / "src", tmp_path / "out", *flags, "--json") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["source_bits_per_weight"] == 32.0
    assert summary["bits_per_weight"] == (16.0 if dtype == "bfloat16" else 32.0)


def test_help_says_where_cpu_quantization_saves_time(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "On CPUs MLX's quantized matmul saves memory, not time" in text and "--q-recipe" in text
    assert "xLSTM-Large models on Linux CPUs decode and prefill in C instead" in text


def test_dequantize_then_requantize_matches(tok_ckpt):
    model = load_model(tok_ckpt)
    quantize_model(model, bits=8)
    expected, _ = model(IDS)
    dequantize_model(model)
    np.testing.assert_allclose(np.array(model(IDS)[0]), np.array(expected), rtol=1e-5, atol=1e-5)


def test_quantized_output_loads_in_mlx_lm_with_equal_logits(tok_ckpt, tmp_path):
    """The quantization entry is mlx-lm's format: mlx_lm.load rebuilds the same quantized layers
    (per-layer overrides and float gates included) and gives our logits exactly."""
    import mlx_lm

    out = tmp_path / "q"
    assert convert(tok_ckpt, out, "-q", "--q-recipe", "mixed-4-8", "--q-group-size", "32") == 0
    model, tokenizer = mlx_lm.load(str(out), trust_remote_code=True)
    kinds = {p: (m.bits, m.group_size) for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert kinds["lm_head"] == (8, 32) and kinds["backbone.blocks.0.mlstm_layer.q"] == (4, 32)
    assert "backbone.blocks.0.mlstm_layer.igate_preact" not in kinds
    ids = tokenizer.encode("the model reads a file")
    np.testing.assert_array_equal(np.array(model(mx.array([ids]))), np.array(load_model(out)(mx.array([ids]))[0]))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_quantized_source_to_half_precision_rounds_each_weight_once(tmp_path, dtype):
    """A quantized SRC with float32 scales converted with --dtype: each weight is its exact
    dequantized value rounded once (the scales and biases were cast first, adding their rounding
    error to every weight)."""
    model = tiny_model(5)
    quantize_model(model, bits=4, group_size=32)
    save_model(model, tmp_path / "q")
    assert convert(tmp_path / "q", tmp_path / "out", "--dtype", dtype) == 0
    out = load_model(tmp_path / "out")
    expected = dict(tree_flatten(dequantize_model(model).parameters()))
    got = dict(tree_flatten(out.parameters()))
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == getattr(mx, dtype), key
        assert mx.array_equal(got[key], value.astype(getattr(mx, dtype))).item(), key


def test_check_of_a_lossless_conversion_from_a_quantized_source(tok_ckpt, tmp_path, capsys):
    """Quantized SRC (bf16 scales) -> its exact bf16 dequantization, checked in bfloat16: the
    weights are the same, so the figures say so (on CPUs the quantized SRC ran MLX's bf16
    quantized matmul, ~10x less accurate than the float one: KL 0.01, greedy tokens differing)."""
    model = load_model(tok_ckpt, dtype="bfloat16")
    quantize_model(model, bits=4, group_size=32)
    save_model(model, tmp_path / "q", tokenizer=tok_ckpt)
    text = tmp_path / "t.txt"
    text.write_text(HELD_OUT)
    assert convert(tmp_path / "q", tmp_path / "out", "--dtype", "bfloat16", "--check", text,
                   "--check-dtype", "bfloat16", "--check-greedy", "40", "--json") == 0
    check = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["check"]
    assert check["kl"] == 0.0 and check["top1"] == 1.0 and check["greedy_agree"] == 40
    assert check["ppl_candidate"] == check["ppl_reference"]
