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
    """The packaged model as it runs best here. It ships quantized (small) and stays so on GPUs,
    and on CPUs where the C decode step and the C prefill (:mod:`xlstm_metal.kernels.cpu`) read its
    packed weights (faster than float32 there: BENCHMARKS.md). On other CPUs (no C compiler or
    OpenBLAS) MLX's quantized matmul would run, which is slower than float32, so its layers are
    dequantized in place (in the dtype of the loaded scales: float32 as generate loads it, ~60 MB).
    Returns the model."""
    import mlx.core as mx

    from ..quantization import dequantize_model, quantization_config

    if mx.default_device() == mx.cpu and quantization_config(model) is not None:
        from ..kernels.cpu import decode_step, prefill

        if decode_step.unsupported_reason(model) is not None or prefill.unsupported_reason(model) is not None:
            dequantize_model(model)
    return model
