"""Model architectures: xlstm_large (xLSTM-Large / xLSTM-7b) and xlstm_2024 (sLSTM + mLSTM)."""

from importlib.util import find_spec


def xlstm_2024_available() -> bool:
    return find_spec("xlstm_metal.models.xlstm_2024") is not None
