"""ring-ext-astate: AState-like zero-redundancy peer-to-peer weight sync (Ring-1T §2.5), trainer to rollout ranks."""
