"""The command line: every user error is one `error:` line naming the file, the key path
(with list indexes) and the fix, never a traceback; help on every argument."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from gateway_extproc import __main__ as cli
from gateway_extproc import server
from gateway_extproc.render import load_values

from .integration.local_cli import VALUES_LOCAL, free_ports_values, processes_mentioning

LOCAL = str(VALUES_LOCAL)


@pytest.fixture(autouse=True)
def _logging_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() points structlog at this test's captured stdout, which closes after it; the
    loggers would cache it and fail in later tests. The tests here read error lines only."""
    monkeypatch.setattr(cli.logs, "configure", lambda *a, **k: None)
Case = Callable[[Path], list[str]]


def _write(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


UTF16 = "version: 1\n".encode("utf-16")


def _write_bytes(tmp: Path, name: str, data: bytes) -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


def _values(tmp: Path, edit: Callable[[dict], None], name: str = "v.yaml") -> str:
    values = load_values([VALUES_LOCAL])
    edit(values)
    return _write(tmp, name, yaml.safe_dump(values, sort_keys=False))


def _rendered(tmp: Path, edit: Callable[[dict], None] | None = None) -> str:
    """A gateway.yaml rendered from values-local, optionally edited."""
    assert cli.main(["render", "--values", LOCAL, "--out", str(tmp / "out")]) == 0
    path = tmp / "out" / "gateway.yaml"
    if edit is not None:
        doc = yaml.safe_load(path.read_text())
        edit(doc)
        path.write_text(yaml.safe_dump(doc))
    return str(path)


def _set_backend_provider(v: dict) -> None:
    v["models"][0]["backends"][1]["provider"] = "mock-bakup"


def _set(path: str, value: object) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        *parents, last = path.split(".")
        for part in parents:
            doc = doc[int(part)] if part.isdigit() else doc.setdefault(part, {})
        doc[int(last) if last.isdigit() else last] = value
    return edit


PAST = (datetime.now(timezone.utc) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

# (id, argv builder, expected substring of the one error line)
CASES: list[tuple[str, Case, str]] = [
    # render
    ("render-values-missing", lambda t: ["render", "--values", str(t / "nope.yaml"), "--out", str(t / "o")],
     "nope.yaml: values file not found; check the path"),
    ("render-values-not-yaml", lambda t: ["render", "--values", _write(t, "b.yaml", "a: [1,\n"), "--out", str(t)],
     "b.yaml: not valid YAML"),
    ("render-values-a-list", lambda t: ["render", "--values", _write(t, "b.yaml", "- 1\n"), "--out", str(t)],
     "b.yaml: must be a mapping of values"),
    ("render-values-a-directory", lambda t: ["render", "--values", str(t), "--out", str(t / "o")],
     "is a directory; give a values file"),
    ("render-misspelt-provider", lambda t: ["render", "--values", _values(t, _set_backend_provider), "--out", str(t)],
     "models[0].backends[1].provider is 'mock-bakup', not in providers; did you mean 'mock-backup'?"),
    ("render-schema-typo", lambda t: ["render", "--values", LOCAL, "--values",
                                      _write(t, "typo.yaml", "envoy: {listner: {port: 1}}\n"), "--out", str(t)],
     "envoy.listner is not a key the chart knows (a typo?); did you mean 'listener'?"),
    ("render-schema-typo-in-list", lambda t: ["render", "--values",
                                              _values(t, _set("models.2.backends.0.prority", 1)), "--out", str(t)],
     "models[2].backends[0].prority is not a key the chart knows (a typo?); did you mean 'priority'?"),
    ("render-wrong-type", lambda t: ["render", "--values", _values(t, _set("models.0.backends.1.priority", "high")),
                                     "--out", str(t)],
     "models[0].backends[1].priority: got string, want integer"),
    ("render-memory-budgets-replicas", lambda t: ["render", "--values", LOCAL, "--values",
                                                  _write(t, "r.yaml", "deployment: {replicas: 3}\n"), "--out", str(t)],
     "budgets.store is memory but up to 3 replicas run"),
    ("render-key-team-missing", lambda t: ["render", "--values", _values(t, _set("keys.1.team", "demoo")),
                                           "--out", str(t)],
     "keys[1].team is 'demoo', not in teams; add it to teams or fix the name"),
    ("render-out-is-a-file", lambda t: ["render", "--values", LOCAL, "--out", _write(t, "f", "")],
     "f: File exists"),
    # check-config
    ("check-missing", lambda t: ["check-config", str(t / "gateway.yaml")],
     "gateway.yaml: file not found; render it with `gateway-extproc render`"),
    ("check-given-values", lambda t: ["check-config", LOCAL],
     "version is missing: this looks like Helm values, not a gateway.yaml; render it with"),
    ("check-not-yaml", lambda t: ["check-config", _write(t, "g.yaml", "version: [\n")], "g.yaml: not valid YAML"),
    ("check-bad-backend", lambda t: ["check-config", _rendered(t, _set("models.0.backends.1.provider", "azure"))],
     "models[0].backends[1].provider is 'azure', not in providers; add it or fix the name"),
    # serve
    ("serve-missing", lambda t: ["serve", "--config", str(t / "gateway.yaml")], "gateway.yaml: file not found"),
    ("serve-given-values", lambda t: ["serve", "--config", LOCAL], "this looks like Helm values"),
    ("serve-bad-key", lambda t: ["serve", "--config", _rendered(t, _set("keys.0.team", "nobody"))],
     "keys[0].team is 'nobody', not in teams"),
    ("serve-memory-two-processes", lambda t: ["serve", "--config", _rendered(t, _set("listen", ["unix:///tmp/a",
                                                                                              "unix:///tmp/b"]))],
     "budgets.store is memory, which one process holds, but listen has 2 ext_proc processes"),
    # keys create
    ("keys-expires-word", lambda t: ["keys", "create", "--values", LOCAL, "--team", "demo", "--expires", "tomorrow"],
     "--expires 'tomorrow' is not an ISO 8601 timestamp; write e.g. 2027-01-31T00:00:00Z"),
    ("keys-expires-past", lambda t: ["keys", "create", "--values", LOCAL, "--team", "demo", "--expires", PAST],
     "is in the past"),
    ("keys-team-unknown", lambda t: ["keys", "create", "--values", LOCAL, "--team", "payments"],
     "--team 'payments' is not in teams of"),
    ("keys-team-odd-name", lambda t: ["keys", "create", "--values", LOCAL, "--team", "X_bad Team"],
     "--team 'X_bad Team' is not in teams"),
    ("keys-id-rules", lambda t: ["keys", "create", "--values", LOCAL, "--team", "demo", "--id", "Bad_ID"],
     "--id 'Bad_ID' breaks the id rules (1-63 characters: lowercase letters, digits and '-'"),
    ("keys-id-taken", lambda t: ["keys", "create", "--values", LOCAL, "--team", "demo", "--id", "tiny"],
     "--id 'tiny' is already keys[1].id in"),
    ("keys-model-unknown", lambda t: ["keys", "create", "--values", LOCAL, "--team", "demo", "--models",
                                      "default-chat,gpt-5"], "--models names 'gpt-5', which is not in models"),
    ("keys-values-missing", lambda t: ["keys", "create", "--values", str(t / "v.yaml"), "--team", "demo"],
     "v.yaml: values file not found"),
    ("keys-no-values", lambda t: ["keys", "create", "--team", "demo"],
     "keys create needs --values FILE"),
    # local (everything here fails before a process starts)
    ("local-values-missing", lambda t: ["local", "--values", str(t / "nope.yaml"), "--workdir", str(t / "run")],
     "nope.yaml: values file not found"),
    ("local-schema-typo", lambda t: ["local", "--values", LOCAL, "--values", str(free_ports_values(t)), "--values",
                                     _write(t, "typo.yaml", "extproc: {procesess: 1}\n"), "--workdir", str(t / "run")],
     "extproc.procesess is not a key the chart knows (a typo?); did you mean 'processes'?"),
    ("local-key-team-missing", lambda t: ["local", "--values", _values(t, _set("keys.1.team", "demoo")), "--values",
                                          str(free_ports_values(t)), "--workdir", str(t / "run")],
     "keys[1].team is 'demoo', not in teams"),
    # files that are not UTF-8 text (a UTF-16 save from a Windows editor): a traceback before
    ("render-values-not-utf8", lambda t: ["render", "--values", _write_bytes(t, "v.yaml", UTF16), "--out", str(t)],
     "v.yaml: is not UTF-8 text (byte 0xff at offset 0); save it as UTF-8"),
    ("check-not-utf8", lambda t: ["check-config", _write_bytes(t, "g.yaml", UTF16)],
     "g.yaml: is not UTF-8 text (byte 0xff at offset 0); save it as UTF-8"),
    ("serve-not-utf8", lambda t: ["serve", "--config", _write_bytes(t, "g.yaml", UTF16)],
     "g.yaml: is not UTF-8 text (byte 0xff at offset 0); save it as UTF-8"),
    ("keys-values-not-utf8", lambda t: ["keys", "create", "--values", _write_bytes(t, "v.yaml", UTF16), "--team", "d"],
     "v.yaml: is not UTF-8 text (byte 0xff at offset 0); save it as UTF-8"),
    ("local-values-not-utf8", lambda t: ["local", "--values", _write_bytes(t, "v.yaml", UTF16), "--workdir",
                                         str(t / "run")], "v.yaml: is not UTF-8 text"),
    # the command line itself
    ("no-command", lambda t: [], "the following arguments are required: COMMAND"),
    ("unknown-command", lambda t: ["serv"], "invalid choice: 'serv'"),
    ("keys-no-subcommand", lambda t: ["keys"], "the following arguments are required: {create,list,rotate,revoke,update,admin-token}"),
    ("mock-cert-without-key", lambda t: ["mock-provider", "--tls-cert", _write(t, "c.pem", "")],
     "--tls-cert and --tls-key go together"),
]


@pytest.mark.parametrize(("make_argv", "expected"), [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_user_error_is_one_error_line(make_argv: Case, expected: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv = make_argv(tmp_path)
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code in (1, 2)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]


def test_at_least_25_bad_inputs() -> None:
    assert len(CASES) >= 25


def _actions(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(f"{parser.prog} {a}", x) for a, x in _actions(sub)] or []
                found.append((f"{parser.prog} {name}", action))
        else:
            found.append((parser.prog, action))
    return found


def test_every_argument_has_help() -> None:
    for prog, action in _actions(cli.build_parser()):
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            assert all(helps.values()), (prog, helps)
        else:
            assert action.help and action.help != argparse.SUPPRESS, (prog, action.dest)


def test_help_shows_no_internal_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "SUPPRESS" not in out and "serve-one" not in out and "cmd" not in out
    for command in ("serve", "render", "keys", "check-config", "mock-provider", "local"):
        assert f"    {command}" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("gateway-extproc 0.")


def test_keys_create_output_renders_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What keys create prints, pasted into the values it names, renders and passes the check."""
    future = (datetime.now(timezone.utc) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert cli.main(["keys", "create", "--values", LOCAL, "--team", "demo", "--models", "default-chat",
                     "--expires", future]) == 0
    out = capsys.readouterr().out
    key = out.splitlines()[1].strip()
    entry = yaml.safe_load(out.split(":\n", 2)[2])[0]
    assert key.startswith(f"gwk_{entry['id']}_") and entry["team"] == "demo" and entry["models"] == ["default-chat"]
    values = load_values([VALUES_LOCAL])
    values["keys"].append(entry)
    path = _write(tmp_path, "v.yaml", yaml.safe_dump(values))
    assert cli.main(["render", "--values", path, "--out", str(tmp_path / "out")]) == 0
    assert cli.main(["check-config", str(tmp_path / "out" / "gateway.yaml")]) == 0


def test_default_key_id_comes_from_the_team_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    values = load_values([VALUES_LOCAL])
    values["teams"].append({"name": "Data Science_EU"})
    path = _write(tmp_path, "v.yaml", yaml.safe_dump(values))
    assert cli.main(["keys", "create", "--values", path, "--team", "Data Science_EU"]) == 0
    assert "gwk_data-science-eu-" in capsys.readouterr().out


def _busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_mock_provider_on_a_busy_port(capsys: pytest.CaptureFixture[str]) -> None:
    with _busy_port() as s:
        port = s.getsockname()[1]
        assert cli.main(["mock-provider", "--port", str(port)]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: --host 127.0.0.1 --port {port}: ") and "address already in use" in line


def test_serve_with_its_metrics_port_busy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _busy_port() as s:
        port = s.getsockname()[1]
        def edit(doc: dict) -> None:
            doc["metrics"] = {"address": "127.0.0.1", "port": port}
            doc["listen"] = [f"unix://{tmp_path}/extproc-0.sock"]
        gateway_yaml = _rendered(tmp_path, edit)
        capsys.readouterr()
        assert cli.main(["serve", "--config", gateway_yaml]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {gateway_yaml}: metrics.port {port} on 127.0.0.1: ") and "extproc.metrics.port" in line


@pytest.mark.parametrize("processes", [1, 2])
def test_serve_with_a_pattern_only_the_scanner_rejects_is_one_error_and_leaves_no_worker(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], processes: int) -> None:
    """`serve` starts its workers as soon as the file reads as a config, and builds the whole
    Runtime to check it while they build theirs (one after the other took ~7 s instead of ~4).
    A custom pattern that only the scanner rejects is still one error line, the workers' own
    included (captured at the file descriptor), exit 1, and no worker outlives it."""
    def edit(doc: dict) -> None:
        doc["listen"] = [f"unix://{tmp_path}/extproc-{i}.sock" for i in range(processes)]
        doc["metrics"] = {"address": "127.0.0.1", "port": 0}
        doc["classification"]["custom"] = [{"name": "bad", "kind": "regex", "pattern": "a{2,1}"}]
        if processes > 1:
            doc["budgets"].update(store="redis", redis={"url": "redis://127.0.0.1:1/0", "passwordEnv": ""})
    gateway_yaml = _rendered(tmp_path, edit)
    capfd.readouterr()
    assert cli.main(["serve", "--config", gateway_yaml]) == 1
    [line] = capfd.readouterr().err.splitlines()
    assert line == f"error: {gateway_yaml}: custom rule 'bad': invalid regex: min repeat greater than max repeat " \
                   "at position 2", line
    assert processes_mentioning(gateway_yaml) == []
    # A first worker leaves that line to `serve` (had it been quicker); a restarted one prints it.
    worker = [sys.executable, "-m", "gateway_extproc", "serve-one", gateway_yaml, "0"]
    quiet = subprocess.run(worker, env={**os.environ, server._QUIET_ENV: "1"}, capture_output=True, text=True)
    loud = subprocess.run(worker, capture_output=True, text=True)
    assert (quiet.returncode, quiet.stderr) == (server.EXIT_CONFIG, "")
    assert (loud.returncode, loud.stderr.splitlines()) == (server.EXIT_CONFIG, [line])


def test_serve_prints_the_error_of_a_file_broken_while_its_first_worker_starts(tmp_path: Path) -> None:
    """`serve` checks the file, then its first worker reads it again (and leaves a config
    error to `serve`): a file broken in between still ends in its error line, not a silent
    exit 78 (`serve` reads the file again when such a worker stops)."""
    def edit(doc: dict) -> None:
        doc["listen"] = [f"unix://{tmp_path}/extproc-0.sock"]
        doc["metrics"] = {"address": "127.0.0.1", "port": 0}
    gateway_yaml = _rendered(tmp_path, edit)
    broken = yaml.safe_load(Path(gateway_yaml).read_text())
    broken["classification"]["custom"] = [{"name": "bad", "kind": "regex", "pattern": "a{2,1}"}]
    proc = subprocess.Popen([sys.executable, "-m", "gateway_extproc", "serve", "--config", gateway_yaml],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not any("serve-one" in line for line in processes_mentioning(gateway_yaml)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        Path(gateway_yaml).write_text(yaml.safe_dump(broken))  # the worker is still importing (~1 s)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == server.EXIT_CONFIG
    assert f"error: {gateway_yaml}: custom rule 'bad': invalid regex: min repeat greater than max repeat " \
           "at position 2" in err.splitlines(), err
    assert processes_mentioning(gateway_yaml) == []
