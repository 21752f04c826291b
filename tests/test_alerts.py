"""The Prometheus alerting rules (helm/gateway-extproc/files/prometheus-rules.yaml): promtool
accepts them, their unit tests (tests/promtool/rules_test.yaml) pass, and they only query
metrics gateway_extproc/telemetry/metrics.py really exports.

promtool comes from Debian's `prometheus` package (/usr/bin/promtool). Without it these
tests skip locally, but fail under CI (env CI set) so a CI image without it is caught.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "helm" / "gateway-extproc" / "files" / "prometheus-rules.yaml"
RULES_TEST = REPO / "tests" / "promtool" / "rules_test.yaml"
METRICS_PY = REPO / "gateway_extproc" / "telemetry" / "metrics.py"
OBSERVABILITY_DOC = REPO / "docs" / "observability.md"

METRIC_REF = re.compile(r"genai_[a-z_]+")
KUBE_STATE_REF = re.compile(r"kube_pod_container_status_restarts_total")
# Prometheus' own per-target series: a dead process exports nothing, its absence is the signal.
UP_REF = re.compile(r"\bup\{job=")
# Envoy's own stats (the stats listener, job gateway-extproc-envoy); the names are checked
# against a real Envoy's /stats/prometheus by tests/integration/test_envoy_stats.py.
ENVOY_REF = re.compile(r"\benvoy_[a-z_]+\b(?!\s*=)")  # series, not label names
ENVOY_SERIES = {"envoy_cluster_membership_total", "envoy_cluster_membership_healthy", "envoy_http_downstream_rq_xx"}
# What /metrics exposes per metric type (telemetry/counters.py writes no `_created`).
SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count"),
            "Summary": ("_sum", "_count")}

# The rule from "Operating Your GenAI Platform" (Odovey Consulting), as published.
# The rules file carries it verbatim; this guards against anyone "fixing" it in place.
ARTICLE_RULE = r"""
groups:
  - name: genai-cost-alerts
    rules:
      - alert: TeamDailyCostOverrun
        expr: |
          sum by (team) (
            increase(genai_request_cost_dollars_total[24h])
          ) > on (team) group_left()
          genai_team_daily_budget_dollars
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: "Team {{ $labels.team }} exceeded daily GenAI budget"
          description: >
            Spend is {{ $value | humanize }}$ against a budget of
            {{ with query "genai_team_daily_budget_dollars{team='{{ $labels.team }}'}" }}
            {{ . | first | value | humanize }}${{ end }}.
"""
AUDIENCES = {"team-lead", "on-call"}


# --- metric names (shared with tests/test_dashboard.py) ---------------------------------------

def declared_metrics(path: Path = METRICS_PY) -> dict[str, str]:
    """{metric name: type} for every Counter/Gauge/Histogram/Summary(...) call in metrics.py."""
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SUFFIXES
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            name = node.args[0].value
            if node.func.id == "Counter":
                name = name.removesuffix("_total")  # prometheus-client does the same
            found[name] = node.func.id
    return found


def exported_series_names(metrics: dict[str, str] | None = None) -> dict[str, str]:
    """{series name as scraped: declared metric}, e.g. genai_requests_total -> genai_requests."""
    metrics = declared_metrics() if metrics is None else metrics
    return {name + suffix: name for name, kind in metrics.items() for suffix in SUFFIXES[kind]}


def unknown_metric_refs(texts: list[str], metrics: dict[str, str] | None = None) -> set[str]:
    """Every genai_* name in `texts` that is not a series metrics.py exports."""
    exported = exported_series_names(metrics)
    return {ref for text in texts for ref in METRIC_REF.findall(text) if ref not in exported}


# --- the rules file -----------------------------------------------------------------------------

def load_rules(path: Path = RULES) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in load_rules() if "alert" in rule}


def recorded() -> dict[str, dict[str, Any]]:
    return {rule["record"]: rule for rule in load_rules() if "record" in rule}


def test_metric_parsing_knows_the_suffixes() -> None:
    exported = exported_series_names({"genai_requests": "Counter", "genai_ttft_seconds": "Histogram",
                                      "genai_budget_dollars": "Gauge"})
    assert set(exported) == {"genai_requests_total", "genai_ttft_seconds_bucket", "genai_ttft_seconds_sum",
                             "genai_ttft_seconds_count", "genai_budget_dollars"}
    declared = declared_metrics()
    assert declared["genai_requests"] == "Counter"
    assert declared["genai_time_to_first_token_seconds"] == "Histogram"
    assert declared["genai_gateway_team_daily_budget_dollars"] == "Gauge"
    assert unknown_metric_refs(["rate(genai_requests[5m]) + genai_requests_bucket + genai_nope_total"]) == {
        "genai_requests", "genai_requests_bucket", "genai_nope_total"}


def test_every_metric_the_rules_query_exists() -> None:
    rules = load_rules()
    texts = [r["expr"] for r in rules] + [v for r in rules for v in r.get("annotations", {}).values()]
    # Container restarts are kube-state-metrics' to count: a crashed process exports nothing.
    assert all(METRIC_REF.search(r["expr"]) or KUBE_STATE_REF.search(r["expr"]) or UP_REF.search(r["expr"])
               or ENVOY_REF.search(r["expr"]) for r in rules), "a rule that queries no genai_* metric"
    assert {ref for r in rules for ref in ENVOY_REF.findall(r["expr"])} <= ENVOY_SERIES
    assert unknown_metric_refs(texts) - set(recorded()) == set(), \
        "neither exported by gateway_extproc/telemetry/metrics.py nor recorded by a rule"
    # Recording rules read only what the pods export (no rule feeds on another's output).
    assert unknown_metric_refs([r["expr"] for r in recorded().values()]) == set()


def test_article_rule_is_carried_verbatim() -> None:
    [article_group] = yaml.safe_load(ARTICLE_RULE)["groups"]
    [ours] = [g for g in yaml.safe_load(RULES.read_text())["groups"] if g["name"] == article_group["name"]]
    [article_rule] = article_group["rules"]
    assert [r for r in ours["rules"] if r.get("alert") == article_rule["alert"]] == [article_rule]


def test_every_alert_says_who_gets_it_and_why() -> None:
    expected = {"TeamDailyCostOverrun", "TeamDailyBudgetAt80Percent", "GenAIErrorRateHigh", "GenAITTFTp95Regression",
                "GuardrailTriggerSpike", "GuardrailTriggersDroppedToZero", "GatewayRedisSlow", "ExtProcPhaseSlow",
                "AuditEventsDropped", "GatewayEnvoyRestarted", "GatewayExtProcDown", "GatewayExtProcTargetMissing",
                "GatewayExtProcWorkerUnhealthy", "GatewayEnvoy5xxHigh", "GatewayExtProcErrors",
                "GatewayBudgetSettlementsPending", "GatewayBudgetReservationsExpired", "GatewayBudgetOverReservation",
                "GatewayConfigReloadFailing"}
    found = alerts()
    assert set(found) == expected
    for name, rule in found.items():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        # The article's rule stays verbatim (no audience label); Alertmanager routes it by name.
        if name != "TeamDailyCostOverrun":
            assert rule["labels"]["audience"] in AUDIENCES, name
    # Cost alerts go to team leads, not on-call: overspending is a planning problem.
    assert found["TeamDailyBudgetAt80Percent"]["labels"]["audience"] == "team-lead"
    assert {r["labels"]["audience"] for n, r in found.items() if not n.startswith("Team")} == {"on-call"}


def test_the_budget_the_article_rule_matches_is_one_series_per_team() -> None:
    """The article's `> on (team) group_left() genai_team_daily_budget_dollars` needs one series per
    team on the right: a rule records it from the per-pod metric, aggregated to `team` alone."""
    rule = recorded()["genai_team_daily_budget_dollars"]
    assert re.fullmatch(r"max by \(team\) \(genai_gateway_team_daily_budget_dollars\)", rule["expr"].strip())
    assert "genai_team_daily_budget_dollars" not in exported_series_names()
    # Same group, before the alert: rules in a group run in order, so the alert sees this cycle's value.
    [group] = [g for g in yaml.safe_load(RULES.read_text())["groups"] if g["name"] == "genai-cost-alerts"]
    names = [r.get("record") or r.get("alert") for r in group["rules"]]
    assert names.index("genai_team_daily_budget_dollars") < names.index("TeamDailyCostOverrun")


def test_every_alert_is_documented() -> None:
    doc = OBSERVABILITY_DOC.read_text()
    assert [name for name in alerts() if f"`{name}`" not in doc] == []
    assert "alertname" in doc and "TeamDailyCostOverrun" in doc  # routed by name, see above


# --- promtool -----------------------------------------------------------------------------------

def debian_tool(name: str, package: str) -> str:
    """`name`'s path; in CI its absence fails (`.ci/run` installs `package`), elsewhere it skips
    the checks that need it, saying so."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not on PATH: .ci/run must install Debian's `{package}` package "
                    f"(apt-get install -y {package})", pytrace=False)
    reason = f"{name} not found on PATH; its checks skipped. Install it with `apt-get install -y {package}` (Debian)."
    print(reason)
    warnings.warn(reason, stacklevel=1)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def promtool() -> str:
    return debian_tool("promtool", "prometheus")


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_promtool_check_rules(promtool: str) -> None:
    proc = run([promtool, "check", "rules", str(RULES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in proc.stdout


def test_promtool_rule_unit_tests(promtool: str) -> None:
    proc = run([promtool, "test", "rules", str(RULES_TEST)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_without_the_recording_rule_the_article_rule_fails_on_three_pods(promtool: str, tmp_path: Path) -> None:
    """Why the recording rule exists: the article's rule over three pods that each export the
    budget under its name is a PromQL error, not a silent alert."""
    (tmp_path / "article.yaml").write_text(ARTICLE_RULE)
    series = [{"series": f'genai_team_daily_budget_dollars{{instance="10.0.0.{i}:9464", team="alpha"}}',
               "values": "100+0x30"} for i in (1, 2, 3)]
    series.append({"series": 'genai_request_cost_dollars_total{instance="10.0.0.1:9464", team="alpha"}',
                   "values": "0+10x30"})
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({
        "rule_files": ["article.yaml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series,
                   "alert_rule_test": [{"eval_time": "25m", "alertname": "TeamDailyCostOverrun", "exp_alerts": []}]}]}))
    proc = subprocess.run([promtool, "test", "rules", "test.yaml"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert "many-to-many matching not allowed" in proc.stdout + proc.stderr or \
        "found duplicate series for the match group" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_unit_tests_run_the_cost_alerts_over_one_and_three_pods() -> None:
    groups = yaml.safe_load(RULES_TEST.read_text())["tests"]
    pods = set()
    for group in groups:
        budget = [s["series"] for s in group["input_series"]
                  if s["series"].startswith("genai_gateway_team_daily_budget")]
        fired = {c["alertname"] for c in group.get("alert_rule_test", []) if c.get("exp_alerts")}
        if "TeamDailyCostOverrun" in fired:
            pods.add(len({re.search(r'instance="([^"]+)"', b).group(1) for b in budget}))
    assert {1, 3} <= pods


def test_unit_tests_cover_every_alert_firing_and_silent() -> None:
    cases = [case for group in yaml.safe_load(RULES_TEST.read_text())["tests"] for case in group["alert_rule_test"]]
    for name in alerts():
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"{name}: no firing case"
        assert any(not case.get("exp_alerts") for case in mine), f"{name}: no silent case"


# --- amtool: the Alertmanager example in docs/observability.md, run as written ------------------

@pytest.fixture(scope="module")
def amtool() -> str:
    return debian_tool("amtool", "prometheus-alertmanager")


def test_the_documented_alertmanager_routing_checks_and_routes_as_its_comments_say(amtool: str,
                                                                                   tmp_path: Path) -> None:
    doc = OBSERVABILITY_DOC.read_text()
    config = next(b for b in re.findall(r"^```yaml\n(.*?)^```", doc, re.S | re.M) if b.startswith("route:"))
    (tmp_path / "alertmanager.yml").write_text(config)
    commands = next(b for b in re.findall(r"^```sh\n(.*?)^```", doc, re.S | re.M) if "amtool" in b)
    for line in commands.splitlines():
        command, _, receiver = line.partition("#")
        argv = shlex.split(command)
        assert argv[0] == "amtool"
        proc = subprocess.run([amtool, *argv[1:]], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 0, f"{line}\n{proc.stdout}{proc.stderr}"
        if receiver.strip():
            assert proc.stdout.strip() == receiver.strip(), line
