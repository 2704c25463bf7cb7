"""What a stored model version is: its files and digests, where it came from, what it is.

A manifest is written once, when a version is committed; only its `signature` may be added or
replaced later (the same bytes arriving signed, or `edgeagent sign`), since a signature is about
the version, not part of it. The version id is derived from the file list alone (paths, sha256,
sizes), so the same bytes fetched twice or from two mirrors are one version.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeagent.errors import CorruptArtifactError, StoppedError
from edgeagent.store.eval_file import EVAL_FILE

MANIFEST_SCHEMA = 1
VERSION_ID_HEX = 16
CHUNK = 4 << 20


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Frozen):
    path: str
    sha256: str
    size: int


class HubSource(_Frozen):
    kind: Literal["hub"] = "hub"
    repo: str
    revision: str = Field(description="what was asked for: a branch, tag or commit")
    commit: str = Field(description="the 40-hex commit it resolved to")
    endpoint: str


class BuildSource(_Frozen):
    kind: Literal["build"] = "build"
    base: str = Field(description="the base model: a hub repo id or a local directory")
    base_digest: str = Field(description="sha256 over the base model's file digests")
    recipe: dict[str, Any]
    tool: str = Field(description="the quantizer and its version, e.g. auto-round 0.16.1")


class ImportSource(_Frozen):
    kind: Literal["import"] = "import"
    origin: str = Field(description="the directory it was copied from")


Source = Annotated[HubSource | BuildSource | ImportSource, Field(discriminator="kind")]


class SignatureRecord(_Frozen):
    """The signature a version came with (store/trust.py): OpenSSF model signing's `model.sig`,
    a Sigstore bundle whose DSSE envelope signs every file's sha256."""

    bundle: str = Field(description="the signature file as it came, JSON")
    key_id: str = Field(
        description="sha256 of the signer's public key (PEM), as the signature names it"
    )
    checked: str = Field(
        description="what admission found: the trusted key it verified with, or why not"
    )


class Architecture(_Frozen):
    """The facts a fit check and a hot-swap decision need, from config.json and the headers."""

    architectures: list[str]
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    torch_dtype: str
    tie_word_embeddings: bool
    weight_bytes: int = Field(description="tensor bytes in the safetensors files")
    tensor_count: int


class Manifest(_Frozen):
    schema_version: int = MANIFEST_SCHEMA
    version: str
    created: datetime
    source: Source
    files: list[FileEntry]
    total_bytes: int
    architecture: Architecture
    quantization: dict[str, Any] | None = Field(description="config.json's quantization_config")
    signature: SignatureRecord | None = None

    @property
    def quantization_label(self) -> str:
        if not self.quantization:
            return self.architecture.torch_dtype
        q = self.quantization
        method = str(q.get("quant_method", "?"))
        bits, group = q.get("bits"), q.get("group_size")
        sym = "sym" if q.get("sym", True) else "asym"
        return f"{method} {bits}-bit g{group} {sym}" if bits else method

    @property
    def model_id(self) -> str:
        """What the model is called: its hub repo, its base model, or its origin's name."""
        source = self.source
        if isinstance(source, HubSource):
            return source.repo
        if isinstance(source, BuildSource):
            return source.base
        return Path(source.origin).name

    @property
    def digest(self) -> str:
        return files_digest(list(self.files))

    @property
    def eval_file(self) -> FileEntry | None:
        """The eval set the version ships (`eval.jsonl` at its root), listed and checked like
        every other file of it; None if it ships none."""
        return next((entry for entry in self.files if entry.path == EVAL_FILE), None)

    @property
    def source_label(self) -> str:
        return source_label(self.source)


def source_label(source: Source) -> str:
    if isinstance(source, HubSource):
        return f"{source.repo}@{source.commit[:10]}"
    if isinstance(source, BuildSource):
        return f"build of {source.base}"
    return f"import of {source.origin}"


def files_digest(files: list[FileEntry]) -> str:
    """sha256 over every file's path, digest and size: equal digests, identical files."""
    digest = hashlib.sha256()
    for entry in sorted(files, key=lambda e: e.path):
        digest.update(f"{entry.path}\0{entry.sha256}\0{entry.size}\n".encode())
    return digest.hexdigest()


def version_id(files: list[FileEntry]) -> str:
    return files_digest(files)[:VERSION_ID_HEX]


def new_manifest(
    model_dir: Path, files: list[FileEntry], source: Source,
    signature: SignatureRecord | None = None,
) -> Manifest:  # fmt: skip
    config = read_config(model_dir)
    return Manifest(
        version=version_id(files),
        created=datetime.now(UTC),
        source=source,
        files=sorted(files, key=lambda e: e.path),
        total_bytes=sum(entry.size for entry in files),
        architecture=architecture_of(model_dir, config),
        quantization=config.get("quantization_config"),
        signature=signature,
    )


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptArtifactError(f"{model_dir}: no config.json; not a model directory") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptArtifactError(f"{path}: not valid JSON ({error})") from None
    return config


def architecture_of(model_dir: Path, config: dict[str, Any]) -> Architecture:
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        weight_bytes, tensors = 0, 0
        for path in sorted(model_dir.glob("*.safetensors")):
            size, count = safetensors_data_bytes(path)
            weight_bytes, tensors = weight_bytes + size, tensors + count
        return Architecture(
            architectures=list(config.get("architectures") or []),
            model_type=str(config["model_type"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=int(config["vocab_size"]),
            max_position_embeddings=int(config["max_position_embeddings"]),
            torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float16"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            weight_bytes=weight_bytes,
            tensor_count=tensors,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptArtifactError(f"{model_dir}/config.json: missing or bad {error}") from None


def safetensors_data_bytes(path: Path) -> tuple[int, int]:
    """(tensor bytes, tensor count) from a safetensors header; refuses a truncated file."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CorruptArtifactError(f"{path.name}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, 100 << 20):
            raise CorruptArtifactError(f"{path.name}: bad safetensors header length {header_len}")
        try:
            header: dict[str, Any] = json.loads(file.read(header_len))
        except ValueError as error:
            raise CorruptArtifactError(f"{path.name}: unreadable safetensors header") from error
    tensors = {name: t for name, t in header.items() if name != "__metadata__"}
    end = max((int(t["data_offsets"][1]) for t in tensors.values()), default=0)
    if 8 + header_len + end != size:
        raise CorruptArtifactError(
            f"{path.name}: {size} bytes on disk, the header describes {8 + header_len + end}"
        )
    return end, len(tensors)


def sha256_of(path: Path, cancel: threading.Event | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            if cancel is not None and cancel.is_set():
                raise StoppedError(f"hashing {path} was cancelled")
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The id git (and the hub, for non-LFS files) gives a file's content."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
