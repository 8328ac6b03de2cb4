"""Checkpoints we write open in transformers: config.json passes its strict xLSTMConfig, the
model gives our logits, and AutoTokenizer encodes (BOS included or not) exactly as we do."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_tokenizer import train_tiny_tokenizer
from transformers import AutoConfig, AutoTokenizer, xLSTMForCausalLM

from xlstm_metal import load, load_model, save_model
from xlstm_metal.assets import default_model_path
from xlstm_metal.checkpoint_files import MLX_LM_SHIM
from xlstm_metal.generation.tokenizer import load_tokenizer

TEXTS = ["hello world, the cat", "def f(x):\n    return x", " leading space", ""]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


@pytest.mark.parametrize("tied", [True, False])
def test_saved_checkpoint_opens_in_transformers_with_our_logits(tmp_path, tied):
    hf_tok = train_tiny_tokenizer()
    # E=128: transformers rounds qk_dim up to a multiple of 64, so it agrees with ours only there.
    model = tiny_model(3, embedding_dim=128, vocab_size=hf_tok.get_vocab_size(), chunkwise_kernel="chunkwise_scan",
                       tie_word_embeddings=tied, autocast_kernel_dtype="float32", ffn_proj_factor=2)
    path = save_model(model, tmp_path / "ckpt", tokenizer=hf_tok)
    config = json.loads((path / "config.json").read_text())
    assert config["chunkwise_kernel"] == "chunkwise--native_autograd"
    assert config["xlstm_metal"]["chunkwise_kernel"] == "chunkwise_scan"
    assert config["model_file"] == MLX_LM_SHIM and (path / MLX_LM_SHIM).is_file()
    assert load_model(path).config.chunkwise_kernel == "chunkwise_scan"  # our choice read back

    reference = xLSTMForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = np.random.default_rng(4).integers(0, hf_tok.get_vocab_size(), size=(2, 37))
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    ours, _ = load_model(path)(mx.array(ids.astype(np.int32)))
    assert rel_err(np.array(ours), expected) <= 1e-4


@pytest.mark.parametrize("bos", [True, False])
def test_auto_tokenizer_encodes_like_ours(tmp_path, bos):
    hf_tok = train_tiny_tokenizer()
    model = tiny_model(0, vocab_size=hf_tok.get_vocab_size(), force_bos_token_insert=bos)
    path = save_model(model, tmp_path / "ckpt", tokenizer=hf_tok)
    auto = AutoTokenizer.from_pretrained(path)
    ours = load_tokenizer(path)
    assert ours.add_bos == bos
    for text in TEXTS:
        expected = ours.encode(text)
        assert auto(text).input_ids == expected
        assert (expected[:1] == [0]) == bos
        assert auto.decode(expected, skip_special_tokens=True) == ours.decode(expected)


def test_save_model_tokenizer_sources_and_errors(tmp_path):
    """A tokenizer directory and our Tokenizer write the same files; a bad one writes nothing."""
    hf_tok = train_tiny_tokenizer()
    model = tiny_model(0, vocab_size=hf_tok.get_vocab_size())
    first = save_model(model, tmp_path / "a", tokenizer=hf_tok)
    _, ours = load(first)
    second = save_model(model, tmp_path / "b", tokenizer=ours)
    third = save_model(model, tmp_path / "c", tokenizer=first)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        text = (first / name).read_text()
        assert (second / name).read_text() == text == (third / name).read_text()
    # Saving again does not stack a second BOS template onto the first.
    assert load_tokenizer(third).encode("cat")[:2] != [0, 0]
    with pytest.raises(ValueError, match="no tokenizer.json"):
        save_model(model, tmp_path / "d", tokenizer=tmp_path)
    assert not (tmp_path / "d").exists()
    with pytest.raises(TypeError, match="tokenizer must be"):
        save_model(model, tmp_path / "e", tokenizer=42)


def test_packaged_model_opens_in_transformers():
    path = default_model_path()
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "xlstm" and config.chunkwise_kernel == "chunkwise--native_autograd"
    assert json.loads((path / "config.json").read_text())["model_file"] == MLX_LM_SHIM
    assert (path / MLX_LM_SHIM).is_file()
    auto, ours = AutoTokenizer.from_pretrained(path), load_tokenizer(path)
    for text in TEXTS:
        assert auto(text).input_ids == ours.encode(text)
    assert ours.encode("x")[0] == ours.bos_token_id == 0


def test_chat_template_keeps_every_role():
    """The server's fallback chat format: developer reads as system, other roles (tool) as a
    'Role: content' line instead of vanishing; user and assistant turns as before."""
    import jinja2

    from xlstm_metal.checkpoint_files import chat_template

    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "6 x 7?"},
                {"role": "assistant", "content": "Let me check."}, {"role": "tool", "content": "42"},
                {"role": "user", "content": "So?"}]
    text = jinja2.Environment().from_string(chat_template(True)).render(
        messages=messages, bos_token="<s>", eos_token="</s>")
    assert text == "<s>Be brief.\n\nUser: 6 x 7?\nAssistant:Let me check.</s>\nTool: 42\nUser: So?\nAssistant:"
