"""Text generation: tokenizer, sampling, and the xLSTMRunner (prefill + compiled decode).

    from xlstm_metal.generation import xLSTMRunner
    runner = xLSTMRunner("path/to/checkpoint")
    for chunk in runner.stream("The xLSTM", max_tokens=50):
        print(chunk.text, end="")
"""

from pathlib import Path

from .runner import GenerationChunk, default_dtype, model_info, wiring_text, xLSTMRunner
from .sampling import SamplingParams
from .tokenizer import StreamingDetokenizer, Tokenizer, TokenizerError, load_tokenizer

#: The small model shipped in the package (used by `xlstm-metal generate` without --model).
DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "default_model"

__all__ = [
    "DEFAULT_MODEL_DIR",
    "GenerationChunk",
    "SamplingParams",
    "StreamingDetokenizer",
    "Tokenizer",
    "TokenizerError",
    "default_dtype",
    "load_tokenizer",
    "model_info",
    "wiring_text",
    "xLSTMRunner",
]
