"""Training: text data -> packed token windows (data), the loop (trainer), checkpoints.

The command line is ``xlstm-metal train`` (xlstm_metal/cli/train.py). In Python::

    from xlstm_metal.training import Trainer, TrainingConfig
    trainer = Trainer(model, train_stream, val_stream, TrainingConfig(steps=1000), "runs/x", tokenizer_dir)
    result = trainer.train()        # result.losses, result.evals, result.best_val_loss

``train()`` raises :class:`TrainingDiverged` when a loss read at a log point or evaluation (or the
weights about to be checkpointed) is NaN or infinite; the checkpoints written before it stay.
"""

from .checkpoint import latest_checkpoint, save_checkpoint
from .data import DataError, PackedBatches, load_documents, split_stream, tokenize_documents, train_bpe_tokenizer
from .trainer import Trainer, TrainingConfig, TrainingDiverged, TrainResult, init_xlstm_large

__all__ = [
    "DataError",
    "PackedBatches",
    "Trainer",
    "TrainingConfig",
    "TrainingDiverged",
    "TrainResult",
    "init_xlstm_large",
    "latest_checkpoint",
    "load_documents",
    "save_checkpoint",
    "split_stream",
    "tokenize_documents",
    "train_bpe_tokenizer",
]
