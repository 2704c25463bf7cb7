"""What a fleet operator sees (issue 31): the serving version, the last update's outcome with its
reason and the quality gate's figures in the metrics of a real in-process daemon (fake engines),
and a Grafana dashboard (`deploy/grafana/edgeagent-fleet.json`) that queries only metrics the
daemon exports, each of them documented in docs/metrics.md."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from edgeagent.metrics import REASON_CHARS
from edgeagent.v1 import admin_pb2 as admin_pb
from fast.fakes import Behaviour
from fast.runner import Box, InProcess, in_process

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "edgeagent-fleet.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"
ANY_PORT = "127.0.0.1:0"  # metrics.address: any free port; the daemon says which
PROMOTED, REFUSED = admin_pb.UPDATE_RESULT_PROMOTED, admin_pb.UPDATE_RESULT_REFUSED
ROLLED_BACK = admin_pb.UPDATE_RESULT_ROLLED_BACK

# -- the daemon's /metrics ----------------------------------------------------------------------


async def _scrape(daemon: InProcess) -> str:
    exporter = daemon.daemon.listeners.metrics_server
    assert exporter is not None, "metrics.address is set: the daemon serves /metrics"

    def get() -> str:
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())

    return await asyncio.to_thread(get)


SUFFIXES = {  # the series a family of each type is scraped as
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_names(text: str) -> set[str]:
    """Every series name the exposition declares (a family with no sample yet, such as a
    labelled counter nothing has counted, is declared by its TYPE) or holds a sample of."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def samples(text: str, name: str) -> list[Sample]:
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def one(text: str, name: str) -> Sample:
    found = samples(text, name)
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


# -- PromQL: the metric names an expression references -------------------------------------------

KEYWORDS = {"and", "or", "unless", "bool", "inf", "nan", "offset", "start", "end"}
GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)"


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression (or a Grafana `label_values(...)` query): what
    is left once strings, label matchers, ranges, grouping clauses, Grafana variables, numbers,
    function names (a name followed by a parenthesis) and keywords are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    # label_values(SELECTOR, LABEL): the last argument is a label; label_values(LABEL): no metric
    text = re.sub(r"\blabel_values\s*\(\s*([^,()]*)\)", "", text)
    text = re.sub(r"\blabel_values\s*\((.*),\s*[A-Za-z_]\w*\s*\)", r"(\1)", text)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(GROUPING, " ", text)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", text)  # Grafana variables
    text = re.sub(r"\boffset\s+-?\w+|@\s*[\w.()]+", " ", text)
    text = re.sub(r"(?<![\w:.])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        followed = text[match.end() :].lstrip()
        if followed.startswith("(") or match.group().lower() in KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(match.group())
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (method, code) (rate(edgeagent_requests_total{instance=~"$instance"}[5m]))',
         {"edgeagent_requests_total"}),
        ('histogram_quantile(0.95, sum(rate(x_seconds_bucket{le!="+Inf"}[$__rate_interval])) '
         "by (le))", {"x_seconds_bucket"}),
        ("a_used / on(instance) group_left(name, kind) b_total offset 1h > 0.5e3",
         {"a_used", "b_total"}),
        ("count(up == 0 and (time() - ts_seconds) < 86400) or vector(0)", {"up", "ts_seconds"}),
        ("max without (job) (rate(c_total[5m:1m])) unless bool d", {"c_total", "d"}),
        ('label_values(edgeagent_serving_info{job="edge"}, instance)', {"edgeagent_serving_info"}),
        ("label_values(instance)", set()),
        ("edgeagent_requests_totl", {"edgeagent_requests_totl"}),  # a typo is a name too
    ],
)  # fmt: skip
def test_the_promql_extractor_finds_metric_names_only(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def _expressions(node: Any, where: str) -> Iterator[tuple[str, str]]:
    """(where, expression) for every query in the dashboard: panels' targets (rows' panels
    too), template variables' queries, annotations."""
    if isinstance(node, dict):
        title = node.get("title") or node.get("name")
        here = f"{where}/{title}" if isinstance(title, str) else where
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str) and value:
                yield here, value
            else:
                yield from _expressions(value, here)
    elif isinstance(node, list):
        for item in node:
            yield from _expressions(item, where)


def _dashboard_queries() -> dict[str, set[str]]:
    """metric name → where the dashboard queries it."""
    dashboard = json.loads(DASHBOARD.read_text())
    referenced: dict[str, set[str]] = {}
    for part in ("panels", "templating", "annotations"):
        for where, expr in _expressions(dashboard.get(part, {}), part):
            if where.startswith("templating/DS_PROMETHEUS"):
                continue  # the data source variable's query is a plugin type, not PromQL
            for name in metric_names(expr):
                referenced.setdefault(name, set()).add(where)
    return referenced


def test_the_dashboard_is_a_grafana_dashboard_whose_every_panel_queries_a_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["instance"]["type"] == "query"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert {p["type"] for p in panels} <= {"timeseries", "stat", "table"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        exprs = [t["expr"] for t in panel["targets"]]
        assert exprs, panel["title"]
        assert all(metric_names(e) and '$instance"' in e for e in exprs), panel["title"]


async def test_every_metric_the_dashboard_queries_is_exported_and_documented(box: Box) -> None:
    """After a request and an update, every series the dashboard queries is one the daemon's
    /metrics declares; every family it exports is in docs/metrics.md."""
    async with in_process(box, EDGEAGENT_METRICS__ADDRESS=ANY_PORT) as daemon:
        await daemon.generate()
        assert (await daemon.update(box.versions["b"].version)).result == PROMOTED
        text = await _scrape(daemon)
    exported = exported_names(text)
    referenced = _dashboard_queries()
    assert len(referenced) >= 10
    missing = {name: sorted(where) for name, where in referenced.items() if name not in exported}
    assert missing == {}, f"queried by the dashboard, not exported: {missing}"

    documented = set(re.findall(r"`(edgeagent_\w+)", METRICS_DOC.read_text()))
    families = {f.name for f in text_string_to_metric_families(text)}
    undocumented = sorted(
        name for name in families
        if name.startswith("edgeagent_") and not name.endswith("_created")  # (a counter's)
        and not {name, f"{name}_total"} & documented
    )  # fmt: skip
    assert undocumented == [], f"exported, not in docs/metrics.md: {undocumented}"


# -- the serving version, the last outcome and the gate's figures --------------------------------


def _serving(text: str) -> dict[str, str]:
    return one(text, "edgeagent_serving_info").labels


def _last(text: str) -> dict[str, str]:
    sample = one(text, "edgeagent_last_update_info")
    assert sample.value == 1
    return sample.labels


def _gate(text: str) -> tuple[set[tuple[str, str]], dict[str, float]]:
    """The (candidate, reference) pairs the gate's figures are labelled with, and the figures."""
    pairs, figures = set(), {}
    for name in ("perplexity_ratio", "top1_agreement", "passed", "candidate_perplexity",
                 "reference_perplexity", "mean_kl_nats", "scoring_seconds",
                 "timestamp_seconds"):  # fmt: skip
        sample = one(text, f"edgeagent_gate_{name}")
        figures[name] = sample.value
        pairs.add((sample.labels["candidate"], sample.labels["reference"]))
        assert sample.labels["eval_set"].startswith("edgeagent "), sample.labels  # its name
    return pairs, figures


async def test_the_serving_version_and_the_last_update_with_its_reason_are_exported(
    box: Box,
) -> None:
    """A promoted update, a candidate the quality gate turns away (rolled back: it was loaded),
    then that candidate again (refused: marked bad); the metrics follow each, and after a
    restart still show the last outcome (the journal keeps it)."""
    worse = box.add("worse", Behaviour(seed=14, prompt_logprob=-3.0))  # perplexity x7.4
    a, b = box.versions["a"], box.versions["b"]
    async with in_process(box, EDGEAGENT_METRICS__ADDRESS=ANY_PORT) as daemon:
        text = await _scrape(daemon)
        assert _serving(text)["version"] == a.version
        assert samples(text, "edgeagent_last_update_info") == []  # a fresh box: no update yet
        assert samples(text, "edgeagent_gate_passed") == []
        assert one(text, "edgeagent_gate_enabled").value == 1

        started = time.time()
        assert (await daemon.update(b.version)).result == PROMOTED
        text = await _scrape(daemon)
        assert _serving(text) == {
            "model_id": b.model_id, "version": b.version, "state": "serving",
            "hub_commit": "",  # an imported version; a hub version names its commit
            "quantization": b.quantization_label,
            "quantized_kernel": daemon.engine.facts.quantized_kernel,
        }  # fmt: skip
        assert _last(text) == {"kind": "update", "result": "promoted", "candidate": b.version,
                               "from_version": a.version, "reason": ""}  # fmt: skip
        finished = one(text, "edgeagent_last_update_timestamp_seconds").value
        assert started <= finished <= time.time()
        pairs, gate = _gate(text)
        assert pairs == {(b.version, a.version)}
        assert gate["passed"] == 1
        assert gate["perplexity_ratio"] == pytest.approx(1.0)
        assert one(text, "edgeagent_gate_max_perplexity_ratio").value == pytest.approx(1.2)
        assert one(text, "edgeagent_gate_min_top1_agreement").value == pytest.approx(0.9)

        outcome = await daemon.update(worse.version)
        assert outcome.result == ROLLED_BACK, outcome.reason
        text = await _scrape(daemon)
        assert _serving(text)["version"] == b.version
        last = _last(text)
        assert (last["result"], last["candidate"]) == ("rolled_back", worse.version)
        assert last["reason"].startswith(f"quality gate refused {worse.version}: perplexity")
        assert len(last["reason"]) <= REASON_CHARS
        assert outcome.reason.startswith(last["reason"].removesuffix("…"))
        pairs, gate = _gate(text)
        assert pairs == {(worse.version, b.version)}
        assert gate["passed"] == 0
        assert gate["perplexity_ratio"] == pytest.approx(7.389, abs=0.01)

        outcome = await daemon.update(worse.version)
        assert outcome.result == REFUSED
        text = await _scrape(daemon)
        last = _last(text)
        assert (last["result"], last["candidate"]) == ("refused", worse.version)
        assert last["reason"].startswith("marked bad earlier: quality gate refused")
        assert len(outcome.reason) > REASON_CHARS  # the gate's figures: cut, marked as cut
        assert last["reason"] == outcome.reason[: REASON_CHARS - 1] + "…"
        assert one(text, "edgeagent_versions_marked_bad").value == 1
        counted = {(s.labels["kind"], s.labels["result"]): s.value
                   for s in samples(text, "edgeagent_updates_total")}  # fmt: skip
        assert counted == {("update", "promoted"): 1, ("update", "rolled_back"): 1,
                           ("update", "refused"): 1}  # fmt: skip
        assert len(samples(text, "edgeagent_last_update_info")) == 1  # replaced, not added

    async with in_process(box, EDGEAGENT_METRICS__ADDRESS=ANY_PORT) as daemon:
        text = await _scrape(daemon)
        assert _serving(text)["version"] == b.version
        after = _last(text)
        assert (after["result"], after["reason"]) == ("refused", last["reason"])
        assert samples(text, "edgeagent_gate_passed") == []  # figures are this process's
