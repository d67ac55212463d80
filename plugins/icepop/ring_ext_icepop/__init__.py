"""ring-ext-icepop: IcePop, KPop and TIS policy losses for verl's registry (train/inference mismatch)."""
