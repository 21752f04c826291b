"""gateway-extproc: an AI gateway made of Envoy and this ext_proc server.

A user's mistake (a bad values file, a misspelt key, a busy port) ends in one
`error:` line naming the file, the key and the fix, and exit status 1 (2 for a
wrong command line). A traceback means a bug in gateway-extproc.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from . import cli_identity, config, keys, logs
from .audit import cli as audit_cli

KEY_ID_RULES = "1-63 characters: lowercase letters, digits and '-', starting with a letter or digit; unique in keys"


class UserError(Exception):
    """A mistake the user can fix; its message is the whole `error:` line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, not argparse's usage block: `error: <problem> (see <prog> --help)`."""
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gateway-extproc", description=__doc__.split("\n\n")[0],
                epilog="`gateway-extproc COMMAND --help` describes each command.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # New commands: one add_parser here and one branch in run().
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    s = sub.add_parser("serve", help="run the ext_proc server: one worker process per `listen` address, "
                       "restarted if it dies", description="Run the ext_proc server Envoy calls.")
    s.add_argument("--config", required=True, metavar="GATEWAY_YAML",
                   help="gateway.yaml written by `render` (reloaded when it changes)")

    rd = sub.add_parser("render", help="render envoy.yaml and gateway.yaml from the Helm chart and check them",
                        description="Render the Helm chart's Envoy and gateway config for running outside "
                                    "Kubernetes (needs the render extra).")
    rd.add_argument("--values", action="append", type=Path, default=[], metavar="FILE",
                    help="values file over the chart defaults; repeat to layer several (later ones win)")
    rd.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write the files to")

    k = sub.add_parser("keys", help="manage virtual API keys", description="Manage virtual API keys.")
    ksub = k.add_subparsers(dest="keys_command", metavar="{create,list,rotate,revoke,update,admin-token}",
                            required=True, parser_class=_Parser)
    kc = ksub.add_parser("create", help="print a new key once, and the values entry holding its hash",
                         description="Print a new key once and the `keys:` entry (its hash) for the values file, "
                                     "after checking the entry against that file.")
    kc.add_argument("--values", action="append", type=Path, default=[], metavar="FILE",
                    help="values file(s) the key goes into: the team and models must exist there "
                         "(required unless --admin-url creates it through the key admin API)")
    kc.add_argument("--team", required=True, help="team the key belongs to (a teams[].name in the values)")
    kc.add_argument("--id", help=f"key id, shown in logs (not secret); {KEY_ID_RULES}. "
                                 "Default: the team name and a random suffix")
    kc.add_argument("--models", metavar="M1,M2", help="comma-separated models[].name this key may use "
                                                      "(default: every model)")
    kc.add_argument("--expires", metavar="WHEN", help="ISO 8601 expiry in the future, e.g. 2027-01-31T00:00:00Z "
                                                      "(UTC if no offset is given); default: never")

    cli_identity.register(sub, ksub, kc)  # keys through the admin API, dev-token (docs/identity.md)

    cc = sub.add_parser("check-config", help="validate a gateway.yaml as `serve` would",
                        description="Validate a gateway.yaml (the file `render` writes) as `serve` would.")
    cc.add_argument("file", metavar="GATEWAY_YAML", help="the gateway.yaml to check")

    m = sub.add_parser("mock-provider", help="run the bundled mock OpenAI/Azure/Anthropic/Bedrock/Gemini provider",
                       description="Run the bundled mock provider (docs/mock-provider.md).")
    m.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    m.add_argument("--port", type=int, default=8081, help="port to listen on (default: %(default)s)")
    m.add_argument("--api-key", help="require this provider key (default: accept any)")
    m.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve HTTPS with this certificate chain")
    m.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")

    lc = sub.add_parser("local", help="run mock providers, the ext_proc and Envoy on this machine (`make run`)",
                        description="Run the whole gateway here: one mock provider per loopback port the "
                                    "values' providers point at, the ext_proc and Envoy. Stops everything "
                                    "(exit 1) if any part dies.")
    lc.add_argument("--values", action="append", type=Path, default=[], metavar="FILE",
                    help="values file over the chart defaults; repeat to layer several (later ones win)")
    lc.add_argument("--workdir", type=Path, default=Path("run"), metavar="DIR",
                    help="where the rendered config and each part's log go (default: %(default)s)")
    lc.add_argument("--mtls-port", type=int, metavar="PORT", help="also serve mTLS here, with throwaway "
                    "certificates made in <workdir>/certs (docs/identity.md)")
    audit_cli.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-one"]:  # one worker, started by `serve`: not a user command
        logs.configure()
        from .server import run_one
        return run_one(argv[1], int(argv[2]))
    args = build_parser().parse_args(argv)
    logs.configure()
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    from .render import RenderError

    try:
        if getattr(args, "audit_run", None):  # audit and report subcommands (audit/cli.py)
            return args.audit_run(args)
        if args.command == "serve":
            from .server import serve
            return serve(args.config)
        if args.command == "render":
            from .render import render
            for path in render(args.values, args.out):
                print(f"wrote {path}")
            return 0
        if args.command == "dev-token" or (args.command == "keys" and (args.keys_command != "create"
                                                                        or args.admin_url)):
            return cli_identity.run(args)
        if args.command == "keys":
            return _keys_create(args)
        if args.command == "check-config":
            cfg = config.load(args.file)
            print(f"{args.file}: OK ({len(cfg.models)} models, {len(cfg.providers)} providers, "
                  f"{len(cfg.keys)} keys, {len(cfg.listen)} ext_proc processes)")
            return 0
        if args.command == "local":
            return _local(args)
        if args.command == "mock-provider":
            return _mock_provider(args)
    except RenderError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:  # an output directory or file the user named
        if exc.filename is None:
            raise UserError(f"{exc.strerror or exc}") from None
        raise UserError(f"{exc.filename}: {exc.strerror}; check the path and its permissions") from None
    raise AssertionError(args.command)


def _mock_provider(args: argparse.Namespace) -> int:
    from .mock_provider import run as run_mock

    if (args.tls_cert is None) != (args.tls_key is None):
        raise UserError("--tls-cert and --tls-key go together; give both or neither")
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not path.is_file():
            raise UserError(f"{path}: file not found; give a PEM file")
    try:
        run_mock(args.host, args.port, args.api_key, (args.tls_cert, args.tls_key) if args.tls_cert else None)
    except OSError as exc:
        raise UserError(f"--host {args.host} --port {args.port}: {exc.strerror or exc}; "
                        "choose another --port (0 picks a free one)") from None
    return 0


def _local(args: argparse.Namespace) -> int:
    import secrets
    import signal
    import time

    from .localstack import ENVOY_RESTARTS, LocalStack, StartError, mock_ports
    from .render import chart_values, describe

    values = chart_values(args.values)
    provider_key = secrets.token_urlsafe(24)  # the mocks' key, handed to Envoy and the ext_proc
    env: dict[str, str] = {}
    files: dict[Path, str] = {}
    for provider in values.get("providers") or []:
        cred = provider.get("credential") if isinstance(provider, dict) else None
        if not isinstance(cred, dict):
            continue  # the render names the problem
        # Bedrock signs with an access key pair; the mock checks the signature's shape only.
        value = f"AKIDLOCALMOCK:{provider_key}" if provider.get("kind") == "bedrock" else provider_key
        if "env" in cred:
            env[cred["env"]] = value
        if "file" in cred:
            files[Path(cred["file"])] = value
    mocks = {port: provider_key for port in mock_ports(values)}
    stack = LocalStack(values, args.workdir, env, mocks, quiet=False, source=describe(args.values))
    if args.mtls_port:
        from .devidentity import prepare, tls_values

        stack.mtls_values = tls_values(values, args.workdir / "certs", args.mtls_port,
                                       values["envoy"]["admin"]["port"] + 2, args.workdir / "mtls")  # +1: stats
    try:
        # Before writing what a running stack reads (its provider key files, certificates and
        # dev JWKS, rendered config): a second `make run` must leave the first one working.
        stack.check_free()
    except StartError as exc:
        raise UserError(str(exc)) from None
    for path, value in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)
    if args.mtls_port:
        prepare(args.workdir / "certs")
    stopped = False

    def stop(*_: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        stack.start()
        print(f"\ngateway-extproc is up on {stack.url} (Envoy admin {stack.admin_url}); logs in "
              f"{args.workdir}/*.log. Ctrl-C stops it.\n", flush=True)
        while not stopped:
            if (gone := stack.exited()) is not None:
                name, returncode = gone
                if name == "envoy":  # Envoy crashing must not end the session: start it again
                    print(f"warning: {stack.describe_exit(name, returncode)}\nwarning: restarting envoy",
                          file=sys.stderr, flush=True)
                    if stack.restart_envoy():
                        print("envoy is up again", file=sys.stderr, flush=True)
                        continue
                    raise UserError(f"envoy died {ENVOY_RESTARTS + 1} times within a minute; stopping the gateway "
                                    f"(see {stack.log_path('envoy')})")
                # Any other part died on its own: the rest would serve errors, so stop and say why.
                print(f"error: {stack.describe_exit(name, returncode)}\nerror: stopping the gateway",
                      file=sys.stderr, flush=True)
                return 1
            time.sleep(0.2)
    except StartError as exc:
        raise UserError(str(exc)) from None
    finally:
        stack.stop()
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from .render import chart_values, describe

    if not args.values:
        raise UserError("keys create needs --values FILE (the values the key goes into), or --admin-url to "
                        "create it through the key admin API")
    values = chart_values(args.values)
    source = describe(args.values)
    teams = [t.get("name") for t in values.get("teams") or [] if isinstance(t, dict)]
    if args.team not in teams:
        raise UserError(f"--team {args.team!r} is not in teams of {source} (teams: {', '.join(map(str, teams)) or 'none'}); "
                        "add the team to teams first, or fix the name")
    existing = [k.get("id") for k in values.get("keys") or [] if isinstance(k, dict)]
    if args.id is not None:
        id_ = args.id
        if not config.KEY_ID.match(id_):
            raise UserError(f"--id {id_!r} breaks the id rules ({KEY_ID_RULES})")
    else:
        import secrets

        slug = re.sub(r"[^a-z0-9]+", "-", args.team.lower()).strip("-")[:54] or "key"
        id_ = f"{slug}-{secrets.token_hex(4)}"
    if id_ in existing:
        raise UserError(f"--id {id_!r} is already keys[{existing.index(id_)}].id in {source}; choose another id")
    entry: dict[str, Any] = {"id": id_, "sha256": "", "team": args.team}
    if args.models is not None:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        known = [m.get("name") for m in values.get("models") or [] if isinstance(m, dict)]
        if not names:
            raise UserError("--models is empty; list model names separated by commas, or leave it out for all")
        for name in names:
            if name not in known:
                raise UserError(f"--models names {name!r}, which is not in models of {source} "
                                f"(models: {', '.join(map(str, known))}); fix the name")
        entry["models"] = names
    if args.expires is not None:
        entry["expiresAt"] = _future_timestamp(args.expires)
    key = keys.generate(id_)
    entry["sha256"] = keys.digest(key)
    print("API key (shown once; store it now, the gateway keeps only its hash):")
    print(f"  {key}")
    print(f"\nAdd to `keys:` in {args.values[-1]}:")
    print(yaml.safe_dump([entry], sort_keys=False).rstrip())
    return 0


def _future_timestamp(text: str) -> str:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"--expires {text!r} is not an ISO 8601 timestamp; write e.g. 2027-01-31T00:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    if when <= datetime.now(timezone.utc):
        raise UserError(f"--expires {text!r} is in the past; the key would be refused from the start. "
                        "Give a future time, or leave --expires out for no expiry")
    return when.isoformat().replace("+00:00", "Z")


def _version() -> str:
    try:
        return version("gateway-extproc")
    except PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())
