"""Synthetic verifiable-reward data for the tiny default (`ring_ext/tiny/data.py`).

Arithmetic word problems (+, -, x of small numbers) with an integer answer, written in verl's RL
parquet schema (the one `examples/data_preprocess/gsm8k.py` produces and `RLHFDataset` reads):
`data_source`, `prompt` (chat messages), `ability`, `reward_model` {style, ground_truth},
`extra_info` {split, index, question, answer}. `answer` is a gsm8k-style worked solution
("3 + 4 = 7\\n#### 7") so a reader can re-check the ground truth without our generator.
"""

from __future__ import annotations

import operator
import random
from pathlib import Path
from typing import Any

DATA_SOURCE = "ring_ext/arith"
INSTRUCTION = "Put the final answer after ####."
TRAIN_SIZE = 256
VAL_SIZE = 32
TRAIN_SEED = 1
VAL_SEED = 2

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Max", "Zoe")
ITEMS = ("apples", "pencils", "books", "marbles", "cookies", "stickers", "coins", "cards")
# Templates per operator; all plural nouns, operands >= 2, so the grammar never breaks.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": (
        "{n} has {a} {i} and buys {b} more. How many {i} does {n} have now?",
        "{n} had {a} {i}. {m} gave {n} {b} more. How many {i} does {n} have?",
    ),
    "-": (
        "{n} has {a} {i} and gives {b} to {m}. How many {i} does {n} have left?",
        "{n} had {a} {i} and lost {b} of them. How many {i} are left?",
    ),
    "*": (
        "{n} has {a} boxes with {b} {i} in each box. How many {i} does {n} have in total?",
        "{n} buys {a} packs of {b} {i}. How many {i} does {n} buy?",
    ),
}


def make_problem(rng: random.Random) -> dict[str, Any]:
    """One problem: question text, expression, integer answer (draw order is fixed -> reproducible)."""
    op = rng.choice(tuple(OPS))
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
    else:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        if op == "-" and b > a:
            a, b = b, a  # keep answers non-negative
    n, m = rng.sample(NAMES, 2)
    template = rng.choice(TEMPLATES[op])
    result = OPS[op](a, b)
    return {
        "question": template.format(n=n, m=m, a=a, b=b, i=rng.choice(ITEMS)),
        "expression": f"{a} {op} {b}",
        "result": result,
    }


def make_rows(split: str, size: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for index in range(size):
        p = make_problem(rng)
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": f"{p['question']} {INSTRUCTION}"}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(p["result"])},
                "extra_info": {
                    "split": split,
                    "index": index,
                    "question": p["question"],
                    "answer": f"{p['expression']} = {p['result']}\n#### {p['result']}",
                },
            }
        )
    return rows


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    """Write with an explicit schema and fixed writer settings: same versions -> same bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    msg = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(msg)),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            (
                "extra_info",
                pa.struct(
                    [
                        ("split", pa.string()),
                        ("index", pa.int64()),
                        ("question", pa.string()),
                        ("answer", pa.string()),
                    ]
                ),
            ),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)  # no pandas -> no index / pandas metadata
    pq.write_table(
        table,
        str(path),
        row_group_size=1 << 20,  # everything in one row group
        compression="zstd",
        compression_level=3,
        use_dictionary=False,
        write_statistics=True,
        version="2.6",
    )


def build_data(out_dir: Path, train_size: int = TRAIN_SIZE, val_size: int = VAL_SIZE) -> tuple[Path, Path]:
    """Write `arith_train.parquet`, `arith_val.parquet`, `longcot_sft.parquet`, `open_prompts.parquet` into `out_dir`.

    Returns the two RL paths; the SFT and RLHF sets are `out_dir / SFT_FILE`, `out_dir / OPEN_PROMPTS_FILE`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = out_dir / "arith_train.parquet", out_dir / "arith_val.parquet"
    write_parquet(make_rows("train", train_size, TRAIN_SEED), train)
    write_parquet(make_rows("val", val_size, VAL_SEED), val)
    write_sft_parquet(make_sft_rows(), out_dir / SFT_FILE)
    write_parquet(make_open_prompt_rows("train", OPEN_PROMPTS_SIZE, OPEN_PROMPTS_SEED), out_dir / OPEN_PROMPTS_FILE)
    return train, val


# Long-CoT SFT traces: the same problems, answered with a worked chain of thought that ends in the
# `#### n` line the RL reward checks, so SFT teaches the format RL then rewards.
SFT_FILE = "longcot_sft.parquet"
SFT_SIZE = 256
SFT_SEED = 3
_VERBS = {"+": "add", "-": "subtract", "*": "multiply"}


def long_cot(expression: str, result: int) -> str:
    """A worked answer: restate, compute, check by the inverse operation, conclude with `#### n`."""
    a, op, b = expression.split()
    check = {"+": f"{result} - {b} = {a}", "-": f"{result} + {b} = {a}", "*": f"{result} = {b} * {a}"}[op]
    return (
        f"Let's think step by step. We need to {_VERBS[op]} {a} and {b}.\n"
        f"{expression} = {result}.\nCheck: {check}.\nThe answer is {result}.\n#### {result}"
    )


def make_sft_rows(size: int = SFT_SIZE, seed: int = SFT_SEED, split: str = "train") -> list[dict[str, Any]]:
    """Chat `messages` rows (verl's MultiTurnSFTDataset schema) for the Long-CoT SFT stage."""
    rng = random.Random(seed)
    rows = []
    for index in range(size):
        p = make_problem(rng)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"{p['question']} {INSTRUCTION}"},
                    {"role": "assistant", "content": long_cot(p["expression"], p["result"])},
                ],
                "extra_info": {"split": split, "index": index},
            }
        )
    return rows


def write_sft_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    msg = pa.struct([("role", pa.string()), ("content", pa.string())])
    extra = pa.struct([("split", pa.string()), ("index", pa.int64())])
    table = pa.Table.from_pylist(rows, schema=pa.schema([("messages", pa.list_(msg)), ("extra_info", extra)]))
    pq.write_table(table, str(path), compression="zstd", use_dictionary=False, version="2.6")


# Open prompts for the general-RL (RLHF) stage: no ground truth, a reward model scores the answers.
OPEN_PROMPTS_FILE = "open_prompts.parquet"
OPEN_PROMPTS_SIZE = 64
OPEN_PROMPTS_SEED = 4
TOPICS = ("the sea", "a cat", "autumn", "music", "a train", "the moon", "bread", "rain", "a garden", "friendship",
          "the city", "snow", "a river", "books", "coffee", "the mountains")  # fmt: skip
OPEN_TEMPLATES = (
    "Write a short sentence about {t}.",
    "Describe {t} in one sentence.",
    "Write a friendly greeting that mentions {t}.",
    "Give one interesting fact about {t}.",
)


def make_open_prompt_rows(split: str, size: int, seed: int) -> list[dict[str, Any]]:
    """RL parquet rows (the arithmetic set's schema) with `reward_model.style` "model" and no ground truth."""
    rng = random.Random(seed)
    rows = []
    for index in range(size):
        prompt = rng.choice(OPEN_TEMPLATES).format(t=rng.choice(TOPICS))
        rows.append(
            {
                "data_source": "ring_ext/open_prompts",
                "prompt": [{"role": "user", "content": prompt}],
                "ability": "general",
                "reward_model": {"style": "model", "ground_truth": ""},
                "extra_info": {"split": split, "index": index, "question": prompt, "answer": ""},
            }
        )
    return rows
