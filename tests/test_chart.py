"""The Helm chart is the single source of Envoy config: render it with the real Helm engine
(helm-python-sdk), lint it, validate every render with real Envoy, and keep envoy/ current."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from gateway_extproc import api, config
from gateway_extproc.localstack import envoy_binary
from gateway_extproc.processors import responses
from gateway_extproc.processors.router import KNOWN_METHODS, UNKNOWN_PATH
from gateway_extproc.render import CHART, RenderError, chart_values, render_values

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "helm" / "values-local.yaml"


def envoy_validate(envoy_yaml: str, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(envoy_yaml)
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def cluster(envoy: dict[str, Any], name: str) -> dict[str, Any]:
    [c] = [c for c in envoy["static_resources"]["clusters"] if c["name"] == name]
    return c


def upstream_filters(c: dict[str, Any]) -> list[str]:
    opts = c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    return [f["name"] for f in opts["http_filters"]]


@pytest.mark.parametrize("values_files", [[], [LOCAL]], ids=["defaults", "local"])
def test_chart_lints_clean(values_files: list[Path]) -> None:
    report = helm_python.lint(str(CHART), chart_values(values_files), strict=True)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values_files", [[], [LOCAL]], ids=["defaults", "local"])
def test_every_render_passes_envoy_validate_and_config_check(values_files: list[Path], tmp_path: Path) -> None:
    rendered = render_values(chart_values(values_files))
    envoy_validate(rendered["envoy.yaml"], tmp_path)
    cfg = config.parse(yaml.safe_load(rendered["gateway.yaml"]), "gateway.yaml")
    envoy = yaml.safe_load(rendered["envoy.yaml"])
    for model in cfg.models.values():
        c = cluster(envoy, f"model.{model.name}")
        metadata = [e["metadata"]["filter_metadata"]["gw"]["backend"]
                    for group in c["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]
        assert metadata == [b.id for b in model.backends]
    sockets = [e["endpoint"]["address"]["pipe"]["path"]
               for e in cluster(envoy, "gateway_extproc")["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert [f"unix://{s}" for s in sockets] == list(cfg.listen)


def test_envoy_dir_is_the_current_render_of_the_defaults() -> None:
    rendered = render_values(chart_values([]))
    for name, text in rendered.items():
        assert (REPO / "envoy" / name).read_text() == text, f"envoy/{name} is stale: run `make envoy-config`"


def test_every_status_refused_after_the_body_has_its_route() -> None:
    """processors/responses.refusal_after_body: a route per status that waits for the whole
    body (the buffer filter, off on every other route) and answers with that status."""
    envoy = yaml.safe_load(render_values(chart_values([LOCAL]))["envoy.yaml"])
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]][-2:] == ["envoy.filters.http.buffer", "envoy.filters.http.router"]
    (host,) = hcm["route_config"]["virtual_hosts"]
    assert host["typed_per_filter_config"]["envoy.filters.http.buffer"]["disabled"] is True
    refusals = {r["match"]["headers"][0]["string_match"]["exact"]: r for r in host["routes"]
                if r["match"].get("headers", [{}])[0].get("name") == "x-gateway-refusal-status"}
    assert set(refusals) == {str(s) for s in responses.REFUSED_AFTER_BODY}
    for status, route in refusals.items():
        assert route["direct_response"] == {"status": int(status)}
        assert route["typed_per_filter_config"]["envoy.filters.http.buffer"]["buffer"]["max_request_bytes"] > 0


def test_credentials_are_injected_natively_unless_an_attempt_needs_body_work() -> None:
    envoy = yaml.safe_load(render_values(chart_values([LOCAL]))["envoy.yaml"])
    single = cluster(envoy, "model.private-chat")
    assert upstream_filters(single) == ["envoy.filters.http.header_mutation", "envoy.filters.http.upstream_codec"]
    assert "%ENVIRONMENT(MOCK_PROVIDER_API_KEY)%" in yaml.safe_dump(single)
    for name in ("model.default-chat", "model.fallback-chat", "model.claude-chat"):
        fallback = cluster(envoy, name)
        assert upstream_filters(fallback) == ["envoy.filters.http.header_mutation", "envoy.filters.http.ext_proc",
                                              "envoy.filters.http.upstream_codec"]
        assert [g["priority"] for g in fallback["load_assignment"]["endpoints"]] == [0, 1]
        assert "ENVIRONMENT" not in yaml.safe_dump(fallback)


@pytest.mark.parametrize("model", ["m-file-credential", "gemini-chat", "azure-chat"])
def test_single_backends_needing_the_upstream_ext_proc_get_it(model: str) -> None:
    """A file credential, or a provider kind that is not OpenAI (translation, signing):
    the attempt is built from the body. Its gRPC stream never carries a response body, and
    the ext_proc connection never pushes back (Envoy 1.40 crashes when it does while an
    upstream-filter ext_proc exists: docs/architecture.md)."""
    values = copy.deepcopy(chart_values([LOCAL]))
    values["models"].append({"name": "m-file-credential", "backends": [{"provider": "mock-backup", "model": "x",
                                                                        "maxTier": "internal",
                                                                        "pricing": {"input": 1, "output": 2}}]})
    envoy = yaml.safe_load(render_values(values)["envoy.yaml"])
    opts = cluster(envoy, f"model.{model}")["typed_extension_protocol_options"]
    [ext] = [f for f in opts["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
             if f["name"] == "envoy.filters.http.ext_proc"]
    cfg = ext["typed_config"]
    assert cfg["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert cfg["processing_mode"]["response_header_mode"] == "SEND"  # each attempt's status
    assert cfg["processing_mode"]["response_body_mode"] == "NONE"
    assert "allow_mode_override" not in cfg  # answers are translated by the router-level filter
    assert cfg["grpc_service"]["envoy_grpc"]["cluster_name"] == "gateway_extproc"
    assert cluster(envoy, "gateway_extproc")["per_connection_buffer_limit_bytes"] == 2**32 - 1


def test_every_attempt_is_logged_by_envoy() -> None:
    envoy = yaml.safe_load(render_values(chart_values([LOCAL]))["envoy.yaml"])
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [router] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.router"]
    fmt = router["typed_config"]["upstream_log"][0]["typed_config"]["log_format"]["json_format"]
    assert fmt["event"] == "upstream_attempt"
    assert {"request_id", "start_time", "backend", "status", "flags"} <= set(fmt)


def test_envoys_logs_and_spans_name_the_endpoints_the_ext_proc_names() -> None:
    """Envoy's envoy_error line and span URL tag (a CEL list in the chart) name the same paths
    as the ext_proc's access line; anything else is "(unknown)" in both."""
    values = copy.deepcopy(chart_values([LOCAL]))
    values["tracing"]["otlp"] = {"address": "127.0.0.1", "port": 4317}
    envoy = render_values(values)["envoy.yaml"]
    expressions = re.findall(r"%CEL\(request\.url_path in \[([^\]]*)\] \? request\.url_path : '([^']*)'\)%", envoy)
    assert len(expressions) == 2  # the envoy_error line and the spans' http.url
    for listed, unknown in expressions:
        assert set(re.findall(r"'([^']*)'", listed)) == {*api.FORWARDED, api.MODELS_PATH, api.USAGE_PATH}
        assert unknown == UNKNOWN_PATH
    # The method too: over HTTP/2 any token of the caller's making (a key) is one.
    methods = re.findall(r"%CEL\(request\.method in \[([^\]]*)\] \? request\.method : '([^']*)'\)%", envoy)
    assert len(methods) == 2  # the envoy_error line and the spans' http.method
    for listed, other in methods:
        assert set(re.findall(r"'([^']*)'", listed)) == KNOWN_METHODS and other == "other"


def test_no_credential_value_is_ever_rendered(tmp_path: Path) -> None:
    values = copy.deepcopy(chart_values([LOCAL]))
    rendered = "".join(render_values(values).values())
    assert "sk-" not in rendered and "gwk_" not in rendered


def test_unknown_provider_fails_the_render_with_a_fix() -> None:
    values = copy.deepcopy(chart_values([LOCAL]))
    values["models"][0]["backends"][0]["provider"] = "nope"
    with pytest.raises(RenderError, match=r"models\[0\].backends\[0\].provider is 'nope', not in providers"):
        render_values(values)


@pytest.mark.parametrize(("edit", "message"), [
    # a list where a name was: Helm's template engine stopped with a Go error from deep in envoy.yaml
    (lambda v: v["classification"].__setitem__("tiers", ["public", {"a": 1}]), r"classification\.tiers\[1\]: got object, want string"),
    # wrong types where the chart's reference check walks: a Python TypeError before the schema spoke
    (lambda v: v["models"][0].__setitem__("backends", 5), r"models\[0\]\.backends: got number, want array"),
    (lambda v: v["providers"][0].__setitem__("name", ["mock"]), r"providers\[0\]\.name: got array, want string"),
])
def test_values_of_the_wrong_type_fail_the_render_naming_the_key(edit: Any, message: str) -> None:
    values = copy.deepcopy(chart_values([LOCAL]))
    edit(values)
    with pytest.raises(RenderError, match=message):
        render_values(values)


@pytest.mark.parametrize(("edit", "key"), [
    # a caller key pasted where its hash goes, or as the id
    (lambda v, s: v["keys"][0].__setitem__("sha256", f"gwk_demo_{s}"), r"keys\[0\]\.sha256"),
    (lambda v, s: v["keys"][0].__setitem__("id", f"gwk_demo_{s}"), r"keys\[0\]\.id"),
    # a provider key pasted where the variable's name goes
    (lambda v, s: v["providers"][0]["credential"].__setitem__("env", f"sk-proj-{s}"), r"providers\[0\]\.credential\.env"),
    # a password in a provider URL that the URL pattern refuses before the chart's own check
    (lambda v, s: v["providers"][0].__setitem__("baseURL", f"https://user:{s}@llm.internal/v1"),
     r"providers\[0\]\.baseURL"),
], ids=["key-as-sha256", "key-as-id", "provider-key-as-env", "password-in-base-url"])
def test_a_value_the_schema_refuses_is_not_quoted_in_the_error(edit: Any, key: str) -> None:
    """Helm's schema message quotes the value a pattern refused; where a secret was pasted into
    the wrong field, that printed it on the terminal and into CI logs."""
    secret = "S3cretValue1234567890abcdef"
    values = copy.deepcopy(chart_values([LOCAL]))
    edit(values, secret)
    with pytest.raises(RenderError, match=key) as info:
        render_values(values)
    assert secret not in str(info.value)


@pytest.mark.parametrize("name", ["chat@restricted", "chat\n", "chat\x00"])
def test_a_model_name_that_cannot_route_fails_the_render_saying_why(name: str) -> None:
    """`@` joins a model and a tier in route names, and a control character cannot travel in
    the route header: Helm refuses them, with the schema's reason, before anything starts."""
    values = copy.deepcopy(chart_values([LOCAL]))
    values["models"][0]["name"] = name
    with pytest.raises(RenderError, match=r"models\[0\]\.name: .* \(no control characters and no @, which joins"):
        render_values(values)


@pytest.mark.parametrize(("limit", "heap"), [("2Gi", int(2 * 2**30 * 0.9)), ("512Mi", int(512 * 2**20 * 0.9)),
                                             ("1G", int(10**9 * 0.9)), (1500000000, int(1.5e9 * 0.9))])
def test_envoy_refuses_new_requests_near_its_memory_limit(limit: object, heap: int) -> None:
    values = copy.deepcopy(chart_values([LOCAL]))
    values["deployment"]["envoy"]["resources"]["limits"]["memory"] = limit
    overload = yaml.safe_load(render_values(values)["envoy.yaml"])["overload_manager"]
    [monitor] = [m for m in overload["resource_monitors"] if m["name"] == "envoy.resource_monitors.fixed_heap"]
    assert monitor["typed_config"]["max_heap_size_bytes"] == heap
    actions = {a["name"]: a["triggers"][0] for a in overload["actions"]}
    assert actions["envoy.overload_actions.stop_accepting_requests"]["threshold"]["value"] == 0.9


def test_a_memory_limit_that_is_no_quantity_fails_the_render_naming_the_key() -> None:
    values = copy.deepcopy(chart_values([LOCAL]))
    values["deployment"]["envoy"]["resources"]["limits"]["memory"] = "lots"
    with pytest.raises(RenderError, match=r"deployment.envoy.resources.limits.memory \"lots\""):
        render_values(values)


@pytest.mark.parametrize(("retry", "named"), [
    ({"perTryTimeout": "0.5s"}, "perTryTimeout"), ({"perTryIdleTimeout": "2s"}, "perTryIdleTimeout"),
    ({"retryOn": "connect-failure, reset"}, "retryOn: reset (it retries a reset after the request went out"),
    ({"retryOn": "5xx,connect-failure"}, "retryOn: 5xx (it retries a reset"),
    ({"retryOn": "gateway-error"}, "retryOn: gateway-error (it retries a reset")])
def test_with_budgets_no_retry_abandons_an_attempt_a_provider_may_bill(retry: dict[str, str], named: str) -> None:
    """A reservation covers one billed attempt: a retry after the provider got the request
    (a per-try timeout, a reset after the request went out) would leave the first bill
    outside every budget. With budgets on the render refuses them; without, they render."""
    values = copy.deepcopy(chart_values([LOCAL]))
    values["envoy"]["retry"].update(retry)
    with pytest.raises(RenderError, match=re.escape(f"values: envoy.retry {named}")) as info:
        render_values(values)
    assert "would move on from an attempt a provider may already be working on" in str(info.value)
    values["budgets"].pop("orgLimit")
    for principal in values["teams"] + values["keys"]:
        principal.pop("budget", None)
        principal.pop("rateLimits", None)
    assert "retry_policy" in render_values(values)["envoy.yaml"]


def test_the_default_retry_policy_retries_a_reset_only_before_the_request_went_out() -> None:
    envoy = render_values(copy.deepcopy(chart_values([LOCAL])))["envoy.yaml"]
    policies = re.findall(r"retry_policy:\n\s+retry_on: (\S+)\n\s+retriable_status_codes", envoy)
    assert policies and set(policies) == {"retriable-status-codes,reset-before-request,connect-failure,refused-stream"}


def test_an_ext_proc_stream_is_retried_only_when_no_worker_had_it() -> None:
    """A stream that drew a dead worker's socket goes to another worker (a request holds two
    streams, so a dead worker would fail nearly every request until the health check noticed);
    one a worker already had is never replayed (it may have reserved budget). Retries have
    room beside the streams, and streams go only to healthy workers while one is healthy,
    with health changes applied at once (test_worker_faults measures the bounds)."""
    envoy = yaml.safe_load(render_values(copy.deepcopy(chart_values([LOCAL])))["envoy.yaml"])
    services = [f["typed_config"]["grpc_service"] for f in _all_filters(envoy)
                if f["name"] == "envoy.filters.http.ext_proc"]
    assert len(services) > 1
    for service in services:
        assert service["envoy_grpc"] == {"cluster_name": "gateway_extproc"}
        retry = service["retry_policy"]
        assert retry["retry_on"] == "reset-before-request,connect-failure,refused-stream"
        assert [p["name"] for p in retry["retry_host_predicate"]] == ["envoy.retry_host_predicates.previous_hosts"]
    extproc = cluster(envoy, "gateway_extproc")
    [limits] = extproc["circuit_breakers"]["thresholds"]
    assert limits["max_retries"] == limits["max_requests"]
    # Envoy rounds the panic threshold to a whole percent: below 0.5 it is no panic at all, and
    # with every worker out of rotation (busy past a check) every request failed 503.
    assert extproc["common_lb_config"] == {"healthy_panic_threshold": {"value": 1}, "update_merge_window": "0s"}
    [check] = extproc["health_checks"]
    assert (check["timeout"], check["interval"], check["no_traffic_interval"]) == ("1s", "0.5s", "0.5s")


def _all_filters(node: Any) -> list[dict[str, Any]]:
    """Every HTTP filter anywhere in a config: the listener's and the clusters' upstream ones."""
    if isinstance(node, list):
        return [f for item in node for f in _all_filters(item)]
    if not isinstance(node, dict):
        return []
    found = [f for f in node.get("http_filters") or [] if isinstance(f, dict) and "name" in f]
    return found + [f for key, value in node.items() if key != "http_filters" for f in _all_filters(value)]


def test_a_render_over_a_running_gateways_config_replaces_each_file_whole(tmp_path: Path) -> None:
    """Workers reload gateway.yaml once it stands still (reload.py); a render into their
    directory renames each new file over the old one, so no worker can read a prefix of it
    (the file's inode changes, and nothing half-written is left beside it)."""
    from gateway_extproc.render import render

    render([LOCAL], tmp_path)
    before = {p.name: p.stat().st_ino for p in tmp_path.iterdir()}
    render([LOCAL], tmp_path)
    after = {p.name: p.stat().st_ino for p in tmp_path.iterdir()}
    assert after.keys() == before.keys() and "gateway.yaml" in after
    assert all(after[name] != before[name] for name in after)


@pytest.mark.parametrize("daily", [0.00005, 0.0000001, 2.5e-7])
def test_a_budget_below_a_ten_thousandth_of_a_dollar_renders_and_loads(tmp_path: Path, daily: float) -> None:
    """Helm writes a float under 1e-4 as `5e-05`, which YAML 1.1 (PyYAML) reads as a string:
    until 2026-12-05 the render refused a team's `daily: 0.00005` as "must be a dollar
    amount". gateway.yaml is read as YAML 1.2 reads numbers, so it loads as the amount."""
    from gateway_extproc.render import render

    values = yaml.safe_load(LOCAL.read_text())
    values["teams"][0]["budget"] = {"daily": daily}
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(values))
    render([tmp_path / "v.yaml"], tmp_path / "out")
    loaded = config.load(tmp_path / "out" / "gateway.yaml")
    assert loaded.teams[values["teams"][0]["name"]].budget.daily_nano == round(daily * 1e9)
