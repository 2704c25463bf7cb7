"""Prometheus metrics, served on an opt-in loopback port (`metrics.address`).

Requests by method and status code, prompt and generated tokens, time to first token, request
duration, update outcomes; read at scrape time: requests running and waiting and the serving
version (from the serving slot), the last update's outcome (from the update journal), the
quality gate's figures for the last candidate it scored (from the gate), and the device's
memory as the fit check's probe reads it. One registry per daemon (vLLM registers its own
metrics in the global one; they are not mixed in). The names and their meaning are listed in
docs/metrics.md; `deploy/grafana/edgeagent-fleet.json` is a dashboard over them.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgeagent.engine.slot import ServingSlot
from edgeagent.errors import ConfigError
from edgeagent.gpu import MemoryProbe
from edgeagent.store.manifest import HubSource
from edgeagent.updates.gate import QualityGate
from edgeagent.updates.journal import UpdateJournal

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Label values that carry free text (an update's reason, a drop's name) are cut to this length:
# one series each, but a scraper stores every distinct value it sees.
REASON_CHARS = 200
NAME_CHARS = 100


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "edgeagent_requests", "Generation RPCs by method and final status code",
            ["method", "code"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("edgeagent_prompt_tokens", "Prompt tokens", registry=r)
        self.generated_tokens = Counter(
            "edgeagent_generated_tokens", "Tokens generated", registry=r
        )
        self.time_to_first_token = Histogram(
            "edgeagent_time_to_first_token_seconds", "From admission to the first token",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "edgeagent_request_duration_seconds", "Generation RPCs, start to end",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.refused = Counter(
            "edgeagent_requests_refused", "Requests refused for load or size (RESOURCE_EXHAUSTED)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.updates = Counter(
            "edgeagent_updates", "Model updates by kind and result", ["kind", "result"],
            registry=r,
        )  # fmt: skip

    def observer(self, method: str) -> Callable[[str], None]:
        """What the request's final status code (its name: `OK`, `INVALID_ARGUMENT`, ...) is
        reported to (see `errors_as_status`)."""
        started = time.perf_counter()

        def finished(code: str) -> None:
            self.requests.labels(method, code).inc()
            self.request_duration.observe(time.perf_counter() - started)

        return finished

    def watch_slot(self, slot: ServingSlot) -> None:
        """Requests running and waiting, and the version served, read from the slot."""
        self.registry.register(_Serving(slot))

    def watch_device(self, probe: MemoryProbe) -> None:
        self.registry.register(_DeviceMemory(probe))

    def watch_updates(self, journal: UpdateJournal, gate: QualityGate) -> None:
        """The last update's outcome, read from the journal, and the gate's last figures."""
        self.registry.register(_Updates(journal, gate))


class _Serving(Collector):
    """Read at scrape time from the serving slot, the one owner of what is served."""

    def __init__(self, slot: ServingSlot) -> None:
        self._slot = slot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        slot = self._slot
        yield GaugeMetricFamily(
            "edgeagent_requests_running", "Requests under way (admitted, not finished)",
            value=len(slot),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "edgeagent_requests_waiting", "Requests held while an update swaps the model",
            value=slot.waiting,
        )  # fmt: skip
        load = slot.serving.engine.load() if slot.serving is not None else None
        for metric, help_text, value in (
            ("edgeagent_engine_requests_running", "Requests in the engine's batch",
             load.running if load else 0),
            ("edgeagent_engine_requests_waiting", "Requests queued inside the engine",
             load.waiting if load else 0),
            ("edgeagent_engine_kv_cache_usage", "Share of the engine's KV cache in use (0-1)",
             load.kv_cache_usage if load else 0.0),
        ):  # fmt: skip
            yield GaugeMetricFamily(metric, help_text, value=value)
        info = GaugeMetricFamily(
            "edgeagent_serving_info", "The served model version (value 1; none when nothing "
            "serves): its store version id, model id, hub commit (hub versions), quantization "
            "and the 4-bit GPU kernel it runs ('' off a GPU), and the slot's state",
            labels=["model_id", "version", "state", "hub_commit", "quantization",
                    "quantized_kernel"],
        )  # fmt: skip
        serving = slot.serving
        if serving is not None:
            manifest = serving.manifest
            commit = manifest.source.commit if isinstance(manifest.source, HubSource) else ""
            info.add_metric([serving.model_id, serving.version, slot.state, commit,
                             manifest.quantization_label,
                             serving.engine.facts.quantized_kernel], 1)  # fmt: skip
        yield info


class _Updates(Collector):
    """Read at scrape time from the update journal (the one record of what updates did, kept
    across restarts) and from the quality gate (its last figures, since this process started)."""

    def __init__(self, journal: UpdateJournal, gate: QualityGate) -> None:
        self._journal, self._gate = journal, gate

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "edgeagent_last_update_info", "The last update, rollback or refused drop or fetch "
            "(value 1; none before the first): its kind, result, candidate, the version it "
            f"would replace and why (cut to {REASON_CHARS} characters)",
            labels=["kind", "result", "candidate", "from_version", "reason"],
        )  # fmt: skip
        finished = GaugeMetricFamily(
            "edgeagent_last_update_timestamp_seconds", "When the last update ended (Unix time)"
        )
        last = next(iter(self._journal.history.copy()), None)
        if last is not None:
            info.add_metric([last.kind, last.result, _cut(last.version, NAME_CHARS),
                             _cut(last.from_version, NAME_CHARS),
                             _cut(last.reason, REASON_CHARS)], 1)  # fmt: skip
            finished.add_metric([], last.finished_at)
        yield info
        yield finished
        yield GaugeMetricFamily(
            "edgeagent_versions_marked_bad", "Versions this box will not update to again",
            value=len(self._journal.bad),
        )  # fmt: skip
        yield from self._gate_figures()

    def _gate_figures(self) -> Iterator[GaugeMetricFamily]:
        gate = self._gate
        for metric, help_text, value in (
            ("edgeagent_gate_enabled", "Whether updates go through the quality gate (1/0)",
             float(gate.enabled)),
            ("edgeagent_gate_max_perplexity_ratio", "The gate's limit: candidate perplexity "
             "over the serving version's", gate.max_perplexity_ratio),
            ("edgeagent_gate_min_top1_agreement", "The gate's limit: least share of positions "
             "where both versions' most likely token agree", gate.min_top1_agreement),
        ):  # fmt: skip
            yield GaugeMetricFamily(metric, help_text, value=value)
        figures, labels = gate.last, ["candidate", "reference", "eval_set"]
        for metric, help_text, read in (
            ("edgeagent_gate_candidate_perplexity", "The last gated candidate's perplexity on "
             "the eval set", lambda f: f.perplexity),
            ("edgeagent_gate_reference_perplexity", "The serving version's perplexity it was "
             "compared with", lambda f: f.reference_perplexity),
            ("edgeagent_gate_perplexity_ratio", "Candidate perplexity over the reference's",
             lambda f: f.perplexity_ratio),
            ("edgeagent_gate_top1_agreement", "Share of positions where the candidate's most "
             "likely token is the reference's", lambda f: f.top1_agreement),
            ("edgeagent_gate_mean_kl_nats", "Mean approximate KL(reference || candidate) per "
             "position, nats", lambda f: f.mean_kl),
            ("edgeagent_gate_passed", "Whether the last gated candidate passed (1/0)",
             lambda f: float(f.passed)),
            ("edgeagent_gate_scoring_seconds", "How long the candidate's scoring took",
             lambda f: f.seconds),
            ("edgeagent_gate_timestamp_seconds", "When the gate scored it (Unix time)",
             lambda f: f.finished_at),
        ):  # fmt: skip
            family = GaugeMetricFamily(metric, help_text, labels=labels)
            if figures is not None:
                family.add_metric([figures.candidate, figures.reference, figures.eval_set],
                                  read(figures))  # fmt: skip
            yield family


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _DeviceMemory(Collector):
    """Read at scrape time, as the fit check reads it."""

    def __init__(self, probe: MemoryProbe) -> None:
        self._probe = probe

    def collect(self) -> Iterator[GaugeMetricFamily]:
        reading = self._probe.read()
        labels = ["kind", "name"]
        for metric, help_text, value in (
            ("edgeagent_device_memory_total_bytes", "Device memory", reading.total_bytes),
            ("edgeagent_device_memory_used_bytes", "Device memory in use (all processes)",
             reading.used_bytes),
        ):  # fmt: skip
            family = GaugeMetricFamily(metric, help_text, labels=labels)
            family.add_metric([reading.kind, reading.name], value)
            yield family


@dataclass(frozen=True)
class MetricsServer:
    port: int
    stop: Callable[[], None]


def serve_metrics(metrics: Metrics, address: str) -> MetricsServer:
    """Serve /metrics on a loopback HOST:PORT (port 0: any free one)."""
    host, port = loopback_address(address)
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    logger.info("metrics on http://%s:%d/metrics", host, server.server_port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return MetricsServer(server.server_port, stop)


def loopback_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        number = int(port)
    except ValueError:
        raise ConfigError(f"metrics.address {address!r}: expected HOST:PORT") from None
    if not loopback:
        raise ConfigError(
            f"metrics.address {address!r}: metrics are served on loopback only "
            f"(127.0.0.1 or ::1); scrape them through a local agent"
        )
    return host, number
