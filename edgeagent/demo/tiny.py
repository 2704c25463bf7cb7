"""The embedded default model: a tiny Phi-4-family model, made offline and deterministically.

It has Phi-4's architecture class (`Phi3ForCausalLM`, grouped-query attention, untied
embeddings), Phi-4's special tokens and chat template, a byte-level BPE tokenizer trained here on a
shipped corpus, and random weights from a fixed seed: the same bytes on every machine. It lets the
whole pipeline (build, store, engine, gRPC) run on a laptop; its answers are noise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgeagent.store.durable import fsync_dir, fsync_tree

EMBEDDED_MODEL_ID = "edgeagent/tiny-phi4"
MODEL_MARK = "edgeagent_model"  # config.json's key naming the embedded model, wherever it went

# Phi-4's special tokens (microsoft/phi-4 tokenizer_config.json); pad is one of its dummies.
BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_SEP = "<|im_sep|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|dummy_85|>"
SPECIAL_TOKENS = (BOS_TOKEN, IM_START, IM_SEP, IM_END, PAD_TOKEN)

# Phi-4's chat template, verbatim.
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyShape:
    """Phi-4's proportions, shrunk. Dimensions are multiples of 128 so GPTQ groups of 128 fit."""

    vocab_size: int = 1280
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def build_tiny_model(out_dir: Path, seed: int = 0, shape: TinyShape = TinyShape()) -> Path:
    """Write the tiny model to `out_dir` (which must not exist) atomically; return it."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        token_ids = write_tokenizer(staging, shape.vocab_size)
        write_config(staging, shape, token_ids)
        _write_weights(staging, shape, seed)
        fsync_tree(staging)
        os.replace(staging, out_dir)
        fsync_dir(out_dir.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _corpus_lines() -> list[str]:
    text = resources.files("edgeagent.demo").joinpath("corpus.txt").read_text("utf-8")
    return [line for line in text.splitlines(keepends=True) if line.strip()]


def write_tokenizer(
    out: Path,
    vocab_size: int,
    special_fillers: bool = True,
    texts: Sequence[str] | None = None,
) -> dict[str, int]:
    """Phi-4's special tokens and chat template on a small BPE, padded with dummies to the size.

    The BPE is trained on `texts` (default: the shipped corpus). Phi-4's dummies are special
    tokens (skipped when decoding); `special_fillers=False` makes them plain vocabulary entries
    instead, so a random-weight model's output decodes to text and the tokenizer loads as fast
    as a real 100k-token one (100k added tokens take a minute).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_lines() if texts is None else texts, trainer)
    # Like Phi-4, fill the vocabulary up with dummy tokens so every id the model can emit decodes.
    fillers = vocab_size - len(SPECIAL_TOKENS) - tokenizer.get_vocab_size()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    dummies = [f"<|dummy_{100 + i}|>" for i in range(fillers)]
    if special_fillers:
        tokenizer.add_special_tokens(dummies)
    else:
        tokenizer = _with_vocabulary_entries(tokenizer, dummies)
    if tokenizer.get_vocab_size() != vocab_size:
        raise AssertionError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, not {vocab_size}")
    tokenizer.save(str(out / "tokenizer.json"))

    ids: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token)
        assert token_id is not None, token
        ids[token] = token_id
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": IM_END,
        "pad_token": PAD_TOKEN,
        "unk_token": BOS_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": PHI4_CHAT_TEMPLATE,
    }
    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": IM_END,
        "pad_token": PAD_TOKEN,
        "unk_token": BOS_TOKEN,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", special_map)
    return ids


def _with_vocabulary_entries(tokenizer: Any, tokens: list[str]) -> Any:
    """The tokenizer with `tokens` appended to its BPE vocabulary (ids after every other)."""
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.to_str())
    first = tokenizer.get_vocab_size()
    data["model"]["vocab"].update({token: first + i for i, token in enumerate(tokens)})
    return Tokenizer.from_str(json.dumps(data))


def is_embedded_model(model_dir: Path) -> bool:
    """Whether `model_dir` holds the embedded model (random, trained or quantized), however it
    reached the store: its config.json says so."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get(MODEL_MARK) == EMBEDDED_MODEL_ID


def write_config(out: Path, shape: TinyShape, ids: dict[str, int]) -> None:
    config = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[PAD_TOKEN],
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "original_max_position_embeddings": shape.max_position_embeddings,
        "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_key_value_heads": shape.num_key_value_heads,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 250000,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": shape.vocab_size,
        MODEL_MARK: EMBEDDED_MODEL_ID,  # kept by transformers, AutoRound and vLLM
    }
    generation = {
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": [ids[IM_END], ids[BOS_TOKEN]],
        "pad_token_id": ids[PAD_TOKEN],
    }
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation)


def _write_weights(out: Path, shape: TinyShape, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)

    def normal(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=generator) * 0.02).to(torch.float16)

    h, kv_width = shape.hidden_size, shape.num_key_value_heads * shape.head_dim
    tensors = {"model.embed_tokens.weight": normal(shape.vocab_size, h)}
    for layer in range(shape.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        tensors[f"{prefix}.self_attn.qkv_proj.weight"] = normal(h + 2 * kv_width, h)
        tensors[f"{prefix}.self_attn.o_proj.weight"] = normal(h, h)
        tensors[f"{prefix}.mlp.gate_up_proj.weight"] = normal(2 * shape.intermediate_size, h)
        tensors[f"{prefix}.mlp.down_proj.weight"] = normal(h, shape.intermediate_size)
    tensors["model.norm.weight"] = torch.ones(h, dtype=torch.float16)
    tensors["lm_head.weight"] = normal(shape.vocab_size, h)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
