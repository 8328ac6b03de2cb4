"""How many kernels one compiled decode step launches, per block, counted on any machine.

On an NVIDIA GPU MLX's CUDA back-end records every primitive of a compiled step as a kernel node,
and a decode step of the 7B shape is bound by how many there are, not by bytes (benchmarks/NOTES.md).
This script traces the greedy decode step that ``xlstm-metal bench`` compiles (``mx.compile``
over ``model.state``), exports the traced graph (``mx.export_to_dot``) and counts its primitives,
for a model with 1 and with 2 blocks; the difference is the cost of one block. Views (reshape,
transpose, slice, split, broadcast, ...) launch nothing and are listed apart.

    python benchmarks/decode_primitives.py [--pretend-cuda] [--batch 1] [--dtype bfloat16] [--q-bits 4]

``--pretend-cuda`` traces the CUDA code path on a machine without a GPU: the package's CUDA
checks answer yes (``cuda_compile_check.pretend_cuda``) and a stand-in for ``mx.fast.cuda_kernel``
returns zeros; each custom kernel, and each of MLX's fast norms (one kernel on a GPU, several ops
on a CPU stream), then appears as one ``Depends`` node over its inputs (counted as a kernel).
Without it the step of this machine's device is counted (on a CPU, set
``XLSTM_METAL_FAST_ACTIVATIONS=0`` to count the GPU's activation ops).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Primitives that only make a view (no kernel) when their input is row-contiguous, as it is here.
VIEWS = {"Reshape", "Squeeze", "ExpandDims", "Transpose", "Slice", "Split", "Broadcast", "AsStrided",
         "StopGradient", "Flatten", "Unflatten", "BroadcastAxes", "Contiguous"}


def _install_pretend_cuda() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cuda_compile_check import pretend_cuda  # noqa: PLC0415  (imports xlstm_metal before mlx)
    import mlx.core as mx  # noqa: PLC0415

    def kernel(name, input_names, output_names, source, header="", **_):
        def run(inputs, output_shapes, output_dtypes, **__):
            outs = [mx.zeros(tuple(s), dtype=d) for s, d in zip(output_shapes, output_dtypes)]
            # Tie the placeholder outputs to the inputs, so the graph keeps everything that feeds
            # the kernel; the Depends node stands for the kernel itself.
            return mx.depends(outs, [a for a in inputs if isinstance(a, mx.array)])

        return run

    pretend_cuda()
    mx.fast.cuda_kernel = kernel

    # MLX's fast norms are one kernel each on a GPU, but on a CPU stream they are built from their
    # fallback ops (square, sum, rsqrt ...): stand in for them as one node too.
    def one_node(x, *args, **kwargs):
        return mx.depends([mx.full(x.shape, 0.0, dtype=x.dtype)], [x])[0]

    mx.fast.rms_norm = one_node
    mx.fast.layer_norm = one_node


def count_step(blocks: int, batch: int, dtype: str, embedding_dim: int, num_heads: int,
               q_bits: int | None = None) -> collections.Counter:
    import mlx.core as mx  # noqa: PLC0415

    from xlstm_metal import benchmark as bm  # noqa: PLC0415

    config = bm.shape_config("7b", num_blocks=blocks, embedding_dim=embedding_dim, num_heads=num_heads,
                             vocab_size=512)
    model = bm.random_model(config, dtype=dtype)
    if q_bits:  # as `xlstm-metal bench --q-bits`: gate projections stay in float (the default recipe)
        from xlstm_metal.quantization import quantize_model  # noqa: PLC0415

        quantize_model(model, bits=q_bits, group_size=64)
    model.fuse_projections()
    step = bm.make_decode_step(model, compiled=True)
    state = model.make_state(batch)
    tokens = mx.zeros((batch, 1), dtype=mx.int32)
    mx.eval(state, tokens)
    out = step(tokens, state)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "step.dot")
        mx.export_to_dot(path, out[0], *[a for s in out[1] for a in s])
        labels = re.findall(r'\[label ="([^"]+)", shape=rectangle\]', Path(path).read_text())
    return collections.Counter(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretend-cuda", action="store_true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--embedding-dim", type=int, default=512, help="small dims: the count does not depend on them")
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--q-bits", type=int, default=None, help="quantize (group 64) before counting")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.pretend_cuda:
        _install_pretend_cuda()
    one, two = (count_step(n, args.batch, args.dtype, args.embedding_dim, args.num_heads, args.q_bits) for n in (1, 2))
    block = two - one
    kernels = {k: v for k, v in sorted(block.items()) if k not in VIEWS}
    views = {k: v for k, v in sorted(block.items()) if k in VIEWS}
    rest = {k: v for k, v in sorted(one.items()) if k not in VIEWS}
    record = {"batch": args.batch, "dtype": args.dtype, "q_bits": args.q_bits, "pretend_cuda": args.pretend_cuda,
              "kernels_per_block": sum(kernels.values()), "per_block": kernels, "views_per_block": views,
              "kernels_one_block_model": sum(rest.values()), "one_block_model": rest}
    if args.json:
        print(json.dumps(record))
        return
    print(f"kernels per block: {record['kernels_per_block']}  (views: {sum(views.values())})")
    for name, n in kernels.items():
        print(f"  {n:3d}  {name}")
    print(f"whole step of a 1-block model: {record['kernels_one_block_model']} kernels")
    for name, n in rest.items():
        print(f"  {n:3d}  {name}")


if __name__ == "__main__":
    main()
