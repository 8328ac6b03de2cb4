"""`xlstm-metal train` used as documented (good input), checking what README.md / --help promise."""

import json

import mlx.core as mx
import numpy as np

from xlstm_metal.cli import main

WORDS = ("the for statement loops over items in a list while the condition holds def defines a function "
         "return gives back a value class makes an object import loads a module").split()


def make_text(path, seed=0, lines=120):
    rng = np.random.default_rng(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS, 12)) + "." for _ in range(lines)))
    return path


TINY = ["--config", "tiny", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--no-progress",
        "--val-fraction", "0.1", "--eval-batches", "2", "--seed", "0"]


def test_export_after_resume_takes_the_best_checkpoint(tmp_path, capsys):
    """--export writes the best-validation model; when that evaluation happened before a
    --resume, its checkpoint (kept by rotation) is what is exported, not the last weights."""
    data = make_text(tmp_path / "data.txt")
    out, export = tmp_path / "run", tmp_path / "export"
    assert main(["train", str(data), "--out", str(out), *TINY, "--steps", "30", "--lr", "3e-3",
                 "--eval-every", "10", "--save-every", "10", "--keep", "1"]) == 0
    # The resumed segment runs at a far higher rate: its validation loss is worse than step 30's.
    assert main(["train", "--out", str(out), "--resume", "--steps", "40", "--lr", "0.2",
                 "--export", str(export)]) == 0
    err = capsys.readouterr().err
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    best = min(evals, key=lambda r: r["val_loss"])
    assert best["step"] == 30 and evals[-1]["val_loss"] > best["val_loss"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0000030", "checkpoint-0000040"]
    exported = mx.load(str(export / "model.safetensors"))
    kept = mx.load(str(out / "checkpoint-0000030" / "model.safetensors"))
    last = mx.load(str(out / "checkpoint-0000040" / "model.safetensors"))
    assert exported.keys() == kept.keys()
    assert all(mx.array_equal(exported[k], kept[k]).item() for k in kept)
    assert not all(mx.array_equal(exported[k], last[k]).item() for k in last)
    assert "exported the step-30 model (best validation loss, from its checkpoint)" in err
