"""The Grafana dashboard (helm/gateway-extproc/files/grafana-dashboard.json) is valid JSON, every
panel queries the `${datasource}` variable, every metric it asks for is one metrics.py exports,
and (with promtool) every query is valid PromQL."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from .test_alerts import (  # noqa: F401 (promtool: fixture)
    ENVOY_REF, ENVOY_SERIES, METRIC_REF, REPO, UP_REF, promtool, unknown_metric_refs)

DASHBOARD = REPO / "helm" / "gateway-extproc" / "files" / "grafana-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's built-in and dashboard variables, replaced by something promtool can parse.
SUBSTITUTIONS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1d", "$team": ".*", "$model": ".*",
                 "$namespace": ".*", "$job": ".*"}
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Panels including those nested in collapsed rows."""
    return [q for p in panels for q in [p, *all_panels(p.get("panels", []))]]


def query_panels() -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard()["panels"]) if p["type"] != "row"]


def variable_queries() -> dict[str, str]:
    """{variable name: label_values(...) query} for the dashboard's query variables."""
    found = {}
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found[var["name"]] = query
    return found


def exprs() -> list[str]:
    return [t["expr"] for p in query_panels() for t in p["targets"]]


def test_dashboard_parses_with_expected_shape() -> None:
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    queries = variable_queries()
    assert set(queries) == {"namespace", "job", "team", "model"}
    for name, query in queries.items():
        m = LABEL_VALUES.match(query)
        assert m and m["label"] == name, query
        assert variables[name]["datasource"] == DATASOURCE


def test_every_panel_has_the_datasource_variable_and_targets() -> None:
    panels = query_panels()
    assert len(panels) >= 14
    for p in panels:
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE and t["expr"].strip() and t["refId"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_panel_ids_are_unique() -> None:
    ids = [p["id"] for p in all_panels(dashboard()["panels"])]
    assert [i for i, n in Counter(ids).items() if n > 1] == []


def test_every_metric_the_dashboard_queries_exists() -> None:
    texts = exprs() + list(variable_queries().values())
    assert all(METRIC_REF.search(e) or UP_REF.search(e) or ENVOY_REF.search(e) for e in exprs()), \
        "a panel query that reads no genai_* metric, no `up` and no Envoy stat"
    assert unknown_metric_refs(texts) == set(), "not exported by gateway_extproc/telemetry/metrics.py"
    assert {ref for e in exprs() for ref in ENVOY_REF.findall(e)} <= ENVOY_SERIES


def test_every_query_follows_the_namespace_and_job_variables() -> None:
    for expr in exprs() + [q for name, q in variable_queries().items() if name not in {"namespace", "job"}]:
        selectors = re.findall(r"\b(?:genai_[a-z_]+|up|envoy_[a-z_]+)\{([^}]*)\}", expr)
        assert selectors and all('namespace=~"$namespace"' in s and 'job=~"$job' in s for s in selectors), expr
    titles = [p["title"] for p in all_panels(dashboard()["panels"]) if p["type"] == "row"]
    assert "Availability" in titles


def test_dashboard_covers_what_each_audience_asks() -> None:
    queried = {ref for e in exprs() for ref in METRIC_REF.findall(e)}
    assert {
        "genai_request_cost_dollars_total", "genai_gateway_team_daily_budget_dollars",
        "genai_team_daily_budget_remaining_dollars", "genai_tokens_total", "genai_requests_total",
        "genai_time_to_first_token_seconds_bucket", "genai_time_per_output_token_seconds_bucket",
        "genai_guardrail_triggers_total", "genai_cache_requests_total", "genai_upstream_attempts_total",
        "genai_gateway_extproc_phase_seconds_bucket", "genai_gateway_redis_latency_seconds_bucket",
        "genai_gateway_config_last_reload_successful", "genai_gateway_config_reloads_total",
    } <= queried


def promql(text: str) -> str:
    for var, value in SUBSTITUTIONS.items():
        text = text.replace(var, value)
    assert "$" not in text, f"unknown Grafana variable in {text!r}"
    return text


def test_every_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:  # noqa: F811
    rules = [{"record": f"dashboard:panel_{p['id']}_{t['refId']}", "expr": promql(t["expr"])}
             for p in query_panels() for t in p["targets"]]
    rules += [{"record": f"dashboard:variable_{name}", "expr": promql(LABEL_VALUES.match(q)["selector"])}
              for name, q in variable_queries().items()]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
