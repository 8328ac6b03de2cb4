"""Files shipped inside the package: the default model (see MODEL_CARD.md at the repository root)."""

from __future__ import annotations

from pathlib import Path

#: Checkpoint directory of the default model: config.json, model.safetensors (bfloat16),
#: tokenizer.json, tokenizer_config.json, generation_config.json.
DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent / "default_model"


def default_model_path() -> Path:
    """The default model's checkpoint directory (FileNotFoundError naming it if it is missing,
    e.g. in a source checkout without the weights)."""
    if not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"the default model is missing: {DEFAULT_MODEL_DIR}/model.safetensors")
    return DEFAULT_MODEL_DIR
