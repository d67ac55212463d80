"""ring-ext-icepop: train/inference-mismatch policy losses for verl's registry (IcePop, KPop, TIS, sequence-level)."""
