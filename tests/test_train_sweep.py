"""`xlstm-metal train` used as an experienced user would: what the settings promise, checked by value."""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

import xlstm_metal  # noqa: F401  (BLAS preload before mlx use)
from xlstm_metal.training.trainer import TrainingConfig, make_optimizer


def test_weight_decay_reaches_matrices_only_in_lab_models():
    """--weight-decay is 'AdamW weight decay of matrices': an sLSTM lab model's gate bias
    (``slstm_cell._bias_``, a vector whose name does not end in '.bias') was decayed too."""
    from xlstm_metal.lab import training_model
    from xlstm_metal.lab.library import load_arch

    model = training_model(load_arch("slstm"), 300, 0)
    # Trained values (every parameter non-zero): the lab's sLSTM biases start at zero.
    model.update(tree_map(lambda p: p + 0.5, model.parameters()))
    before = dict(tree_flatten(model.parameters()))
    lr, wd = 0.1, 0.5
    optimizer = make_optimizer(TrainingConfig(lr=lr, weight_decay=wd), model)
    # Zero gradients: AdamW's step is then the decay alone, p * (1 - lr * wd) for decayed parameters.
    optimizer.update(model, tree_map(mx.zeros_like, model.trainable_parameters()))
    after = dict(tree_flatten(model.parameters()))
    biases = [k for k in before if k.endswith("_bias_")]
    assert biases
    for name, value in before.items():
        decayed = value.ndim >= 2 and "embeddings" not in name and "norm" not in name
        expected = np.array(value) * (1 - lr * wd) if decayed else np.array(value)
        np.testing.assert_allclose(np.array(after[name]), expected, rtol=1e-6, atol=1e-7, err_msg=name)
