"""Phi-4's real tokenizer as bench/phi4_tokenizer.py makes it from cl100k_base's ranks: the ids
tiktoken gives, Phi-4's special tokens and chat template, loaded by transformers and xgrammar.

The reference is tiktoken's own cl100k_base (its split pattern and special tokens), reading the
same ranks file from its cache: nothing is downloaded."""

from __future__ import annotations

import hashlib
import importlib.util
import random
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
TEXTS = (
    "hello world",
    "Héllo wörld, ça va? Grüße aus Köln — naïve café",
    "日本語のテキストと中文混合 🤖🚀 emoji",
    "1234567890 3.14159 -42 1,000,000 2026-12-07",
    "I'm sure they'll've DONE it; WE'RE here",
    "  leading spaces\n\n\ttabs\r\n trailing   ",
    'def f(x):\n    return {"a": [1, 2, 3]}  # comment\n',
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "",
)
# Characters whose runs stress the split pattern: letters, digits, contractions, whitespace
# of every kind, punctuation, multi-byte letters and symbols.
ALPHABET = [*"aAzZ09 \n\r\t'sSlLvVdDmM.,;:!?-_(){}[]\"/\\#@", *"éß日本🤖\u00a0\u3000ñΩ\u200bـ"]


def _load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "phi4_tokenizer", REPO / "bench" / "phi4_tokenizer.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    ranks: dict[bytes, int] = builder.load_ranks(builder.default_ranks_file())
    return ranks


@pytest.fixture(scope="module")
def phi4(ranks: dict[bytes, int]) -> Any:
    return builder.build_tokenizer(ranks)


@pytest.fixture(scope="module")
def cl100k(tmp_path_factory: pytest.TempPathFactory) -> tiktoken.Encoding:
    """tiktoken's cl100k_base, its ranks file put in tiktoken's cache under the name tiktoken
    gives the download, with downloading made to fail."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    shutil.copy(builder.default_ranks_file(), cache / hashlib.sha1(CL100K_URL.encode()).hexdigest())

    def no_download(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to fetch {blobpath}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        patch.setattr(tiktoken.load, "read_file", no_download)
        return tiktoken.Encoding(**openai_public.cl100k_base())


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The written files, loaded by transformers as vLLM loads a model's tokenizer."""
    out = tmp_path_factory.mktemp("phi4-tokenizer")
    builder.write_phi4_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


def test_known_ids(phi4: Any) -> None:
    assert phi4.encode("hello world").ids == [15339, 1917]
    assert phi4.get_vocab_size() == 100_352
    named = {
        "<|endoftext|>": 100257,
        "<|im_start|>": 100264,
        "<|im_end|>": 100265,
        "<|im_sep|>": 100266,
        "<|endofprompt|>": 100276,
        "<|dummy_0|>": 100256,
        "<|dummy_4|>": 100267,
        "<|dummy_85|>": 100349,  # Phi-4's pad
        "<|dummy_87|>": 100351,
    }
    assert {token: phi4.token_to_id(token) for token in named} == named
    # Microsoft.ML.Tokenizers' Phi-4 test: specials in text are matched, the rest is cl100k.
    text = "<|im_start|>Hello<|im_sep|> World<|im_end|><|dummy_85|>"
    assert phi4.encode(text).ids == [100264, 9906, 100266, 4435, 100265, 100349]


def test_cl100k_specials_where_tiktoken_has_them(phi4: Any, cl100k: tiktoken.Encoding) -> None:
    specials = cl100k._special_tokens
    assert len(specials) == 5
    assert {token: phi4.token_to_id(token) for token in specials} == specials
    assert cl100k.n_vocab - 1 == max(specials.values()) < 100_352


def test_encodes_as_tiktoken_and_decodes_back(phi4: Any, cl100k: tiktoken.Encoding) -> None:
    rng = random.Random(0)
    randoms = ["".join(rng.choices(ALPHABET, k=rng.randint(1, 40))) for _ in range(2000)]
    corpus = (REPO / "edgeagent" / "demo" / "corpus.txt").read_text("utf-8")
    for text in (*TEXTS, *randoms, corpus):
        ids = phi4.encode(text).ids
        assert ids == cl100k.encode(text), text
        assert phi4.decode(ids) == text


def test_refuses_other_ranks(tmp_path: Path) -> None:
    altered = bytearray(builder.default_ranks_file().read_bytes())
    altered[-2] = ord("0") if altered[-2] != ord("0") else ord("1")  # the last rank's digit
    (tmp_path / "ranks").write_bytes(altered)
    with pytest.raises(ValueError, match="not cl100k_base's"):
        builder.load_ranks(tmp_path / "ranks")


def test_transformers_loads_it_with_phi4_chat_template(loaded: Any) -> None:
    tokenizer = loaded
    assert len(tokenizer) == 100_352
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        100257,
        100265,
        100349,
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello world"},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system<|im_sep|>Be brief.<|im_end|>"
        "<|im_start|>user<|im_sep|>hello world<|im_end|>"
        "<|im_start|>assistant<|im_sep|>"
    )
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[-9:] == [100264, 882, 100266, 15339, 1917, 100265, 100264, 78191, 100266]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == "systemBe brief.userhello worldassistant"


def test_xgrammar_compiles_a_schema_over_its_vocabulary(loaded: Any) -> None:
    """What vLLM's structured output does with it: a byte-level vocabulary of Phi-4's size,
    a JSON schema compiled to token masks, a valid answer accepted and ended by `<|im_end|>`."""
    import xgrammar

    tokenizer = loaded
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=100_352)
    assert info.vocab_type == xgrammar.VocabType.BYTE_LEVEL
    assert info.vocab_size == 100_352
    schema = '{"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}'
    matcher = xgrammar.GrammarMatcher(
        xgrammar.GrammarCompiler(info, max_threads=1).compile_json_schema(schema)
    )
    answer = tokenizer('{"age": 36}', add_special_tokens=False)["input_ids"]
    assert all(matcher.accept_token(token) for token in answer)
    assert not matcher.accept_token(tokenizer.encode("x", add_special_tokens=False)[0])
    assert matcher.accept_token(100265)
    assert matcher.is_terminated()
