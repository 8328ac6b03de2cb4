"""The 2024 xLSTM LM (mixed mLSTM / sLSTM stacks) against NX-AI's xlstm.xLSTMLMModel (vanilla
sLSTM backend, native mLSTM, torch CPU, float32): logits, prefill-then-step, states, gradients,
checkpoint loading (config.json / config.yaml + model.safetensors), auto-wiring, errors."""

import xlstm_metal  # noqa: F401,I001  (first: preloads the BLAS before mlx is imported)

import dataclasses
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import yaml
from mlx.utils import tree_flatten
from safetensors.torch import save_file
from xlstm import (
    FeedForwardConfig as TFeedForwardConfig,
    mLSTMBlockConfig as TmLSTMBlockConfig,
    mLSTMLayerConfig as TmLSTMLayerConfig,
    sLSTMBlockConfig as TsLSTMBlockConfig,
    sLSTMLayerConfig as TsLSTMLayerConfig,
    xLSTMLMModel as TxLSTMLMModel,
    xLSTMLMModelConfig as TxLSTMLMModelConfig,
)

from xlstm_metal import load_model, save_model
from xlstm_metal.config_2024 import is_xlstm_2024_config, read_config, xLSTMLMConfig
from xlstm_metal.loading import CheckpointError, model_from_checkpoint
from xlstm_metal.models.xlstm_2024 import create_xlstm_model, model_from_config, xLSTMLMModel

TOL = 1e-4
V = 61


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def np_(x):
    return np.array(x.astype(mx.float32)) if isinstance(x, mx.array) else x.detach().numpy()


def official(slstm_at=(1,), num_blocks=3, E=32, mlstm=True, slstm=True, seed=0, tie=False, bias=False,
             s_conv=4, ffn=True, m_heads=2, s_heads=2, post_norm=True):
    cfg = TxLSTMLMModelConfig(
        mlstm_block=TmLSTMBlockConfig(mlstm=TmLSTMLayerConfig(conv1d_kernel_size=4, qkv_proj_blocksize=4,
                                                              num_heads=m_heads)) if mlstm else None,
        slstm_block=TsLSTMBlockConfig(
            slstm=TsLSTMLayerConfig(backend="vanilla", num_heads=s_heads, conv1d_kernel_size=s_conv),
            feedforward=TFeedForwardConfig(proj_factor=1.3, act_fn="gelu") if ffn else None,
        ) if slstm else None,
        context_length=64, num_blocks=num_blocks, embedding_dim=E, slstm_at=list(slstm_at), vocab_size=V,
        tie_weights=tie, bias=bias, add_post_blocks_norm=post_norm,
    )
    torch.manual_seed(seed)
    model = TxLSTMLMModel(cfg)
    model.reset_parameters()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move every tensor off its init (zero norms, zero R) so mix-ups show
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.5 if "fgate.bias" in name or "igate.bias" in name else 0.2))
    return model.eval(), cfg


def state_dict(model):
    sd = {}
    seen = set()
    for k, v in model.state_dict().items():
        if id(v) in seen or v.data_ptr() in seen:  # tied weights appear twice; safetensors wants one
            continue
        seen.add(v.data_ptr())
        sd[k] = v.detach().contiguous()
    return sd


def save_official(model, cfg, path, fmt="json"):
    path.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(model), str(path / "model.safetensors"))
    d = dataclasses.asdict(cfg)
    if fmt == "json":
        (path / "config.json").write_text(json.dumps(d))
    else:
        (path / "config.yaml").write_text(yaml.safe_dump(d))
    return path


def ours_from(model, cfg, **kw):
    weights = {k: mx.array(v.numpy()) for k, v in state_dict(model).items()}
    return model_from_checkpoint(dataclasses.asdict(cfg), weights, **kw)


def ids_for(B=2, S=21, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, S))


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).numpy()


STACKS = {
    "m_s_m": dict(slstm_at=(1,), num_blocks=3),
    "s_m_s_m": dict(slstm_at=(0, 2), num_blocks=4, s_heads=4),
    "all_slstm": dict(mlstm=False, num_blocks=2, slstm_at=()),
    "all_mlstm_bias": dict(slstm=False, slstm_at=(), num_blocks=2, bias=True),
    "tied_noconv_noffn": dict(slstm_at=(0,), num_blocks=2, tie=True, s_conv=0, ffn=False, post_norm=False),
}


@pytest.mark.parametrize("name", list(STACKS))
def test_logits_and_prefill_step_match_nxai(name):
    model, cfg = official(seed=len(name), **STACKS[name])
    ours = ours_from(model, cfg)
    ids = ids_for(seed=len(name))
    ref = torch_logits(model, ids)
    logits, _ = ours(mx.array(ids))
    assert rel_err(np_(logits), ref) <= TOL
    last, _ = ours(mx.array(ids), last_only=True)
    assert last.shape == (ids.shape[0], 1, V) and rel_err(np_(last), ref[:, -1:]) <= TOL
    # Prefill 13 tokens, then one token at a time: equals the one full forward.
    out, state = ours(mx.array(ids[:, :13]))
    outs = [np_(out)]
    for t in range(13, ids.shape[1]):
        out, state = ours(mx.array(ids[:, t : t + 1]), state)
        outs.append(np_(out))
    assert rel_err(np.concatenate(outs, axis=1), ref) <= TOL


def test_step_matches_nxai_step_and_states():
    model, cfg = official(seed=3)
    ours = ours_from(model, cfg)
    ids = ids_for(S=9, seed=3)
    with torch.no_grad():
        state, ref_steps = None, []
        for t in range(ids.shape[1]):
            out, state = model.step(torch.tensor(ids[:, t : t + 1]), state)
            ref_steps.append(out.numpy())
    logits, ours_state = ours(mx.array(ids))
    assert rel_err(np_(logits), np.concatenate(ref_steps, axis=1)) <= TOL
    # mLSTM block 0: our C, n = NX-AI's * sqrt(DH) (q- vs k-scaling); the converter undoes it.
    cell = ours.blocks[0].xlstm.mlstm_cell
    C_ref, n_ref, m_ref = (t.numpy() for t in state["block_0"]["mlstm_state"])
    C, n, m = (np_(s) for s in ours_state[0][:3])
    assert rel_err(C, C_ref * np.sqrt(cell.head_dim)) <= TOL
    for a, b in zip(cell.state_to_nxai(ours_state[0][:3]), (C_ref, n_ref, m_ref)):
        assert rel_err(np_(a), b) <= TOL
    back = cell.state_from_nxai(tuple(mx.array(t.numpy()) for t in state["block_0"]["mlstm_state"]))
    assert rel_err(np_(back[0]), C) <= TOL
    assert rel_err(np_(ours_state[0][3]), state["block_0"]["conv_state"][0].numpy()[:, 1:]) <= 1e-6
    # sLSTM block 1: NX-AI's (y, c, n, m) [B, H] against our (c, n, m, h) [B, NH, DH].
    y, c, n_s, m_s = (t.numpy().reshape(2, 2, 16) for t in state["block_1"]["slstm_state"])
    for a, b in zip(ours_state[1][:4], (c, n_s, m_s, y)):
        assert rel_err(np_(a), b) <= TOL


def test_mlstm_kernels_agree_and_chunk_boundaries():
    model, cfg = official(seed=4)
    ids = ids_for(S=37, seed=4)
    ref = torch_logits(model, ids)
    for kernel, chunk in (("chunkwise", 8), ("parallel", 64), ("sequence", 64)):
        ours = ours_from(model, cfg, mlstm_kernel=kernel, chunk_size=chunk)
        assert rel_err(np_(ours(mx.array(ids))[0]), ref) <= TOL, kernel


def test_state_continuation_and_batch_rows():
    model, cfg = official(seed=5)
    ours = ours_from(model, cfg)
    ids = ids_for(S=20, seed=5)
    full, full_state = ours(mx.array(ids))
    a, st = ours(mx.array(ids[:, :7]))
    b, st = ours(mx.array(ids[:, 7:]), st)
    assert rel_err(np_(mx.concatenate([a, b], axis=1)), np_(full)) <= TOL
    for blk_a, blk_b in zip(st, full_state):
        for x, y in zip(blk_a, blk_b):
            assert rel_err(np_(x), np_(y)) <= TOL
    # make_state == None; states of batch-1 runs concatenate along axis 0.
    zero, _ = ours(mx.array(ids[:, :5]), ours.make_state(2))
    assert rel_err(np_(zero), np_(full[:, :5])) <= 1e-6
    _, s0 = ours(mx.array(ids[:1, :7]))
    _, s1 = ours(mx.array(ids[1:, :7]))
    cat = [tuple(mx.concatenate([x, y], axis=0) for x, y in zip(p, q)) for p, q in zip(s0, s1)]
    b2, _ = ours(mx.array(ids[:, 7:]), cat)
    assert rel_err(np_(b2), np_(b)) <= TOL


def test_gradients_match_torch_autograd():
    model, cfg = official(seed=6)
    model.train()
    ours = ours_from(model, cfg)
    ours.train()
    ids = ids_for(S=12, seed=6)
    logits = model(torch.tensor(ids[:, :-1]))
    loss_t = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.tensor(ids[:, 1:]).reshape(-1))
    loss_t.backward()

    def loss_fn(m):
        out, _ = m(mx.array(ids[:, :-1]))
        return nn.losses.cross_entropy(out, mx.array(ids[:, 1:])).mean()

    loss, grads = nn.value_and_grad(ours, loss_fn)(ours)
    assert abs(float(loss) - loss_t.item()) <= 1e-4 * abs(loss_t.item())
    grads = dict(tree_flatten(grads))
    torch_grads = {k: p.grad for k, p in model.named_parameters()}
    assert set(grads) == set(torch_grads)
    for key in ("xlstm_block_stack.blocks.1.xlstm.slstm_cell._recurrent_kernel_",
                "xlstm_block_stack.blocks.1.xlstm.slstm_cell._bias_",
                "xlstm_block_stack.blocks.1.xlstm.fgate.weight",
                "xlstm_block_stack.blocks.0.xlstm.mlstm_cell.igate.weight",
                "xlstm_block_stack.blocks.0.xlstm.conv1d.conv.weight",
                "token_embedding.weight"):
        assert rel_err(np_(grads[key]), torch_grads[key].numpy()) <= 1e-3, key


def test_compiled_training_steps_reduce_loss():
    """The trainer's pattern: one mx.compile'd step (value_and_grad + optimizer update)."""
    from functools import partial

    import mlx.optimizers as optim

    model = create_xlstm_model(V, 2, (1, 1), 32, 8, 4, seed=1)
    model.train()
    ids = mx.array(np.tile(np.arange(17) % 7, (2, 1)))
    opt = optim.Adam(learning_rate=3e-3)

    def loss_fn(m, x, y):
        out, _ = m(x)
        return nn.losses.cross_entropy(out, y).mean()

    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        opt.update(model, grads)
        return loss

    losses = []
    for _ in range(15):
        loss = step(ids[:, :-1], ids[:, 1:])
        mx.eval(loss, state)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    r = model.blocks[1].xlstm.slstm_cell._recurrent_kernel_
    assert float(mx.abs(r).sum()) > 0  # the recurrent kernel (zero at init) was trained


# ------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_load_model_directory(tmp_path, fmt):
    model, cfg = official(seed=7, slstm_at=(0, 2), num_blocks=3)
    path = save_official(model, cfg, tmp_path / fmt, fmt)
    ours = load_model(path)
    assert isinstance(ours, xLSTMLMModel)
    assert ours.config.slstm_at == [0, 2]
    ids = ids_for(seed=7)
    assert rel_err(np_(ours(mx.array(ids))[0]), torch_logits(model, ids)) <= TOL


def test_load_nxai_experiment_yaml_layout(tmp_path):
    """NX-AI's example YAMLs: the model under ``model:`` beside training/dataset, with
    ``${...}`` references and only the fields that differ from the defaults."""
    model, cfg = official(seed=8, slstm_at=(1,), num_blocks=2, m_heads=2, s_heads=2)
    path = tmp_path / "exp"
    path.mkdir()
    save_file(state_dict(model), str(path / "model.safetensors"))
    text = f"""
training:
  batch_size: 4
  num_steps: 20
  lr_decay_until_steps: ${{.num_steps}}
model:
  name: xlstm_tiny
  num_blocks: 2
  embedding_dim: 32
  mlstm_block:
    mlstm:
      num_heads: 2
  slstm_block:
    slstm:
      backend: vanilla
      num_heads: 2
    feedforward:
      proj_factor: 1.3
      act_fn: gelu
  slstm_at: [1]
  context_length: ${{dataset.kwargs.context_length}}
  vocab_size: ${{dataset.kwargs.vocab_size}}
dataset:
  kwargs:
    context_length: 64
    vocab_size: {V}
"""
    (path / "config.yaml").write_text(text)
    d = read_config(path)
    assert d["vocab_size"] == V and is_xlstm_2024_config(d)
    ours = load_model(path)
    ids = ids_for(seed=8)
    assert rel_err(np_(ours(mx.array(ids))[0]), torch_logits(model, ids)) <= TOL


def test_tied_checkpoint_saved_by_safetensors_save_model(tmp_path):
    """safetensors' save_model (how shared tensors are saved: save_file refuses them) keeps one
    name of a tied pair, lm_head.weight; the embedding loads from it (and gives vocab_size)."""
    from safetensors.torch import load_file, save_model as st_save_model

    model, cfg = official(seed=17, tie=True)
    path = tmp_path / "tied"
    path.mkdir()
    st_save_model(model, str(path / "model.safetensors"))
    stored = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" in stored and "token_embedding.weight" not in stored
    d = dataclasses.asdict(cfg)
    d["vocab_size"] = "${dataset.vocab_size}"  # left to the weights
    (path / "config.yaml").write_text(yaml.safe_dump(d))
    ours = load_model(path)
    assert ours.config.tie_weights and ours.config.vocab_size == V and "lm_head" not in ours
    ids = ids_for(seed=17)
    assert rel_err(np_(ours(mx.array(ids))[0]), torch_logits(model, ids)) <= TOL


def test_readme_style_yaml_without_vocab_size(tmp_path):
    """NX-AI's README config is a block-stack config (no vocab_size; sLSTM backend "cuda"):
    the vocabulary comes from token_embedding.weight, the sLSTM layout from the kernel's shape."""
    model, cfg = official(seed=16, slstm_at=(1,), num_blocks=2, m_heads=4, s_heads=4)
    path = tmp_path / "readme"
    path.mkdir()
    save_file(state_dict(model), str(path / "model.safetensors"))
    (path / "config.yaml").write_text(
        "mlstm_block:\n  mlstm:\n    conv1d_kernel_size: 4\n    qkv_proj_blocksize: 4\n    num_heads: 4\n"
        "slstm_block:\n  slstm:\n    backend: cuda\n    num_heads: 4\n    conv1d_kernel_size: 4\n"
        "    bias_init: powerlaw_blockdependent\n  feedforward:\n    proj_factor: 1.3\n    act_fn: gelu\n"
        "context_length: ${dataset.context_length}\nnum_blocks: 2\nembedding_dim: 32\nslstm_at: [1]\n"
    )
    ours = load_model(path)
    assert ours.config.vocab_size == V and ours.blocks[1].xlstm.slstm_cell.layout == "vanilla"
    ids = ids_for(seed=16)
    assert rel_err(np_(ours(mx.array(ids))[0]), torch_logits(model, ids)) <= TOL


def test_auto_wiring_ignores_wrong_slstm_at():
    """The block types come from the weight names, not the config's slstm_at."""
    model, cfg = official(seed=9, slstm_at=(2,), num_blocks=3)
    d = dataclasses.asdict(cfg)
    d["slstm_at"], d["_block_map"] = [0], "1,0,0"
    weights = {k: mx.array(v.numpy()) for k, v in state_dict(model).items()}
    ours = model_from_checkpoint(d, weights)
    assert ours.config.slstm_at == [2]
    assert [type(b).__name__ for b in ours.blocks] == ["mLSTMBlock2024", "mLSTMBlock2024", "sLSTMBlock"]
    ids = ids_for(seed=9)
    assert rel_err(np_(ours(mx.array(ids))[0]), torch_logits(model, ids)) <= TOL
    text = ours.wiring()
    assert "blocks.0-1: mLSTM block" in text and "blocks.2: sLSTM block" in text
    assert "mLSTM block (at [0, 1]): x + xlstm(xlstm_norm(x))" in text and "sLSTM block (at [2])" in text
    assert "fgate->i~" in text and "weight layout vanilla" in text


def test_cuda_layout_checkpoint(tmp_path):
    """GPU-trained checkpoints store the sLSTM kernel in the CUDA layout; the recurrent
    kernel's shape tells, so the same weights load from either layout."""
    model, cfg = official(seed=10)
    sd = state_dict(model)
    cell = model.xlstm_block_stack.blocks[1].xlstm.slstm_cell
    NH, DH = 2, 16
    sd["xlstm_block_stack.blocks.1.xlstm.slstm_cell._recurrent_kernel_"] = (
        cell._recurrent_kernel_int2ext(cell._recurrent_kernel_).reshape(NH, DH, 4 * DH).detach().contiguous()
    )
    sd["xlstm_block_stack.blocks.1.xlstm.slstm_cell._bias_"] = cell._bias_int2ext(cell._bias_).reshape(-1).detach().contiguous()
    d = dataclasses.asdict(cfg)
    d["slstm_block"]["slstm"]["backend"] = "cuda"
    path = tmp_path / "cuda"
    path.mkdir()
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(d))
    ours = load_model(path)
    assert ours.blocks[1].xlstm.slstm_cell.layout == "cuda"
    ids = ids_for(seed=10)
    assert rel_err(np_(ours(mx.array(ids))[0]), torch_logits(model, ids)) <= TOL


def test_save_roundtrip_and_nxai_loads_our_checkpoint(tmp_path):
    ours = create_xlstm_model(V, 3, (2, 1), 32, 8, 4, slstm_backend="vanilla", seed=2)
    path = save_model(ours, tmp_path / "ours")
    again = load_model(path)
    ids = ids_for(seed=11)
    a, b = ours(mx.array(ids))[0], again(mx.array(ids))[0]
    assert np.array_equal(np_(a), np_(b))
    # NX-AI builds the same model from our config.json and loads our safetensors strictly.
    d = json.loads((path / "config.json").read_text())
    d["context_length"] = 64  # NX-AI's mLSTM cell sizes a mask buffer from it (-1 fails there)
    cfg = TxLSTMLMModelConfig(
        mlstm_block=TmLSTMBlockConfig(mlstm=TmLSTMLayerConfig(**d["mlstm_block"]["mlstm"])),
        slstm_block=TsLSTMBlockConfig(slstm=TsLSTMLayerConfig(**d["slstm_block"]["slstm"]),
                                      feedforward=TFeedForwardConfig(**d["slstm_block"]["feedforward"])),
        # model_file names the mlx-lm model file (for mlx_lm.load), not an NX-AI field.
        **{k: v for k, v in d.items() if k not in ("mlstm_block", "slstm_block", "model_file")},
    )
    from safetensors.torch import load_file

    nx = TxLSTMLMModel(cfg).eval()
    nx.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    assert rel_err(np_(a), torch_logits(nx, ids)) <= TOL


def test_loading_errors_list_every_problem(tmp_path):
    model, cfg = official(seed=12)
    sd = state_dict(model)
    del sd["xlstm_block_stack.blocks.0.xlstm.learnable_skip"]
    sd["xlstm_block_stack.blocks.1.xlstm.extra.weight"] = torch.zeros(3)
    sd["xlstm_block_stack.blocks.2.xlstm.proj_down.weight"] = torch.zeros(32, 63)
    path = tmp_path / "bad"
    path.mkdir()
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert "1 missing" in msg and "blocks.0.xlstm.learnable_skip" in msg
    assert "1 unexpected" in msg and "blocks.1.xlstm.extra.weight" in msg
    assert "1 mis-shaped" in msg and "proj_down.weight: checkpoint (32, 63), model (32, 64)" in msg


def test_wiring_errors(tmp_path):
    model, cfg = official(seed=13)
    weights = {k: mx.array(v.numpy()) for k, v in state_dict(model).items()}
    d = dataclasses.asdict(cfg)
    no_cell = {k: v for k, v in weights.items() if not k.startswith("xlstm_block_stack.blocks.1.xlstm.slstm_cell")}
    with pytest.raises(CheckpointError, match=r"blocks \[1\] have neither"):
        model_from_checkpoint(d, no_cell)
    gap = {k: v for k, v in weights.items() if not k.startswith("xlstm_block_stack.blocks.1.")}
    with pytest.raises(CheckpointError, match=r"no tensors for blocks \[1\]"):
        model_from_checkpoint(d, gap)
    with pytest.raises(CheckpointError, match="the weights hold 3 blocks, the config says num_blocks=4"):
        model_from_checkpoint({**d, "num_blocks": 4}, weights)
    with pytest.raises(CheckpointError, match=r"sLSTM blocks at \[1\] but the config has no slstm_block"):
        model_from_checkpoint({**d, "slstm_block": None, "slstm_at": []}, weights)
    bad_yaml = tmp_path / "y"
    bad_yaml.mkdir()
    (bad_yaml / "config.yaml").write_text("model:\n  num_blocks: ${nowhere.n}\n  slstm_at: [1]\n")
    save_file(state_dict(model), str(bad_yaml / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"num_blocks: unresolved interpolation"):
        load_model(bad_yaml)
    with pytest.raises(CheckpointError, match="no config.json or config.yaml"):
        read_config(tmp_path)


def test_config_roundtrip_and_detection():
    _, cfg = official()
    d = dataclasses.asdict(cfg)
    ours = xLSTMLMConfig.from_dict(d)
    assert ours.slstm_at == [1] and ours.mlstm_inner_dim == 64 and ours.ffn_dim == 64
    assert xLSTMLMConfig.from_dict(ours.to_dict()) == ours
    assert is_xlstm_2024_config(d) and is_xlstm_2024_config({"model": {"slstm_at": [0]}})
    assert not is_xlstm_2024_config({"model_type": "xlstm", "embedding_dim": 64, "num_blocks": 2})
    only_s = xLSTMLMConfig.from_dict({"num_blocks": 3, "slstm_block": {}, "vocab_size": 5})
    assert only_s.slstm_at == [0, 1, 2]  # no mlstm_block: all sLSTM, as in NX-AI
    from xlstm_metal.config import ConfigError

    for bad, match in (({"slstm_at": "some"}, "slstm_at must be"), ({"slstm_at": [5]}, r"positions \[5\] are outside"),
                       ({"num_blocks": 0}, "num_blocks must be a positive integer"),
                       ({"slstm_block": {"slstm": {"num_heads": 3}}}, "num_heads 3 must divide embedding_dim 32")):
        with pytest.raises(ConfigError, match=match):
            xLSTMLMConfig.from_dict({**d, **bad})


def test_create_xlstm_model_signature():
    m = create_xlstm_model(V, 10, (3, 1), 32, 8, 4)
    assert m.config.slstm_at == [3, 7]
    assert m.config.mlstm_block.mlstm.proj_factor == 2.0
    assert m.config.slstm_block.feedforward.proj_factor == pytest.approx(4 / 3)
    assert m.blocks[3].ffn.hidden == 64  # round_up(4/3 * 32, 64)
    assert create_xlstm_model(V, 3, (0, 1), 32, 8, 4).config.slstm_at == [0, 1, 2]
    logits, state = m(mx.array(ids_for(S=5)))
    assert logits.shape == (2, 5, V) and len(state) == 10
    assert len(state[3]) == 5 and len(state[0]) == 4
    with pytest.raises(ValueError, match="head_dim \\* head_num = 24 must equal inp_dim = 32"):
        create_xlstm_model(V, 2, (1, 1), 32, 6, 4)
    with pytest.raises(ValueError, match="signature"):
        create_xlstm_model(V, 2, (0, 0), 32, 8, 4)


def test_model_from_config_and_weight_decay_split():
    _, cfg = official(seed=14)
    d = dataclasses.asdict(cfg)
    mx.random.seed(4)
    a = model_from_config(d)
    mx.random.seed(4)
    b = model_from_config(d)
    c = model_from_config(d, seed=99)
    pa, pb, pc = (dict(tree_flatten(m.parameters())) for m in (a, b, c))
    key = "xlstm_block_stack.blocks.0.xlstm.proj_up.weight"
    assert np.array_equal(np_(pa[key]), np_(pb[key])) and not np.array_equal(np_(pa[key]), np_(pc[key]))
    # Same split as NX-AI's get_weight_decay_optim_group_param_names.
    decay_ref, no_decay_ref = TxLSTMLMModel(cfg).get_weight_decay_optim_group_param_names()
    assert {k for k in pa if a.decays(k)} == set(decay_ref)
    assert {k for k in pa if not a.decays(k)} == set(no_decay_ref)


def test_init_matches_nxai_scheme():
    m = create_xlstm_model(V, 4, (1, 1), 64, 16, 4, seed=3)
    p = dict(tree_flatten(m.parameters()))
    assert np.allclose(np_(p["xlstm_block_stack.blocks.0.xlstm.mlstm_cell.fgate.bias"]), np.linspace(3, 6, 4))
    assert np.all(np_(p["xlstm_block_stack.blocks.0.xlstm_norm.weight"]) == 0)
    std = float(np.std(np_(p["token_embedding.weight"])))
    assert abs(std - np.sqrt(2 / (5 * 64))) < 0.1 * np.sqrt(2 / (5 * 64))
    # powerlaw_blockdependent forget-gate bias of sLSTM block 1 (ratio 1/3), same for each head
    b = np_(m.blocks[1].xlstm.slstm_cell.gate_bias())
    expect = -(-5.0 + 12.0 * (np.arange(16) / 15) ** (0.3 + 1.3 / 3))
    assert np.allclose(b[:, 1], expect[None], atol=1e-5) and np.all(b[:, [0, 2, 3]] == 0)


def test_runner_generates_like_argmax_loop():
    from xlstm_metal.generation.runner import xLSTMRunner

    model = create_xlstm_model(V, 3, (1, 1), 32, 8, 4, seed=5)
    prompt = [3, 9, 4, 1, 7]
    got = xLSTMRunner(model, prefill_chunk_size=2).generate(prompt, max_tokens=6)
    ids, expect = list(prompt), []
    for _ in range(6):
        logits, _ = model(mx.array([ids]))
        nxt = int(mx.argmax(logits[0, -1]).item())
        expect.append(nxt)
        ids.append(nxt)
    assert got == expect


def test_bfloat16_load_runs_close_to_float32(tmp_path):
    model, cfg = official(seed=15)
    path = save_official(model, cfg, tmp_path / "bf16")
    ours32, ours16 = load_model(path), load_model(path, dtype="bfloat16")
    assert ours16.blocks[1].xlstm.slstm_cell._recurrent_kernel_.dtype == mx.bfloat16
    ids = mx.array(ids_for(S=16, seed=15))
    ref = np_(ours32(ids)[0])
    out, state = ours16(ids[:, :10], ours16.make_state(2))
    assert state[0][3].dtype == mx.bfloat16 and state[0][0].dtype == mx.float32
    step, _ = ours16(ids[:, 10:11], state)
    assert out.dtype == mx.bfloat16
    for got, want in ((np_(out), ref[:, :10]), (np_(step), ref[:, 10:11])):  # bf16: ~3 digits
        assert rel_err(got, want) < 0.15
        assert np.mean(np.abs(got - want)) < 0.06 * np.mean(np.abs(want))


# ------------------------------------------------------------------------------ recompute
def _recompute_grads(model, recompute, ids):
    from mlx.utils import tree_flatten

    from xlstm_metal.training.trainer import make_loss_fn

    loss_fn = make_loss_fn(model, mx.float32, recompute)
    loss, grads = mx.value_and_grad(loss_fn)(model.trainable_parameters(), ids[:, :-1], ids[:, 1:])
    return loss.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize("tie", [True, False])
def test_recompute_gives_the_same_loss_and_gradients_for_the_2024_model(tie):
    """--recompute on a 2024 xLSTM (mLSTM and sLSTM blocks with FFN, tied or separate head):
    the checkpointed forward computes the model's own loss and gradients."""
    from xlstm_metal.training.trainer import cross_entropy

    model = create_xlstm_model(V, 3, (2, 1), 32, 8, 4, seed=3, slstm_backend="vanilla")
    model = model_from_config({**model.config.to_dict(), "tie_weights": tie}, seed=3)  # created untied
    assert ("lm_head" in model) is not tie
    ids = mx.array(np.random.default_rng(0).integers(0, V, (2, 19)))
    plain_loss, plain = _recompute_grads(model, "none", ids)
    assert plain_loss == pytest.approx(cross_entropy(model(ids[:, :-1])[0], ids[:, 1:]).item(), rel=1e-6)
    for recompute in ("head", "mlstm", "ffn", "blocks"):
        loss, grads = _recompute_grads(model, recompute, ids)
        assert loss == pytest.approx(plain_loss, rel=1e-6), recompute
        assert grads.keys() == plain.keys()
        for name, g in grads.items():
            assert rel_err(g, plain[name]) < 1e-5, (recompute, name)
    assert float(mx.abs(plain["xlstm_block_stack.blocks.2.xlstm.slstm_cell._recurrent_kernel_"]).sum()) > 0


def test_recompute_is_refused_where_it_cannot_run():
    from xlstm_metal.training.trainer import make_loss_fn

    model = create_xlstm_model(V, 2, (1, 1), 32, 8, 4, dropout=0.1)
    with pytest.raises(ValueError, match="needs dropout 0"):
        make_loss_fn(model, mx.float32, "mlstm")
    make_loss_fn(model, mx.float32, "none")  # the plain forward takes any dropout


def test_train_points_a_loaded_2024_model_at_the_training_kernel():
    """`xlstm-metal train --init-from` a 2024 model: its mLSTM layers run the training kernel
    (chunkwise_fused on CUDA by default), not the loader's."""
    from xlstm_metal.cli import UsageError
    from xlstm_metal.cli.train import _set_training_kernel
    from xlstm_metal.kernels import get_mlstm_kernel

    model = create_xlstm_model(V, 3, (2, 1), 32, 8, 4, seed=1)
    layers = [b.xlstm for b in model.blocks if b.kind == "mLSTM"]
    assert len(layers) == 2 and all(layer.kernel_name == "chunkwise" for layer in layers)
    ids = mx.array(np.random.default_rng(1).integers(0, V, (1, 21)))
    before = model(ids)[0]
    _set_training_kernel(model, "chunkwise_fused")
    assert all(layer.kernel_name == "chunkwise_fused" for layer in layers)
    assert all(layer._kernel is get_mlstm_kernel("chunkwise_fused") for layer in layers)
    assert rel_err(model(ids)[0], before) < 1e-5
    with pytest.raises(UsageError, match="--kernel"):
        _set_training_kernel(model, "no_such_kernel")


@pytest.mark.parametrize("in_features,heads,out_features", [(32, 8, 32), (24, 2, 40), (64, 4, 64)])
def test_dense_block_diagonal_headwise_equals_the_blocks(monkeypatch, in_features, heads, out_features):
    """LinearHeadwise's dense path (one GEMM with the block-diagonal matrix; CUDA, >= 64 rows)
    gives the block products' outputs and gradients; forced here on the CPU."""
    from xlstm_metal.cells import xlstm_2024 as cells

    layer = cells.LinearHeadwise(in_features, heads, out_features, bias=True)
    rng = np.random.default_rng(heads)
    layer.weight = mx.array(rng.standard_normal(layer.weight.shape).astype(np.float32))
    layer.bias = mx.array(rng.standard_normal(out_features).astype(np.float32))
    x = mx.array(rng.standard_normal((3, 70, in_features)).astype(np.float32))
    dy = mx.array(rng.standard_normal((3, 70, out_features)).astype(np.float32))

    def run():
        def loss(params, x):
            layer.update(params)
            return (layer(x) * dy).sum()

        out = layer(x)
        _, (gp, gx) = mx.value_and_grad(loss, argnums=(0, 1))(layer.trainable_parameters(), x)
        return out, gp["weight"], gp["bias"], gx

    monkeypatch.setattr(cells, "_dense_headwise", lambda rows: False)  # the block products (CUDA too)
    blocks = run()
    monkeypatch.setattr(cells, "_dense_headwise", lambda rows: rows >= cells.DENSE_HEADWISE_MIN_ROWS)
    dense = run()
    w = np.array(layer.weight)
    dense_w = np.array(cells.block_diagonal(layer.weight))
    o, i = w.shape[1:]
    for h in range(heads):  # each block in its place, zeros elsewhere
        np.testing.assert_array_equal(dense_w[h * o:(h + 1) * o, h * i:(h + 1) * i], w[h])
    assert np.count_nonzero(dense_w) == np.count_nonzero(w)
    for name, a, b in zip(("out", "dW", "db", "dx"), dense, blocks):
        assert rel_err(a, b) < 1e-6, name


def test_2024_model_with_dense_headwise_matches(monkeypatch):
    """A whole 2024 model (mLSTM 4x4 q/k/v blocks, sLSTM gate heads) through the dense path."""
    from xlstm_metal.cells import xlstm_2024 as cells

    model = create_xlstm_model(V, 3, (2, 1), 32, 8, 4, seed=2)
    ids = mx.array(np.random.default_rng(2).integers(0, V, (2, 40)))
    monkeypatch.setattr(cells, "_dense_headwise", lambda rows: False)
    before = model(ids)[0]
    calls = []
    monkeypatch.setattr(cells, "_dense_headwise", lambda rows: calls.append(rows) or True)
    after = model(ids)[0]
    assert calls and rel_err(after, before) < 1e-5
