"""A real gateway for integration tests: the Helm chart rendered with helm-python-sdk,
real Envoy, real ext_proc processes, and two mock providers with different keys."""

from __future__ import annotations

import base64
import copy
from contextlib import contextmanager
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import httpx2
import orjson
import pytest

from gateway_extproc import keys
from gateway_extproc.localstack import LocalStack, StartError, free_port
from gateway_extproc.mock_provider import SEALED, seal
from gateway_extproc.render import chart_values

from .local_cli import children

REPO = Path(__file__).resolve().parents[2]
DEMO_KEY = "gwk_demo_local-only-demo-key-not-for-production"
BEDROCK_KEY_ID = "AKIDGATEWAYTEST"  # the Bedrock provider signs with BEDROCK_KEY_ID and the backup key


def audit_records(audit: Path, crashed: bool = False) -> list[dict[str, Any]]:
    """Every record line of an audit directory, strictly parsed. After a SIGKILL (`crashed`) a
    segment may end in a line the kill cut short mid-write; the restarted writer names it in
    its signed resume checkpoint, which `audit verify` checks (docs/audit.md, Durability)."""
    out = []
    for seg in sorted(audit.rglob("*.jsonl")):
        lines = seg.read_bytes().split(b"\n")
        if crashed:
            lines.pop()  # b"" after a whole last line, else the cut one
        out += [orjson.loads(x) for x in lines if x]
    return out


@dataclass
class Gateway:
    stack: LocalStack
    key: str  # demo key: every model
    restricted_key: str  # may use default-chat only
    expired_key: str
    primary: str  # mock provider URL (provider "mock", key from env)
    backup: str  # mock provider URL (provider "mock-backup", key from a file)
    primary_key: str
    backup_key: str

    @property
    def url(self) -> str:
        return self.stack.url

    def received(self, mock: str) -> list[dict[str, Any]]:
        return httpx.get(f"{mock}/_mock/requests").json()

    def reset(self) -> None:
        for mock in (self.primary, self.backup):
            httpx.post(f"{mock}/_mock/reset").raise_for_status()

    def logs(self) -> str:
        return "".join(self.stack.log_path(n).read_text(errors="replace") for n in ("extproc", "envoy"))


def build_gateway(workdir: Path, env: dict[str, str] | None = None,
                  customize: Callable[[dict[str, Any]], None] | None = None, share_mocks: Gateway | None = None) -> Gateway:
    """A started stack. `customize` edits the values before rendering; `share_mocks` reuses
    another gateway's mock providers (a second replica in front of the same providers).
    `free_port` only finds a port free now: when another process (a client's ephemeral port)
    takes one before the stack binds it, the stack is built again on other ports."""
    for _ in range(2):
        try:
            return _build_gateway(workdir, env, customize, share_mocks)
        except StartError as err:
            if not ("Address already in use" in str(err) or " is in use: " in str(err)):
                raise
    return _build_gateway(workdir, env, customize, share_mocks)


def _build_gateway(workdir: Path, env: dict[str, str] | None, customize: Callable[[dict[str, Any]], None] | None,
                   share_mocks: Gateway | None) -> Gateway:
    if share_mocks is not None:
        primary_port, backup_port = (int(u.rsplit(":", 1)[1]) for u in (share_mocks.primary, share_mocks.backup))
        primary_key, backup_key = share_mocks.primary_key, share_mocks.backup_key
    else:
        primary_port, backup_port = free_port(), free_port()
        primary_key, backup_key = "sk-primary-" + keys.generate("p")[-20:], "sk-backup-" + keys.generate("b")[-20:]
    restricted, expired = keys.generate("restricted"), keys.generate("expired")
    values = copy.deepcopy(chart_values([REPO / "helm" / "values-local.yaml"]))
    values["envoy"]["listener"]["port"] = free_port()
    values["envoy"]["admin"]["port"] = free_port()
    values["envoy"]["metrics"]["port"] = free_port()
    values["extproc"]["socketDir"] = str(workdir / "sock")
    values["extproc"]["metrics"]["port"] = free_port()
    values["audit"]["dir"] = str(workdir / "audit")
    values["audit"]["signingKey"]["file"] = str(workdir / "audit-signing.key")
    workdir.mkdir(parents=True, exist_ok=True)
    # values-local points providers at mock instances on :8081 (key from env) and :8082
    # (key from a file); here they get free ports and keys of their own.
    ports = {"8081": primary_port, "8082": backup_port}
    for p in values["providers"]:
        host, port = p["baseURL"].split("//", 1)[1].split("/", 1)[0].split(":")
        p["baseURL"] = p["baseURL"].replace(f"{host}:{port}", f"127.0.0.1:{ports[port]}", 1)
        if "file" in p["credential"]:
            cred_file = workdir / f"{p['name']}.key"
            cred_file.write_text(f"{BEDROCK_KEY_ID}:{backup_key}" if p["kind"] == "bedrock" else backup_key)
            p["credential"] = {"file": str(cred_file)}
    past = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
    values["keys"] += [
        {"id": "restricted", "sha256": keys.digest(restricted), "team": "demo", "models": ["default-chat"]},
        {"id": "expired", "sha256": keys.digest(expired), "team": "demo", "expiresAt": past},
    ]
    if customize is not None:
        customize(values)
    mocks = {} if share_mocks is not None else {primary_port: primary_key, backup_port: backup_key}
    stack = LocalStack(values, workdir, {"MOCK_PROVIDER_API_KEY": primary_key, **(env or {})}, mocks)
    stack.start()
    return Gateway(stack, DEMO_KEY, restricted, expired, f"http://127.0.0.1:{primary_port}",
                   f"http://127.0.0.1:{backup_port}", primary_key, backup_key)


@contextmanager
def running_gateway(prefix: str, **kwargs: Any) -> Iterator[Gateway]:
    """A gateway of its own (fresh state) in a temp dir, stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        gw = build_gateway(Path(tmp), **kwargs)
        try:
            yield gw
        finally:
            gw.stack.stop()


@contextmanager
def two_replicas(prefix: str, customize: Callable[[dict[str, Any], int], None]) -> Iterator[tuple[Gateway, Gateway]]:
    """Two replicas (their own Envoy and ext_proc) in front of the same mock providers;
    `customize(values, replica index)` edits each one's values."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        first = build_gateway(Path(tmp) / "a", customize=lambda v: customize(v, 0))
        try:
            second = build_gateway(Path(tmp) / "b", customize=lambda v: customize(v, 1), share_mocks=first)
            try:
                yield first, second
            finally:
                second.stack.stop()
        finally:
            first.stack.stop()


def _sealed(request: Any) -> None:
    """Moves a request's `x-mock-*` controls into one `x-mock-sealed` header the mock provider
    opens (mock_provider.seal): the gateway classifies request headers like the body, and
    the replies tests ask the mock for hold the very values it must stop (a card, to see the
    output scanner redact it). Sealed, they pass as an encrypted value would, unread. A test
    that wants the gateway to read a header uses another name (test_header_classification)."""
    controls = {k: v for k, v in request.headers.items() if k.startswith("x-mock-") and k != SEALED}
    if controls:
        for k in controls:
            del request.headers[k]
        request.headers[SEALED] = seal(controls)


@pytest.fixture(scope="session", autouse=True)
def sealed_mock_controls() -> Iterator[None]:
    """Every HTTP client of the integration tests seals its mock controls (`_sealed`): httpx,
    and httpx2, which the openai and anthropic SDKs use."""
    clients = [c for module in (httpx, httpx2) for c in (module.Client, module.AsyncClient)]
    originals = [c.send for c in clients]

    def sealing(send: Any, is_async: bool) -> Any:
        if is_async:
            async def asend(self: Any, request: Any, **kwargs: Any) -> Any:
                _sealed(request)
                return await send(self, request, **kwargs)
            return asend

        def ssend(self: Any, request: Any, **kwargs: Any) -> Any:
            _sealed(request)
            return send(self, request, **kwargs)
        return ssend

    for i, c in enumerate(clients):
        c.send = sealing(originals[i], i % 2 == 1)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for c, send in zip(clients, originals):
            c.send = send  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def gateway() -> Iterator[Gateway]:
    with running_gateway("gw-it-") as gw:
        yield gw


@pytest.fixture
def gw(gateway: Gateway) -> Gateway:
    """The shared gateway with the mock providers' records and behaviours cleared."""
    gateway.reset()
    return gateway


def add_provider_models(values: dict[str, Any]) -> None:
    """values-local plus the provider kinds it has no model for: bedrock-chat and gemini3-chat."""
    def model(name: str, provider: str, backend: str) -> dict[str, Any]:
        return {"name": name, "tokenizer": "o200k_base", "maxOutputTokens": 1024, "backends": [
            {"provider": provider, "model": backend, "pricing": {"input": 1.0, "output": 1.0}, "maxTier": "internal"}]}
    values["models"] += [model("bedrock-chat", "mock-bedrock", "amazon.nova-mock-v1:0"),
                         model("gemini3-chat", "mock-gemini", "gemini-3-mock-pro")]


def workers(gw: Gateway) -> list[int]:
    """The live ext_proc workers of `serve` (a killed one stays a child, as a zombie, until
    `serve` reaps it)."""
    live = []
    for pid in children(gw.stack.procs["extproc"].pid):
        try:
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in "ZX":
                live.append(pid)
        except OSError:
            pass
    return sorted(live)


def workers_healthy(gw: Gateway) -> bool:
    """Every worker (`extproc.processes`) up and back in the rotation of Envoy's health checks."""
    n = gw.stack.values["extproc"]["processes"]
    clusters = httpx.get(f"{gw.stack.admin_url}/clusters", timeout=5).text
    health = [line for line in clusters.splitlines() if line.startswith("gateway_extproc::") and "::health_flags::" in line]
    return len(workers(gw)) == n and len(health) == n and all(line.endswith("::healthy") for line in health)


def all_healthy(gw: Gateway, timeout: float = 20) -> None:
    """Waits until `workers_healthy` (after a kill: the supervisor's restart)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if workers_healthy(gw):
            return
        time.sleep(0.1)
    raise AssertionError(f"workers not back: {workers(gw)}")


def raw_events(*events: bytes) -> str:
    """The mock provider's `x-mock-raw-events` control: these bytes, chunk by chunk, as the
    provider's answer (docs/mock-provider.md)."""
    return orjson.dumps([base64.b64encode(e).decode() for e in events]).decode()


@contextmanager
def envoy_survives(gw: Gateway) -> Iterator[Gateway]:
    """`gw` reset for a test, and after it Envoy still the same live, ready process."""
    gw.reset()
    envoy = gw.stack.procs["envoy"]
    yield gw
    assert envoy.poll() is None, "Envoy died"
    assert httpx.get(gw.stack.admin_url + "/ready").status_code == 200


def nothing_held(redis: Any, prefix: str = "gw:{local}:") -> None:
    """Waits until the budget store holds no reservation (settlements run after the response,
    in the background), then checks none is held or expired unsettled: every request was
    settled or released. `redis`: a tests.redis_server.RedisServer."""
    import redis as redis_py

    client = redis_py.Redis(host=redis.host, port=redis.port)
    try:
        deadline = time.monotonic() + 15
        while client.hlen(f"{prefix}reservations") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        held = client.hlen(f"{prefix}reservations"), client.hlen(f"{prefix}reservations:expired")
        assert held == (0, 0), f"reservations held, expired unsettled: {held}"
    finally:
        client.close()


def config_dir_is(values: dict[str, Any], workdir: Path) -> None:
    """Envoy and the ext_proc read their files from `workdir` (configDir; the SDS files beside
    them, outside Kubernetes), and the directories the chart mounts go beside it: in a
    Deployment configDir is a read-only ConfigMap volume with no mount point inside it, and
    the chart refuses the values that would put one there."""
    values["configDir"] = str(workdir)
    values["extproc"]["socketDir"] = str(workdir.parent / f"{workdir.name}-sock")
    values["audit"]["dir"] = str(workdir.parent / f"{workdir.name}-audit")


def no_budgets(values: dict[str, Any]) -> None:
    """values-local without any budget or token rate limit: nothing reserves, so no stream is
    cut at a grant (a test's scripted provider writing far more tokens an event than a
    request may be granted would be cut: docs/budgets.md)."""
    values["budgets"].pop("orgLimit", None)
    for team in values["teams"]:
        team.pop("budget", None)
        team.pop("rateLimits", None)
    values["keys"] = [k for k in values["keys"] if "budget" not in k]
