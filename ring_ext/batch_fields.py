"""Per-token fields that ring-ext plugins add to verl's training batch for one another (names only, no code).

- `ROLLOUT_POLICY_LAG`: per response token, the policy version being trained minus the version of the weights
  that decoded it (0: on-policy; 1: decoded before the last weight sync; ...). Written by ring-ext-c3po into
  TransferQueue for each training batch; read by ring-ext-icepop's loss to split its mismatch diagnostics by lag.
"""

ROLLOUT_POLICY_LAG = "rollout_policy_lag"
