"""Several processes, one model: MLX's own distributed layer (``mx.distributed``).

Processes are started by ``mlx.launch`` (the ring backend over TCP on CPUs and Macs, NCCL on
NVIDIA GPUs, MPI where installed)::

    mlx.launch -n 2 -- $(command -v xlstm-metal) train data/ --out runs/m          # data parallel
    mlx.launch -n 2 -- $(command -v xlstm-metal) generate --prompt "..."           # tensor parallel
    mlx.launch --hostfile hosts.json -- $(command -v xlstm-metal) generate --parallel pipeline ...

Outside ``mlx.launch`` :func:`world` is a group of one and everything here is a no-op, so the
same code runs in one process.

- Data parallel training (:class:`xlstm_metal.training.Trainer` with ``group=``): every rank
  holds the whole model, takes its rows of each global batch, and gradients are averaged with
  ``mlx.nn.average_gradients`` inside the compiled step.
- Tensor parallel inference (:func:`shard_model`): each block's heads and FFN width, and the
  vocabulary, split across ranks; two all-reduces per block.
- Pipeline inference (:func:`pipeline_model`): consecutive blocks per rank, the hidden state
  passed along; for models larger than one device.
- Collectives every rank calls at the same point: :func:`broadcast_bytes`,
  :func:`broadcast_json`, :func:`broadcast_arrays`, :func:`check_same`, :func:`share_path`.

A collective whose peer died raises ``RuntimeError`` in MLX (the ring backend: "connection to a
peer was lost"); callers turn it into :class:`DistributedError`.
"""

from .comm import (
    DistributedError,
    agree,
    broadcast_arrays,
    broadcast_bytes,
    broadcast_json,
    check_same,
    is_main,
    joined_world,
    launch_rank,
    launched,
    peer_lost,
    process_rank,
    share_path,
    size_and_rank,
    world,
)
from .launch import PARALLEL_MODES, add_parallel_argument, parallel_fields, parallelize, print_on_rank0_only
from .pipeline import PipelineGap, pipeline_model, stage_bounds
from .tensor import VocabShardedEmbedding, VocabShardedLinear, shard_model, tensor_parallel_supported

__all__ = [
    "PARALLEL_MODES",
    "DistributedError",
    "add_parallel_argument",
    "parallel_fields",
    "parallelize",
    "print_on_rank0_only",
    "tensor_parallel_supported",
    "PipelineGap",
    "VocabShardedEmbedding",
    "VocabShardedLinear",
    "pipeline_model",
    "shard_model",
    "stage_bounds",
    "agree",
    "broadcast_arrays",
    "broadcast_bytes",
    "broadcast_json",
    "check_same",
    "is_main",
    "joined_world",
    "launch_rank",
    "launched",
    "peer_lost",
    "process_rank",
    "share_path",
    "size_and_rank",
    "world",
]
