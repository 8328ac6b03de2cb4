"""Pipeline-parallel inference: consecutive blocks per rank, the hidden state passed along.

For models larger than one device: rank r keeps blocks ``[a_r, b_r)`` (an even split in order)
plus the small replicated parts (embeddings, final norm, LM head) and frees the others. A forward
pass runs the ranks in turn: after the last block of stage s, rank s hands its hidden state
[B, S, E] to every rank (an all-sum to which the other ranks add zeros), rank s + 1 continues
with its blocks, and after the last stage every rank holds the final hidden state, so all
compute the same logits and sample the same tokens. (A collective rather than send / recv: its
inputs order it in the graph, so a lazy graph of several forward passes, e.g. decode steps not
evaluated one by one, cannot deadlock; MLX schedules a receive, which has no inputs, anywhere.)

Evaluate one forward pass before building an independent one (generation does: each step
depends on the last token): two unrelated passes in one ``mx.eval`` may run their hand-offs in
another order on each rank, and the all-sums would pair up wrongly.

The module tree keeps its names: a block a rank does not hold is replaced by a
:class:`PipelineGap` (no parameters) at the same index, which takes part in the hand-offs, so
``model(ids, state)``, ``model.prefill`` and the generation code run unchanged. Each rank's
recurrent state holds its own blocks' entries (placeholders elsewhere).
"""

from __future__ import annotations

import types

import mlx.core as mx
import mlx.nn as nn

from .comm import check_same_model, world


def stage_bounds(num_blocks: int, size: int) -> list[tuple[int, int]]:
    """[(a_r, b_r)] per rank: consecutive blocks, as even as possible (earlier ranks take the
    extra ones)."""
    if num_blocks < size:
        raise ValueError(f"cannot split {num_blocks} block{'s' * (num_blocks != 1)} across {size} processes: each "
                         f"needs at least one: start at most {num_blocks}")
    base, extra = divmod(num_blocks, size)
    bounds, start = [], 0
    for r in range(size):
        end = start + base + (r < extra)
        bounds.append((start, end))
        start = end
    return bounds


class PipelineGap(nn.Module):
    """Stands for a block another rank holds: (x [B, S, E], state) -> (x, state); where that
    block ends a stage (``handoff``), x becomes the holding rank's output.

    Its state is a placeholder: ``arity`` zeros of shape [B] (the held block's state has that
    many arrays), so code that keeps one cache per block and batches or filters rows (mlx-lm's
    server) treats every block alike; the rank holding the block keeps the real state."""

    def __init__(self, group: mx.distributed.Group, handoff: bool = False, arity: int = 0):
        super().__init__()
        self.group, self.handoff, self.arity = group, handoff, arity

    def __call__(self, x: mx.array, state=None):
        state = self.zero_state(x.shape[0]) if state is None else state
        if self.handoff:
            # zeros_like does not read x: the dependency keeps this rank's order of hand-offs.
            x = mx.distributed.all_sum(mx.depends(mx.zeros_like(x), x), group=self.group)
            state = _after(state, x)
        return x, state

    def zero_state(self, batch_size: int = 1, *_args, **_kwargs) -> tuple:
        """The placeholder state for ``batch_size`` rows."""
        return tuple(mx.zeros((batch_size,)) for _ in range(self.arity))


class _HandsOff:
    """Mixin for the last block of a rank's stage: every rank gets its output."""

    def __call__(self, x: mx.array, state=None):
        x, state = super().__call__(x, state)
        x = mx.distributed.all_sum(x, group=self._pipeline_group)
        return x, _after(state, x)


def _after(state: tuple, x: mx.array) -> tuple:
    """``state`` made to depend on the hand-off result ``x``. Every rank then runs every hand-off
    whatever it evaluates: the states alone (mlx-lm's prefill evaluates only the caches; a
    rank's own states would not need the later hand-offs, the last rank's would) or the logits."""
    return tuple(mx.depends(list(state), x)) if len(state) else state


def pipeline_model(model, group: mx.distributed.Group | None = None):
    """Split ``model``'s blocks across ``group`` (default: every ``mlx.launch`` process) in
    order, in place; returns the model.

    Works for any model of this package with a list of blocks (``backbone.blocks`` in
    xLSTM-Large, ``xlstm_block_stack.blocks`` in the 2024 xLSTM). Every rank calls this with
    the same model; the blocks it does not hold are dropped (load the model with
    ``load_model(..., lazy=True)`` and only this rank's blocks are ever read into memory).
    Results equal the unsplit model's exactly (the same operations in the same order, only the
    hidden state moves). A group of one leaves the model as it is. Raises ValueError when there are fewer blocks than ranks or the model is
    already split.
    """
    group = group or world()
    N, r = group.size(), group.rank()
    if N == 1:
        return model
    check_same_model(model, "pipeline", group)  # before anything rank-local can fail
    if getattr(model, "parallel", None):
        raise ValueError(f"the model is already split across processes ({model.parallel['mode']})")
    owner = next((model[name] for name in ("backbone", "xlstm_block_stack")
                  if name in model and isinstance(model[name].get("blocks"), list)), None)
    if owner is None:
        raise ValueError(f"pipeline parallelism needs a model with a list of blocks, not {type(model).__name__}")
    blocks = owner["blocks"]
    bounds = stage_bounds(len(blocks), N)
    arity = [len(s) for s in model.make_state(1)]  # lazy zeros: nothing is allocated
    a, b = bounds[r]
    stage_ends = {end - 1 for _, end in bounds}
    new = []
    for index, block in enumerate(blocks):
        if not a <= index < b:
            new.append(PipelineGap(group, handoff=index in stage_ends, arity=arity[index]))
            continue
        if index == b - 1:
            block.__class__ = types.new_class(f"Pipeline{type(block).__name__}", (_HandsOff, type(block)))
            object.__setattr__(block, "_pipeline_group", group)
        new.append(block)
    owner.blocks = new
    full_state = model.make_state

    def make_state(self, batch_size: int = 1):
        """Zero states of this rank's blocks, placeholders (see :class:`PipelineGap`) elsewhere."""
        return [gap.zero_state(batch_size) if isinstance(gap, PipelineGap) else s
                for s, gap in zip(full_state(batch_size), new)]

    # An instance attribute shadows the class's method for this model only.
    object.__setattr__(model, "make_state", types.MethodType(make_state, model))
    # A compiled-prefill cache would hold the dropped blocks.
    model.__dict__.pop("_prefill_blocks", None)
    object.__setattr__(model, "parallel", {"mode": "pipeline", "size": N, "rank": r, "blocks": (a, b)})
    mx.eval(model.parameters())
    return model
