"""Session 53 hunt, the model core: kernels, configs and paths of xLSTM-Large and the 2024 xLSTM."""

import xlstm_metal  # noqa: F401,I001  (first: preloads the BLAS before mlx is imported)

import mlx.core as mx
import pytest

from xlstm_metal.config import xLSTMConfig
from xlstm_metal.errors import ConfigError
from xlstm_metal.models.xlstm_2024 import model_from_config

TINY = dict(embedding_dim=64, num_heads=2, num_blocks=1, vocab_size=97)
CFG_2024 = {"vocab_size": 61, "embedding_dim": 32, "num_blocks": 2, "slstm_at": [1],
            "mlstm_block": {"mlstm": {"num_heads": 2}}, "slstm_block": {"slstm": {"num_heads": 2, "backend": "vanilla"}}}


@pytest.mark.parametrize("field", ["chunkwise_kernel", "sequence_kernel"])
@pytest.mark.parametrize("name", ["step", "native", "triton"])
def test_a_one_token_kernel_for_prompts_is_refused_by_field(field, name):
    # accepted, then the first prompt failed with "mlstm_step takes one time step, got S=5"
    with pytest.raises(ConfigError, match=f"'{field}': '{name}' runs one token at a time"):
        xLSTMConfig(**TINY, **{field: name})
    xLSTMConfig(**TINY, step_kernel=name)  # where it belongs
    xLSTMConfig(**TINY, step_kernel="chunkwise")  # one token through a prompt kernel is right too


def test_a_2024_model_with_a_one_token_kernel_is_refused_at_construction():
    with pytest.raises(ValueError, match="mlstm_kernel 'step' runs one token at a time"):
        model_from_config(CFG_2024, seed=0, mlstm_kernel="step")
    model = model_from_config(CFG_2024, seed=0, mlstm_kernel="parallel")
    with pytest.raises(ValueError, match="'step_fused' runs one token"):
        model.blocks[0].xlstm.set_kernel("step_fused")
    assert model.blocks[0].xlstm.kernel_name == "parallel"
    assert model(mx.array([[1, 2, 3]]))[0].shape == (1, 3, 61)
