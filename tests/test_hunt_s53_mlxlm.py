"""mlx-lm and lm-eval corners (session 53 hunt). A tiny seeded 2024 model."""

import xlstm_metal  # noqa: F401,I001  (first: preloads the BLAS before mlx is imported)

import mlx.core as mx
import mlx_lm
import pytest
from cli_helpers import assert_rejected
from test_tokenizer import train_tiny_tokenizer

from xlstm_metal import create_xlstm_model, save_model
from xlstm_metal.generation.tokenizer import Tokenizer

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from xlstm_metal.lm_eval_adapter import XLSTMMetalLM  # noqa: E402

IDS = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):  # fresh: its i/f gate weights all zero (NX-AI's init); no BOS inserted
    hf = train_tiny_tokenizer()
    m = create_xlstm_model(hf.get_vocab_size(), num_layers=2, signature=(1, 1), inp_dim=64, head_dim=16, head_num=4)
    return save_model(m, tmp_path_factory.mktemp("s53") / "m", tokenizer=Tokenizer(hf, bos_token_id=0,
                                                                                    eos_token_ids=[2]))


def test_generate_until_of_an_empty_context_starts_from_the_prefix_token(ckpt):
    lm = XLSTMMetalLM(pretrained=str(ckpt), batch_size=2)
    out = lm.generate_until([Instance("generate_until", {}, (c, {"max_gen_toks": 6}), 0) for c in ("", "a")])
    want = lm.runner.generate([[0], lm.tok.encode("a")], max_tokens=6)  # "prompt 0 is empty" before
    assert out == [lm.tok.decode(ids) for ids in want] and out[0]
    with pytest.raises(ValueError, match="apply_chat_template: the xlstm-metal adapter renders no"):
        lm.tokenizer_name  # lm-eval's NotImplementedError (a traceback) before


def lora(ckpt, tmp_path, capsys, *extra):
    for split in ("train", "valid"):
        (tmp_path / f"{split}.jsonl").write_text('{"text": "the cat sat on the mat"}\n' * 2)
    assert_rejected(["mlx-lm", "lora", "--model", ckpt, "--train", "--data", tmp_path, "--iters", "1", "--batch-size",
                     "1", "--val-batches", "1", "--adapter-path", tmp_path / "ad", *extra[:-1]], capsys, extra[-1])
    assert not (tmp_path / "ad").exists()


@pytest.mark.parametrize("opt, words", [  # before: all blocks trained; MLX's "[grad] ..."; NaN losses (DoRA)
    ("--num-layers 0", "got 0"), ("num_layers: 0", "got 0"), ("lora_parameters: {rank: 1, scale: 1, dropout: 0, keys: "
                                                             "[q]}", "['q'] name no"),
    ("--fine-tune-type dora --num-layers -1", "layers.0.xlstm.mlstm_cell.fgate has an all-zero weight row")])
def test_lora_that_would_train_all_blocks_none_or_nan_is_refused(ckpt, tmp_path, capsys, opt, words):
    (tmp_path / "c.yaml").write_text(opt)
    lora(ckpt, tmp_path, capsys, *(opt.split() if opt[0] == "-" else ["--config", tmp_path / "c.yaml"]), words)


def test_server_exact_prompt_cache_hit_leaves_a_token_to_compute(ckpt, tmp_path, monkeypatch):
    from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache

    from xlstm_metal.cli.mlxlm import server_requests_checked

    model, _ = mlx_lm.load(str(ckpt), trust_remote_code=True)
    lru = LRUPromptCache()
    for n in (3, 4):
        model(mx.array([IDS[:n]]), cache := make_prompt_cache(model))
        lru.insert_cache("m", IDS[:n], cache)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "none"))
    with server_requests_checked():  # rest [] before: the server's generation thread died
        cache, rest = lru.fetch_nearest_cache("m", IDS)
        assert mlx_lm.server.scan_cache_dir().repos == ()  # no Hugging Face cache: GET /v1/models had no body
    assert rest == [8] and mx.allclose(model(mx.array([rest]), cache), model(mx.array([IDS]))[:, -1:], atol=1e-4)


def test_lm_eval_command_names_a_bad_model_arg(ckpt, capsys, monkeypatch):
    from xlstm_metal.lm_eval_adapter import main

    monkeypatch.setattr("sys.argv", ["x", "--model", "xlstm-metal", "--model_args", f"pretrained={ckpt},max_length=a",
                                     "--tasks", "lambada_openai"])
    with pytest.raises(SystemExit, match="2"):  # a traceback before
        main()
    assert capsys.readouterr().err.endswith("error: max_length must be an integer of at least 2 tokens, got 'a'\n")
