"""The eval set: the prompts the update gate and `edgeagent eval` score a version on.

Where it comes from, for the version being judged, first match wins (`eval_set_for`):
1. the version's own `eval.jsonl` (at its root: fetched, imported and signed with it, listed
   with its sha256 in the manifest, checked when the version is committed);
2. `updates.eval_set`, a JSONL on the box (checked before any slow work);
3. the default for the version's model: the embedded tiny model (`edgeagent/tiny-phi4`, by its
   config's mark or its source) keeps
   the held-out exchanges of its own dataset (`held_out_set`); any other model, a real Phi-4
   first, gets the general-purpose exchanges the project ships (`eval_general.jsonl`), never
   the tiny model's synthetic tasks.
The format and its bounds are `store/eval_file.py`'s. A chat exchange is rendered in the
version's own chat template (`chat_template.jinja` or `tokenizer_config.json`), or Phi-4's if it
has none; a raw prompt is scored as it is. Once tokenized, a set may have at most
MAX_PROMPT_TOKENS per prompt and MAX_TOKENS in all (`check_tokens`): the gate's scoring of the
largest allowed set stays a few seconds on a GPU (the default sets are about 1,200 and 3,000).

The demo's held-out exchanges are split from its training exchanges by a hash of the user's
message and never trained on; `task_exchanges` are those whose answers are checked exactly
(sums and JSON extraction), which only the held-out set has.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from edgeagent.demo.dataset import TASKS, Exchange, exchanges
from edgeagent.demo.tiny import EMBEDDED_MODEL_ID, PHI4_CHAT_TEMPLATE, is_embedded_model
from edgeagent.errors import ConfigError, CorruptArtifactError
from edgeagent.store.eval_file import EVAL_FILE, EvalRecord, parse_eval_lines, read_eval_file
from edgeagent.store.manifest import Manifest

EVAL_PROMPTS = 32  # the held-out set's size: the update gate's second or so on a CPU
MAX_PROMPT_TOKENS = 1024
MAX_TOKENS = 16384
GENERAL_FILE = "eval_general.jsonl"

Source = Literal["version", "setting", "flag", "held-out", "general", "given"]
Template = Callable[[list[dict[str, str]]], str]  # messages -> the text the model reads


@dataclass(frozen=True)
class EvalSet:
    name: str  # what the set is and where it came from, as tables and the gate's figures say
    texts: tuple[str, ...]
    source: Source = "given"

    @property
    def digest(self) -> str:
        digest = hashlib.sha256()
        for text in self.texts:
            digest.update(text.encode() + b"\0")
        return digest.hexdigest()

    @property
    def has_tasks(self) -> bool:
        """Whether `task_exchanges` belong to this set (the embedded model's held-out set)."""
        return self.source == "held-out"


@dataclass(frozen=True)
class EvalFile:
    """An eval file read and checked: what names it ("updates.eval_set", "--eval-set") and its
    records, to be rendered for each version judged."""

    path: Path
    setting: Literal["setting", "flag"]
    records: tuple[EvalRecord, ...]

    @property
    def label(self) -> str:
        return "updates.eval_set" if self.setting == "setting" else "--eval-set"


def configured_file(path: Path, setting: Literal["setting", "flag"] = "setting") -> EvalFile:
    """`path` read and checked; ConfigError naming the setting, the file and the line."""
    try:
        return EvalFile(path, setting, tuple(read_eval_file(path)))
    except ValueError as error:
        label = EvalFile(path, setting, ()).label
        raise ConfigError(f"{label}: {error}") from None


def eval_set_for(
    manifest: Manifest, model_dir: Path, configured: EvalFile | None = None,
    prompts: int = EVAL_PROMPTS,
) -> EvalSet:  # fmt: skip
    """The set to judge the version of `manifest` (its files in `model_dir`) on: its own
    eval.jsonl, else `configured`, else its model's default (`prompts` of a built-in set).
    CorruptArtifactError when its own file fails; ConfigError when `configured` cannot be
    rendered in its chat template."""
    if manifest.eval_file is not None:
        try:
            records = read_eval_file(model_dir / EVAL_FILE)
            name = f"{EVAL_FILE} of {manifest.version} ({len(records)} prompts)"
            return EvalSet(name, render(records, model_dir), "version")
        except ValueError as error:
            message = str(error).replace(str(model_dir / EVAL_FILE), EVAL_FILE)
            raise CorruptArtifactError(f"the eval set of {manifest.version}: {message}") from None
    if configured is not None:
        return rendered_file(configured, model_dir)
    if manifest.model_id == EMBEDDED_MODEL_ID or is_embedded_model(model_dir):
        return held_out_set(prompts)
    return general_set(model_dir, prompts)


def rendered_file(configured: EvalFile, model_dir: Path) -> EvalSet:
    records = configured.records
    try:
        texts = render(records, model_dir)
    except ValueError as error:
        raise ConfigError(f"{configured.label} {configured.path}: {error}") from None
    name = f"{configured.path} ({configured.label}, {len(records)} prompts)"
    return EvalSet(name, texts, configured.setting)


def general_set(model_dir: Path, prompts: int = EVAL_PROMPTS) -> EvalSet:
    """The project's general-purpose chat exchanges (questions of science, arithmetic, code,
    writing, extraction; a few with a system message, one of two turns) in the version's
    template: the default for any model but the embedded one."""
    text = resources.files("edgeagent").joinpath(GENERAL_FILE).read_text("utf-8")
    records = parse_eval_lines(text)[:prompts]
    return EvalSet(f"edgeagent general ({len(records)} exchanges)", render(records, model_dir),
                   "general")  # fmt: skip


def render(records: Sequence[EvalRecord], model_dir: Path) -> tuple[str, ...]:
    """Each record as the model reads it: a raw prompt as it is, an exchange in the chat
    template of the model in `model_dir`; ValueError naming the record that cannot be."""
    template: Template | None = None
    texts = []
    for number, record in enumerate(records, start=1):
        if record.prompt is not None:
            texts.append(record.prompt)
            continue
        template = template or _chat_template(model_dir)
        messages = [{"role": role, "content": content} for role, content in record.messages]
        try:
            texts.append(template(messages))
        except Exception as error:  # the template's own raise_exception, or a jinja2 error
            raise ValueError(f"prompt {number}: the chat template failed: {error}") from None
    return tuple(texts)


def _chat_template(model_dir: Path) -> Template:
    """A function rendering messages as the model's chat template does (as transformers
    renders it: sandboxed, trimmed blocks, the tokenizer's special tokens defined)."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    source, specials = _template_source(model_dir)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    environment.globals["raise_exception"] = raise_exception
    try:
        compiled = environment.from_string(source)
    except TemplateError as error:
        raise ValueError(f"the model's chat template does not compile: {error}") from None
    return lambda messages: compiled.render(
        messages=messages, add_generation_prompt=False, **specials
    )


def _template_source(model_dir: Path) -> tuple[str, dict[str, str]]:
    """The chat template (Phi-4's where the model has none) and the special tokens it may
    name, from the model's files."""
    config: dict[str, Any] = {}
    path = model_dir / "tokenizer_config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text("utf-8"))
        except ValueError as error:
            raise ValueError(f"{path.name} is not valid JSON ({error})") from None
    specials = {}
    for key, value in config.items():
        if key.endswith("_token") and (text := _token_text(value)) is not None:
            specials[key] = text
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text("utf-8"), specials
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)  # fmt: skip
    return (template if isinstance(template, str) else PHI4_CHAT_TEMPLATE), specials


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def check_tokens(eval_set: EvalSet, token_counts: Sequence[int], max_model_len: int) -> None:
    """ValueError when `eval_set`, tokenized by the model (`token_counts`, one per prompt), is
    too large to score in a few seconds or a prompt does not fit the engine's context."""
    limit = min(MAX_PROMPT_TOKENS, max_model_len - 1)  # the one token each scoring generates
    for number, count in enumerate(token_counts, start=1):
        if count > limit:
            raise ValueError(f"{eval_set.name}: prompt {number} is {count} tokens, more than "
                             f"the {limit} a prompt may have")  # fmt: skip
    if (total := sum(token_counts)) > MAX_TOKENS:
        raise ValueError(f"{eval_set.name}: {total} tokens, more than the {MAX_TOKENS} an eval "
                         "set may have")  # fmt: skip


def held_out_exchanges() -> list[Exchange]:
    """Generated like the training exchanges, never trained on."""
    return [e for e in exchanges() if e.held_out]


def held_out_set(prompts: int = EVAL_PROMPTS) -> EvalSet:
    """The held-out exchanges rendered in Phi-4's chat template: the first `prompts`, spread
    over the tasks by taking every n-th."""
    held_out = held_out_exchanges()
    step = max(1, len(held_out) // prompts)
    chosen = held_out[::step][:prompts]
    return EvalSet(f"edgeagent held-out ({len(chosen)} exchanges)",
                   tuple(e.render() for e in chosen), "held-out")  # fmt: skip


def task_exchanges(per_task: int | None = None) -> list[Exchange]:
    """The held-out exchanges whose answers are checked exactly (sums and JSON extraction), all
    of them or `per_task` of each task spread over its list."""
    held_out = held_out_exchanges()
    chosen: list[Exchange] = []
    for task in TASKS:
        of_task = [e for e in held_out if e.task == task]
        step = max(1, len(of_task) // per_task) if per_task else 1
        chosen += of_task[::step][:per_task]
    return chosen
