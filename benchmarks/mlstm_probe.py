"""What bounds the fused chunkwise kernels: each kernel alone (CUPTI), one 7B layer's q, k, v,
i, f at one length, per chunk size, bf16 terms and diagnostic switch (``XLSTM_METAL_PROBE_*``:
they leave work out, so those runs compute wrong values; see chunkwise_fused._probe).

    python benchmarks/mlstm_probe.py --length 16384 --cases 64,32,64:t1,64:s1,64:s2,64:s4,64:o1 \
        --out $RES/probe.jsonl

A case is CHUNK[:tTERMS][:sBITS][:oBITS][:p][:eNAME=VALUE...]: chunk size, the states kernel's
bf16 terms (1-3), the states / outputs kernel's probe bits, p: the states kernel with the gates
pass (``XLSTM_METAL_STATES_PREGATES=1``, on by default since session 9; the S9R1 and S9R2 runs
of this script turned it off unless p), e: any
``XLSTM_METAL_<NAME>`` setting for this case (the others: the defaults).
One JSON line per case: ms per call of each kernel. A case starting with "ng" times the prompt's
multi-head norm + output gate kernel (norm_rows.py) alone on the layer's shapes instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import xlstm_metal  # noqa: E402,F401
import mlx.core as mx  # noqa: E402

from xlstm_metal import benchmark as bm  # noqa: E402
from xlstm_metal.kernels.fast import chunkwise_fused as fused  # noqa: E402
from xlstm_metal.kernels.mlstm import _state_f32  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="7b")
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--cases", default="64")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from train_side_by_side import trace_kernels

    config = bm.shape_config(args.shape, num_blocks=1)
    model = bm.random_model(config, dtype="bfloat16").fuse_projections()
    block = model.blocks[0]
    x = (mx.random.normal((1, args.length, config.embedding_dim)) * 0.5).astype(mx.bfloat16)
    q, k, v, o_pre, i, f = block.mlstm_layer.project(block.norm_mlstm(x))
    mx.eval(q, k, v, o_pre, i, f)
    out = open(args.out, "w") if args.out else None
    for case in args.cases.split(","):
        fields = case.split(":")
        L, terms, sbits, obits = (64 if fields[0] == "ng" else int(fields[0])), None, 0, 0
        for name in [n for n in os.environ if n.startswith("XLSTM_METAL_")]:
            del os.environ[name]
        for item in fields[1:]:
            if item[0] == "e":
                name, value = item[1:].split("=", 1)
                os.environ["XLSTM_METAL_" + name] = value
            elif item == "p":
                os.environ["XLSTM_METAL_STATES_PREGATES"] = "1"
            elif item[0] == "t":
                terms = int(item[1:])
            elif item[0] == "s":
                sbits = int(item[1:])
            elif item[0] == "o":
                obits = int(item[1:])
        os.environ["XLSTM_METAL_PROBE_STATES"] = str(sbits)
        os.environ["XLSTM_METAL_PROBE_OUTPUTS"] = str(obits)
        B, NH, S, _ = k.shape
        NC = -(-S // L)
        if fields[0] == "ng":
            _norm_gate_case(case, block, v, o_pre, trace_kernels, args, out)
            continue
        state = _state_f32(k, v, None)

        def states():
            return fused._states(k, v, i, f, state, NC, L, 1, raw=True, terms=terms, csplit=True)

        st = states()
        mx.eval(st)

        def outputs():
            return fused._outputs(q, k, v, i, f, st[0], st[1], st[2], st[3], None, 1e-6, L, mx.bfloat16, raw=True,
                                  cpre=True)

        def run():
            mx.eval(states())
            mx.eval(outputs())
            bm._sync()

        run()
        summary = trace_kernels(run, args.steps)
        rec = {"case": case, "length": S, "chunk": L, "terms": terms, "probe_states": sbits, "probe_outputs": obits}
        if "error" in summary:
            rec["error"] = summary["error"]
        else:
            for t in summary["top"]:
                name = t["name"]
                if "chunk_states" in name:
                    rec["states_ms"] = round(t["ms"], 4)
                elif "chunk_outputs" in name:
                    rec["outputs_ms"] = round(t["ms"], 4)
                elif "gates_pass" in name:
                    rec["gates_pass_ms"] = round(t["ms"], 4)
            rec["steps_per_chunk_us"] = round(1000 * rec.get("states_ms", 0) / NC, 3)
        line = json.dumps(rec)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()


def _norm_gate_case(case, block, v, o_pre, trace_kernels, args, out) -> None:
    from xlstm_metal.kernels.fast.norm_rows import norm_gate_rows

    norm = block.mlstm_layer.multihead_norm
    h = mx.contiguous(v)  # [B, NH, S, DV] bf16, as the outputs kernel writes h
    mx.eval(h)

    def run():
        mx.eval(norm_gate_rows(h, o_pre, norm.weight, norm.eps))
        bm._sync()

    run()
    summary = trace_kernels(run, args.steps)
    rec = {"case": case, "length": h.shape[2]}
    if "error" in summary:
        rec["error"] = summary["error"]
    else:
        rec["norm_gate_ms"] = round(sum(t["ms"] for t in summary["top"] if "norm_gate" in t["name"]), 4)
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
        out.write(line + "\n")
        out.flush()


if __name__ == "__main__":
    main()
