"""Convert local public-dataset files into verl's parquet schemas (`recipes/ring1t/data/convert.py`).

Reads jsonl / json / parquet from disk only (no network, no hub) and writes, with pyarrow and an
explicit schema (same input -> byte-identical parquet):

* RL schema, read by `verl.utils.dataset.rl_dataset.RLHFDataset`: `data_source` str, `prompt` list of
  `{role, content}`, `ability` str, `reward_model` `{style, ground_truth}`, `extra_info`
  `{split, index, ...}` (`index` is the row's position in the input file).
* SFT schema, read by `verl.utils.dataset.multiturn_sft_dataset.MultiTurnSFTDataset`
  (`messages_key="messages"`): `messages` list of `{role, content}`, `extra_info` `{split, index}`.

Converters `convert_<name>(rows, split)`: gsm8k, math, code, rlhf -> RL; sft -> SFT. A row missing a
required column raises `ConversionError` (always fatal: wrong file or wrong converter); a malformed
value (or a null) raises it too unless `skip_bad`, which skips the row and counts it in `Report`.
`synthetic-{sft,rlvr,rlhf}` write the embedded sets of the tiny CPU profile from `ring_ext.tiny.data`.

    python recipes/ring1t/data/convert.py gsm8k --input train.jsonl --output gsm8k_train.parquet
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

Row = dict[str, Any]
GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
CODE_INSTRUCTION = "Write your solution in Python inside a ```python code block."
STDIO_INSTRUCTION = "Read the input from standard input and write the answer to standard output."
DEFAULT_SOURCE = {"gsm8k": "openai/gsm8k", "math": "DigitalLearningGmbH/MATH-lighteval", "rlhf": "rlhf"}
WRITE_OPTS: dict[str, Any] = {  # as ring_ext/tiny/data.py: one row group, fixed settings
    "row_group_size": 1 << 20,
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": False,
    "write_statistics": True,
    "version": "2.6",
}


class ConversionError(ValueError):
    """A row cannot be converted; `skippable` is False for a missing column (wrong file/converter)."""

    def __init__(self, message: str, *, skippable: bool = True) -> None:
        super().__init__(message)
        self.skippable = skippable


@dataclass
class Report:
    """What `skip_bad` dropped: a count and each row's error message."""

    skipped: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class _Ctx:
    conv: str
    index: int
    row: Row

    def bad(self, problem: str) -> ConversionError:
        return ConversionError(f"{self.conv}: row {self.index}: {problem}")

    def need(self, *cols: str) -> tuple[str, Any]:
        """(column, value) of the first of `cols` with a non-null value."""
        for col in cols:
            if self.row.get(col) is not None:
                return col, self.row[col]
        names = " or ".join(repr(c) for c in cols)
        if any(c in self.row for c in cols):
            raise self.bad(f"column {names} is null")
        present = ", ".join(map(str, self.row)) or "none"
        raise ConversionError(
            f"{self.conv}: row {self.index}: missing required column {names} (columns present: {present})",
            skippable=False,
        )

    def text(self, *cols: str) -> str:
        col, value = self.need(*cols)
        if not isinstance(value, str):
            raise self.bad(f"column {col!r} must be a string, got {type(value).__name__}")
        return value

    def messages(self, col: str, value: Any) -> list[dict[str, str]]:
        ok = (
            isinstance(value, list)
            and bool(value)
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value
            )
        )
        if not ok:
            raise self.bad(f"column {col!r} must be a non-empty list of {{'role', 'content'}} string messages")
        return [{"role": m["role"], "content": m["content"]} for m in value]


def _convert(
    name: str, rows: Iterable[Row], build: Callable[[_Ctx], Row], skip_bad: bool, report: Report | None
) -> list[Row]:
    out: list[Row] = []
    for index, row in enumerate(rows):
        try:
            out.append(build(_Ctx(name, index, row)))
        except ConversionError as e:
            if not (skip_bad and e.skippable):
                raise
            if report is not None:
                report.skipped += 1
                report.errors.append(str(e))
    return out


def _rl(
    c: _Ctx,
    split: str,
    source: str,
    prompt: str | list[dict[str, str]],
    ability: str,
    style: str,
    truth: str,
    **extra: Any,
) -> Row:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return {
        "data_source": source,
        "prompt": messages,
        "ability": ability,
        "reward_model": {"style": style, "ground_truth": truth},
        "extra_info": {"split": split, "index": c.index, **extra},
    }


def convert_gsm8k(
    rows: Iterable[Row],
    split: str,
    *,
    skip_bad: bool = False,
    report: Report | None = None,
    data_source: str | None = None,
) -> list[Row]:
    """Columns `question`, `answer` ("...#### 72"); ground truth = the number after the last ####."""

    def build(c: _Ctx) -> Row:
        question, answer = c.text("question"), c.text("answer")
        if "####" not in answer:
            raise c.bad("column 'answer' has no '####' final answer")
        truth = answer.rsplit("####", 1)[1].strip().replace(",", "")
        try:
            float(truth)
        except ValueError:
            raise c.bad(f"the text after '####' is not a number: {truth!r}") from None
        return _rl(
            c,
            split,
            data_source or DEFAULT_SOURCE["gsm8k"],
            f"{question} {GSM8K_INSTRUCTION}",
            "math",
            "rule",
            truth,
            question=question,
            answer=answer,
        )

    return _convert("gsm8k", rows, build, skip_bad, report)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested and escaped braces allowed); None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] in "{}" and text[j - 1] != "\\":
            depth += 1 if text[j] == "{" else -1
            if depth == 0:
                return text[i:j]
    raise ValueError("unbalanced braces in the last \\boxed{...}")


def convert_math(
    rows: Iterable[Row],
    split: str,
    *,
    skip_bad: bool = False,
    report: Report | None = None,
    data_source: str | None = None,
) -> list[Row]:
    """Columns `problem` (or `question`) and `answer` (preferred) or `solution` (last \\boxed{} taken)."""

    def build(c: _Ctx) -> Row:
        problem = c.text("problem", "question")
        col, value = c.need("answer", "solution")
        if col == "answer" and value == "" and c.row.get("solution") is not None:
            col, value = "solution", c.row["solution"]  # merged sets: empty `answer`, boxed `solution`
        if col == "answer":
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise c.bad(f"column 'answer' must be a string or number, got {type(value).__name__}")
            truth, reference = str(value).strip(), str(value)
        else:
            reference = c.text("solution")
            try:
                boxed = last_boxed(reference)
            except ValueError as e:
                raise c.bad(f"column 'solution': {e}") from None
            if boxed is None:
                raise c.bad("column 'solution' has no \\boxed{...} and there is no 'answer' column")
            truth = boxed.strip()
        if not truth:
            raise c.bad(f"empty final answer in column {col!r}")
        return _rl(
            c,
            split,
            data_source or DEFAULT_SOURCE["math"],
            f"{problem} {MATH_INSTRUCTION}",
            "math",
            "rule",
            truth,
            question=problem,
            answer=reference,
        )

    return _convert("math", rows, build, skip_bad, report)


def convert_code(
    rows: Iterable[Row],
    split: str,
    *,
    skip_bad: bool = False,
    report: Report | None = None,
    data_source: str | None = None,
) -> list[Row]:
    """Columns `question` / `prompt` / `text`, and `input_output` (APPS/TACO JSON) or `test_list` (MBPP).

    Ground truth: JSON `{"inputs", "outputs"[, "fn_name"]}` (data source "apps") or `{"asserts"}` ("mbpp").
    """

    def build(c: _Ctx) -> Row:
        question = c.text("question", "prompt", "text")
        col, tests = c.need("input_output", "test_list")
        if col == "input_output":
            if isinstance(tests, str):
                try:
                    tests = json.loads(tests)
                except json.JSONDecodeError as e:
                    raise c.bad(f"unparsable input_output JSON: {e}") from None
            if not (
                isinstance(tests, dict)
                and isinstance(tests.get("inputs"), list)
                and isinstance(tests.get("outputs"), list)
                and len(tests["inputs"]) == len(tests["outputs"])
            ):
                raise c.bad("input_output must be an object with 'inputs' and 'outputs' lists of equal length")
            truth: dict[str, Any] = {"inputs": tests["inputs"], "outputs": tests["outputs"]}
            fn = tests.get("fn_name")
            how = f"Implement the function `{fn}`." if fn else STDIO_INSTRUCTION
            if fn:
                truth["fn_name"] = fn
            prompt, source = f"{question}\n\n{how} {CODE_INSTRUCTION}", "apps"
        else:
            if not (isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests)):
                raise c.bad("column 'test_list' must be a non-empty list of assert strings")
            truth = {"asserts": "\n".join(tests)}
            prompt, source = (
                f"{question}\nYour code should pass these tests:\n\n{truth['asserts']}\n\n{CODE_INSTRUCTION}",
                "mbpp",
            )
        return _rl(c, split, data_source or source, prompt, "code", "rule", json.dumps(truth), question=question)

    return _convert("code", rows, build, skip_bad, report)


def convert_rlhf(
    rows: Iterable[Row],
    split: str,
    *,
    skip_bad: bool = False,
    report: Report | None = None,
    data_source: str | None = None,
) -> list[Row]:
    """Column `prompt` (string or chat list), optional `chosen` / `rejected` (string or chat list: last turn)."""

    def side(c: _Ctx, col: str) -> str | None:
        value = c.row.get(col)
        if value is None or isinstance(value, str):
            return value
        return c.messages(col, value)[-1]["content"]

    def build(c: _Ctx) -> Row:
        _, prompt = c.need("prompt")
        prompt = prompt if isinstance(prompt, str) else c.messages("prompt", prompt)
        return _rl(
            c,
            split,
            data_source or DEFAULT_SOURCE["rlhf"],
            prompt,
            "general",
            "model",
            "",
            chosen=side(c, "chosen"),
            rejected=side(c, "rejected"),
        )

    return _convert("rlhf", rows, build, skip_bad, report)


def convert_sft(rows: Iterable[Row], split: str, *, skip_bad: bool = False, report: Report | None = None) -> list[Row]:
    """Column `messages` (chat list with an assistant turn), or `prompt` (string or chat list) + `response`."""

    def build(c: _Ctx) -> Row:
        col, value = c.need("messages", "prompt")
        if col == "messages":
            messages = c.messages(col, value)
            if not any(m["role"] == "assistant" for m in messages):
                raise c.bad("column 'messages' has no assistant turn")
        else:
            head = [{"role": "user", "content": value}] if isinstance(value, str) else c.messages(col, value)
            messages = [*head, {"role": "assistant", "content": c.text("response")}]
        return {"messages": messages, "extra_info": {"split": split, "index": c.index}}

    return _convert("sft", rows, build, skip_bad, report)


# ---------------------------------------------------------------- schemas, reading, writing
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
RL_EXTRA = {
    "gsm8k": ("question", "answer"),
    "math": ("question", "answer"),
    "code": ("question",),
    "rlhf": ("chosen", "rejected"),
}


def rl_schema(extra: tuple[str, ...]) -> pa.Schema:
    info = [("split", pa.string()), ("index", pa.int64()), *((name, pa.string()) for name in extra)]
    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", MESSAGES),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            ("extra_info", pa.struct(info)),
        ]
    )


SFT_SCHEMA = pa.schema(
    [("messages", MESSAGES), ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64())]))]
)


def schema_for(kind: str) -> pa.Schema:
    return SFT_SCHEMA if kind == "sft" else rl_schema(RL_EXTRA[kind])


def write_parquet(rows: list[Row], path: Path | str, schema: pa.Schema) -> None:
    """Explicit schema, no pandas metadata, fixed writer settings: same rows -> same bytes."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path), **WRITE_OPTS)


def read_rows(path: Path | str, limit: int | None = None) -> Iterator[Row]:
    """Rows of a local .jsonl/.ndjson, .json (list of objects, or object of columns) or .parquet file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows: Iterator[Row] = _read_jsonl(path)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConversionError(f"{path}: invalid JSON: {e}", skippable=False) from None
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            data = [dict(zip(data, values)) for values in zip(*data.values())]
        if not (isinstance(data, list) and all(isinstance(r, dict) for r in data)):
            raise ConversionError(f"{path}: expected a list of objects or an object of columns", skippable=False)
        rows = iter(data)
    elif suffix == ".parquet":
        rows = (r for b in pq.ParquetFile(path).iter_batches(batch_size=1024) for r in b.to_pylist())
    else:
        raise ConversionError(
            f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)", skippable=False
        )
    return itertools.islice(rows, limit)


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConversionError(f"{path}:{lineno}: invalid JSON: {e}", skippable=False) from None
                if not isinstance(row, dict):
                    raise ConversionError(f"{path}:{lineno}: expected a JSON object", skippable=False)
                yield row


def count_rows(path: Path | str, limit: int | None = None) -> int | None:
    """Row count for the progress bar when cheap (parquet footer), else None."""
    if Path(path).suffix.lower() != ".parquet":
        return limit
    n = pq.ParquetFile(path).metadata.num_rows
    return n if limit is None else min(n, limit)


# ---------------------------------------------------------------- synthetic sets (tiny CPU profile)
def synthetic_sft(split: str = "train", size: int = 256, seed: int = 3) -> list[Row]:
    """`ring_ext.tiny.data.make_sft_rows`: worked traces (plan, compute, check, '#### n'); defaults = the tiny
    default's longcot_sft.parquet."""
    from ring_ext.tiny.data import make_sft_rows

    return make_sft_rows(size, seed, split)


def synthetic_rlvr(split: str = "train", size: int = 256, seed: int = 1) -> list[Row]:
    """`ring_ext.tiny.data.make_rows` (defaults = the tiny default's arith_train.parquet, byte for byte)."""
    from ring_ext.tiny.data import make_rows

    return make_rows(split, size, seed)


def synthetic_rlhf(split: str = "train", size: int = 64, seed: int = 4) -> list[Row]:
    """`ring_ext.tiny.data.make_open_prompt_rows` ("Write a short sentence about <topic>."), scored by a reward
    model, with the rlhf schema's `extra_info` (no chosen/rejected pair)."""
    from ring_ext.tiny.data import make_open_prompt_rows

    rows = make_open_prompt_rows(split, size, seed)
    for row in rows:
        info = row["extra_info"]
        row["extra_info"] = {"split": info["split"], "index": info["index"], "chosen": None, "rejected": None}
    return rows


CONVERTERS: dict[str, Callable[..., list[Row]]] = {
    "gsm8k": convert_gsm8k,
    "math": convert_math,
    "code": convert_code,
    "rlhf": convert_rlhf,
    "sft": convert_sft,
}
SYNTHETIC: dict[str, tuple[Callable[..., list[Row]], str, int, int]] = {  # fn, schema kind, size, seed
    "synthetic-sft": (synthetic_sft, "sft", 256, 3),
    "synthetic-rlvr": (synthetic_rlvr, "gsm8k", 256, 1),
    "synthetic-rlhf": (synthetic_rlhf, "rlhf", 64, 4),
}


# ---------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="convert.py")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in CONVERTERS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").split("\n")[0])
        p.add_argument("--input", required=True, type=Path, help="local .jsonl, .json or .parquet file")
        p.add_argument("--output", required=True, type=Path, help="parquet file to write")
        p.add_argument("--split", default="train", help="written to extra_info.split (default: train)")
        p.add_argument("--limit", type=int, default=None, help="convert only the first N input rows")
        p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed rows instead of failing")
        p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
        if name != "sft":
            p.add_argument("--data-source", default=None, help="override the data_source column")
    for name, (fn, _, size, seed) in SYNTHETIC.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").split("\n")[0])
        p.add_argument("--output", required=True, type=Path, help="parquet file to write")
        p.add_argument("--split", default="train")
        p.add_argument("--size", type=int, default=size, help=f"rows (default: {size})")
        p.add_argument("--seed", type=int, default=seed, help=f"generator seed (default: {seed})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in SYNTHETIC:
            fn, kind, _, _ = SYNTHETIC[args.command]
            rows = fn(args.split, args.size, args.seed)
            write_parquet(rows, args.output, schema_for(kind))
            print(f"wrote {len(rows)} rows to {args.output}")
            return 0
        from tqdm import tqdm

        total = count_rows(args.input, args.limit)
        source = tqdm(
            read_rows(args.input, args.limit),
            total=total,
            unit="row",
            desc=args.command,
            disable=args.no_progress,
            file=sys.stderr,
        )
        report = Report()
        kwargs = {} if args.command == "sft" else {"data_source": args.data_source}
        rows = CONVERTERS[args.command](source, args.split, skip_bad=args.skip_bad, report=report, **kwargs)
        write_parquet(rows, args.output, schema_for(args.command))
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(rows)} rows to {args.output}")
    if args.skip_bad:
        print(f"skipped {report.skipped} bad rows")
        for message in report.errors[:10]:
            print(f"  {message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
