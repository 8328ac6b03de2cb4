"""Bad input to `xlstm-metal train`: refused with exit code 2 before any work, or read correctly."""

import json

from cli_helpers import assert_rejected, run_main

from xlstm_metal.jsonfiles import read_jsonl

TINY = ["--steps", "2", "--seq-len", "8", "--batch-size", "2", "--no-progress"]


def test_train_export_into_a_checkpoint_of_the_run_is_refused_first(text_data, tmp_path, capsys):
    """--export OUT/checkpoint-N: a new run trained, then failed on it; a resumed run given
    --overwrite replaced the checkpoint (its optimizer state and trainer_state.json gone)."""
    out = tmp_path / "run"
    assert_rejected(["train", text_data, "--out", out, "--export", out / "checkpoint-0000002", "--vocab-size", "300",
                     *TINY], capsys, "checkpoint-0000002, a file of the run")
    assert not out.exists()  # refused before the tokenizer was trained
    assert run_main(["train", text_data, "--out", out, "--vocab-size", "300", *TINY], capsys)[0] == 0
    assert_rejected(["train", "--out", out, "--resume", "--steps", "3", "--no-progress", "--overwrite", "--export",
                     out / "checkpoint-0000002" / "best"], capsys, "a file of the run")
    assert (out / "checkpoint-0000002" / "optimizer.safetensors").exists()


def test_train_jsonl_text_with_unicode_line_separators(tmp_path, capsys):
    """JSON strings may hold U+2028, U+2029 and U+0085 unescaped; str.splitlines() split the
    records there ("not valid JSON")."""
    text = "the quick brown fox\u2028jumps over\u2029the lazy\x85dog. "
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": text * 3}, ensure_ascii=False) + "\n" for _ in range(20)),
                    encoding="utf-8")
    assert [value["text"] for _, value in read_jsonl(data)] == [text * 3] * 20
    code, err = run_main(["train", data, "--out", tmp_path / "run", "--vocab-size", "300", *TINY], capsys)
    assert code == 0, err
