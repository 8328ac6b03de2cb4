"""mlx-lm model file of an xLSTM checkpoint written by xlstm-metal.

mlx_lm.load(path, trust_remote_code=True) imports this file; the model code is the
xlstm-metal package's (pip install xlstm-metal). On Linux CPUs, `xlstm-metal mlx-lm ...` runs
mlx-lm's commands with OpenBLAS bound (mlx-lm imports mlx before this file can).
"""

import warnings

try:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*mlx was imported before xlstm_metal")
        from xlstm_metal.mlx_lm_model import Model, ModelArgs  # noqa: F401
except ImportError as err:  # pragma: no cover - only without the package
    raise ImportError(
        "this xLSTM checkpoint needs the xlstm-metal package: pip install xlstm-metal"
    ) from err
