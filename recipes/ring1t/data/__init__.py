"""Data preparation for the Ring-1T stage recipes: `convert.py` turns local public-dataset files
(jsonl / json / parquet) into verl's RL and SFT parquet schemas and writes the synthetic tiny sets."""
