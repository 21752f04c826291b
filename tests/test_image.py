"""The ext_proc image (Containerfile), built and run for real.

No registry is reachable in CI, so the base comes from mmdebstrap (Debian bookworm, python3,
python3-venv, ca-certificates) and is imported into podman; pip inside the build uses this
machine's package index settings and CA bundle, mounted read-only. Containers cannot start
in the CI sandbox (crun cannot set rlimits), so the test creates a container without starting
it, mounts its root filesystem and runs the image's entrypoint there with chroot, as the
image's user, with the image's environment and OTLP export configured — the import that
failed before the packaging fix — then asks every worker for gRPC health through its socket.

Needs root, podman and mmdebstrap; skipped without them, except under CI (`CI` set), where a
machine that has the tools but cannot run the test fails instead of skipping silently.
One image build per run (several minutes); the base image is reused when already present.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway_extproc.render import chart_values, render_values

REPO = Path(__file__).resolve().parents[1]
BASE = "localhost/gateway-extproc-test-base:bookworm"
IMAGE = "localhost/gateway-extproc-test:latest"
PODMAN = ["podman", "--cgroup-manager=cgroupfs"]


def _unavailable() -> str | None:
    missing = [tool for tool in ("podman", "mmdebstrap", "chroot") if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)}"
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("podman and mmdebstrap are installed but the image test needs root (CI is set: not skipping)")
        return "needs root (chroot, podman image storage)"
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=_unavailable() or "")


def run(*argv: str, timeout: float = 1800) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv[:4]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def pip_settings(tmp: Path) -> list[str]:
    """podman build volumes giving pip this machine's index and CA bundle (read-only)."""
    settings: dict[str, str] = {}
    for line in run("python3", "-m", "pip", "config", "list").splitlines():
        key, _, value = line.partition("=")
        settings[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    for key in ("index-url", "extra-index-url", "trusted-host", "cert"):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            settings[key] = env
    conf = configparser.ConfigParser()
    conf["global"] = {}
    for key in ("index-url", "extra-index-url", "trusted-host"):
        # Local file:// indexes are not inside the build container.
        urls = [u for u in settings.get(key, "").split() if not u.startswith("file:")]
        if urls:
            conf["global"][key] = " ".join(urls)
    volumes: list[str] = []
    cert = settings.get("cert") or os.environ.get("SSL_CERT_FILE")
    if cert and Path(cert).is_file():
        conf["global"]["cert"] = "/etc/ssl/certs/host-ca-bundle.crt"
        volumes += ["--volume", f"{cert}:/etc/ssl/certs/host-ca-bundle.crt:ro"]
    with (tmp / "pip.conf").open("w") as f:
        conf.write(f)
    return [*volumes, "--volume", f"{tmp / 'pip.conf'}:/etc/pip.conf:ro"]


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    tmp = tmp_path_factory.mktemp("image")
    if subprocess.run([*PODMAN, "image", "exists", BASE]).returncode != 0:
        run("mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
            str(tmp / "base.tar"))
        run(*PODMAN, "import", str(tmp / "base.tar"), BASE)
        (tmp / "base.tar").unlink()
    run(*PODMAN, "build", "--isolation=chroot", "--network=host", "--build-arg", f"BASE={BASE}",
        *pip_settings(tmp), "-f", str(REPO / "Containerfile"), "-t", IMAGE, str(REPO))
    [inspect] = json.loads(run(*PODMAN, "image", "inspect", IMAGE))
    container = run(*PODMAN, "create", IMAGE).strip()
    try:
        yield Path(run(*PODMAN, "mount", container).strip()), inspect["Config"]
    finally:
        subprocess.run([*PODMAN, "umount", container], capture_output=True)
        subprocess.run([*PODMAN, "rm", "-f", container], capture_output=True)
        subprocess.run([*PODMAN, "rmi", "-f", IMAGE], capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_image_metadata_and_final_stage(rootfs: tuple[Path, dict]) -> None:
    root, config = rootfs
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["gateway-extproc"]
    for compiler in ("gcc", "cc", "c++", "make"):
        assert not (root / "usr/bin" / compiler).exists(), compiler
    venv = root / "opt/gateway-extproc/bin"
    assert (venv / "gateway-extproc").exists() and not (venv / "pip").exists()
    # The packaging fix: Envoy's messages are vendored, opentelemetry-proto is the only copy.
    site = next((root / "opt/gateway-extproc/lib").glob("python3*/site-packages"))
    assert not list(site.glob("xds_protos*")) and (site / "gateway_extproc/_proto").is_dir()


def test_serve_with_otlp_answers_grpc_health_as_uid_65532(rootfs: tuple[Path, dict]) -> None:
    root, config = rootfs
    metrics_port = free_port()
    values = chart_values([])
    values["extproc"]["metrics"] = {"address": "127.0.0.1", "port": metrics_port}
    rendered = render_values(values)
    gateway_yaml = yaml.safe_load(rendered["gateway.yaml"])
    (root / "etc/gateway").mkdir(exist_ok=True)
    (root / "etc/gateway/gateway.yaml").write_text(rendered["gateway.yaml"])
    env = dict(item.split("=", 1) for item in config["Env"])
    # Nothing listens there: the exporter must import and start, export failures are only logged.
    env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}", "OPENAI_API_KEY": "sk-test"}
    user = config["User"]
    argv = [shutil.which("chroot") or "chroot", f"--userspec={user}", str(root), *config["Entrypoint"], *config["Cmd"]]
    proc = subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Overlay paths exceed a Unix socket address (108 bytes): connect through a short link.
        link = Path(tempfile.mkdtemp(prefix="gwimg")) / "r"
        link.symlink_to(root)
        sockets = [link / address.removeprefix("unix:///") for address in gateway_yaml["listen"]]
        deadline = time.monotonic() + 60
        statuses: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                statuses = [health(s) for s in sockets]
            except grpc.RpcError:
                time.sleep(0.5)
                continue
            if all(s == health_pb2.HealthCheckResponse.SERVING for s in statuses):
                break
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert statuses and all(s == health_pb2.HealthCheckResponse.SERVING for s in statuses), statuses
        assert all(s.stat().st_uid == 65532 for s in sockets)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert "extproc_worker_exited" not in out and "Traceback" not in out, out[-3000:]


def health(sock: Path) -> int:
    with grpc.insecure_channel(f"unix://{sock}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3).status
