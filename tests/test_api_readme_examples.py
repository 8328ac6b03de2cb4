"""The README's Python API examples run as written (the packaged model standing in for
"path/to/checkpoint" / "ckpt", a temporary directory for "out_dir") and do what the README says
of them: shapes of logits and state, make_state == state=None, a one-token continuation, the
dtype cast on load, save_model's files, the runner's token ids and stream, and the 2024
constructor's block map."""

import xlstm_metal  # noqa: F401,I001  (first: preloads the BLAS before mlx is imported)

import re
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from xlstm_metal.generation import DEFAULT_MODEL_DIR

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def block_with(text: str) -> str:
    found = [b for b in python_blocks() if text in b]
    assert len(found) == 1, f"one README python block holds {text!r}"
    return found[0]


def run_block(code: str, tmp_path) -> dict:
    code = (code.replace('"path/to/checkpoint"', repr(str(DEFAULT_MODEL_DIR)))
            .replace('"ckpt"', repr(str(DEFAULT_MODEL_DIR)))
            .replace('"out_dir"', repr(str(tmp_path / "out_dir"))))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_python_api_block(tmp_path):
    ns = run_block(block_with("xlstm_metal.load(\"path/to/checkpoint\")"), tmp_path)
    model, logits, state0 = ns["model"], ns["logits"], ns["state0"]
    first, tokenizer = xlstm_metal.load(DEFAULT_MODEL_DIR, dtype="float32")  # float32: exact comparisons
    V = first.config.vocab_size
    assert logits.shape == (1, 1, V)  # the continued token
    ids = mx.array([[0, 510, 3758]])
    full, full_state = first(ids)
    assert full.shape == (1, 3, V)
    # One entry per block: (C [B, NH, DQK, DV], n [B, NH, DQK], m [B, NH, 1]) in float32.
    c = first.config
    assert len(full_state) == c.num_blocks
    for C, n, m in full_state:
        assert C.shape == (1, c.num_heads, c.qk_head_dim, c.v_head_dim)
        assert n.shape == (1, c.num_heads, c.qk_head_dim) and m.shape == (1, c.num_heads, 1)
        assert C.dtype == n.dtype == m.dtype == mx.float32
    # "continue one token": the same logits as the whole sequence's last position.
    whole, _ = first(mx.array([[0, 510, 3758, 1129]]))
    step, _ = first(mx.array([[1129]]), full_state)
    assert mx.allclose(step[:, -1], whole[:, -1], rtol=1e-4, atol=1e-4).item()
    # make_state(batch_size=4): zeros, the same as state=None.
    assert len(state0) == c.num_blocks and state0[0][0].shape[0] == 4
    assert all(not mx.any(a).item() for block in state0 for a in block)
    rows = mx.array([[0, 510, 3758]] * 4)
    assert mx.array_equal(first(rows, state0)[0], first(rows)[0]).item()
    # load_model(dtype="bfloat16"): float weights cast (a quantized layer's scales carry it).
    floats = {str(v.dtype) for _, v in tree_flatten(model.parameters()) if v.dtype != mx.uint32}
    assert floats == {"mlx.core.bfloat16"}
    out = tmp_path / "out_dir"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    again, again_tok = xlstm_metal.load(out)
    assert mx.array_equal(again(ids)[0], model(ids)[0]).item()
    assert again_tok.encode("def f") == tokenizer.encode("def f")


def test_runner_block(tmp_path, capsys):
    ns = run_block(block_with("xLSTMRunner(\"path/to/checkpoint\")"), tmp_path)
    ids, runner = ns["ids"], ns["runner"]
    assert isinstance(ids, list) and 0 < len(ids) <= 50 and all(isinstance(i, int) for i in ids)
    assert ids == runner.generate("The mLSTM", max_tokens=50, temperature=0.7, seed=0)  # seeded
    printed = capsys.readouterr().out
    streamed = "".join(c.text for c in runner.stream("The mLSTM", max_tokens=50))
    assert printed == runner.tokenizer.decode(ids) + "\n" + streamed
    assert streamed == runner.tokenizer.decode(runner.generate("The mLSTM", max_tokens=50))


def test_2024_constructor_block(tmp_path):
    ns = run_block("import xlstm_metal\n" + block_with("create_xlstm_model(vocab_size=50304"), tmp_path)
    model = ns["model"]
    cfg = model.config
    assert cfg.block_map == ["m"] * 7 + ["s"] + ["m"] * 4  # (7, 1) cycled over 12 layers
    assert cfg.embedding_dim == 768 and cfg.vocab_size == 50304
    assert model.blocks[7].xlstm.slstm_cell.head_dim == 192 and model.blocks[0].xlstm.num_heads == 4
    logits, state = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 50304) and len(state) == 12


def test_lab_wiring_block(tmp_path):
    # The packaged model (quantized) stands in for the checkpoint; in float32 the wired model
    # gives load_model's logits to round-off (a bf16 load_model keeps a float32 residual stream,
    # which the wiring does not).
    code = block_with("load_wired(").replace('"path/to/xlstm-large-checkpoint"', repr(str(DEFAULT_MODEL_DIR)))
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    x = mx.random.normal((2, 5, 16), key=mx.random.key(0))
    y, _ = ns["block"](x)
    assert y.shape == (2, 5, 16)
    assert ns["model"].config.vocab_size == 16 and ns["model"].config.embedding_dim == 64
    ids = mx.array([[0, 510, 3758, 1129, 7]])
    ours = xlstm_metal.load_model(DEFAULT_MODEL_DIR, dtype="float32")
    a, b = ours(ids)[0], ns["wired"](ids)[0]
    assert (mx.max(mx.abs(a - b)) / mx.max(mx.abs(a))).item() < 1e-5
