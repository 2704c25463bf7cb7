"""The embedded default model: deterministic, Phi-4's architecture class, tokens and template."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import AutoTokenizer

from edgeagent.demo.tiny import SPECIAL_TOKENS, build_tiny_model


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def test_same_bytes_every_time(tiny_fp16: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert _digests(again) == _digests(tiny_fp16)


def test_other_seed_changes_weights_only(tiny_fp16: Path, tiny_fp16_b: Path) -> None:
    a, b = _digests(tiny_fp16), _digests(tiny_fp16_b)
    assert a.pop("model.safetensors") != b.pop("model.safetensors")
    assert a == b


def test_phi4_architecture_and_special_tokens(tiny_fp16: Path) -> None:
    config = json.loads((tiny_fp16 / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA, like Phi-4
    tokenizer = AutoTokenizer.from_pretrained(tiny_fp16)
    assert len(tokenizer) == config["vocab_size"]
    assert tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|dummy_85|>"
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    for token in SPECIAL_TOKENS:
        assert tokenizer.encode(token, add_special_tokens=False) == [
            tokenizer.convert_tokens_to_ids(token)
        ]


def test_chat_template_renders_like_phi4(tiny_fp16: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_fp16)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Why?"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system<|im_sep|>Be brief.<|im_end|>"
        "<|im_start|>user<|im_sep|>Hi<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Hello.<|im_end|>"
        "<|im_start|>user<|im_sep|>Why?<|im_end|>"
        "<|im_start|>assistant<|im_sep|>"
    )


def test_tokenizer_round_trips_text(tiny_fp16: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_fp16)
    text = "Knead the dough for ten minutes. Ünïcode and emoji 🚀 survive too."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
