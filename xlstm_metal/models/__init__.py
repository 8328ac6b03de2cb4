"""Model architectures: xlstm_large (xLSTM-Large / xLSTM-7b) and xlstm_2024 (sLSTM + mLSTM)."""
