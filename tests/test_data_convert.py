"""Tests for `recipes/ring1t/data/convert.py`: exact converter outputs, errors, CLI, determinism, verl loading."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import operator
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "recipes" / "ring1t" / "data" / "convert.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ring1t_data_convert", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


cv = _load()
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
MSG = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
GSM8K = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A car costs $1,234 more than 0. Price?", "answer": "It is 1,234.\n#### 1,234", "extra": 1},
]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True, timeout=60)


def test_gsm8k_exact_rows() -> None:
    out = cv.convert_gsm8k(GSM8K, "train")
    assert out[0] == {
        "data_source": "openai/gsm8k",
        "prompt": _user(f"{GSM8K[0]['question']} {cv.GSM8K_INSTRUCTION}"),
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "7"},
        "extra_info": {"split": "train", "index": 0, "question": GSM8K[0]["question"], "answer": GSM8K[0]["answer"]},
    }
    assert out[1]["reward_model"]["ground_truth"] == "1234" and out[1]["extra_info"]["index"] == 1
    assert "####" in out[1]["prompt"][0]["content"]


def test_last_boxed() -> None:
    assert cv.last_boxed(r"so \boxed{1} and finally \boxed{\frac{1}{\sqrt{2}}}.") == r"\frac{1}{\sqrt{2}}"
    assert cv.last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert cv.last_boxed("no box") is None
    with pytest.raises(ValueError, match="unbalanced"):
        cv.last_boxed(r"\boxed{\frac{1}{2}")


def test_math_exact_rows() -> None:
    rows = [
        {"problem": "Compute 1/2.", "solution": r"It is $\boxed{\frac{1}{2}}$.", "level": "Level 1"},
        {"problem": "AIME: find n.", "answer": 204},  # AIME style: integer answer, no solution
        {"problem": "Both.", "solution": r"\boxed{x}", "answer": " y "},  # `answer` wins
        {"question": "Empty answer.", "solution": r"\boxed{z}", "answer": ""},  # ... unless empty
    ]
    out = cv.convert_math(rows, "test")
    assert out[0] == {
        "data_source": "DigitalLearningGmbH/MATH-lighteval",
        "prompt": _user(f"Compute 1/2. {cv.MATH_INSTRUCTION}"),
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": r"\frac{1}{2}"},
        "extra_info": {"split": "test", "index": 0, "question": "Compute 1/2.", "answer": rows[0]["solution"]},
    }
    assert [r["reward_model"]["ground_truth"] for r in out] == [r"\frac{1}{2}", "204", "y", "z"]
    assert "\\boxed{}" in out[1]["prompt"][0]["content"]


def test_code_apps_and_mbpp() -> None:
    io = {"inputs": ["1 2\n"], "outputs": ["3\n"]}
    rows = [
        {"question": "Add two numbers.", "input_output": json.dumps(io)},
        {"prompt": "Write add(a, b).", "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]},
        {"question": "Call-based.", "input_output": {"inputs": [[1]], "outputs": [[2]], "fn_name": "inc"}},
    ]
    apps, mbpp, call = cv.convert_code(rows, "train")
    assert apps == {
        "data_source": "apps",
        "prompt": _user(f"Add two numbers.\n\n{cv.STDIO_INSTRUCTION} {cv.CODE_INSTRUCTION}"),
        "ability": "code",
        "reward_model": {"style": "rule", "ground_truth": json.dumps(io)},
        "extra_info": {"split": "train", "index": 0, "question": "Add two numbers."},
    }
    asserts = "assert add(1, 2) == 3\nassert add(0, 0) == 0"
    assert mbpp["data_source"] == "mbpp" and json.loads(mbpp["reward_model"]["ground_truth"]) == {"asserts": asserts}
    assert mbpp["prompt"][0]["content"].startswith(f"Write add(a, b).\nYour code should pass these tests:\n\n{asserts}")
    assert json.loads(call["reward_model"]["ground_truth"])["fn_name"] == "inc"
    assert "`inc`" in call["prompt"][0]["content"]


def test_rlhf_and_sft_exact_rows() -> None:
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    rl = cv.convert_rlhf(
        [
            {"prompt": "Tell a joke.", "chosen": "Sure!", "rejected": "No."},
            {"prompt": chat, "chosen": [*chat, {"role": "assistant", "content": "Hello!"}]},
        ],
        "train",
    )
    assert rl[0] == {
        "data_source": "rlhf",
        "prompt": _user("Tell a joke."),
        "ability": "general",
        "reward_model": {"style": "model", "ground_truth": ""},
        "extra_info": {"split": "train", "index": 0, "chosen": "Sure!", "rejected": "No."},
    }
    assert (
        rl[1]["prompt"] == chat
        and rl[1]["extra_info"]["chosen"] == "Hello!"
        and rl[1]["extra_info"]["rejected"] is None
    )
    messages = [*chat, {"role": "assistant", "content": "Hello!", "name": "bot"}]
    sft = cv.convert_sft([{"messages": messages}, {"prompt": "2+2?", "response": "<think>2+2=4</think> 4"}], "val")
    assert sft == [
        {"messages": [*chat, {"role": "assistant", "content": "Hello!"}], "extra_info": {"split": "val", "index": 0}},
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>2+2=4</think> 4"},
            ],
            "extra_info": {"split": "val", "index": 1},
        },
    ]


# One valid row per converter, placed before the bad one so the error must name row 1.
GOOD_ROW: dict[str, dict[str, Any]] = {
    "gsm8k": GSM8K[0],
    "math": {"problem": "p", "answer": "1"},
    "code": {"question": "q", "test_list": ["a"]},
    "rlhf": {"prompt": "p"},
    "sft": {"prompt": "p", "response": "r"},
}


@pytest.mark.parametrize(
    ("name", "row", "column"),
    [
        ("gsm8k", {"question": "q"}, "'answer'"),
        ("gsm8k", {"answer": "#### 1"}, "'question'"),
        ("math", {"problem": "p"}, "'answer' or 'solution'"),
        ("math", {"solution": r"\boxed{1}"}, "'problem' or 'question'"),
        ("code", {"question": "q"}, "'input_output' or 'test_list'"),
        ("code", {"test_list": ["assert 1"]}, "'question' or 'prompt' or 'text'"),
        ("rlhf", {"chosen": "a"}, "'prompt'"),
        ("sft", {"response": "r"}, "'messages' or 'prompt'"),
        ("sft", {"prompt": "p"}, "'response'"),
    ],
)
def test_missing_column(name: str, row: dict[str, Any], column: str) -> None:
    good = GOOD_ROW[name]
    with pytest.raises(cv.ConversionError) as err:  # missing columns are fatal even with skip_bad
        cv.CONVERTERS[name]([good, row], "train", skip_bad=True)
    msg = str(err.value)
    present = ", ".join(row)
    assert msg == f"{name}: row 1: missing required column {column} (columns present: {present})"
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("name", "bad", "problem"),
    [
        ("gsm8k", {"question": "q", "answer": "just 7"}, "no '####'"),
        ("gsm8k", {"question": "q", "answer": "#### seven"}, "not a number"),
        ("gsm8k", {"question": "q", "answer": None}, "'answer' is null"),
        ("math", {"problem": "p", "solution": "It is 3."}, "no \\boxed{...} and there is no 'answer'"),
        ("math", {"problem": "p", "solution": r"\boxed{\frac{1}{2}"}, "unbalanced"),
        ("code", {"question": "q", "input_output": "{inputs: [1"}, "unparsable input_output JSON"),
        ("code", {"question": "q", "input_output": '{"inputs": [1]}'}, "'inputs' and 'outputs'"),
        ("code", {"question": "q", "test_list": []}, "non-empty list of assert strings"),
        ("rlhf", {"prompt": [{"role": "user"}]}, "'prompt' must be a non-empty list"),
        ("sft", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ],
)
def test_malformed_rows(name: str, bad: dict[str, Any], problem: str) -> None:
    good = GOOD_ROW[name]
    with pytest.raises(cv.ConversionError, match=rf"^{name}: row 1: .*{re.escape(problem)}"):
        cv.CONVERTERS[name]([good, bad, good], "train")
    report = cv.Report()
    out = cv.CONVERTERS[name]([good, bad, good], "train", skip_bad=True, report=report)
    assert report.skipped == 1 and problem in report.errors[0]
    assert [r["extra_info"]["index"] for r in out] == [0, 2]  # index = position in the input file


def test_written_schema_from_jsonl_and_parquet(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    pq.write_table(pa.Table.from_pylist(GSM8K), tmp_path / "gsm8k.parquet")
    for i, path in enumerate([src, tmp_path / "gsm8k.parquet"]):
        out = tmp_path / f"out{i}.parquet"
        cv.write_parquet(cv.convert_gsm8k(cv.read_rows(path), "train"), out, cv.schema_for("gsm8k"))
        table = pq.read_table(out)
        assert table.schema == pa.schema(
            [
                ("data_source", pa.string()),
                ("prompt", MSG),
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
        assert table.schema.metadata is None  # no pandas metadata
        assert table.column("reward_model").to_pylist()[1] == {"style": "rule", "ground_truth": "1234"}
    sft = tmp_path / "sft.parquet"
    cv.write_parquet(cv.convert_sft([{"prompt": "p", "response": "r"}], "train"), sft, cv.schema_for("sft"))
    assert pq.read_schema(sft).field("messages").type == MSG
    assert list(cv.read_rows(src, limit=1)) == GSM8K[:1]
    (tmp_path / "cols.json").write_text(json.dumps({"question": ["a", "b"], "answer": ["#### 1", "#### 2"]}))
    assert list(cv.read_rows(tmp_path / "cols.json"))[1] == {"question": "b", "answer": "#### 2"}


def test_cli_end_to_end_skip_bad_and_errors(tmp_path: Path) -> None:
    assert _cli("--help").returncode == 0 and "synthetic-sft" in _cli("--help").stdout
    src = _jsonl(tmp_path / "in.jsonl", [*GSM8K, {"question": "q", "answer": "no marker"}, GSM8K[0]])
    out = tmp_path / "out.parquet"
    proc = _cli("gsm8k", "--input", str(src), "--output", str(out), "--split", "test", "--limit", "2")
    assert proc.returncode == 0, proc.stderr
    rows = pq.read_table(out).to_pylist()
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["7", "1234"] and rows[0]["extra_info"][
        "split"
    ] == "test"
    proc = _cli("gsm8k", "--input", str(src), "--output", str(out))
    assert proc.returncode == 1 and "gsm8k: row 2: column 'answer' has no '####'" in proc.stderr
    proc = _cli("gsm8k", "--input", str(src), "--output", str(out), "--skip-bad", "--no-progress")
    assert proc.returncode == 0 and "wrote 3 rows" in proc.stdout and "skipped 1 bad rows" in proc.stdout
    bad = _jsonl(tmp_path / "bad.jsonl", [{"problem": "p"}])
    proc = _cli("math", "--input", str(bad), "--output", str(tmp_path / "x.parquet"), "--skip-bad")
    assert proc.returncode != 0 and "missing required column 'answer' or 'solution'" in proc.stderr
    assert "row 0" in proc.stderr and "columns present: problem" in proc.stderr


def test_deterministic_bytes(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "in.jsonl", GSM8K)
    for i in (1, 2):
        assert (
            cv.main(["gsm8k", "--input", str(src), "--output", str(tmp_path / f"a{i}.parquet"), "--no-progress"]) == 0
        )
        for name in cv.SYNTHETIC:
            assert cv.main([name, "--output", str(tmp_path / f"{name}{i}.parquet")]) == 0
    for stem in ["a", *cv.SYNTHETIC]:
        assert (tmp_path / f"{stem}1.parquet").read_bytes() == (tmp_path / f"{stem}2.parquet").read_bytes()


def test_synthetic_sets(tmp_path: Path) -> None:
    sft = cv.synthetic_sft(size=50)
    for row in sft:
        user, assistant = row["messages"]
        expr, result = assistant["content"].split("\n")[1].rstrip(".").split(" = ")
        a, op, b = expr.split()
        assert OPS[op](int(a), int(b)) == int(result) and assistant["content"].endswith(f"#### {result}")
        assert assistant["content"].startswith("Let's think step by step.") and user["content"].endswith("####.")
    rlhf = cv.synthetic_rlhf(size=8)
    assert all(r["reward_model"] == {"style": "model", "ground_truth": ""} for r in rlhf)
    assert any(r["prompt"][0]["content"].startswith("Write a short sentence about") for r in cv.synthetic_rlhf())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from ring_ext.tiny import build_tiny_default

    return build_tiny_default(cache_dir=tmp_path_factory.mktemp("tiny"))


def test_synthetic_rlvr_matches_tiny_default(tiny: Any, tmp_path: Path) -> None:
    assert cv.main(["synthetic-rlvr", "--output", str(tmp_path / "rlvr.parquet")]) == 0
    assert (
        hashlib.sha256((tmp_path / "rlvr.parquet").read_bytes()).digest()
        == hashlib.sha256(tiny.train_parquet.read_bytes()).digest()
    )


def test_verl_loads_outputs(tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset
    from verl.utils.dataset.rl_dataset import RLHFDataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    tokenizer = AutoTokenizer.from_pretrained(tiny.model_dir)
    rl = tmp_path / "gsm8k.parquet"
    cv.write_parquet(cv.convert_gsm8k(GSM8K, "train"), rl, cv.schema_for("gsm8k"))
    config = OmegaConf.create({"max_prompt_length": 256, "cache_dir": str(tmp_path / "verl"), "prompt_key": "prompt"})
    ds = RLHFDataset(str(rl), tokenizer, config)
    item = ds[1]
    assert len(ds) == 2 and item["raw_prompt"] == cv.convert_gsm8k(GSM8K, "train")[1]["prompt"]
    assert item["reward_model"] == {"style": "rule", "ground_truth": "1234"} and item["index"] == 1
    sft = tmp_path / "sft.parquet"
    cv.write_parquet(cv.synthetic_sft(size=4), sft, cv.schema_for("sft"))
    sft_ds = MultiTurnSFTDataset(str(sft), tokenizer, OmegaConf.create({"max_length": 256, "truncation": "right"}))
    sample = sft_ds[0]
    assert len(sft_ds) == 4 and int(sample["loss_mask"].sum()) > 0
