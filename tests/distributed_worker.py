"""Run under ``mlx.launch -n N``: split tiny models across the processes (tensor and pipeline
parallel) and compare with the unsplit model, which every rank first runs by itself.

    mlx.launch -n 2 -- python tests/distributed_worker.py OUT.json [CASE ...]

Rank 0 writes ``{case: {"logits": rel. error, "prefill": ..., "state": ..., "tokens_equal":
bool, "tokens": [...]}}`` to OUT.json; tests/test_distributed_inference.py checks the numbers.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import xlstm_metal  # noqa: F401,I001  (first: preloads the BLAS)

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_model  # noqa: E402

from xlstm_metal.distributed import agree, broadcast_json, pipeline_model, shard_model, world  # noqa: E402
from xlstm_metal.kernels.cpu import prefill as cpu_prefill  # noqa: E402


def rel(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a, np.float64), np.array(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def greedy(model, ids: mx.array, n: int) -> list[list[int]]:
    """n greedy tokens after ``ids`` [B, S]: the prompt in one call, then one step per token."""
    logits, state = model(ids)
    tokens = []
    for _ in range(n):
        token = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(token)
        logits, state = model(token[:, None], state)
    return mx.stack(tokens, axis=1).tolist()


def measure(model, ids: mx.array) -> dict:
    logits, state = model(ids)
    # Bounded pieces, as `generate` feeds prompts (the 2024 xLSTM has no prefill). The MLX graph on
    # every side: split models run it, and the whole model's C prefill (tests/test_cpu_prefill.py)
    # agrees with it to round-off only, where this compares the same ops exactly.
    with cpu_prefill.switched(False):
        last = model.prefill(ids, chunk_size=16)[0] if hasattr(type(model), "prefill") else logits[:, -1]
    mx.eval(logits, last, state)
    return {"logits": logits, "prefill": last, "state": state, "tokens": greedy(model, ids, 8)}


def state_error(model, got: list, ref: list) -> float:
    """This rank's part of the recurrent state against the full model's: its heads of every
    block (tensor parallel) or every entry of its blocks (pipeline)."""
    split, r = model.parallel, model.parallel["rank"]
    errors = []
    for index, (g, f) in enumerate(zip(got, ref)):
        if split["mode"] == "tensor":
            heads = g[0].shape[1]
            errors += [rel(gi, fi[:, r * heads : (r + 1) * heads]) for gi, fi in zip(g, f)]
        elif split["blocks"][0] <= index < split["blocks"][1]:
            errors += [rel(gi, fi) for gi, fi in zip(g, f)]
    return max(errors)


def build_2024():
    from xlstm_metal.models.xlstm_2024 import create_xlstm_model

    model = create_xlstm_model(vocab_size=61, num_layers=3, signature=(1, 1), inp_dim=32, head_dim=16, head_num=2,
                               seed=3)
    mx.eval(model.parameters())
    return model


def tensor(model, fuse: bool = False):
    shard_model(model)
    return model.fuse_projections() if fuse else model


CASES = {
    # name: (build the full model, split it)
    "tensor": (lambda: tiny_model(seed=1), tensor),
    "tensor_fused": (lambda: tiny_model(seed=2).fuse_projections(), lambda m: tensor(m, fuse=True)),
    "tensor_tied": (lambda: tiny_model(seed=3, tie_word_embeddings=True, vocab_size=98), tensor),
    "pipeline": (lambda: tiny_model(seed=4, num_blocks=3), pipeline_model),
    "pipeline_2024": (build_2024, pipeline_model),
}


def shipped_files(tmp: Path) -> dict:
    """share_path: rank 0's directory reaches a rank that lacks it (rank 1 is made to see no
    files), byte for byte; a rank that has the same files keeps its own path."""
    from xlstm_metal.distributed import comm

    group = world()
    source = tmp / "source"
    if group.rank() == 0:
        (source / "sub").mkdir(parents=True, exist_ok=True)
        (source / "a.txt").write_text("alpha")
        (source / "sub" / "b.bin").write_bytes(bytes(range(256)) * 1000)
    comm.broadcast_json(None, group)  # the files exist before any rank looks
    same = comm.share_path(source, group, tmp)
    if group.rank() == 1:
        comm._manifest = lambda path: None  # as on another machine
    shipped = comm.share_path(source, group, tmp)
    files = sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file())
    equal = all((shipped / f).read_bytes() == (source / f).read_bytes() for f in files)
    return {"kept_own": str(same) == str(source), "moved": str(shipped) != str(source), "files": files,
            "equal": equal}


def lazy_pipeline_load(tmp: Path) -> dict:
    """The largest fraction of the checkpoint's bytes any rank held at once while loading: with
    load_model(prepare=pipeline_model) (the blocks of the other ranks are never read) and when
    splitting a loaded model."""
    from mlx.utils import tree_flatten

    from xlstm_metal.loading import load_model, save_model

    group = world()
    path = tmp / "ckpt"
    if group.rank() == 0:
        save_model(tiny_model(seed=7, embedding_dim=128, num_blocks=6, vocab_size=64), path)
    broadcast_json(None, group)  # saved before anyone reads
    fractions = {}
    for name, load in (("split_after_load", lambda: pipeline_model(load_model(path))),
                       ("prepare", lambda: load_model(path, prepare=pipeline_model))):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        model = load()
        fractions[name] = mx.get_peak_memory() - base
        del model
    full = sum(v.nbytes for _, v in tree_flatten(load_model(path).parameters()))
    return {name: agree(peak / full, group) for name, peak in fractions.items()}


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:] or [*CASES, "share_path"]  # share_path: also the lazy load
    group = world()
    results = {"world_size": group.size()}
    if "share_path" in names:
        names.remove("share_path")
        tmp = Path(broadcast_json(tempfile.mkdtemp() if group.rank() == 0 else None, group))  # one for all
        mine = shipped_files(tmp)
        broadcast_json(None, group)  # every rank is done with the files
        if group.rank() == 0:
            shutil.rmtree(tmp)
        # Rank 1's view reaches rank 0 through a gather of JSON texts.
        texts = [json.dumps(mine).encode()]
        sizes = mx.distributed.all_gather(mx.array([len(texts[0])]), group=group).tolist()
        padded = np.zeros(max(sizes), np.uint8)
        padded[: len(texts[0])] = np.frombuffer(texts[0], np.uint8)
        rows = np.array(mx.distributed.all_gather(mx.array(padded)[None], group=group))
        results["share_path"] = [json.loads(bytes(rows[r][: sizes[r]]).decode()) for r in range(group.size())]
        tmp = Path(broadcast_json(tempfile.mkdtemp() if group.rank() == 0 else None, group))
        results["lazy_pipeline_load"] = lazy_pipeline_load(tmp)
        broadcast_json(None, group)
        if group.rank() == 0:
            shutil.rmtree(tmp)
    rng = np.random.default_rng(0)
    for name in names:
        build, split = CASES[name]
        model = build()
        ids = mx.array(rng.integers(0, model.config.vocab_size, size=(2, 37)).astype(np.int32))
        ref = measure(model, ids)
        split(model)
        got = measure(model, ids)
        results[name] = {
            "state": agree(state_error(model, got["state"], ref["state"]), group),  # max over ranks
            "logits": rel(got["logits"], ref["logits"]),
            "prefill": rel(got["prefill"], ref["prefill"]),
            "tokens_equal": got["tokens"] == ref["tokens"],
            "tokens": got["tokens"],
            "parallel": getattr(model, "parallel", None),
        }
        if group.rank() == 0:
            print(name, json.dumps(results[name]), flush=True)
    if group.rank() == 0:
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
