"""Round trips through `xlstm-metal convert` and `xlstm-metal mlx-lm`, as a user runs them: a
checkpoint transformers wrote (model, tokenizer, generation config) converted here, then opened
in transformers, mlx-lm and xlstm-metal; mlx-lm's LoRA on a model of fewer than 16 blocks with
its default --num-layers (the README's example). Tiny seeded models; nothing downloads."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model
from test_tokenizer import SPECIALS, train_tiny_tokenizer

from xlstm_metal import load, save_model
from xlstm_metal.cli import main
from xlstm_metal.generation import load_tokenizer, xLSTMRunner

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mlx_lm = pytest.importorskip("mlx_lm")

PROMPT = "the cat sat on the mat"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A checkpoint as transformers writes one: xLSTMForCausalLM.save_pretrained (its config has
    no force_bos_token_insert), a fast tokenizer that adds no BOS, a generation config."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast, xLSTMConfig, xLSTMForCausalLM

    bos, pad, eos = SPECIALS
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_tiny_tokenizer(), bos_token=bos, eos_token=eos,
                                        pad_token=pad)
    config = xLSTMConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_heads=2,
                         chunk_size=16, autocast_kernel_dtype="float32", bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    from test_transformers_checkpoint import randomize_weights

    torch.manual_seed(0)
    model = randomize_weights(xLSTMForCausalLM(config).eval())
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=2, do_sample=True, temperature=0.7,
                                               top_k=5)
    path = tmp_path_factory.mktemp("hf") / "src"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert "force_bos_token_insert" not in json.loads((path / "config.json").read_text())
    return path


def test_transformers_checkpoint_converts_with_its_tokenization_logits_and_files(hf_dir, tmp_path, capsys):
    """HF -> convert -> transformers / xlstm-metal: the same token ids for a prompt (the output
    inserted a BOS its source never had: "force_bos_token_insert" defaulted to true), the same
    logits (float32), the generation config copied as it was."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    assert main(["convert", str(hf_dir), str(out)]) == 0
    capsys.readouterr()
    source_ids = AutoTokenizer.from_pretrained(hf_dir).encode(PROMPT)
    assert source_ids[0] != 0 and load_tokenizer(hf_dir).encode(PROMPT) == source_ids  # no BOS in the source
    assert load_tokenizer(out).encode(PROMPT) == source_ids
    assert AutoTokenizer.from_pretrained(out).encode(PROMPT) == source_ids
    assert json.loads((out / "config.json").read_text())["force_bos_token_insert"] is False
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is False
    assert (out / "generation_config.json").read_bytes() == (hf_dir / "generation_config.json").read_bytes()

    ids = np.random.default_rng(1).integers(0, 320, size=(2, 29))
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(hf_dir).eval()(torch.tensor(ids)).logits.numpy()
        round_trip = AutoModelForCausalLM.from_pretrained(out).eval()(torch.tensor(ids)).logits.numpy()
    ours, _ = load(out)
    assert rel_err(round_trip, reference) == 0.0  # float32 weights copied exactly
    assert rel_err(np.array(ours(mx.array(ids.astype(np.int32)))[0]), reference) <= 1e-4


def test_quantized_conversion_of_a_transformers_checkpoint_decodes_alike_in_mlx_lm(hf_dir, tmp_path, capsys):
    """-q --q-recipe mixed-4-6: mlx-lm reads the quantization entry and, from the prompt's
    source token ids, decodes greedily the tokens xlstm-metal decodes."""
    out = tmp_path / "q"
    assert main(["convert", str(hf_dir), str(out), "-q", "--q-recipe", "mixed-4-6"]) == 0
    capsys.readouterr()
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["bits"] == 4 and quantization["lm_head"]["bits"] == 6
    model, tokenizer = mlx_lm.load(str(out), trust_remote_code=True)
    source_ids = load_tokenizer(hf_dir).encode(PROMPT)
    assert tokenizer.encode(PROMPT) == source_ids
    theirs = [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=12)]
    ours, our_tokenizer = load(out)
    assert our_tokenizer.encode(PROMPT) == source_ids
    expected = xLSTMRunner(ours, our_tokenizer).generate(PROMPT, max_tokens=12, temperature=0)
    assert len(theirs) == 12 and theirs == list(expected)


def test_mlx_lm_lora_default_num_layers_trains_every_block_of_a_small_model(tmp_path, capsys):
    """`xlstm-metal mlx-lm lora --model M --train --data D` (README) on a model of 2 blocks:
    mlx-lm's default --num-layers 16 stopped it ("Requested to train 16 layers but the model
    only has 2 layers"); now both blocks are trained, adapter_config.json says 2, and the
    adapters change the logits. A --num-layers given is still mlx-lm's to refuse."""
    hf = train_tiny_tokenizer()
    ckpt = save_model(tiny_model(3, vocab_size=hf.get_vocab_size()), tmp_path / "ckpt", tokenizer=hf)
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.dumps({"text": f"the cat number {i} sat on the mat and looked at the dog"}) for i in range(4)]
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    lora = ["mlx-lm", "lora", "--model", str(ckpt), "--train", "--data", str(data), "--iters", "2",
            "--batch-size", "2", "--val-batches", "1", "--steps-per-eval", "100", "--learning-rate", "1e-2"]
    assert main([*lora, "--adapter-path", str(tmp_path / "adapters")]) == 0
    assert "the model has 2 blocks" in capsys.readouterr().err
    assert json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())["num_layers"] == 2
    base, tokenizer = mlx_lm.load(str(ckpt), trust_remote_code=True)
    tuned, _ = mlx_lm.load(str(ckpt), adapter_path=str(tmp_path / "adapters"), trust_remote_code=True)
    ids = mx.array([tokenizer.encode(PROMPT)])
    assert rel_err(np.array(tuned(ids)), np.array(base(ids))) > 1e-3

    assert main([*lora, "--num-layers", "16", "--adapter-path", str(tmp_path / "a16")]) == 2
    assert "Requested to train 16 layers but the model only has 2 layers" in capsys.readouterr().err
    # A --config file's num_layers is the user's too.
    config = tmp_path / "lora.yaml"
    config.write_text("num_layers: 1\n")
    assert main([*lora, "--config", str(config), "--adapter-path", str(tmp_path / "a1")]) == 0
    assert json.loads((tmp_path / "a1" / "adapter_config.json").read_text())["num_layers"] == 1
    import mlx_lm.lora as mlx_lm_lora

    assert type(mlx_lm_lora.CONFIG_DEFAULTS["num_layers"]) is int  # mlx-lm's own default restored


def _native_large(path):
    """NX-AI's native xLSTMLarge checkpoint (its own config.json: no model_type), fused layout."""
    from test_parity_nxai import official_model, save_native

    model, config = official_model(seed=4, weight_mode="fused", vocab_size=320)
    save_native(model, config, path)
    train_tiny_tokenizer().save(str(path / "tokenizer.json"))
    return "the cat sat on the mat"


def _native_2024(path):
    """NX-AI's 2024 xLSTMLMModel (sLSTM + mLSTM blocks) with its config.json (no model_type)."""
    from test_xlstm_2024 import V, official, save_official
    from tokenizers import Tokenizer, models, pre_tokenizers

    model, cfg = official(seed=3)
    save_official(model, cfg, path)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t1"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(str(path / "tokenizer.json"))
    return "t1 t2 t3 t4"


@pytest.mark.parametrize("make", [_native_large, _native_2024])
def test_mlx_lm_generate_reads_an_nxai_native_checkpoint(make, tmp_path, capsys):
    """`xlstm-metal mlx-lm generate --model DIR` on a directory NX-AI's own classes wrote (convert's
    documented inputs): mlx-lm looked up config.json's model_type unguarded (a KeyError
    traceback); it now runs this package's model module and decodes xlstm-metal's greedy tokens."""
    directory = tmp_path / "native"
    prompt = make(directory)
    assert "model_type" not in json.loads((directory / "config.json").read_text())
    assert main(["mlx-lm", "generate", "--model", str(directory), "--prompt", prompt, "--max-tokens", "8",
                 "--temp", "0"]) == 0
    text = capsys.readouterr().out.split("==========")[1].strip("\n")
    ours, tokenizer = load(directory)
    ids = xLSTMRunner(ours, tokenizer).generate(prompt, max_tokens=8, temperature=0)
    assert len(ids) == 8 and text == tokenizer.decode(ids, skip_special_tokens=False)


def test_mlx_lm_on_a_2024_directory_with_only_config_yaml_says_to_convert_it(tmp_path, capsys):
    """NX-AI's 2024 repository keeps config.yaml; mlx-lm reads only config.json. The wrapper now
    says so and names the command that writes one (exit 2), and that command's output runs."""
    import yaml

    directory = tmp_path / "native"
    prompt = _native_2024(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    (directory / "config.json").unlink()
    args = ["--prompt", prompt, "--max-tokens", "4", "--temp", "0"]
    assert main(["mlx-lm", "generate", "--model", str(directory), *args]) == 2
    err = capsys.readouterr().err
    assert "has config.yaml but no config.json" in err and f"xlstm-metal convert {directory} OUT" in err
    assert "Traceback" not in err
    assert main(["convert", str(directory), str(tmp_path / "converted")]) == 0
    capsys.readouterr()
    assert main(["mlx-lm", "generate", "--model", str(tmp_path / "converted"), *args]) == 0
    text = capsys.readouterr().out.split("==========")[1].strip("\n")
    ours, tokenizer = load(directory)
    assert text == tokenizer.decode(xLSTMRunner(ours, tokenizer).generate(prompt, max_tokens=4, temperature=0),
                                    skip_special_tokens=False)
