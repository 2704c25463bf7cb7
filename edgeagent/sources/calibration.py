"""Calibration text for AutoRound, which cannot reach its default data set (on the hub) offline.

The built-in set is generated, not shipped: the source files of a fixed list of Python
standard-library modules (PSF licence), whose docstrings and comments mix English prose with
code. Only the files are read, never the live modules, so the text is the same in every process
for a given Python version (a process's imports can change a module's attributes); the manifest
records its sha256. Users point at their own text (`.txt`, or `.jsonl` with a "text" field per
line) for a better match with their workload.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

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
    sources = (_source(name) for name in MODULES)
    return "\n\n".join(source for source in sources if source)


def _source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return ""  # e.g. a Python built without sqlite3 or ssl
    return Path(spec.origin).read_text(encoding="utf-8")
