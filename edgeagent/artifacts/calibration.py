"""Calibration text for AutoRound, which cannot reach its default data set (on the hub) offline.

The built-in set is generated, not shipped: the documentation and then the source code of a
fixed list of Python standard-library modules (PSF licence), which mixes English prose with
code. It is the same text for a given Python version; the manifest records its sha256. Users
point at their own text (`.txt`, or `.jsonl` with a "text" field per line) for a better match
with their workload.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from edgeagent.errors import ConfigError

_MODULE_NAMES = (
    "argparse asyncio base64 calendar collections configparser contextlib csv dataclasses "
    "datetime decimal difflib email enum fractions functools gzip hashlib heapq html "
    "http.client http.server inspect ipaddress itertools json logging math multiprocessing "
    "operator os pathlib pickle queue random re secrets shlex shutil signal socket sqlite3 "
    "ssl statistics string subprocess tarfile tempfile textwrap threading typing unittest "
    "urllib.parse urllib.request uuid warnings xml.etree.ElementTree zipfile"
)
MODULES = tuple(_MODULE_NAMES.split())


@dataclass(frozen=True)
class Calibration:
    text: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def describe(self) -> dict[str, str]:
        return {"source": self.source, "sha256": self.sha256, "chars": str(len(self.text))}


def load_calibration(path: Path | None) -> Calibration:
    if path is None:
        version = ".".join(map(str, sys.version_info[:3]))
        return Calibration(builtin_text(), f"builtin: Python {version} stdlib docs and source")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"calibration file {path}: {error}") from None
    if path.suffix == ".jsonl":
        try:
            texts = [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{path}: each line must be JSON with a 'text' ({error})") from None
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise ConfigError(f"calibration file {path} is empty")
    return Calibration(raw, str(path))


def builtin_text() -> str:
    modules = [_import(name) for name in MODULES]
    docs = [doc for module in modules if module for doc in _docstrings(module)]
    sources = [_source(module) for module in modules if module]
    return "\n\n".join(dict.fromkeys(docs)) + "\n\n" + "\n\n".join(s for s in sources if s)


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:  # e.g. a Python built without sqlite3 or ssl
        return None


def _docstrings(module: ModuleType) -> list[str]:
    objects: list[object] = [module]
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        objects.append(value)
        if inspect.isclass(value):
            objects += [v for n, v in sorted(vars(value).items()) if not n.startswith("_")]
    docs = (inspect.getdoc(obj) for obj in objects)
    return [doc for doc in docs if doc and len(doc) > 200]


def _source(module: ModuleType) -> str:
    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return ""
