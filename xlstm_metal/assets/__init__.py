"""Files shipped inside the package: the default model (see MODEL_CARD.md at the repository root)."""

from __future__ import annotations

from pathlib import Path

#: Checkpoint directory of the default model: config.json, model.safetensors (quantized, mixed
#: 4/6-bit with bfloat16 scales), tokenizer.json, tokenizer_config.json, generation_config.json.
DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent / "default_model"


def default_model_path() -> Path:
    """The default model's checkpoint directory (FileNotFoundError naming it if it is missing,
    e.g. in a source checkout without the weights)."""
    if not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"the default model is missing: {DEFAULT_MODEL_DIR}/model.safetensors")
    return DEFAULT_MODEL_DIR


def for_this_device(model):
    """The packaged model as it runs best here: it ships quantized (small), but MLX's quantized
    matmul on CPUs is slower than float32 (BENCHMARKS.md), so on the CPU its layers are
    dequantized in place (in the dtype of the loaded scales: float32 as generate loads it, ~60 MB).
    GPUs keep it quantized. Returns the model."""
    import mlx.core as mx

    from ..quantization import dequantize_model, quantization_config

    if mx.default_device() == mx.cpu and quantization_config(model) is not None:
        dequantize_model(model)
    return model
