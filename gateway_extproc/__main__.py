"""`gateway-extproc` command line: serve, render, keys, check-config, mock-provider."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import yaml

from . import config, keys, logs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gateway-extproc", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the ext_proc server (one process per `listen` address)")
    s.add_argument("--config", required=True, help="gateway.yaml rendered by `render`")
    one = sub.add_parser("serve-one", help=argparse.SUPPRESS)
    one.add_argument("config")
    one.add_argument("index", type=int)

    rd = sub.add_parser("render", help="render envoy.yaml and gateway.yaml from the Helm chart")
    rd.add_argument("--values", action="append", type=Path, default=[], help="values file (repeatable)")
    rd.add_argument("--out", type=Path, required=True)

    k = sub.add_parser("keys", help="manage virtual keys")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create", help="print a new key once, and the values entry holding its hash")
    kc.add_argument("--team", required=True)
    kc.add_argument("--id", help="key id (lowercase, digits, '-'); random when omitted")
    kc.add_argument("--models", help="comma-separated models this key may use (default: all)")
    kc.add_argument("--expires", help="ISO 8601 expiry, e.g. 2027-01-31T00:00:00Z")

    cc = sub.add_parser("check-config", help="validate a gateway.yaml")
    cc.add_argument("file")

    m = sub.add_parser("mock-provider", help="run the bundled mock OpenAI/Anthropic provider")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=8081)
    m.add_argument("--api-key", help="require this provider key (default: accept any)")
    m.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate chain (PEM)")
    m.add_argument("--tls-key", type=Path, help="private key of --tls-cert (PEM)")

    lc = sub.add_parser("local", help="run the mock providers, the ext_proc and Envoy here (`make run`); "
                        "one mock instance per loopback port in the values plays every provider there")
    lc.add_argument("--values", action="append", type=Path, default=[], help="values file (repeatable)")
    lc.add_argument("--workdir", type=Path, default=Path("run"))

    args = p.parse_args(argv)
    logs.configure()
    if args.cmd == "serve":
        from .server import serve
        return serve(args.config)
    if args.cmd == "serve-one":
        from .server import run_one
        return run_one(args.config, args.index)
    if args.cmd == "render":
        from .render import render
        for path in render(args.values, args.out):
            print(f"wrote {path}")
        return 0
    if args.cmd == "keys":
        return _keys_create(args)
    if args.cmd == "check-config":
        try:
            cfg = config.load(args.file)
        except config.ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{args.file}: OK ({len(cfg.models)} models, {len(cfg.providers)} providers, "
              f"{len(cfg.keys)} keys, {len(cfg.listen)} ext_proc processes)")
        return 0
    if args.cmd == "local":
        return _local(args)
    if args.cmd == "mock-provider":
        from .mock_provider import run
        if (args.tls_cert is None) != (args.tls_key is None):
            p.error("--tls-cert and --tls-key go together")
        run(args.host, args.port, args.api_key, (args.tls_cert, args.tls_key) if args.tls_cert else None)
        return 0
    return 2


def _local(args: argparse.Namespace) -> int:
    import secrets
    import signal
    import time

    from .localstack import LocalStack, StartError, mock_ports
    from .render import chart_values

    values = chart_values(args.values)
    provider_key = secrets.token_urlsafe(24)  # the mocks' key, handed to Envoy and the ext_proc
    env = {}
    for provider in values["providers"]:
        cred = provider.get("credential", {})
        # Bedrock signs with an access key pair; the mock checks the signature's shape only.
        value = f"AKIDLOCALMOCK:{provider_key}" if provider["kind"] == "bedrock" else provider_key
        if "env" in cred:
            env[cred["env"]] = value
        if "file" in cred:
            Path(cred["file"]).parent.mkdir(parents=True, exist_ok=True)
            Path(cred["file"]).write_text(value)
    mocks = {port: provider_key for port in mock_ports(values)}
    stack = LocalStack(values, args.workdir, env, mocks, quiet=False)
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
                # A part died on its own: the rest would serve errors, so stop and say why.
                print(f"error: {stack.describe_exit(*gone)}\nerror: stopping the gateway", file=sys.stderr,
                      flush=True)
                return 1
            time.sleep(0.2)
    except StartError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        stack.stop()
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    import secrets

    id_ = args.id or f"{args.team.lower()}-{secrets.token_hex(4)}"
    if not config.KEY_ID.match(id_):
        print(f"error: --id {id_!r} must be lowercase letters, digits and '-'", file=sys.stderr)
        return 1
    entry: dict[str, object] = {"id": id_, "sha256": "", "team": args.team}
    if args.models:
        entry["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.expires:
        datetime.fromisoformat(args.expires)
        entry["expiresAt"] = args.expires
    key = keys.generate(id_)
    entry["sha256"] = keys.digest(key)
    print("API key (shown once; store it now, the gateway keeps only its hash):")
    print(f"  {key}")
    print("\nAdd to `keys:` in your values file:")
    print(yaml.safe_dump([entry], sort_keys=False).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
