"""Run by tests/test_cuda_distributed.py as one process of a one-rank NCCL "world" on one GPU
(the environment mlx.launch --backend nccl gives rank 0 of 1). Prints one JSON line of checks."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import xlstm_metal  # noqa: E402,F401,I001  (first: the BLAS preload)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from conftest import tiny_model  # noqa: E402
from xlstm_metal.distributed.comm import launched, world  # noqa: E402
from xlstm_metal.distributed.tensor import VocabShardedEmbedding, VocabShardedLinear  # noqa: E402


def max_diff(a: mx.array, b: mx.array) -> float:
    return mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item()


def main() -> None:
    out: dict = {"launched": launched()}
    group = mx.distributed.init(strict=True, backend="nccl")
    out["size"], out["rank"] = group.size(), group.rank()
    out["world_is_nccl_group"] = world().size() == 1
    key = mx.random.key(0)
    for dtype in (mx.float32, mx.bfloat16):
        x = mx.random.normal((37, 129), key=key).astype(dtype)
        name = str(dtype).split(".")[-1]
        out[f"all_sum_{name}"] = max_diff(mx.distributed.all_sum(x, group=group), x)
        out[f"all_gather_{name}"] = max_diff(mx.distributed.all_gather(x, group=group), x)
        out[f"all_max_{name}"] = max_diff(mx.distributed.all_max(x, group=group), x)

    # The vocabulary-sharded embedding and LM head over NCCL (their all-sum / all-gather), in a
    # group of one, give the plain model's logits.
    model = tiny_model(seed=0)
    model.set_dtype(mx.bfloat16)
    ids = mx.random.randint(0, model.config.vocab_size, (2, 9), key=key)
    ref, _ = model(ids)
    model.backbone.embeddings = VocabShardedEmbedding.from_embedding(model.backbone.embeddings, group)
    if "lm_head" in model and type(model.lm_head) is nn.Linear:
        model.lm_head = VocabShardedLinear.from_linear(model.lm_head, group)
    got, _ = model(ids)
    out["sharded_vocab_logits"] = max_diff(got, ref)

    # Gradient averaging over NCCL inside a compiled function, as the data-parallel train step does.
    params = dict(tree_flatten(model.trainable_parameters()))
    grads = {k: mx.random.normal(v.shape, key=mx.random.key(i)).astype(v.dtype) for i, (k, v) in enumerate(params.items())}
    averaged = mx.compile(lambda g: nn.average_gradients(g, group=group))(grads)
    out["average_gradients"] = max(max_diff(averaged[k], grads[k]) for k in grads)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
