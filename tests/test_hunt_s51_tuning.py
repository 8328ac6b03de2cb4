"""Session 51's hunt in tune, profile, plot and judge: each test fails on the code before its fix."""

import json
import shutil

import pytest

from xlstm_metal.cli import main

pytest.importorskip("optuna")


@pytest.fixture(autouse=True)
def _profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))


def _records(out):
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def test_resume_from_another_directory_with_relative_model_shape_and_profile(tmp_path, monkeypatch, tiny_model_dir):
    """--model ckpt, --shape tiny.json and --profile my.json were kept relative in run_meta.json's
    objective, so `tune --out ../sweep --resume` from another directory was refused: "cannot resume
    ... with other settings (model 'ckpt' -> '/abs/ckpt')"."""
    from xlstm_metal.profiles import PACKAGE_DIR

    work = tmp_path / "work"
    work.mkdir()
    (work / "tiny.json").write_text(json.dumps({"embedding_dim": 64, "num_heads": 2, "num_blocks": 1,
                                                "vocab_size": 128}))
    profile = json.loads((PACKAGE_DIR / "exact-fp32.json").read_text())
    (work / "my.json").write_text(json.dumps({**profile, "name": "my"}))
    shutil.copytree(tiny_model_dir, work / "ckpt")
    (tmp_path / "elsewhere").mkdir()
    common = ["--trials", "1", "--metric", "prefill", "--prefill-length", "32", "--repeats", "1", "--no-progress"]
    for name, source in (("shape", ["--shape", "tiny.json", "--profile", "my.json"]), ("model", ["--model", "ckpt"])):
        monkeypatch.chdir(work)
        assert main(["tune", "--objective", "speed", *source, "--out", f"../{name}", "--profile-name", name,
                     *common]) == 0
        monkeypatch.chdir(tmp_path / "elsewhere")
        assert main(["tune", "--out", f"../{name}", "--resume", "--trials", "2", "--no-progress"]) == 0
        assert [r["status"] for r in _records(tmp_path / name)] == ["complete", "complete"]
