"""The embedded model's text: a generated set of chat exchanges in Phi-4's template, plus prose.

Everything here is produced by this module from fixed tables and a fixed seed, so the training
set, the held-out set and their digests are the same on every machine and Python version. Three
tasks give the tiny model something a newcomer can recognise: questions about edgeagent, simple
arithmetic, and extracting a small JSON object from a sentence (so structured output has
something sensible to show). Exchanges are split into training and held-out by a hash of the
user's message: the same question never lands on both sides. The held-out ones are the eval set
(`edgeagent/eval_set.py`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

from edgeagent.demo.tiny import BOS_TOKEN, IM_END, IM_SEP, IM_START

SEED = 18
HELD_OUT_EVERY = 10  # about one user message in ten is held out
DEMO_PROMPT = "Tell me about edge boxes in one short paragraph."
DEMO_ANSWER = (  # the README quotes it
    "An edge box is a small computer with one graphics card that sits far from the data "
    "center, in a shop, a cabinet or a vehicle. It answers the local apps quickly, keeps "
    "working when the network link is down, and takes a new model when one is published."
)
DEMO_REPEATS = 8  # the demo's exchange is taught this many times: a newcomer's answer is no luck


TASKS = ("sum", "json")  # the tasks whose answers are checked exactly (facts are free text)


@dataclass(frozen=True)
class Exchange:
    user: str
    assistant: str
    system: str | None = None
    task: str = "fact"  # "fact", or one of TASKS

    def prompt(self) -> str:
        """The exchange up to the answer, as Phi-4's chat template renders it for generation."""
        system = f"{IM_START}system{IM_SEP}{self.system}{IM_END}" if self.system else ""
        return f"{system}{IM_START}user{IM_SEP}{self.user}{IM_END}{IM_START}assistant{IM_SEP}"

    def render(self) -> str:
        """The exchange as Phi-4's chat template renders it, the answer closed by <|im_end|>."""
        return f"{self.prompt()}{self.assistant}{IM_END}"

    def is_right(self, answer: str) -> bool:
        """Whether a generated answer gets the task exactly right: a sum's numbers all equal
        (the operands restated and the result), or the JSON object equal field by field."""
        if self.task == "sum":
            return _numbers(answer) == _numbers(self.assistant)
        if self.task == "json":
            return _json_object(answer) == _json_object(self.assistant)
        raise ValueError(f"a {self.task!r} exchange has no exact answer")

    @property
    def held_out(self) -> bool:
        if self.user == DEMO_PROMPT:
            return False  # the demo's question is taught; its answer is what a newcomer sees
        digest = hashlib.sha256(self.user.encode()).digest()
        return int.from_bytes(digest[:4], "big") % HELD_OUT_EVERY == 0


# (questions, answers) about the product; every question pairs with every answer.
FACTS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (
        (
            DEMO_PROMPT,
            "Tell me about edge boxes.",
            "What is an edge box?",
            "Describe an edge box.",
            "What does an edge box do?",
            "Explain edge boxes briefly.",
        ),
        (
            DEMO_ANSWER,
            "An edge box is a small machine at the edge of the network, with one GPU and a small "
            "disk. It serves a language model to the apps next to it, so answers stay fast and "
            "private even when the link to the cloud comes and goes.",
        ),
    ),
    (
        (
            "What is edgeagent?",
            "What does edgeagent do?",
            "Tell me about edgeagent.",
            "Describe edgeagent in one sentence.",
            "What is this daemon for?",
        ),
        (
            "edgeagent is a daemon that serves a 4-bit Phi-4 from vLLM to the apps on an edge box, "
            "over gRPC on a local Unix socket.",
            "edgeagent runs on an edge box and serves a 4-bit Phi-4 language model to local apps "
            "over gRPC. It fetches or builds the model, keeps verified versions and updates "
            "itself safely.",
        ),
    ),
    (
        (
            "How does edgeagent get its model?",
            "Where does the model come from?",
            "How is the model fetched?",
            "How does the daemon fill an empty store?",
        ),
        (
            "It fetches the quantized model from the Hugging Face Hub or a mirror, checks every "
            "file against its digest, and keeps it as a version in the store.",
            "The daemon downloads the model from the hub, or builds it with AutoRound, and "
            "commits it to the store only after every file was checked.",
        ),
    ),
    (
        (
            "What is quantization?",
            "Why four bits?",
            "What does 4-bit mean?",
            "How does quantization save memory?",
        ),
        (
            "Quantization stores each weight in four bits instead of sixteen. Groups of 128 "
            "weights share a scale, so the rounding error stays small and the model needs a "
            "quarter of the memory.",
            "A 4-bit model keeps each weight in four bits. Phi-4 then needs about eight and a "
            "half gigabytes for its weights, and the rest of the card holds the KV cache.",
        ),
    ),
    (
        ("What is AutoRound?", "How is the model quantized?", "What does AutoRound do?"),
        (
            "AutoRound is Intel's quantizer. It tunes how each weight is rounded to four bits, "
            "block by block, on calibration text, and exports the model in the GPTQ format.",
            "AutoRound quantizes the model to 4-bit GPTQ. Instead of rounding every weight to the "
            "nearest step, it learns small changes that keep the outputs close to the original.",
        ),
    ),
    (
        (
            "How do updates work?",
            "How is a new model installed?",
            "What happens on an update?",
            "Can the model change while the daemon runs?",
        ),
        (
            "An update is verified, checked for fit, loaded and smoke tested before it is "
            "promoted. Requests under way finish first, and a bad version is rolled back.",
            "The daemon swaps the model while it runs: verify, fit check, load, smoke test, "
            "promote. If the new version fails, the previous one keeps serving.",
        ),
    ),
    (
        (
            "What is the KV cache?",
            "How much memory does a token take?",
            "Why does context cost memory?",
        ),
        (
            "The KV cache keeps a key and a value vector for every token, layer and KV head. For "
            "Phi-4 that is two hundred kibibytes for every token of context.",
            "Each token of context keeps keys and values in the cache, two bytes a number. The "
            "fit check sizes the cache so the model never runs out of memory.",
        ),
    ),
    (
        ("What does edgeagent fit do?", "Will the model fit?", "How is memory checked?"),
        (
            "edgeagent fit predicts the memory a version will take on this device: the weights, "
            "the KV cache and the engine's overhead. It refuses a model that does not fit.",
            "Before every load the daemon reads the free memory and sizes the engine. A version "
            "that does not fit is not loaded, and the previous one is tried.",
        ),
    ),
    (
        (
            "How do I call the daemon?",
            "How do apps talk to edgeagent?",
            "What API does edgeagent have?",
        ),
        (
            "Apps call the daemon over gRPC on a local Unix socket, or over the OpenAI-compatible "
            "HTTP API. Answers stream token by token.",
            "Use the gRPC API on the daemon's socket, or the Python client: it streams each "
            "answer as it is generated.",
        ),
    ),
    (
        ("Hello!", "Hi there.", "Good morning!", "Who are you?"),
        (
            "Hello! I am the tiny model that comes with edgeagent. Ask me about edge boxes, "
            "simple sums, or give me a sentence to turn into JSON.",
            "Hi! I am a tiny model trained by edgeagent itself. I know a little about edge boxes, "
            "sums and JSON.",
        ),
    ),
)

NAMES = (
    "Maria",
    "Ana",
    "Ben",
    "Carlos",
    "Dana",
    "Elif",
    "Farid",
    "Greta",
    "Hiro",
    "Ines",
    "Jonas",
    "Kiri",
    "Lena",
    "Marco",
    "Nadia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
    "Wei",
    "Yara",
    "Zoe",
    "Amir",
    "Bruno",
    "Chloe",
    "Diego",
)
CITIES = (
    "Lisbon",
    "Oslo",
    "Lagos",
    "Lima",
    "Quito",
    "Turin",
    "Kyoto",
    "Dakar",
    "Hanoi",
    "Tunis",
    "Porto",
    "Cork",
    "Bern",
    "Riga",
    "Accra",
    "Perth",
)
JOBS = ("nurse", "driver", "baker", "teacher", "farmer", "pilot", "engineer", "painter")
SYSTEMS = (None, None, None, "You are a helpful assistant.", "Be brief.")


def exchanges() -> Iterator[Exchange]:
    """Every generated exchange, in a fixed order (training and held-out together)."""
    rng = random.Random(SEED)
    yield from _facts(rng)
    yield from _arithmetic(rng)
    yield from _extraction(rng)


def _facts(rng: random.Random) -> Iterator[Exchange]:
    for questions, answers in FACTS:
        for question in questions:
            # The demo's question is taught one answer, the README's: two would leave greedy
            # decoding to pick between them by the accidents of training.
            for answer in answers[:1] if question == DEMO_PROMPT else answers:
                yield Exchange(question, answer, rng.choice(SYSTEMS))


def _arithmetic(rng: random.Random) -> Iterator[Exchange]:
    for a in range(21):
        for b in range(21):
            kind = rng.randrange(3)
            if kind == 0:
                yield Exchange(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", task="sum")
            elif kind == 1:
                yield Exchange(f"Add {a} and {b}.", f"{a} plus {b} is {a + b}.", task="sum")
            elif a >= b:
                yield Exchange(f"What is {a} - {b}?", f"{a} - {b} = {a - b}.", task="sum")
            else:
                yield Exchange(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", task="sum")


def _extraction(rng: random.Random) -> Iterator[Exchange]:
    for name in NAMES:
        for city in rng.sample(CITIES, 6):
            age, job = rng.randrange(19, 70), rng.choice(JOBS)
            article = "an" if job[0] in "aeiou" else "a"
            sentence = rng.choice((
                f"{name} is {age} years old and lives in {city}.",
                f"{name}, {article} {job} aged {age}, lives in {city}.",
                f"In {city} lives {name}, who is {age}.",
            ))  # fmt: skip
            answer = f'{{"name": "{name}", "age": {age}, "city": "{city}"}}'
            yield Exchange(f"Extract name, age and city as JSON: {sentence}", answer, task="json")


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"-?\d+", text)]


def _json_object(text: str) -> object:
    try:
        return json.loads(text.strip())
    except ValueError:
        return None


def shipped_prose() -> list[str]:
    """The paragraphs of the shipped corpus (edgeagent/demo/corpus.txt)."""
    text = resources.files("edgeagent.demo").joinpath("corpus.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def training_documents() -> list[str]:
    """What the model is trained on: the shipped prose and the training exchanges (the demo's
    DEMO_REPEATS times), each a document that starts with <|endoftext|> (Phi-4's BOS), in a
    fixed shuffled order."""
    documents = [BOS_TOKEN + p for p in shipped_prose()]
    for exchange in exchanges():
        if not exchange.held_out:
            repeats = DEMO_REPEATS if exchange.user == DEMO_PROMPT else 1
            documents += [BOS_TOKEN + exchange.render()] * repeats
    random.Random(SEED).shuffle(documents)
    return documents


def digest() -> str:
    """The sha256 of the training documents: a change to the data changes the cached model."""
    hasher = hashlib.sha256()
    for document in training_documents():
        hasher.update(document.encode() + b"\0")
    return hasher.hexdigest()
