"""xLSTM language models on MLX (Metal, Linux CPU, CUDA).

Public API::

    model = xlstm_metal.load_model(path, dtype=None)      # -> nn.Module
    model, tokenizer = xlstm_metal.load(path)
    logits, state = model(input_ids, state=None)          # input_ids [B, S] int -> logits [B, S, V]
    xlstm_metal.save_model(model, path)
    runner = xlstm_metal.xLSTMRunner(path)                 # generation
    model = xlstm_metal.create_xlstm_model(vocab_size, num_layers, signature=(1, 1), ...)  # 2024 xLSTM
"""

# Must run before anything imports mlx: binds MLX's cblas calls to OpenBLAS on Linux.
from . import _blas

_blas.preload()

# MLX's compiled CUDA kernels go to a cache that outlives /tmp (read by MLX at its first compile).
from . import _cuda_cache  # noqa: E402

_cuda_cache.configure_ptx_cache()
_cuda_cache.configure_graph_cache()  # a deferred decode state cycles through more CUDA graphs

from .config import xLSTMConfig  # noqa: E402
from .generation import xLSTMRunner  # noqa: E402
from .loading import load, load_model, save_model  # noqa: E402
from .models.xlstm_2024 import create_xlstm_model  # noqa: E402

__version__ = "0.1.0"

__all__ = ["xLSTMConfig", "xLSTMRunner", "create_xlstm_model", "load", "load_model", "save_model", "__version__"]
