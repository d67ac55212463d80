"""Tests for the embedded tiny default (`ring_ext/tiny/`): determinism, tokenizer, models, data, reward.

One build in this process (module fixture) plus fresh builds in subprocesses, so the byte-identity
check also covers per-process randomness (hash seeds, thread pools).
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ring_ext.tiny import TinyDefault, build_tiny_default, default_cache_dir
from ring_ext.tiny.reward import compute_score

REPO = Path(__file__).resolve().parents[1]
BUILD_BOTH = "from ring_ext.tiny import build_tiny_default as b; import sys; b(sys.argv[1]); b(sys.argv[1], moe=True)"


def _run(code: str, *args: str, seed: str = "0") -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["PYTHONHASHSEED"] = seed
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, stdout=subprocess.PIPE)


def _hashes(cache: Path) -> dict[str, str]:
    root = cache / "tiny-v3"
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cache_a")
    build_tiny_default(d)
    build_tiny_default(d, moe=True)
    return d


@pytest.fixture(scope="module")
def dense(cache: Path) -> TinyDefault:
    return build_tiny_default(cache)


# --- build / cache -----------------------------------------------------------------------------


def test_layout(cache: Path, dense: TinyDefault) -> None:
    root = cache / "tiny-v3"
    data = root / "data"
    assert dense == TinyDefault(
        root / "qwen2", data / "arith_train.parquet", data / "arith_val.parquet", data / "longcot_sft.parquet",
        data / "open_prompts.parquet",
    )  # fmt: skip
    assert build_tiny_default(cache, moe=True).model_dir == root / "qwen3moe"
    assert sorted(p.name for p in root.iterdir()) == ["data", "qwen2", "qwen3moe"]  # no temp leftovers


def test_two_concurrent_fresh_builds_are_byte_identical(cache: Path, tmp_path: Path) -> None:
    # Two processes race on one fresh cache (lock + atomic rename), with other hash seeds.
    procs = [_run(BUILD_BOTH, str(tmp_path), seed=s) for s in ("1", "2")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    a, b = _hashes(cache), _hashes(tmp_path)
    assert len(a) == 16 and {"qwen2/model.safetensors", "qwen3moe/tokenizer.json", "data/longcot_sft.parquet"} <= set(a)
    assert a == b
    assert sorted(p.name for p in (tmp_path / "tiny-v3").iterdir()) == ["data", "qwen2", "qwen3moe"]


def test_cheap_path_imports_nothing_heavy(cache: Path) -> None:
    code = (
        "import sys, json; from ring_ext.tiny import build_tiny_default as b; b(sys.argv[1]); b(sys.argv[1], moe=True);"
        "print(json.dumps([m for m in ('transformers', 'torch', 'tokenizers', 'pyarrow', 'verl') if m in sys.modules]))"
    )
    p = _run(code, str(cache))
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and json.loads(out.splitlines()[-1]) == []


def test_incomplete_part_is_rebuilt_and_force_reproduces(cache: Path) -> None:
    before = _hashes(cache)
    dense = build_tiny_default(cache)
    dense.val_parquet.unlink()
    assert build_tiny_default(cache).val_parquet.is_file()
    build_tiny_default(cache, force=True)
    assert _hashes(cache) == before


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RING_EXT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("RING_EXT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "ring_ext"


# --- tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["qwen2", "qwen3moe"])
def test_tokenizer(cache: Path, variant: str) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    d = cache / "tiny-v3" / variant
    tok = AutoTokenizer.from_pretrained(d)
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert len(tok) == 512
    assert (tok.eos_token, tok.pad_token, tok.eos_token_id, tok.pad_token_id) == ("<|im_end|>", "<|endoftext|>", 2, 0)
    # Every vocab entry holding a digit is exactly one digit -> numbers are one token per digit.
    assert all(len(t) == 1 for t in tok.get_vocab() if any(c.isdigit() for c in t))
    assert tok.tokenize("has 1234 apples")[-6:-1] == ["Ġ", "1", "2", "3", "4"]
    assert tok.tokenize("90817") == list("90817")
    msgs = [{"role": "user", "content": "Tom has 3 apples. Put the final answer after ####."}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == f"<|im_start|>user\n{msgs[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, tokenize=False) == f"<|im_start|>user\n{msgs[0]['content']}<|im_end|>\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 1 and tok.decode(ids) == text
    assert ids == raw.encode(text).ids  # whatever class AutoTokenizer picks, it is our pipeline
    for s in ["Ünïcödé 😀\t\n  weird   spacing", "#### -42", ""]:
        assert tok.decode(tok(s)["input_ids"]) == s


# --- models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["qwen2", "qwen3moe"])
def test_model_loads_and_runs(cache: Path, variant: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    d = cache / "tiny-v3" / variant
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["dtype"], cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == ("bfloat16", 512, 64, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (2, 1, True)
    assert (cfg["eos_token_id"], cfg["pad_token_id"], cfg["bos_token_id"]) == (2, 0, 0)
    assert GenerationConfig.from_pretrained(d).eos_token_id == 2
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(torch.tensor([[1, 87, 85, 10, 11, 2]])).logits
    assert logits.shape == (1, 6, 512) and torch.isfinite(logits).all() and logits.float().std() > 0
    if variant == "qwen3moe":
        assert type(model).__name__ == "Qwen3MoeForCausalLM"
        c = model.config
        assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (4, 2, 64)
        assert model.model.layers[0].mlp.experts.down_proj.shape[0] == 4
    else:
        assert type(model).__name__ == "Qwen2ForCausalLM"


def test_reward_model_scores_each_sequence(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = build_tiny_default(tmp_path, reward_model=True)
    assert rm.model_dir == tmp_path / "tiny-v3" / "qwen2_rm"
    cfg = json.loads((rm.model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"] and len(cfg["id2label"]) == 1
    digest = hashlib.sha256((rm.model_dir / "model.safetensors").read_bytes()).digest()
    assert build_tiny_default(tmp_path, reward_model=True).model_dir == rm.model_dir  # cached: no rebuild
    build_tiny_default(tmp_path, reward_model=True, force=True)
    assert hashlib.sha256((rm.model_dir / "model.safetensors").read_bytes()).digest() == digest
    tok = AutoTokenizer.from_pretrained(rm.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm.model_dir)
    texts = ["The sea is calm.", "Snow falls on the city.", "The sea is calm."]
    with torch.no_grad():
        scores = model(**tok(texts, return_tensors="pt", padding=True)).logits
    assert scores.shape == (3, 1) and torch.isfinite(scores).all()
    assert scores[0] == scores[2] and scores[0] != scores[1]  # one score per text, a function of the text
    with pytest.raises(ValueError, match="not both"):
        build_tiny_default(tmp_path, moe=True, reward_model=True)


def test_the_plain_variant_differs_only_in_the_eos_row(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from ring_ext.tiny.model import EOS_EMBEDDING_SCALE

    tail, plain = (load_file(build_tiny_default(tmp_path, length_tail=t).model_dir / "model.safetensors")
                   for t in (True, False))
    eos = AutoTokenizer.from_pretrained(build_tiny_default(tmp_path).model_dir).eos_token_id
    emb = "model.embed_tokens.weight"
    assert all(torch.equal(tail[k], plain[k]) for k in tail if k != emb)
    others = [i for i in range(tail[emb].shape[0]) if i != eos]
    assert torch.equal(tail[emb][others], plain[emb][others])
    ratio = tail[emb][eos].float() / plain[emb][eos].float()
    assert torch.allclose(ratio, torch.full_like(ratio, EOS_EMBEDDING_SCALE), rtol=1e-2)  # bf16 rounding


# --- data --------------------------------------------------------------------------------------

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def test_open_prompts_have_no_ground_truth(dense: TinyDefault) -> None:
    import pyarrow.parquet as pq

    rows = pq.read_table(dense.open_prompts_parquet).to_pylist()
    assert len(rows) == 64 and len({r["prompt"][0]["content"] for r in rows}) > 16
    assert all(r["reward_model"] == {"style": "model", "ground_truth": ""} and r["ability"] == "general" for r in rows)


@pytest.mark.parametrize(("split", "size"), [("train", 256), ("val", 32)])
def test_parquet(dense: TinyDefault, split: str, size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(dense.train_parquet if split == "train" else dense.val_parquet)
    s = pa.string()
    assert table.schema.metadata is None or b"pandas" not in table.schema.metadata
    assert table.schema == pa.schema(
        [
            ("data_source", s),
            ("prompt", pa.list_(pa.struct([("role", s), ("content", s)]))),
            ("ability", s),
            ("reward_model", pa.struct([("style", s), ("ground_truth", s)])),
            ("extra_info", pa.struct([("split", s), ("index", pa.int64()), ("question", s), ("answer", s)])),
        ]
    )
    rows = table.to_pylist()
    assert len(rows) == size
    for i, row in enumerate(rows):
        info, gt = row["extra_info"], row["reward_model"]["ground_truth"]
        assert (row["data_source"], row["ability"], row["reward_model"]["style"]) == ("ring_ext/arith", "math", "rule")
        assert (info["split"], info["index"]) == (split, i)
        assert row["prompt"] == [{"role": "user", "content": info["question"] + " Put the final answer after ####."}]
        m = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)\n#### (-?\d+)", info["answer"])
        assert m, info["answer"]
        a, op, b = int(m[1]), m[2], int(m[3])
        assert str(OPS[op](a, b)) == gt == m[4] == m[5] and int(gt) >= 0
        assert re.findall(r"\d+", info["question"]) == [m[1], m[3]]
        assert compute_score(row["data_source"], f"so #### {gt}", gt, extra_info=info)["score"] == 1.0


# --- reward ------------------------------------------------------------------------------------


def test_reward_table() -> None:
    def score(s: object, gt: object = "7") -> dict[str, float]:
        return compute_score("ring_ext/arith", s, gt, extra_info={})

    assert score("3 + 4 = 7\n#### 7") == {"score": 1.0, "acc": 1.0, "format": 1.0}
    assert score("####-3", "-3")["score"] == 1.0 and score("#### 7.0")["acc"] == 1.0
    assert score("#### 5") == {"score": 0.1 + 0.1 * math.exp(-2 / 7), "acc": 0.0, "format": 1.0}
    assert score("#### 107")["score"] == 0.1 + 0.1 * math.exp(-100 / 7)
    assert score("#### 7.5")["acc"] == 0.0  # not read as 7
    assert score("#### 3", "0")["score"] == 0.1 + 0.1 * math.exp(-3.0)  # m = max(1, |gt|)
    assert score("I think 9 apples") == {"score": 0.1 * math.exp(-2 / 7), "acc": 0.0, "format": 0.0}
    assert score("it is 7") == {"score": 0.1, "acc": 0.0, "format": 0.0}
    # The LAST `#### <n>` decides, whatever comes before it.
    assert score("#### 7 wait, no: #### 5")["acc"] == 0.0
    assert score("#### 5 wait, no: #### 7 then 99 apples")["score"] == 1.0
    zero = {"score": 0.0, "acc": 0.0, "format": 0.0}
    for bad in ["", None, 7, b"#### 7", "no digits here", "####", "#### seven"]:
        assert score(bad) == zero
    assert score("#### 7", None) == zero and score("#### 7", "seven") == zero and score("#### 7", "nan") == zero


def test_reward_never_raises_on_huge_or_odd_input() -> None:
    huge = "9" * 100_000
    assert compute_score("x", "#### " + huge, "7") == {"score": 0.1, "acc": 0.0, "format": 1.0}
    assert compute_score("x", huge, "7")["score"] == 0.0
    assert compute_score("x", "#### " + huge, huge)["score"] == 1.0
    for s in ["#" * 10_000, "-" * 10_000 + "1", "\x00####\u0663", "####\n\n 12", "٣ ####  ٣"]:
        r = compute_score("x", s, "3")
        assert set(r) == {"score", "acc", "format"} and 0.0 <= r["score"] <= 1.0
