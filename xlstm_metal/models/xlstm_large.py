"""xLSTM-Large (the NX-AI/xLSTM-7b architecture): embeddings -> mLSTM blocks -> out_norm ->
lm_head -> soft-capped logits. Parameter names equal Hugging Face checkpoint keys."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from ..checks import check_chunk_size, is_integer
from ..blocks.xlstm_large import mLSTMBlock, stacked_step
from ..cells.embedding import embed_tokens
from ..cells.ffn import FeedForward
from ..cells.fused import fusion_kind, gemv_layout
from ..cells.mlstm import mlstm_zero_state
from ..cells.norms import RMSNorm, soft_cap
from ..config import xLSTMConfig
from ..kernels.cpu import prefill as cpu_prefill
from ..kernels.fast.decode import add_rms_norm
from ..kernels.fast.quantized import FastQuantizedTree, use_fast_quantized_layers
from ..kernels.fast.skinny import use_fast_linear_layers
from ..kernels.fast.step import cuda_available
from ..kernels.fast.step_deferred import default_deferral, deferred_kernel_applies
from ..kernels.mlstm import MLSTMState, defer_state, settle_state
from .block_compile import compile_alike, signature_count

ModelState = list[MLSTMState]

# prefill() runs pieces of at least this many tokens (batch x length) through compiled blocks,
# evaluated layer by layer. Shorter pieces (chat turns, short prompts) run eagerly as one graph:
# tracing a new shape (~0.15 s on a 2-core CPU, seconds when the CPU compiler first builds the
# kernels) and per-layer syncs would cost more than they save. On a GPU
# ``XLSTM_METAL_PREFILL_SHORT_COMPILED=1`` sends them through the compiled blocks too where all
# blocks share one trace: faster for a length seen before, slower for a new one (H200, 7B, S22R7:
# 512 tokens 17.5-18.2 ms against 28.5-29.7 eagerly; a new length 30.6-38.9 against 24.6-29.7),
# so for prompts of recurring lengths only.
_LONG_PIECE_TOKENS = 2048
_SHORT_COMPILED = os.environ.get("XLSTM_METAL_PREFILL_SHORT_COMPILED", "0") == "1"


def _queue_layers() -> bool:
    """Whether prefill queues each layer behind the one running (GPUs), or evaluates layer by
    layer (CPU: there the host thread is the one computing)."""
    return mx.default_device() == mx.gpu


def _gemv_layout(layer: nn.Module) -> None:
    """The CPU's fast matrix-vector layout for a plain float Linear (others are left as they are)."""
    kind = fusion_kind(layer)
    if kind is not None and kind[0] == "linear":
        layer.weight = gemv_layout(layer.weight)


class Backbone(nn.Module):
    def __init__(self, config: xLSTMConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.blocks = [mLSTMBlock(config) for _ in range(config.num_blocks)]
        if config.add_out_norm:
            self.out_norm = RMSNorm(
                config.embedding_dim, eps=config.norm_eps, force_float32=config.norm_reduction_force_float32
            )

    def __call__(
        self, input_ids: mx.array, state: ModelState | None = None, residual_dtype: mx.Dtype | None = None
    ) -> tuple[mx.array, ModelState]:
        """input_ids [B, S] -> (normed hidden states [B, S, E] in the embeddings' dtype, state);
        the residual stream between the blocks runs in ``residual_dtype`` (None: the embeddings')."""
        x = embed_tokens(self.embeddings, input_ids, self)
        dtype = x.dtype
        x = to_residual(x, residual_dtype)
        if all(isinstance(block, mLSTMBlock) and block.fused_step(x) for block in self.blocks):
            return self._step(x, state, dtype)
        new_state = []
        for index, block in enumerate(self.blocks):
            x, block_state = block(x, None if state is None else state[index])
            new_state.append(block_state)
        return self.finish(x, dtype), new_state

    def finish(self, x: mx.array, dtype: mx.Dtype) -> mx.array:
        """The residual stream after the last block -> out_norm(x) (if any), rounded to ``dtype``."""
        if "out_norm" in self:
            x = self.out_norm(x)
        return x if x.dtype == dtype else x.astype(dtype)

    def _step(self, x: mx.array, state: ModelState | None, dtype: mx.Dtype) -> tuple[mx.array, ModelState]:
        """One token through :meth:`mLSTMBlock.step`: each block's FFN residual is added by the
        next block's (or the out norm's) fused add + RMSNorm. Returns the normed hidden state in
        ``dtype``."""
        new_state, pending = [], None
        states = [None] * len(self.blocks) if state is None else state
        index = 0
        while index < len(self.blocks):
            stacked = stacked_step(self.blocks[index:], x, pending, states[index:])  # several blocks, one launch
            if stacked is not None:
                x, pending, block_states = stacked
                new_state += block_states
                index += len(block_states)
                continue
            x, pending, block_state = self.blocks[index].step(x, pending, states[index])
            new_state.append(block_state)
            index += 1
        x = add_rms_norm(x, pending, self.out_norm)[1] if "out_norm" in self else x + pending
        return (x if x.dtype == dtype else x.astype(dtype)), new_state


def check_input_ids(input_ids) -> None:
    """Refuses ``input_ids`` that are not an integer mx.array [B, S] with S >= 1, by Python type,
    shape and dtype only (no host sync: this runs in traced and compiled forwards; the ids'
    values are the runner's to check). Lists, NumPy arrays, float or bool ids otherwise failed
    deep inside the embedding gather with messages naming neither the argument nor the fix."""
    if not isinstance(input_ids, mx.array):
        raise TypeError(f"input_ids must be an mx.array of integer token ids [B, S], got {type(input_ids).__name__}")
    if input_ids.ndim != 2 or 0 in input_ids.shape:  # B = 0 failed in a reshape ("Cannot infer the shape")
        raise ValueError(f"input_ids must have shape [B, S] with B >= 1 and S >= 1, got {tuple(input_ids.shape)}")
    if not mx.issubdtype(input_ids.dtype, mx.integer):  # bool is not an integer dtype here
        raise TypeError(f"input_ids must have an integer dtype, got {input_ids.dtype}")


def check_state(state, batch_size: int, num_blocks: int, shapes: list | None = None) -> None:
    """Refuses a ``state`` that is not None or a list with one tuple of arrays per block, each
    array's first axis ``batch_size`` (shapes only, no host sync). A state made for another
    batch size otherwise broadcast silently (batch 1 against a batch-2 state gave a batch-2
    state), and a wrong block count failed with an IndexError deep in the forward.

    ``shapes``: per block, the shapes of its entry's arrays after the batch axis (None: that
    block's entry is not checked further, e.g. one held by another process). An entry of other
    shapes or another number of arrays (a state made by a model of other heads or head sizes)
    failed in an MLX broadcast or an unpacking deep inside the block. An entry of six arrays
    where (C, n, m) is expected is a deferred decode state (:meth:`xLSTMLarge.defer_state`): its
    first three are checked."""
    if state is None:
        return
    if not isinstance(state, (list, tuple)):
        raise ValueError(f"state must be None or a list of {num_blocks} per-block tuples (make_state), "
                         f"got {type(state).__name__}")
    if len(state) != num_blocks:
        raise ValueError(f"state has {len(state)} blocks' entries, the model has {num_blocks} blocks")
    for index, layer in enumerate(state):
        if not isinstance(layer, (list, tuple)) or not all(isinstance(a, mx.array) for a in layer):
            raise ValueError(f"state[{index}] must be a tuple of mx.arrays, got {type(layer).__name__}")
        for a in layer:
            if a.ndim == 0 or a.shape[0] != batch_size:
                raise ValueError(f"state[{index}] holds an array of shape {tuple(a.shape)}, not for "
                                 f"input_ids' batch of {batch_size} (make_state(batch_size={batch_size}))")
        want = None if shapes is None else shapes[index]
        if want is None:
            continue
        deferred = len(want) == 3 and len(layer) == 6
        if (len(layer) != len(want) and not deferred) or any(a.shape[1:] != tuple(w) for a, w in zip(layer, want)):
            raise ValueError(f"state[{index}] holds arrays of shapes {[tuple(a.shape) for a in layer]}, this model's "
                             f"block {index} takes {[(batch_size, *w) for w in want]}: a state of another model? "
                             "(make_state)")


def _without_fused(tree):  # nn.quantize passes leaf_modules(): the fused copies, which unfusing removes
    if isinstance(tree, dict) and not isinstance(tree, nn.Module):
        return {k: _without_fused(v) for k, v in tree.items() if not str(k).startswith("_fused_")}
    return [_without_fused(v) for v in tree] if isinstance(tree, list) else tree


def to_residual(x: mx.array, residual_dtype: mx.Dtype | None) -> mx.array:
    """Embeddings [B, S, E] -> the residual stream's dtype (unchanged for None or float32 weights)."""
    return x if residual_dtype is None or x.dtype == residual_dtype else x.astype(residual_dtype)


class xLSTMLarge(FastQuantizedTree, nn.Module):
    """input_ids [B, S] (int) , state | None -> (logits [B, S, V], state).

    ``state`` is a list with one (C [B, NH, DQK, DV], n [B, NH, DQK], m [B, NH, 1]) per block.
    """

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        self.config = config
        #: dtype of the residual stream between blocks: None keeps the weights' dtype (training
        #: computes so); float32 (set by :func:`~xlstm_metal.load_model` and
        #: :meth:`fuse_projections`, dropped with them by :meth:`update`) spares bf16 weights a
        #: rounding at each of the 2 x num_blocks residual adds, the largest part of bf16 drift
        #: from the float32 model (NX-AI's bf16 model rounds there; benchmarks/bf16_fidelity.py).
        self.residual_dtype: mx.Dtype | None = None
        self.backbone = Backbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.embedding_dim, config.vocab_size, bias=False)

    @property
    def args(self) -> xLSTMConfig:
        return self.config

    @property
    def blocks(self) -> list[mLSTMBlock]:
        return self.backbone.blocks

    def state_shapes(self) -> list[tuple | None]:
        """Per block, the shapes of its state's (C, n, m) after the batch axis (None for a block
        another process holds), as :func:`check_state` compares them."""
        dqk, dv = self.config.qk_head_dim, self.config.v_head_dim
        blocks = self.backbone.blocks
        held = [isinstance(block, mLSTMBlock) and block.neuron is not None for block in blocks]
        if not any(held):
            return [None] * len(blocks)
        # this process's heads (a tensor split divides every block's alike), read once: this runs
        # at every eager call (mlx-lm's decode step), and a Module's attributes are slow to reach
        nh = blocks[held.index(True)].neuron.projection_cell.num_heads
        shape = ((nh, dqk, dv), (nh, dqk), (nh, 1))
        return [shape if h else None for h in held]

    def _mlstm_blocks(self) -> list[mLSTMBlock]:
        """The mLSTM blocks this process holds: a pipeline-parallel split
        (:func:`xlstm_metal.distributed.pipeline_model`) puts parameter-free gaps in the others' places."""
        return [block for block in self.backbone.blocks if isinstance(block, mLSTMBlock)]

    def fuse_projections(self) -> "xLSTMLarge":
        """Fuse each block's q|k|v|o|i|f and gate|up projections into one matmul each.

        Layers that compute alike fuse (float ``nn.Linear`` layers together, quantized layers of
        equal bits and group size together); other modules in the tree run as they are.
        For inference: no extra memory (the separate weights become views of the fused ones),
        checkpoint names and saving unchanged, results equal to float round-off. Replacing
        weights through :meth:`update` (``load_weights``, optimizers, ``nn.value_and_grad``)
        un-fuses the model, so a stale fused copy is never used; weights assigned directly
        (``layer.weight = ...``) are not noticed: call :meth:`unfuse_projections` first. Also selects the
        fused step kernel (CUDA; the same reference ops elsewhere), on CUDA the fused chunkwise
        kernels for prefill in place of the ops forms (``chunkwise``, ``chunkwise_scan``) and, on
        the CPU, the weight layout its matrix-vector products read fastest
        (:func:`gemv_layout`). Quantized linear layers (``nn.QuantizedLinear``) become
        :class:`~xlstm_metal.kernels.fast.quantized.FastQuantizedLinear` in place (same arrays and
        keys): fused dequantize-multiply kernels on CUDA, MLX's quantized matmul elsewhere. Plain
        linear layers become :class:`~xlstm_metal.kernels.fast.skinny.FastLinear` until
        :meth:`unfuse_projections` (the skinny kernel for 2-64 rows on CUDA, ``x @ w.T`` elsewhere).
        Returns the model.
        """
        use_fast_quantized_layers(self)
        use_fast_linear_layers(self)
        self.residual_dtype = mx.float32
        for block in self._mlstm_blocks():
            if isinstance(block.ffn, FeedForward):  # a user's FFN module runs as it is
                block.ffn.fuse_projections()
                _gemv_layout(block.ffn.proj_down)
            if block.neuron is None:  # so does a user's mLSTM layer module
                continue
            block.neuron.fuse_projections()
            _gemv_layout(block.neuron.out_proj)
            kernel_cell = block.neuron.recurrent_kernel_cell
            if kernel_cell.step_kernel == "step":
                # The fused step kernel on CUDA; the same reference ops on CPU and Metal.
                kernel_cell.step_kernel = "step_fused"
            prefill_cell = block.neuron.parallel_kernel_cell
            if cuda_available() and prefill_cell.kernel in ("chunkwise", "chunkwise_scan"):
                prefill_cell.kernel = "chunkwise_fused"
        if "lm_head" in self:
            _gemv_layout(self.lm_head)
        elif type(self.backbone.embeddings) is nn.Embedding:
            # A tied LM head reads the whole table every step, a step's gather one row: the
            # CPU's matrix-vector layout again (pydoc-15m: decode step -3 to -8% of CPU time, a
            # 512-token prompt's gather from it unchanged within noise).
            emb = self.backbone.embeddings
            if mx.issubdtype(emb.weight.dtype, mx.floating):
                emb.weight = gemv_layout(emb.weight)
        return self

    def unfuse_projections(self) -> "xLSTMLarge":
        """Back to separate projection matmuls (the weights keep their current values) and plain
        ``nn.Linear`` layers."""
        use_fast_linear_layers(self, enabled=False)
        for block in self._mlstm_blocks():
            if block.neuron is not None:
                block.neuron.unfuse_projections()
            if isinstance(block.ffn, FeedForward):
                block.ffn.unfuse_projections()
        return self

    def update(self, parameters: dict, strict: bool = True) -> "xLSTMLarge":
        """nn.Module.update, after dropping fused projections (they would be stale) and the
        float32 residual stream (training, which replaces weights through here, keeps its
        activations in the weights' dtype)."""
        self.unfuse_projections()
        self.residual_dtype = None
        return super().update(parameters, strict=strict)

    def update_modules(self, modules: dict, strict: bool = True) -> "xLSTMLarge":
        """nn.Module.update_modules (``nn.quantize``, adapters), after dropping fused projections;
        quantized layers it brings in run our dispatch (:class:`FastQuantizedTree`)."""
        self.unfuse_projections()
        return super().update_modules(_without_fused(modules), strict=strict)

    def make_state(self, batch_size: int = 1) -> ModelState:
        """The zero state for ``batch_size`` rows."""
        if not is_integer(batch_size):
            raise TypeError(f"batch_size must be an integer, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch_size = int(batch_size)
        return [mlstm_zero_state(self.config, batch_size) for _ in self.backbone.blocks]

    def defer_state(self, state: ModelState, terms: int | None = None) -> ModelState:
        """The state for a decode loop: each layer's (C, n, m) as a
        :data:`~xlstm_metal.kernels.mlstm.DeferredMLSTMState` holding up to ``terms`` - 1 steps'
        (k, v) apart from C, so a step reads C and writes it once every ``terms`` steps (on CUDA at
        64 rows the float32 state's traffic was half of a 7B step's GPU time). ``terms`` None: the
        device's default (:func:`~xlstm_metal.kernels.fast.step_deferred.default_deferral`: on
        CUDA with the fused step at 16+ rows, where the deferred kernel takes the state: float32,
        DV a multiple of 4); 0 or 1, or a model whose steps do not run the fused step kernel: the
        state as it is. The model takes either form everywhere (a prompt or a multi-token call folds
        the terms in first); :meth:`settle_state` gives (C, n, m) back."""
        blocks = [block for block in self._mlstm_blocks() if block.neuron is not None]
        if terms is None:
            terms = default_deferral(state[0][0].shape[0]) if state else 0
            # A state the deferred kernel does not take (a bf16 one) would run the deferred step's
            # reference ops: 7B on an H100, 904.6 tok/s at 16 rows against 2,212.5 for float32
            # (session 32).
            if terms > 1 and not (all((block.mlstm_layer.recurrent_kernel_cell.state_dtype or mx.float32) == mx.float32
                                      for block in blocks)
                                  and all(deferred_kernel_applies(layer_state) for layer_state in state)):
                terms = 0
        fused_steps = len(blocks) == len(self.backbone.blocks) and all(
            block.mlstm_layer.recurrent_kernel_cell.takes_raw_gates for block in blocks)
        if terms <= 1 or not fused_steps:
            return state
        # k and v are kept in the projections' output dtype (exact); float32 holds any of them exactly
        layer = blocks[0].mlstm_layer.q
        source = getattr(layer, "scales", getattr(layer, "weight", None))
        term_dtype = source.dtype if isinstance(source, mx.array) else mx.float32
        return [defer_state(layer_state, terms, term_dtype) for layer_state in state]

    def settle_state(self, state: ModelState) -> ModelState:
        """Each layer's state as (C, n, m): deferred terms folded into C (see :meth:`defer_state`)."""
        return [settle_state(layer_state) for layer_state in state]

    def _compiled_blocks(self, chained: bool) -> list:
        """Each block's forward (``chained``: its :meth:`mLSTMBlock.step`) compiled: blocks alike
        share one ``mx.compile`` (:func:`~xlstm_metal.models.block_compile.compile_alike`: one
        trace per new shape for all of them), kept per model: fused elementwise ops, and no Python
        graph building per prefill piece. The weights are compile inputs, not constants, so later
        updates are seen."""
        # Kernel settings are baked into a trace: compile again when any of them changes.
        settings = tuple(
            (cell.kernel, cell.chunk_size, cell.eps, cell.state_dtype)
            for cell in (block.neuron.parallel_kernel_cell for block in self._mlstm_blocks() if block.neuron)
        ) + (chained,)
        cached = self.__dict__.get("_prefill_blocks")
        if cached is None or cached[0] != settings:
            cached = (settings, {})
            object.__setattr__(self, "_prefill_blocks", cached)  # outside the module tree
        return compile_alike(self.backbone.blocks, "step" if chained else "__call__", cached[1])

    def _chains_residuals(self) -> bool:
        """Whether prefill runs the blocks as :meth:`mLSTMBlock.step` does for one token: each
        block's FFN output added inside the next block's RMSNorm (one launch for the add and the
        norm; fused projections, every block an mLSTM block). ``XLSTM_METAL_PREFILL_CHAIN=0``
        turns it off (comparisons)."""
        if os.environ.get("XLSTM_METAL_PREFILL_CHAIN") == "0":
            return False
        blocks = self.backbone.blocks
        return all(type(block) is mLSTMBlock and block.neuron is not None and block.neuron.fused for block in blocks)

    def prefill(
        self, input_ids: mx.array, state: ModelState | None = None, *, chunk_size: int | None = None
    ) -> tuple[mx.array, ModelState]:
        """Feed a prompt of any length with bounded memory: input_ids [B, S] -> (logits of the
        last position [B, V], state after the prompt).

        The prompt goes through in pieces of ``chunk_size`` tokens (default: the config's
        ``max_inference_chunksize``) carrying the state; pieces of 2,048+ tokens go through
        compiled blocks (one trace per new shape for all blocks alike), each layer evaluated
        before the next is built, so peak memory is the
        weights plus one layer's activations for one piece (one lazy graph over all layers kept
        every layer's chunkwise intermediates alive: 56 GiB for 16k tokens of the 7B shape on an
        H100). For inference only: the per-layer evaluation is a host sync, so this is not for
        mx.compile or grad. On a Linux CPU a float32 model of the reference cells runs as one C call
        per piece instead (:mod:`xlstm_metal.kernels.cpu.prefill`; equal to round-off).
        """
        check_input_ids(input_ids)
        check_state(state, input_ids.shape[0], len(self.backbone.blocks), self.state_shapes())
        check_chunk_size(chunk_size)
        chunk_size = chunk_size or self.config.max_inference_chunksize
        if mx.default_device() == mx.cpu:
            # the whole prompt in C on every BLAS thread where the model is what that computes
            # (kernels/cpu/prefill.py; None otherwise: the graph below is the reference)
            done = cpu_prefill.prefill(self, input_ids, state, chunk_size)
            if done is not None:
                return done
        backbone = self.backbone
        if state is None:
            state = self.make_state(input_ids.shape[0])
            if min(chunk_size, input_ids.shape[1]) > 1:
                # The chunkwise kernels read a broadcast zero at its strides: no fill kernels for the
                # zero state (three per layer, ~1.4 ms of a 2,048-token 7B prefill on an H200). One
                # host-made scalar per dtype: an mx.zeros(()) per array was still a (one-element)
                # fill kernel each, 96 launches and ~0.3 ms per 7B prefill (round S6R1, CUPTI).
                zeros: dict = {}
                state = [tuple(mx.broadcast_to(zeros.setdefault(s.dtype, mx.array(0, dtype=s.dtype)), s.shape)
                               for s in layer) for layer in state]
        state = list(state)
        x = None
        # On a GPU each layer is queued (async_eval) and the host then waits for the layer before
        # it, so the GPU always has the next layer when one finishes (a blocking eval per layer left
        # it idle while the host built and launched the next, ~32 gaps per piece) while at most two
        # layers' activations are alive. The CPU evaluates each long piece's layers in turn.
        gpu = _queue_layers()
        chained = self._chains_residuals()
        compiled = None  # the compiled blocks: taken once per call, when first needed
        short_compiled = None  # whether short pieces take them (XLSTM_METAL_PREFILL_SHORT_COMPILED=1)
        # The layer the host waits for next. It carries over into the next piece: waiting for the
        # last piece's last layer only after queuing the next piece's second layer kept three
        # layers' buffers alive at each seam (7B, 131k tokens in 16k pieces on an H100: 24.6-24.9
        # GiB peak against 20.6-20.9 for one 16k piece, session 32).
        previous = None
        for start in range(0, input_ids.shape[1], chunk_size):
            x = embed_tokens(backbone.embeddings, input_ids[:, start : start + chunk_size], backbone)
            dtype = x.dtype
            x = to_residual(x, self.residual_dtype)
            long_piece = x.shape[0] * x.shape[1] >= _LONG_PIECE_TOKENS
            if not long_piece and gpu and _SHORT_COMPILED and short_compiled is None:
                # a short piece only where all blocks share one trace: each structure traces once
                # per new length
                short_compiled = signature_count(backbone.blocks) == 1
            if long_piece or short_compiled:
                if compiled is None:
                    compiled = self._compiled_blocks(chained)
                blocks = compiled
            else:
                blocks = [block.step for block in backbone.blocks] if chained else backbone.blocks
            pending = None
            for index, block in enumerate(blocks):
                if chained:  # the block's output is x + pending
                    x, pending, state[index] = block(x, pending, state[index])
                    layer = [x, pending, state[index]]
                else:
                    x, state[index] = block(x, state[index])
                    layer = [x, state[index]]
                if gpu:
                    mx.async_eval(layer)
                    if previous is not None:
                        mx.eval(previous)
                    previous = layer
                elif long_piece:
                    mx.eval(layer)
            x = x[:, -1:] if pending is None else x[:, -1:] + pending[:, -1:]
            # On a GPU the next piece (or the logits) is built while this one runs; the host waits
            # for this piece's last layer once the next piece's first layer is queued.
            (mx.async_eval if gpu else mx.eval)(x, state)
        return self._logits(backbone.finish(x, dtype))[:, 0], state

    def _logits(self, x: mx.array) -> mx.array:
        """Normed hidden states [B, S, E] -> soft-capped logits [B, S, V]."""
        logits = self.backbone.embeddings.as_linear(x) if self.config.tie_word_embeddings else self.lm_head(x)
        return soft_cap(logits, self.config.output_logit_soft_cap)

    def hidden(self, input_ids: mx.array, state: ModelState | None = None) -> tuple[mx.array, ModelState]:
        """input_ids [B, S] -> (the normed hidden states [B, S, E] the LM head reads, new state)."""
        check_input_ids(input_ids)
        check_state(state, input_ids.shape[0], len(self.backbone.blocks), self.state_shapes())
        return self.backbone(input_ids, state, self.residual_dtype)

    def __call__(
        self, input_ids: mx.array, state: ModelState | None = None, *, last_only: bool = False
    ) -> tuple[mx.array, ModelState]:
        """``last_only=True`` returns logits [B, 1, V] of the last position only (prefill needs
        no more, and the lm_head over every position is ~1/4 of a small model's prefill)."""
        x, state = self.hidden(input_ids, state)
        if last_only:
            x = x[:, -1:]
        return self._logits(x), state

    def wiring(self) -> str:
        """The blocks and each block's cells, as text."""
        c = self.config
        lines = [
            f"xLSTMLarge: {c.num_blocks} blocks, E={c.embedding_dim}, heads={c.num_heads}, "
            f"DQK={c.qk_head_dim}, DV={c.v_head_dim}, FFN={c.ffn_dim}, vocab={c.vocab_size}",
            "  backbone.embeddings: Embedding",
        ]
        for index, block in enumerate(self.backbone.blocks):
            if not isinstance(block, mLSTMBlock):  # pipeline parallel: held by another process
                lines.append(f"  blocks.{index}: {type(block).__name__} (held by another process)")
                continue
            neuron = block.neuron
            if neuron is None:
                lines.append(f"  blocks.{index}: {type(block.mlstm_layer).__name__}")
                continue
            cells = ", ".join(
                f"{name}={type(cell).__name__}"
                + (f"({cell.kernel})" if name == "parallel_kernel" else "")
                + (f"({cell.step_kernel}/{cell.sequence_kernel})" if name == "recurrent_kernel" else "")
                for name, cell in neuron.cells.items()
            )
            lines.append(f"  blocks.{index}: mLSTMBlock[norm_mlstm={type(block.norm_mlstm).__name__}, "
                         f"mlstm_layer=mLSTMNeuron[{cells}], norm_ffn={type(block.norm_ffn).__name__}, "
                         f"ffn=FeedForward(SwiGLU)]")
        if "out_norm" in self.backbone:
            lines.append(f"  backbone.out_norm: {type(self.backbone.out_norm).__name__}")
        lines.append("  lm_head: " + ("tied to embeddings" if c.tie_word_embeddings else "Linear")
                     + f" -> soft cap {c.output_logit_soft_cap}")
        return "\n".join(lines)
