"""ring-ext-c3po: C3PO++ budgeted partial rollouts (token budget Phi, retention threshold sigma) for verl."""
