"""mlx-lm and lm-eval corners (session 53 hunt). Tiny seeded models."""

import xlstm_metal  # noqa: F401,I001  (first: preloads the BLAS before mlx is imported)

import mlx.core as mx
import pytest
from cli_helpers import assert_rejected
from test_tokenizer import train_tiny_tokenizer

from xlstm_metal import create_xlstm_model, save_model
from xlstm_metal.generation.tokenizer import Tokenizer

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from xlstm_metal.lm_eval_adapter import XLSTMMetalLM  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A fresh 2024 model (its i/f gate weights all zero, NX-AI's init); a tokenizer inserting no BOS."""
    hf = train_tiny_tokenizer()
    model = create_xlstm_model(vocab_size=hf.get_vocab_size(), num_layers=2, signature=(1, 1), inp_dim=64,
                               head_dim=16, head_num=4, seed=1)
    return save_model(model, tmp_path_factory.mktemp("s53") / "m", tokenizer=Tokenizer(hf, bos_token_id=0,
                                                                                          eos_token_ids=[2]))


def test_generate_until_of_an_empty_context_starts_from_the_prefix_token(ckpt):
    lm = XLSTMMetalLM(pretrained=str(ckpt), batch_size=2)
    kw = {"max_gen_toks": 6}
    out = lm.generate_until([Instance("generate_until", {}, ("", kw), 0), Instance("generate_until", {}, ("a", kw), 1)])
    want = lm.runner.generate([[0], lm.tok.encode("a")], max_tokens=6)  # "prompt 0 is empty" before
    assert out == [lm.tok.decode(ids) for ids in want] and out[0]


def lora(ckpt, tmp_path, *extra):
    for split in ("train", "valid"):
        (tmp_path / f"{split}.jsonl").write_text('{"text": "the cat sat on the mat"}\n' * 2)
    return ["mlx-lm", "lora", "--model", ckpt, "--train", "--data", tmp_path, "--iters", "1", "--batch-size", "1",
            "--val-batches", "1", "--adapter-path", tmp_path / "ad", *extra]


@pytest.mark.parametrize("where", ["option", "config"])
def test_lora_num_layers_0_is_refused(ckpt, tmp_path, capsys, where):
    (tmp_path / "c.yaml").write_text("num_layers: 0\n")
    extra = ["--num-layers", "0"] if where == "option" else ["--config", tmp_path / "c.yaml"]
    # mlx-lm's model.layers[-0:] trained every block
    assert_rejected(lora(ckpt, tmp_path, *extra), capsys, "--num-layers must be -1 (all) or 1 to 2, got 0")
    assert not (tmp_path / "ad").exists()


def test_dora_over_an_all_zero_weight_row_is_refused(ckpt, tmp_path, capsys):
    import mlx_lm
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm.load(str(ckpt), trust_remote_code=True)
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 1.0, "dropout": 0.0}, use_dora=True)
    assert mx.isnan(model(mx.array([[5, 6]]))).any()  # why it is refused: every loss was NaN
    assert_rejected(lora(ckpt, tmp_path, "--fine-tune-type", "dora", "--num-layers", "-1"), capsys,
                    "layers.0.xlstm.mlstm_cell.", "all-zero weight row")
    assert not (tmp_path / "ad").exists()
