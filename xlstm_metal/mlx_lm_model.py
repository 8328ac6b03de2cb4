"""xLSTM models for mlx-lm: ``mlx_lm.load(path, trust_remote_code=True)`` on a checkpoint we wrote.

Every checkpoint :func:`xlstm_metal.save_model` writes carries a small model file
(``xlstm_mlx_lm.py``, named by config.json's ``model_file``) that imports :class:`Model` and
:class:`ModelArgs` from here, so ``mlx_lm.generate``, ``batch_generate``, ``stream_generate``,
the server, ``convert`` and ``lora`` run xLSTM-Large and the 2024 xLSTM with this package's code.

mlx-lm's protocol, as its recurrent models (Mamba) follow it:

- ``Model(args)(inputs [B, S], cache) -> logits [B, S, V]``; the cache is updated in place.
- ``make_cache()``: one mlx-lm ``ArraysCache`` per block holding that block's recurrent state
  arrays, so ``save_prompt_cache`` / ``load_prompt_cache`` and the batching server work.
- Padded batches: mlx-lm right-pads prompts of different lengths and tells the caches the real
  lengths (``prepare``); ``create_ssm_mask`` gives the valid positions and ``advance`` moves on.
  Padded positions never enter a state: every state array of a row (mLSTM C, n, m; sLSTM c, n,
  m, h; conv windows) stays bit-for-bit what it was.
- ``sanitize`` maps NX-AI's native names; ``quant_predicate`` keeps the input and forget gate
  projections in float (they have only NH outputs and drive exponential gates).
- ``mlx_lm.convert --quant-predicate mixed_2_6`` (and mixed_3_4, mixed_3_6, mixed_4_6): mlx-lm's
  recipes find a model's layers by Llama's names (``down_proj``, ``v_proj``, ``lm_head``) and
  refused ours ("Model does not have expected keys for mixed quant."). Importing this module
  wraps mlx-lm's recipe builder so that, for our models, it reads our layers under those names
  (:data:`RECIPE_NAMES`) and keeps the gate projections in float; see :func:`_for_xlstm_names`.
- mlx-lm's ``save_model`` (behind ``convert`` and ``fuse``) writes ``model.parameters()`` only;
  importing this module wraps it so a checkpoint it writes carries what
  :func:`xlstm_metal.save_model` adds for transformers and NX-AI (a tied model's ``lm_head.weight``:
  :func:`~xlstm_metal.checkpoint_files.transformers_weights`).

The model classes here are subclasses of :class:`xlstm_metal.models.xlstm_large.xLSTMLarge` and
the 2024 ``xLSTMLMModel`` with mlx-lm's call signature: same parameters, same checkpoint names.
"""

from __future__ import annotations

import copy
import functools
import importlib
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_ssm_mask
from mlx_lm.models.cache import ArraysCache

from .checkpoint_files import transformers_weights
from .config import xLSTMConfig
from .config_2024 import is_xlstm_2024_config, xLSTMLMConfig
from .kernels.cpu import decode_step as cpu_decode_step
from .loading import fit_out_norm, lm_head_trained_apart, sanitize_xlstm_large, wire_2024_config
from .models.xlstm_2024 import xLSTMLMModel
from .models.xlstm_large import xLSTMLarge

#: Gate projections kept in float by quant_predicate (xLSTM-Large; 2024 mLSTM and sLSTM).
FLOAT_GATES = ("igate_preact", "fgate_preact", "igate", "fgate")
#: Keys mlx-lm adds to config.json's dict at load time (its own runtime settings).
MLX_LM_RUNTIME_KEYS = ("quantize_activations",)
#: Our layers under the names mlx-lm's mixed quantization recipes look for (Llama's): the
#: down projections (the FFN's, and the 2024 mLSTM block's) are its ``down_proj``, and
#: xLSTM-Large's value projection its ``v_proj``. The LM head is ``lm_head`` in both.
RECIPE_NAMES = ((re.compile(r"(^|\.)proj_down$"), r"\1down_proj"),
                (re.compile(r"(^|\.)mlstm_layer\.v$"), r"\1mlstm_layer.v_proj"))
#: mlx-lm's group size for affine quantization when convert is given none (its recipes then wrote
#: ``"group_size": null`` into each layer's entry).
MLX_LM_GROUP_SIZE = 64


@dataclass
class ModelArgs:
    """config.json as read by mlx-lm; the architecture is decided from it (see :class:`Model`)."""

    model_type: str = "xlstm"
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "ModelArgs":
        config = {k: v for k, v in params.items() if k not in MLX_LM_RUNTIME_KEYS}
        return cls(model_type=str(params.get("model_type", "xlstm")), config=config)


class Model(nn.Module):
    """``Model(args)``: the xLSTM model config.json describes, with mlx-lm's interface.

    ``Model(args)`` returns an instance of a subclass: the xLSTM-Large one or the 2024 one,
    chosen from the config, so each keeps its own model class's parameters and methods.
    """

    def __new__(cls, args: ModelArgs):
        if cls is Model:
            cls = Model2024 if is_xlstm_2024_config(args.config) else ModelLarge
        return super().__new__(cls)

    # ------------------------------------------------------------------ forward
    def _forward(self, inputs: mx.array, state):
        """The wrapped model's own ``(input_ids, state) -> (logits, state)``; for one token of
        each row on a CPU, xLSTM-Large's step as one C call where the tree and the row count are
        what it computes (:func:`xlstm_metal.kernels.cpu.decode_step.decode_step`)."""
        if isinstance(self, xLSTMLarge) and inputs.shape[1] == 1:
            out = cpu_decode_step.decode_step(self, inputs, state)
            if out is not None:
                return out
        return super(Model, self).__call__(inputs, state)

    def __call__(self, inputs: mx.array, cache: list[ArraysCache] | None = None) -> mx.array:
        """inputs [B, S] int -> logits [B, S, V]; ``cache`` (from :meth:`make_cache`) is
        read and updated in place. Logits of padded positions are zeros."""
        if not cache:
            logits, _ = self._forward(inputs, None)
            return logits
        state = None if cache[0].empty() else [tuple(c.cache) for c in cache]
        mask = create_ssm_mask(inputs, cache[0])
        if mask is None:
            logits, state = self._forward(inputs, state)
        else:
            logits, state = self._masked_forward(inputs, state, mask)
        for index, c in enumerate(cache):
            if state is not None:  # None: a piece of padding only, before any state existed
                c.cache = list(state[index])
            c.advance(inputs.shape[1])
        return logits

    def _masked_forward(self, inputs: mx.array, state, mask: mx.array):
        """A padded piece: each row runs only its valid positions, so padding never touches a
        state. mlx-lm's masks mark one contiguous run per row (right padding: a prefix; left
        padding: a suffix); the piece is cut at every run boundary and each cut runs the rows
        valid there, with the model's own kernels (chunkwise for several tokens).

        The cut points are planned on the host (one read of the [B, S] mask): only padded
        prompt pieces of a batch come here, never a decode step.
        """
        valid = np.array(mask).astype(bool)
        B, S = valid.shape
        runs = []
        for row in valid:
            where = np.flatnonzero(row)
            if where.size and where[-1] - where[0] + 1 != where.size:
                raise ValueError("a padding mask must mark one contiguous run of positions per row")
            runs.append((int(where[0]), int(where[-1]) + 1) if where.size else (0, 0))
        cuts = sorted({0, S, *(p for run in runs for p in run)})
        pieces = []
        for a, b in zip(cuts, cuts[1:]):
            rows = [r for r, (start, stop) in enumerate(runs) if start <= a and b <= stop]
            if not rows:
                continue
            if len(rows) == B:
                logits, state = self._forward(inputs[:, a:b], state)
            else:
                idx = mx.array(rows)
                sub = None if state is None else [tuple(x[idx] for x in block_state) for block_state in state]
                logits, sub = self._forward(inputs[idx, a:b], sub)
                if state is None:  # rows not run yet hold the zero state (what state=None means)
                    state = [tuple(mx.zeros((B, *y.shape[1:]), y.dtype) for y in block_state) for block_state in sub]
                state = [tuple(_put_rows(x, idx, y) for x, y in zip(old, new)) for old, new in zip(state, sub)]
            pieces.append((rows, a, b, logits))
        if not pieces:  # all padding: nothing to compute
            return mx.zeros((B, S, self.config.vocab_size)), state
        out = mx.zeros((B, S, pieces[0][3].shape[-1]), dtype=pieces[0][3].dtype)
        for rows, a, b, logits in pieces:
            if len(rows) == B:
                out[:, a:b] = logits
            else:
                out[mx.array(rows), a:b] = logits
        return out, state

    # ------------------------------------------------------------------ mlx-lm hooks
    @property
    def layers(self) -> list[nn.Module]:
        """The blocks (mlx-lm's LoRA wraps the Linear layers of the last ``num_layers``)."""
        return self.blocks

    def make_cache(self) -> list[ArraysCache]:
        """One ArraysCache per block, as many slots as that block's state has arrays."""
        return [ArraysCache(len(block_state)) for block_state in self.make_state(1)]

    def quant_predicate(self, path: str, module: nn.Module) -> bool:
        """``mlx_lm.convert -q``: quantize every layer but the i/f gate projections."""
        return path.rsplit(".", 1)[-1] not in FLOAT_GATES


def _put_rows(x: mx.array, idx: mx.array, rows: mx.array) -> mx.array:
    """``x`` with rows ``idx`` replaced by ``rows``."""
    x = mx.array(x)
    x[idx] = rows
    return x


class ModelLarge(Model, xLSTMLarge):
    """xLSTM-Large (NX-AI/xLSTM-7b architecture) for mlx-lm."""

    def __init__(self, args: ModelArgs):
        xLSTMLarge.__init__(self, xLSTMConfig.from_dict(args.config))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """NX-AI's native xLSTMLarge names and fused layouts -> ours; drops a tied LM head (an
        LM head trained apart from the tied embeddings, as transformers writes one, unties the
        model instead: see :func:`xlstm_metal.loading.lm_head_trained_apart`); the out norm
        the weights hold (:func:`xlstm_metal.loading.fit_out_norm`)."""
        if lm_head_trained_apart(weights, self.config):
            self.config.tie_word_embeddings = False
            self.lm_head = nn.Linear(self.config.embedding_dim, self.config.vocab_size, bias=False)
        fit_out_norm(self, weights)
        return sanitize_xlstm_large(weights, self.config)


class Model2024(Model, xLSTMLMModel):
    """NX-AI's 2024 xLSTM (sLSTM + mLSTM blocks at the positions config.json's ``slstm_at``
    names) for mlx-lm."""

    def __init__(self, args: ModelArgs):
        xLSTMLMModel.__init__(self, xLSTMLMConfig.from_dict(args.config), init=False)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """NX-AI's state_dict lists a tied LM head twice; the names are ours already. A tied
        checkpoint written by safetensors' ``save_model`` (shared tensors) holds only
        ``lm_head.weight``: it is the embedding (as :func:`xlstm_metal.loading.model_from_checkpoint`
        reads it). The blocks are rebuilt where the weights say other block kinds or another
        sLSTM weight layout than config.json (:func:`xlstm_metal.loading.wire_2024_config`, as
        ``load_model`` reads them): built from the config alone, such a checkpoint failed mlx-lm's
        strict load ("parameters not in model", "Expected shape")."""
        if self.config.tie_weights:
            weights = dict(weights)
            head = weights.pop("lm_head.weight", None)
            if head is not None and "token_embedding.weight" not in weights:
                weights["token_embedding.weight"] = head
        config = copy.deepcopy(self.config)
        wire_2024_config(config, weights, "checkpoint")
        if config != self.config:
            config.validate()
            xLSTMLMModel.__init__(self, config, init=False)  # the same module, its blocks rebuilt
        return weights


def from_xlstm_metal(model: nn.Module) -> Model:
    """The mlx-lm view of a model :func:`xlstm_metal.load_model` built: the same module tree and
    weights (nothing copied), with mlx-lm's call signature and hooks. Use the returned object in
    place of ``model`` (it shares ``model``'s modules)."""
    for base, cls in ((xLSTMLarge, ModelLarge), (xLSTMLMModel, Model2024)):
        if isinstance(model, base):
            view = dict.__new__(cls)  # an nn.Module is a dict of its children, plus attributes
            dict.update(view, model)
            view.__dict__.update(model.__dict__)
            return view
    raise TypeError(f"no mlx-lm interface for {type(model).__name__}: xLSTMLarge or the 2024 xLSTMLMModel")


def _with_transformers_weights(save_model):
    """mlx-lm's ``save_model(save_path, model, ...)``, also writing the tensors transformers needs
    beside an xLSTM-Large's parameters: transformers' ``xLSTMForCausalLM`` never ties its LM
    head, so without ``lm_head.weight`` a tied model's checkpoint opened there with a random
    head (NX-AI's 2024 ``xLSTMLMModel`` wants it too: its strict load refused a tied model's).
    The head (the embedding array itself, no copy) is in the tree for the save only."""

    @functools.wraps(save_model)
    def save(save_path, model, *args, **kwargs):
        extra = {}
        if isinstance(model, (xLSTMLarge, xLSTMLMModel)) and "lm_head" not in model:
            extra = transformers_weights(model.config, dict(tree_flatten(model.parameters())))
        if "lm_head.weight" not in extra:
            return save_model(save_path, model, *args, **kwargs)
        head = nn.Module()
        head.weight = extra["lm_head.weight"]
        model.lm_head = head
        try:
            return save_model(save_path, model, *args, **kwargs)
        finally:
            del model["lm_head"]

    save.writes_transformers_weights = True
    return save


def _install_save_hook() -> None:
    """Wrap ``mlx_lm.utils.save_model`` (which ``save``, ``convert`` and ``fuse`` call) once."""
    import mlx_lm.utils as utils

    if not getattr(utils.save_model, "writes_transformers_weights", False):
        utils.save_model = _with_transformers_weights(utils.save_model)


def recipe_name(path: str) -> str:
    """A layer's path as mlx-lm's mixed recipes read it (:data:`RECIPE_NAMES`)."""
    for pattern, name in RECIPE_NAMES:
        path = pattern.sub(name, path)
    return path


class _RecipeView:
    """A model as mlx-lm's recipe builder reads it: its modules under :func:`recipe_name`'s
    names, its blocks as ``layers``, anything else the model's own."""

    def __init__(self, model: Model):
        self._model = model

    def named_modules(self):
        return [(recipe_name(path), module) for path, module in self._model.named_modules()]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _for_xlstm_names(builder):
    """mlx-lm's ``mixed_quant_predicate_builder(recipe, model, group_size)``, which also builds
    the recipe for our models: it looks for Llama's layer names (``down_proj``: which layers
    exist and where a path holds the layer index; ``v_proj``, ``down_proj`` and ``lm_head``: the
    layers it gives the high bit width, in the first and last eighth of the blocks and every third
    between), and without a ``down_proj`` it refused the model. For our models it reads our paths
    under those names (:func:`recipe_name`), so the recipe gives our down and value projections
    and LM head what it gives Llama's; :meth:`Model.quant_predicate` keeps the i/f gate
    projections in float, as ``convert -q`` does (the recipe alone gave them its low bit width).
    A group size left to mlx-lm (None) is its default, written into each layer's entry."""

    @functools.wraps(builder)
    def build(recipe, model, group_size=MLX_LM_GROUP_SIZE):
        if not isinstance(model, Model):
            return builder(recipe, model, group_size)
        predicate = builder(recipe, _RecipeView(model), group_size or MLX_LM_GROUP_SIZE)

        def xlstm_predicate(path: str, module: nn.Module):
            if not model.quant_predicate(path, module):
                return False
            return predicate(recipe_name(path), module)

        return xlstm_predicate

    build.reads_xlstm_names = True
    return build


def _install_recipe_hook() -> None:
    """Wrap mlx-lm's mixed recipe builder once, where ``convert`` looks it up: ``mlx_lm.convert``
    (``mlx_lm.convert``, ``python -m mlx_lm convert``), and ``__main__`` when that module runs as
    ``python -m mlx_lm.convert``. Our model file is imported by ``convert``'s load, before the
    recipe is built."""
    convert = importlib.import_module("mlx_lm.convert")  # the module (mlx_lm.convert is also its function)
    main = sys.modules.get("__main__")
    run_as_main = getattr(getattr(main, "__spec__", None), "name", None) == "mlx_lm.convert"
    for module in (convert, main if run_as_main else None):
        builder = getattr(module, "mixed_quant_predicate_builder", None)
        if builder is not None and not getattr(builder, "reads_xlstm_names", False):
            module.mixed_quant_predicate_builder = _for_xlstm_names(builder)


_install_save_hook()
_install_recipe_hook()
