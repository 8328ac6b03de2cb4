"""Tensor-parallel inference for xLSTM-Large: every rank holds 1/N of each block and of the
vocabulary, and all ranks compute every token together.

Per block (Megatron-style, two all-reduces per block):

- q, k, v, the output gate and the input / forget gates are split by output, i.e. by head:
  rank r holds heads ``[r NH/N, (r+1) NH/N)``. Each head's recurrence (C, n, m) is independent,
  so the kernels run unchanged on the local heads, and the per-head norm takes its heads'
  slice of the weight. The input is replicated, so these layers need no communication in the
  forward pass: they are sharded in place (``mlx.nn.layers.distributed.shard_inplace``; an
  ``AllToShardedLinear``'s forward is that same matmul, its extra is gradient aggregation) and
  stay ``nn.Linear``, which ``model.fuse_projections()`` fuses into one matmul per rank.
- out_proj is split by input (``mlx.nn.ShardedToAllLinear``): partial products, one all-sum.
- The FFN's gate and up projections are split by output, the down projection by input.
- The embedding table (and so a tied LM head) and an untied LM head are split by vocabulary
  rows: a lookup sums the one rank's row, the logits are gathered across ranks.

Norms and the residual stream are replicated. The recurrent state of each block holds the local
heads only: ``model.make_state`` is replaced accordingly.
"""

from __future__ import annotations

import math
import types

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from ..cells.embedding import take_rows
from .comm import check_same_model, world

#: Layers split by output (by head) in each mLSTM layer, and in the FFN.
PROJECTIONS = ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact")
FFN_UP = ("proj_up_gate", "proj_up")


def gather_last_axis(x: mx.array, group: mx.distributed.Group) -> mx.array:
    """[..., n] on each rank -> [..., N n] (rank r's values at [r n, (r+1) n))."""
    gathered = mx.distributed.all_gather(mx.moveaxis(x, -1, 0), group=group)
    return mx.moveaxis(gathered, 0, -1)


class VocabShardedEmbedding(nn.Module):
    """An embedding table split by rows: rank r holds ids ``[r R, (r+1) R)`` with
    ``R = ceil(V / N)`` (the last rank's tail rows are zero padding).

    ids [...] -> [..., E]: each rank looks up the ids it holds (zeros elsewhere) and an all-sum
    gives every rank the full embeddings. ``as_linear`` (a tied LM head) gives full logits
    [..., V] by gathering each rank's [..., R] slice.
    """

    def __init__(self, weight: mx.array, vocab_size: int, group: mx.distributed.Group):
        super().__init__()
        self.weight = weight
        self.vocab_size = vocab_size
        self.group = group

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group: mx.distributed.Group) -> "VocabShardedEmbedding":
        return cls(_row_shard(embedding.weight, group), embedding.weight.shape[0], group)

    def __call__(self, ids: mx.array) -> mx.array:
        rows = self.weight.shape[0]
        local = ids - self.group.rank() * rows
        inside = (local >= 0) & (local < rows)
        x = take_rows(self.weight, mx.where(inside, local, 0)) * inside[..., None].astype(self.weight.dtype)
        return mx.distributed.all_sum(x, group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        return gather_last_axis(x @ self.weight.T, self.group)[..., : self.vocab_size]


class VocabShardedLinear(nn.Module):
    """An LM head split by output rows (vocabulary) like :class:`VocabShardedEmbedding`;
    x [..., E] -> full logits [..., V] on every rank."""

    def __init__(self, weight: mx.array, vocab_size: int, group: mx.distributed.Group, bias: mx.array | None = None):
        super().__init__()
        self.weight = weight
        if bias is not None:
            self.bias = bias
        self.vocab_size = vocab_size
        self.group = group

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: mx.distributed.Group) -> "VocabShardedLinear":
        bias = _row_shard(linear.bias, group) if "bias" in linear else None
        return cls(_row_shard(linear.weight, group), linear.weight.shape[0], group, bias)

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.weight.T
        if "bias" in self:
            y = y + self.bias
        return gather_last_axis(y, self.group)[..., : self.vocab_size]


def _row_shard(weight: mx.array, group: mx.distributed.Group) -> mx.array:
    """Rank r's rows ``[r R, (r+1) R)`` of ``weight`` [V, ...], ``R = ceil(V / N)``, zero-padded."""
    N, r = group.size(), group.rank()
    rows = math.ceil(weight.shape[0] / N)
    part = weight[r * rows : (r + 1) * rows]
    if part.shape[0] < rows:
        part = mx.concatenate([part, mx.zeros((rows - part.shape[0], *weight.shape[1:]), dtype=weight.dtype)])
    return mx.contiguous(part)


def tensor_parallel_supported(model) -> bool:
    """True for the models :func:`shard_model` can split (xLSTM-Large)."""
    from ..models.xlstm_large import xLSTMLarge

    return isinstance(model, xLSTMLarge)


def _check_shardable(model, N: int) -> None:
    if not tensor_parallel_supported(model):
        raise ValueError(f"tensor parallelism covers xLSTM-Large models, not {type(model).__name__}; "
                         "use pipeline parallelism (--parallel pipeline) for it")
    if getattr(model, "parallel", None):
        raise ValueError(f"the model is already split across processes ({model.parallel['mode']})")
    cfg = model.config
    problems = [f"{what} ({n}) is not divisible by the number of processes ({N})"
                for what, n in (("num_heads", cfg.num_heads), ("ffn_dim", cfg.ffn_dim)) if n % N]
    # A quantized layer split by input keeps whole groups of its scales: each rank's share of the
    # input must be a multiple of the group size (MLX's own message, "[quantize] The last
    # dimension of the matrix needs to be divisible by the quantization group size", named none
    # of this).
    for path, layer in sorted(model.named_modules(), key=lambda item: item[0]):
        if path.endswith(("mlstm_layer.out_proj", "ffn.proj_down")) and isinstance(getattr(layer, "bits", None), int):
            width = layer.weight.shape[-1] * 32 // layer.bits
            if width % N == 0 and (width // N) % layer.group_size:
                problems.append(f"{path}'s input width {width} in {N} parts of {width // N} is not a multiple of its "
                                f"quantization group size {layer.group_size} (--parallel pipeline splits the model by "
                                "blocks instead)")
                break
    if problems:
        raise ValueError("cannot split the model across processes: " + "; ".join(problems))


def shard_model(model, group: mx.distributed.Group | None = None):
    """Split an xLSTM-Large model across ``group`` (default: every ``mlx.launch`` process) for
    tensor-parallel inference, in place; returns the model.

    Every rank must call this with the same full model (loaded from the same checkpoint); each
    keeps its shard. Afterwards ``model(ids, state)`` / ``model.prefill`` on all ranks together
    give every rank the full logits, equal to the unsplit model's up to float round-off (the
    all-sums add partial products in another order). A fused model is unfused first; call
    ``model.fuse_projections()`` after sharding for the fused fast path on each rank's shard. For inference:
    training a split model is not supported. A group of one leaves the model as it is.

    Raises ValueError when the model is not an xLSTM-Large, is already split, or its heads or
    FFN width do not divide by the group size.
    """
    group = group or world()
    N = group.size()
    if N == 1:
        return model
    check_same_model(model, "tensor", group)  # before anything rank-local can fail
    _check_shardable(model, N)
    cfg = model.config
    model.unfuse_projections()  # shard the separate weights; fuse_projections() later fuses the shards
    heads = cfg.num_heads // N

    def by_head(_path, _weight):
        return 0

    for block in model.backbone.blocks:
        layer = block.mlstm_layer
        for name in PROJECTIONS:
            shard_inplace(layer[name], "all-to-sharded", group=group)
        shard_inplace(layer.multihead_norm, by_head, group=group)  # weight [NH * DV], head-major
        layer.out_proj = shard_linear(layer.out_proj, "sharded-to-all", group=group)
        layer.projection_cell.num_heads = heads
        ffn = block.ffn
        for name in FFN_UP:
            shard_inplace(ffn[name], "all-to-sharded", group=group)
        ffn.proj_down = shard_linear(ffn.proj_down, "sharded-to-all", group=group)
    backbone = model.backbone
    if type(backbone.embeddings) is nn.Embedding:
        backbone.embeddings = VocabShardedEmbedding.from_embedding(backbone.embeddings, group)
    if "lm_head" in model and type(model.lm_head) is nn.Linear:
        model.lm_head = VocabShardedLinear.from_linear(model.lm_head, group)

    def make_state(self, batch_size: int = 1):
        """The zero state for ``batch_size`` rows: this rank's heads of each block."""
        from ..kernels.mlstm import zero_state

        dtype = getattr(mx, self.config.inference_state_dtype)
        return [zero_state(batch_size, heads, self.config.qk_head_dim, self.config.v_head_dim, dtype)
                for _ in self.backbone.blocks]

    # An instance attribute shadows the class's method for this model only.
    object.__setattr__(model, "make_state", types.MethodType(make_state, model))
    object.__setattr__(model, "parallel", {"mode": "tensor", "size": N, "rank": group.rank()})
    mx.eval(model.parameters())
    return model
