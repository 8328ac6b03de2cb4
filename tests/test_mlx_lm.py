"""Our checkpoints in mlx-lm: load (only with trust_remote_code), exact logits, generate,
batch_generate with padding, prompt caches, convert -q and LoRA, for xLSTM-Large and the 2024
xLSTM (sLSTM + mLSTM blocks). Tiny random models, written to temp dirs; nothing downloads."""

import json
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import tiny_model
from mlx.utils import tree_flatten, tree_unflatten
from test_tokenizer import train_tiny_tokenizer

import xlstm_metal
from xlstm_metal import load, load_model, save_model
from xlstm_metal.generation.tokenizer import Tokenizer

mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm import batch_generate, generate, stream_generate  # noqa: E402
from mlx_lm.models.cache import ArraysCache, load_prompt_cache, make_prompt_cache, save_prompt_cache  # noqa: E402

PROMPTS = ["the cat sat", "hello there my good friend, how are you doing on this fine", "a"]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def model_2024(vocab_size: int):
    """An sLSTM block (conv window, h state) then an mLSTM block: every state kind."""
    return xlstm_metal.create_xlstm_model(vocab_size=vocab_size, num_layers=2, signature=(1, 1), inp_dim=64,
                                          head_dim=16, head_num=4, seed=1)


@pytest.fixture(scope="module", params=["large", "2024"])
def ckpt(request, tmp_path_factory):
    hf = train_tiny_tokenizer()
    if request.param == "large":
        model, tok = tiny_model(2, vocab_size=hf.get_vocab_size()), hf  # BOS and EOS from the config
    else:  # the 2024 config has no token ids: the tokenizer brings them (no BOS, as NX-AI's models)
        model, tok = model_2024(hf.get_vocab_size()), Tokenizer(hf, bos_token_id=0, eos_token_ids=[2])
    return save_model(model, tmp_path_factory.mktemp(request.param) / "ckpt", tokenizer=tok)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return mlx_lm.load(str(ckpt), trust_remote_code=True)


def test_load_needs_trust_remote_code_then_gives_exact_logits(ckpt, loaded):
    with pytest.raises(ValueError, match="trust_remote_code"):
        mlx_lm.load(str(ckpt))
    model, tokenizer = loaded
    ours, our_tok = load(ckpt)
    ids = our_tok.encode("hello world, the cat sat on the mat")
    assert tokenizer.encode("hello world, the cat sat on the mat") == ids  # BOS included, as ours
    np.testing.assert_array_equal(np.array(model(mx.array([ids]))), np.array(ours(mx.array([ids]))[0]))
    assert len(model.layers) == 2 and len(model.make_cache()) == 2
    assert all(isinstance(c, ArraysCache) for c in model.make_cache())


def test_greedy_text_equals_xlstm_metal_generate(ckpt, loaded, capsys):
    from xlstm_metal.cli import main

    model, tokenizer = loaded
    tokens = [r.token for r in stream_generate(model, tokenizer, PROMPTS[0], max_tokens=24)]
    text = generate(model, tokenizer, prompt=PROMPTS[0], max_tokens=24)
    capsys.readouterr()
    assert main(["generate", "-m", str(ckpt), "--prompt", PROMPTS[0], "-n", str(len(tokens)), "--temp", "0",
                 "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed == load(ckpt)[1].decode(tokens) and len(printed) > 10
    # mlx-lm's detokenizer shows special tokens (a random model emits some); ours skips them.
    assert re.sub(r"<\|(bos|pad|eos)\|>", "", text).rstrip("\n") == printed


def test_batch_generate_equals_single_runs_and_needs_the_mask(loaded, monkeypatch):
    model, tokenizer = loaded
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    singles = [batch_generate(model, tokenizer, [p], max_tokens=12, return_token_ids=True).token_ids[0]
               for p in prompts]
    # prefill_step_size 8: the padded prompt spans pieces, some all padding for the short rows.
    batched = batch_generate(model, tokenizer, prompts, max_tokens=12, return_token_ids=True, prefill_step_size=8)
    assert batched.token_ids == singles
    monkeypatch.setattr(ArraysCache, "make_mask", lambda self, n: None)  # control: padding leaks into states
    unmasked = batch_generate(model, tokenizer, prompts, max_tokens=12, return_token_ids=True, prefill_step_size=8)
    assert unmasked.token_ids != singles


def test_padded_steps_leave_every_state_unchanged(loaded):
    model, tokenizer = loaded
    ids = mx.array(np.random.default_rng(0).integers(3, 200, size=(2, 10)).astype(np.int32))
    cache = model.make_cache()
    model(ids[:, :4], cache=cache)
    before = [[mx.array(a) for a in c.cache] for c in cache]
    for c in cache:
        c.prepare(lengths=[6, 0])  # row 0: 6 real tokens; row 1: all 6 positions padding
    logits = model(ids[:, 4:], cache=cache)
    for c, old in zip(cache, before):
        for new, prev in zip(c.cache, old):
            np.testing.assert_array_equal(np.array(new[1]), np.array(prev[1]))  # bit for bit
    assert not np.any(np.array(logits[1]))  # padded positions: zero logits
    # Row 0 continues exactly as an unpadded run; a row with 3 of 6 real tokens as a 3-token run.
    reference = model.make_cache()
    ref_logits = model(ids[:, :10], cache=reference)
    np.testing.assert_allclose(np.array(logits[0]), np.array(ref_logits[0, 4:]), rtol=1e-4, atol=1e-4)
    for c, r in zip(cache, reference):
        for new, ref in zip(c.cache, r.cache):
            np.testing.assert_allclose(np.array(new[0]), np.array(ref[0]), rtol=1e-4, atol=1e-5)
    cache = model.make_cache()
    for c in cache:
        c.prepare(lengths=[6, 3])
    model(ids[:, :6], cache=cache)
    short = model.make_cache()
    model(ids[1:, :3], cache=short)
    for c, r in zip(cache, short):
        for new, ref in zip(c.cache, r.cache):
            np.testing.assert_allclose(np.array(new[1]), np.array(ref[0]), rtol=1e-4, atol=1e-5)


def test_prompt_cache_round_trip(loaded, tmp_path):
    model, tokenizer = loaded
    prompt, more = tokenizer.encode(PROMPTS[1]), tokenizer.encode(" and then", add_special_tokens=False)
    cache = make_prompt_cache(model)
    model(mx.array([prompt]), cache=cache)
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache, {"n": str(len(prompt))})
    restored, meta = load_prompt_cache(str(tmp_path / "cache.safetensors"), return_metadata=True)
    assert meta["n"] == str(len(prompt)) and all(isinstance(c, ArraysCache) for c in restored)
    continued = model(mx.array([more]), cache=restored)
    full = model(mx.array([prompt + more]))
    np.testing.assert_allclose(np.array(continued[0]), np.array(full[0, len(prompt):]), rtol=1e-4, atol=1e-4)
    text = generate(model, tokenizer, prompt=more, max_tokens=8, prompt_cache=load_prompt_cache(
        str(tmp_path / "cache.safetensors")))
    assert text == generate(model, tokenizer, prompt=prompt + more, max_tokens=8)


def test_quant_predicate_and_sanitize(loaded):
    model, _ = loaded
    gates = [p for p, m in model.named_modules() if p.rsplit(".", 1)[-1] in ("igate_preact", "fgate_preact", "igate", "fgate")]
    assert gates and not any(model.quant_predicate(p, None) for p in gates)
    assert model.quant_predicate("lm_head", None)


def to_nxai_native(model) -> dict:
    """NX-AI's native xLSTMLarge state dict layout: fused q|k|v|o, i|f and gate|up projections."""
    native = dict(tree_flatten(model.parameters()))
    native["embedding.weight"] = native.pop("backbone.embeddings.weight")
    for b in range(len(model.blocks)):
        for layer, fused, names in (("mlstm_layer", "qkv_opreact", ["q", "k", "v", "ogate_preact"]),
                                    ("mlstm_layer", "ifgate_preact", ["igate_preact", "fgate_preact"]),
                                    ("ffn", "proj_up_gate_z", ["proj_up_gate", "proj_up"])):
            stem = f"backbone.blocks.{b}.{layer}"
            for leaf in ("weight", "bias"):
                keys = [f"{stem}.{n}.{leaf}" for n in names]
                if all(k in native for k in keys):
                    native[f"{stem}.{fused}.{leaf}"] = mx.concatenate([native.pop(k) for k in keys])
    return native


def test_sanitize_reads_nxai_native_names():
    from xlstm_metal.mlx_lm_model import Model, ModelArgs

    model = tiny_model(1)
    native = to_nxai_native(model)
    assert "backbone.blocks.0.mlstm_layer.qkv_opreact.weight" in native
    mlm = Model(ModelArgs.from_dict(model.config.to_dict()))
    mlm.load_weights(list(mlm.sanitize(native).items()))  # strict: every parameter set
    ids = mx.array([[5, 6, 7, 8]])
    np.testing.assert_array_equal(np.array(mlm(ids)), np.array(model(ids)[0]))


def test_sanitize_of_a_tied_2024_checkpoint_holding_only_the_lm_head():
    # safetensors' save_model (how PyTorch saves shared tensors) keeps one name of a tied pair,
    # lm_head.weight: sanitize dropped it, and the embedding was then missing.
    from xlstm_metal.mlx_lm_model import Model, ModelArgs

    source = model_2024(48)
    config = source.config.to_dict()
    config["tie_weights"] = True
    mlm = Model(ModelArgs.from_dict(config))
    weights = dict(tree_flatten(source.parameters()))
    weights["lm_head.weight"] = weights.pop("token_embedding.weight")
    mlm.load_weights(list(mlm.sanitize(weights).items()))  # strict: every parameter set
    np.testing.assert_array_equal(np.array(mlm.token_embedding.weight), np.array(source.token_embedding.weight))
    both = dict(tree_flatten(source.parameters()))  # NX-AI's state_dict: the tied tensor under both names
    both["lm_head.weight"] = both["token_embedding.weight"]
    assert set(mlm.sanitize(both)) == set(both) - {"lm_head.weight"}


def _dequantized_reference(float_dir, quant_dir):
    """The float model with every weight mlx_lm.convert quantized replaced by its dequantization."""
    reference = load_model(float_dir)
    stored = mx.load(str(quant_dir / "model.safetensors"))
    config = json.loads((quant_dir / "config.json").read_text())["quantization"]
    params = dict(tree_flatten(reference.parameters()))
    for key in [k for k in stored if k.endswith(".scales")]:
        stem = key[: -len(".scales")]
        params[f"{stem}.weight"] = mx.dequantize(stored[f"{stem}.weight"], stored[key], stored[f"{stem}.biases"],
                                                 group_size=config["group_size"], bits=config["bits"])
    reference.update(tree_unflatten(list(params.items())))
    return reference


@pytest.mark.slow
def test_convert_4bit_matches_dequantized_reference(ckpt, tmp_path):
    from mlx_lm.convert import convert

    out = tmp_path / "q4"
    convert(str(ckpt), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=32, trust_remote_code=True)
    stored = mx.load(str(out / "model.safetensors"))
    assert any(k.endswith(".scales") for k in stored)
    assert not any(k.rsplit(".", 2)[-2] in ("igate_preact", "fgate_preact", "igate", "fgate") and k.endswith(".scales")
                   for k in stored)  # the gate projections stayed in float
    model, tokenizer = mlx_lm.load(str(out), trust_remote_code=True)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    # mlx-lm's loader leaves our dispatch, as load_model does (the CUDA kernels; the dequantized
    # product where MLX's own is wrong on CUDA: weights of one group per row).
    from xlstm_metal.kernels.fast.quantized import FastQuantizedLinear

    assert not any(type(m) is nn.QuantizedLinear for _, m in model.named_modules())
    assert any(type(m) is FastQuantizedLinear for _, m in model.named_modules())
    ids = tokenizer.encode(PROMPTS[1])
    reference = _dequantized_reference(ckpt, out)
    expected = np.array(reference(mx.array([ids]))[0])
    assert rel_err(np.array(model(mx.array([ids]))), expected) <= 1e-4
    float_logits = np.array(load_model(ckpt)(mx.array([ids]))[0])
    assert rel_err(float_logits, expected) > 1e-3  # the quantization is visible: the test can fail
    # The converted checkpoint still loads here too.
    ours = load_model(out)
    assert rel_err(np.array(ours(mx.array([ids]))[0]), expected) <= 1e-4


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4"])
def test_mlx_lm_float_format_checkpoints_open_here_and_ours_there(ckpt, tmp_path, mode):
    """mlx_lm.convert --q-mode writes uint8 scales and no biases; that checkpoint loads here, and
    ours (xlstm-metal convert --q-mode) loads in mlx-lm: logits equal on both sides."""
    from mlx_lm.convert import convert

    from xlstm_metal.cli import main

    theirs, ours_dir = tmp_path / "theirs", tmp_path / "ours"
    convert(str(ckpt), mlx_path=str(theirs), quantize=True, q_mode=mode, trust_remote_code=True)
    assert json.loads((theirs / "config.json").read_text())["quantization"]["mode"] == mode
    assert main(["convert", str(ckpt), str(ours_dir), "-q", "--q-mode", mode]) == 0
    ids = mx.array([load(ckpt)[1].encode(PROMPTS[1])])
    float_logits = np.array(load_model(ckpt)(ids)[0])
    for path in (theirs, ours_dir):
        here = np.array(load_model(path)(ids)[0])
        there = np.array(mlx_lm.load(str(path), trust_remote_code=True)[0](ids))
        assert rel_err(there, here) <= 1e-5, path.name
        assert rel_err(here, float_logits) > 1e-3, path.name  # quantized: the test can fail


@pytest.mark.slow
def test_lora_three_iterations_change_the_output(ckpt, tmp_path):
    import subprocess
    import sys

    data = tmp_path / "data"
    data.mkdir()
    rows = [json.dumps({"text": f"the cat number {i} sat on the mat and looked at the dog"}) for i in range(8)]
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    adapters = tmp_path / "adapters"
    result = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "lora", "--model", str(ckpt), "--train", "--data", str(data),
         "--iters", "3", "--batch-size", "2", "--num-layers", "2", "--learning-rate", "1e-2",
         "--steps-per-eval", "100", "--val-batches", "1", "--adapter-path", str(adapters),
         "--trust-remote-code"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (adapters / "adapters.safetensors").is_file()
    base, tokenizer = mlx_lm.load(str(ckpt), trust_remote_code=True)
    tuned, _ = mlx_lm.load(str(ckpt), adapter_path=str(adapters), trust_remote_code=True)
    ids = mx.array([tokenizer.encode(PROMPTS[0])])
    assert rel_err(np.array(tuned(ids)), np.array(base(ids))) > 1e-3
    # xlstm-metal's server loads the same adapters onto our loader's model: the same logits.
    from xlstm_metal.serve import load_for_serving

    served, _ = load_for_serving(ckpt, adapter_path=str(adapters), dtype="float32")
    assert rel_err(np.array(served(ids)), np.array(tuned(ids))) <= 1e-5
    # mlx_lm fuse folds the adapters into the weights (it calls fuse() on every module that has
    # one: our inference fast path is named fuse_projections so it stays out of the way); the
    # fused checkpoint loads in xlstm-metal with the adapted model's logits.
    fused_dir = tmp_path / "fused"
    result = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "fuse", "--model", str(ckpt), "--adapter-path", str(adapters),
         "--save-path", str(fused_dir), "--trust-remote-code"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    from xlstm_metal import load_model

    fused = load_model(fused_dir)
    assert rel_err(np.array(fused(ids)[0]), np.array(tuned(ids))) <= 1e-5


def test_cli_loads_a_resave_that_lost_our_model_file(ckpt, tmp_path, capsys):
    """transformers' save_pretrained keeps config.json's model_file but not the file: through
    `xlstm-metal mlx-lm` such a checkpoint loads as model type xlstm and generates what the
    checkpoint with its file does (mlx-lm alone asked for trust_remote_code, then had no file)."""
    import shutil

    from xlstm_metal.checkpoint_files import MLX_LM_SHIM
    from xlstm_metal.cli import main

    resaved = tmp_path / "resaved"
    shutil.copytree(ckpt, resaved)
    (resaved / MLX_LM_SHIM).unlink()
    if "model_type" not in json.loads((ckpt / "config.json").read_text()):  # the 2024 config: the file is needed
        assert main(["mlx-lm", "generate", "--model", str(resaved), "--prompt", "a", "--max-tokens", "2"]) == 2
        assert "custom module" in capsys.readouterr().err
        return
    texts = []
    for path in (ckpt, resaved):
        code = main(["mlx-lm", "generate", "--model", str(path), "--prompt", PROMPTS[0], "--max-tokens", "8"])
        out = capsys.readouterr().out
        assert code == 0, out
        texts.append(out.split("==========")[1])
    assert texts[0] == texts[1] and texts[0].strip()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mlx_lm_convert_of_a_tied_model_opens_in_transformers(tmp_path, dtype):
    """mlx-lm's save writes model.parameters(), where a tied model has no LM head; transformers'
    xLSTMForCausalLM never ties, so it opened such a checkpoint with a random head. The save
    now carries lm_head.weight (the embeddings) as save_model's checkpoints do: transformers,
    mlx-lm and load_model give the logits of the converted weights, and the tree is unchanged."""
    torch = pytest.importorskip("torch")
    from mlx_lm.convert import convert
    from transformers import xLSTMForCausalLM

    from xlstm_metal.loading import read_weights
    from xlstm_metal.mlx_lm_model import from_xlstm_metal

    hf = train_tiny_tokenizer()
    source = tiny_model(4, embedding_dim=128, vocab_size=hf.get_vocab_size(), tie_word_embeddings=True)
    src = save_model(source, tmp_path / "src", tokenizer=hf)
    convert(str(src), mlx_path=str(tmp_path / "out"), dtype=dtype, trust_remote_code=True)
    stored = read_weights(tmp_path / "out")
    assert stored["lm_head.weight"].dtype == getattr(mx, dtype)
    assert mx.array_equal(stored["lm_head.weight"], stored["backbone.embeddings.weight"])
    ids = np.random.default_rng(4).integers(0, hf.get_vocab_size(), size=(1, 16))
    ours = load_model(tmp_path / "out", dtype="float32")  # the converted weights, float32 arithmetic
    expected = np.array(ours(mx.array(ids.astype(np.int32)))[0])
    with torch.no_grad():
        hf_model = xLSTMForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
        assert rel_err(hf_model(torch.tensor(ids)).logits.numpy(), expected) <= 1e-4
    model, _ = mlx_lm.load(str(tmp_path / "out"), trust_remote_code=True)
    assert "lm_head" not in model
    assert rel_err(np.array(model(mx.array(ids.astype(np.int32))).astype(mx.float32)), expected) <= 3e-2

    view = from_xlstm_metal(source)
    mlx_lm.utils.save_model(tmp_path / "direct", view)  # the hook leaves the tree as it found it
    assert "lm_head" not in view and "lm_head" not in source
    assert mx.array_equal(mx.load(str(tmp_path / "direct" / "model.safetensors"))["lm_head.weight"],
                          source.backbone.embeddings.weight)
