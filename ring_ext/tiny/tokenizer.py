"""Tiny byte-level BPE tokenizer for the tiny default (`ring_ext/tiny/tokenizer.py`).

Trained offline with `tokenizers` on a corpus generated in code from the word-problem vocabulary,
wrapped as a `PreTrainedTokenizerFast` with a Qwen-style ChatML template. The pipeline copies
Qwen2's: NFC, Qwen's split regex (each digit its own pre-token, so numbers are one token per digit
and arithmetic stays learnable), byte-level BPE (any string encodes; nothing is `<unk>`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from ring_ext.tiny import data

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)  # ids 0, 1, 2
VOCAB_SIZE = 512
MODEL_MAX_LENGTH = 512
# Qwen2's pre-tokenizer regex: `\p{N}` alone -> single digits; letters keep their leading space.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Extra English for answers / reasoning, so common words are single tokens.
WORDS = (
    "The answer is so then we get first next finally total left more less each in of to and or a an "
    "it he she they has have had gives gave buys bought plus minus times equals is are was were "
    "Let's think step by step. We need to add subtract multiply numbers number result because"
)
# ChatML as in Qwen2.5, minus the default system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def corpus() -> list[str]:
    """Deterministic training text: every template x name x item, worked answers, chat roles."""
    rng = random.Random(0)
    lines = ["system\n", "user\n", "assistant\n"] * 8  # roles as they follow <|im_start|>
    lines += [WORDS, WORDS.lower(), " ".join("0123456789"), "+ - * / = ( ) , . ? ! : ####"] * 2
    for op, templates in data.TEMPLATES.items():
        for t in templates:
            for n in data.NAMES:
                for i in data.ITEMS:
                    a, b = rng.randint(2, 20), rng.randint(2, 9)
                    m = data.NAMES[(data.NAMES.index(n) + 1) % len(data.NAMES)]
                    lines.append(f"{t.format(n=n, m=m, a=a, b=b, i=i)} {data.INSTRUCTION}")
                    r = data.OPS[op](a, b)
                    lines.append(f"{a} {op} {b} = {r}\n#### {r}")
    return lines


def train_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes -> no unknowns
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def build_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """Train and `save_pretrained` into `out_dir` (the model dir); returns the tokenizer."""
    tok = train_tokenizer()
    tok.save_pretrained(str(out_dir))
    return tok
