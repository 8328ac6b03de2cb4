"""The files beside the weights that let other tools open our checkpoints.

:func:`xlstm_metal.save_model` writes them, so every writer (``train`` and its export,
``convert``, user code) gives the same checkpoint:

- ``config.json``: for xLSTM-Large in the form transformers' ``xLSTMConfig`` accepts (see
  :meth:`xLSTMConfig.to_dict`), its ``dtype`` the weights' (:func:`with_weights_dtype`); for
  every model a ``model_file`` entry naming the mlx-lm shim.
- ``xlstm_mlx_lm.py`` (:data:`MLX_LM_SHIM`): ``mlx_lm.load(path, trust_remote_code=True)``
  imports it and gets :mod:`xlstm_metal.mlx_lm_model`.
- ``tokenizer.json`` + ``tokenizer_config.json``: where the model wants a BOS token, the
  tokenizer's post-processor inserts it, so ``tokenizers``, transformers' ``AutoTokenizer`` and
  mlx-lm encode exactly as :class:`xlstm_metal.generation.tokenizer.Tokenizer` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

#: The mlx-lm model file every checkpoint carries (config.json's ``model_file``).
MLX_LM_SHIM = "xlstm_mlx_lm.py"
SHIM_SOURCE = '''"""mlx-lm model file of an xLSTM checkpoint written by xlstm-metal.

mlx_lm.load(path, trust_remote_code=True) imports this file; the model code is the
xlstm-metal package's (pip install xlstm-metal). On Linux CPUs, `xlstm-metal mlx-lm ...` runs
mlx-lm's commands with OpenBLAS bound (mlx-lm imports mlx before this file can).
"""

import warnings

try:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*mlx was imported before xlstm_metal")
        from xlstm_metal.mlx_lm_model import Model, ModelArgs  # noqa: F401
except ImportError as err:  # pragma: no cover - only without the package
    raise ImportError(
        "this xLSTM checkpoint needs the xlstm-metal package: pip install xlstm-metal"
    ) from err
'''
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def mlx_lm_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the ``model_file`` entry mlx-lm needs to load the checkpoint."""
    return {**config, "model_file": MLX_LM_SHIM}


def with_weights_dtype(config: dict[str, Any], weights: dict) -> dict[str, Any]:
    """``config`` (an xLSTM-Large config.json dict) with ``dtype`` (and ``torch_dtype``, where
    present) naming the float weights' dtype, float32 where they mix several: transformers loads
    in the config's dtype, and a name kept from the source (a bf16 checkpoint loaded here as
    float32 and trained) rounded every weight to it; mlx-lm's convert casts to ``torch_dtype``."""
    import mlx.core as mx

    dtypes = {v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)}
    if not dtypes:
        return config
    name = str(dtypes.pop()).removeprefix("mlx.core.") if len(dtypes) == 1 else "float32"
    return {**config, "dtype": name, **({"torch_dtype": name} if "torch_dtype" in config else {})}


def write_shim(directory: Path, write_text: Callable[[Path, str], None]) -> None:
    write_text(directory / MLX_LM_SHIM, SHIM_SOURCE)


def _backend_of(tokenizer: Any):
    """(tokenizers.Tokenizer, our Tokenizer or None, source tokenizer_config dict)."""
    from tokenizers import Tokenizer as HFTokenizer

    from .generation.tokenizer import Tokenizer, TokenizerError
    from .jsonfiles import read_json_object

    if isinstance(tokenizer, Tokenizer):
        return tokenizer.backend, tokenizer, {}
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer, None, {}
    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer).expanduser()
        directory = path if path.is_dir() else path.parent
        if not (directory / TOKENIZER_FILE).is_file():
            raise TokenizerError(f"no {TOKENIZER_FILE} in {directory}")
        tok_config_path = directory / TOKENIZER_CONFIG_FILE
        tok_config = read_json_object(tok_config_path, TokenizerError) if tok_config_path.is_file() else {}
        ours = Tokenizer.from_dir(directory)
        return ours.backend, ours, tok_config
    raise TypeError(
        "tokenizer must be an xlstm_metal Tokenizer, a tokenizers.Tokenizer or a directory holding "
        f"tokenizer.json, got {type(tokenizer).__name__}"
    )


def insert_bos(backend, bos_id: int) -> None:
    """Make the ``tokenizers.Tokenizer`` ``backend`` put ``bos_id`` first in every encoding (with
    special tokens), in its post-processor, unless it already does."""
    from tokenizers import processors

    if backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]:
        return
    bos = backend.id_to_token(bos_id)
    if bos is None:
        raise ValueError(f"bos_token_id {bos_id} is not in the tokenizer's vocabulary")
    template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)])
    existing = backend.post_processor
    backend.post_processor = template if existing is None else processors.Sequence([existing, template])


def chat_template(add_bos: bool) -> str:
    """A plain chat format (``User: ...`` / ``Assistant:``) for models without one; the server
    uses it (checkpoints do not get it: mlx-lm's generate would then wrap every prompt in it).
    OpenAI's ``developer`` role reads as ``system``; any other role (``tool`` ...) as a
    ``Role: content`` line (it was dropped), followed by the ``Assistant:`` cue where the
    assistant speaks next (or the conversation ends: a reply to a tool's result had no cue). An assistant message's ``tool_calls`` follow its
    text, a ``Tool call: NAME {arguments as JSON}`` line each (they were dropped).

    Shaped for prompt caching: the assistant's text follows ``Assistant:`` exactly as the model
    generated it and ends with EOS, as generation does, so a client that re-sends the whole
    conversation gets back the tokens the model already consumed and the server's cache of the
    last turn matches.
    """
    return ("{{ bos_token }}" if add_bos else "") + (
        "{%- for message in messages %}"
        "{%- if message['role'] in ('system', 'developer') %}{{ message['content'] }}{{ '\\n\\n' }}"
        "{%- elif message['role'] == 'user' %}{{ 'User: ' }}{{ message['content'] }}{{ '\\nAssistant:' }}"
        "{%- elif message['role'] == 'assistant' %}{{ message['content'] }}"
        "{%- for call in message['tool_calls'] or [] %}{%- set function = call['function'] or {} %}"
        "{{ '\\n' if message['content'] or not loop.first else ' ' }}{{ 'Tool call: ' }}"
        "{{ function['name'] or '' }}{{ ' ' }}"
        "{%- if function['arguments'] is string %}{{ function['arguments'] }}"
        "{%- else %}{{ (function['arguments'] or {}) | tojson }}{%- endif %}"
        "{%- endfor %}"
        "{%- if eos_token %}{{ eos_token }}{% endif %}{{ '\\n' }}"
        "{%- else %}{{ message['role'] | capitalize }}{{ ': ' }}{{ message['content'] }}"
        "{%- if loop.last or loop.nextitem['role'] == 'assistant' %}{{ '\\nAssistant:' }}{%- else %}{{ '\\n' }}{%- endif %}"
        "{%- endif %}{%- endfor %}"
    )


def tokenizer_files(tokenizer: Any, model_config: Any) -> dict[str, str]:
    """{file name: text} of ``tokenizer.json`` and ``tokenizer_config.json`` for a checkpoint.

    BOS: inserted when the model config says so (``force_bos_token_insert``, xLSTM-Large),
    else when the tokenizer does (our Tokenizer's ``add_bos``, ``add_bos_token``); the id is the
    config's ``bos_token_id``, else the tokenizer's. Special tokens and ``add_bos_token`` are
    written to tokenizer_config.json, over the source's other settings (chat template ...).
    """
    from tokenizers import Tokenizer as HFTokenizer

    backend, ours, tok_config = _backend_of(tokenizer)
    backend = HFTokenizer.from_str(backend.to_str())  # a copy: the caller's tokenizer stays as it is

    def config_value(name: str):
        return getattr(model_config, name, None)

    bos_id = config_value("bos_token_id")
    if bos_id is None and ours is not None:
        bos_id = ours.bos_token_id
    add_bos = config_value("force_bos_token_insert")
    if add_bos is None:
        add_bos = ours.add_bos if ours is not None else bool(tok_config.get("add_bos_token", False))
    add_bos = bool(add_bos) and bos_id is not None
    if add_bos:
        insert_bos(backend, bos_id)

    out_config = dict(tok_config)
    out_config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    eos_ids = config_value("eos_token_id")
    if eos_ids is None and ours is not None:
        eos_ids = ours.eos_token_ids
    eos_id = eos_ids[0] if isinstance(eos_ids, (list, tuple)) and eos_ids else eos_ids
    pad_id = config_value("pad_token_id")
    if pad_id is None and ours is not None:
        pad_id = ours.pad_token_id
    for name, token_id in (("bos_token", bos_id), ("eos_token", eos_id), ("pad_token", pad_id)):
        token = backend.id_to_token(token_id) if isinstance(token_id, int) else None
        if token is not None:
            out_config[name] = token
    out_config["add_bos_token"] = add_bos
    out_config.setdefault("add_eos_token", False)
    out_config.setdefault("clean_up_tokenization_spaces", False)
    out_config.setdefault("model_max_length", 1_000_000)
    return {TOKENIZER_FILE: backend.to_str(), TOKENIZER_CONFIG_FILE: json.dumps(out_config, indent=2)}


#: transformers' xLSTMConfig rounds the q/k and v widths up to a multiple of this (NX-AI's model
#: and ours take int(embedding_dim * factor)), so other widths run there with other head sizes.
TRANSFORMERS_DIM_MULTIPLE = 64


def transformers_shape_problem(config: Any) -> str | None:
    """Why transformers' ``xLSTMForCausalLM`` cannot run an xLSTM-Large ``config`` as we do, or
    None: its config derives the q/k and v widths rounded up to :data:`TRANSFORMERS_DIM_MULTIPLE`
    (a width of 64 with qk_dim_factor 0.5: 64 there, 32 in the weights; its forward then fails)."""
    from .config import xLSTMConfig

    if not isinstance(config, xLSTMConfig):
        return None
    odd = {name: value for name, value in (("qk_dim", config.qk_dim), ("v_dim", config.v_dim))
           if value % TRANSFORMERS_DIM_MULTIPLE}
    if not odd:
        return None
    sizes = ", ".join(f"{name} {value}" for name, value in odd.items())
    return (f"{sizes} (embedding_dim x factor) is not a multiple of {TRANSFORMERS_DIM_MULTIPLE}: transformers' "
            f"xLSTMConfig rounds it up, so xLSTMForCausalLM cannot run this checkpoint (mlx-lm and xlstm-metal can)")


def transformers_out_norm_problem(config: Any, weights: dict) -> str | None:
    """Why transformers' ``xLSTMForCausalLM`` computes another out norm than an xLSTM-Large
    checkpoint of ``weights`` holds, or None: its model always applies one, without a bias
    (:func:`xlstm_metal.loading.fit_out_norm` reads both kinds of checkpoint)."""
    from .config import xLSTMConfig

    if not isinstance(config, xLSTMConfig):
        return None
    if "backbone.out_norm.weight" not in weights:
        return ("the model has no out norm (add_out_norm false): transformers' xLSTMForCausalLM applies one "
                "anyway (its weight starting at ones), so its logits differ (mlx-lm's and xlstm-metal's do not)")
    if "backbone.out_norm.bias" in weights:
        return ("backbone.out_norm.bias (NX-AI's native use_bias model): transformers' xLSTMForCausalLM has no "
                "out norm bias and ignores it, so its logits differ (mlx-lm's and xlstm-metal's do not)")
    return None


def transformers_soft_cap_problem(config: Any) -> str | None:
    """Why transformers' ``xLSTMConfig`` cannot open an xLSTM-Large ``config``, or None: it
    declares ``gate_soft_cap`` and ``output_logit_soft_cap`` floats and rejects null (no cap);
    no number means "no cap" there (its soft_cap with an infinite cap gives NaN)."""
    from .config import xLSTMConfig

    if not isinstance(config, xLSTMConfig):
        return None
    uncapped = [name for name in ("gate_soft_cap", "output_logit_soft_cap") if getattr(config, name) is None]
    if not uncapped:
        return None
    return (f"{' and '.join(uncapped)} null (no cap): transformers' xLSTMConfig requires a number there, so "
            f"it cannot open this checkpoint (mlx-lm and xlstm-metal can)")


def transformers_weights(config: Any, weights: dict) -> dict:
    """Tensors to store beside the parameters for the other frameworks, which both want a tied
    LM head stored: transformers' ``xLSTMForCausalLM`` does not tie the LM head to the
    embeddings, and NX-AI's 2024 ``xLSTMLMModel`` lists the tied tensor under both names in its
    state dict (its strict ``load_state_dict`` refused our tied checkpoints: "Missing key(s):
    lm_head.weight"). So a tied checkpoint (xLSTM-Large or 2024) also carries ``lm_head.weight``
    (our loaders and :func:`sanitize` drop it again)."""
    from .config import xLSTMConfig
    from .config_2024 import xLSTMLMConfig

    if isinstance(config, xLSTMConfig) and config.tie_word_embeddings:
        embedding = "backbone.embeddings"
    elif isinstance(config, xLSTMLMConfig) and config.tie_weights:
        embedding = "token_embedding"
    else:
        return {}
    float_embeddings = f"{embedding}.weight" in weights and f"{embedding}.scales" not in weights
    if float_embeddings and "lm_head.weight" not in weights:
        return {"lm_head.weight": weights[f"{embedding}.weight"]}
    return {}
