"""The chart's `helm test` pod (templates/tests/test-gateway.yaml) runs its exact command
against a real gateway: it passes when Envoy and the ext_proc answer, and fails when nothing
does."""

from __future__ import annotations

import socket
import subprocess
import sys

import helm_python
import yaml

from gateway_extproc.render import CHART, chart_values

from .conftest import Gateway


def pod_command(port_url: str) -> list[str]:
    chart = helm_python.Chart.load(str(CHART))
    try:
        rendered = chart.render(chart_values([]), name="gw", namespace="ai")
    finally:
        chart.close()
    [pod] = [yaml.safe_load(text) for path, text in rendered.items() if path.endswith("tests/test-gateway.yaml")]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    [c] = pod["spec"]["containers"]
    *command, url = c["command"]
    assert url == "http://gw-gateway-extproc.ai.svc:80/v1/chat/completions"
    assert command[0] == "python3"
    return [sys.executable, *command[1:], port_url + "/v1/chat/completions"]


def test_helm_test_passes_through_envoy_and_the_extproc(gateway: Gateway) -> None:
    proc = subprocess.run(pod_command(gateway.url), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "401 missing_api_key" in proc.stdout


def test_helm_test_fails_when_nothing_answers() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(pod_command(f"http://127.0.0.1:{port}"), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
