"""`gateway-extproc` command line: serve, render, keys, check-config, mock-provider."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import cli_identity, config, logs


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

    cli_identity.register(sub)

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
    lc.add_argument("--mtls-port", type=int, help="also serve mTLS here with throwaway certificates made in "
                    "<workdir>/certs (docs/identity.md)")

    args = p.parse_args(argv)
    logs.configure()
    if args.cmd == "serve":
        from .server import serve
        return serve(args.config)
    if args.cmd == "serve-one":
        from .server import run_one
        run_one(args.config, args.index)
        return 0
    if args.cmd == "render":
        from .render import render
        for path in render(args.values, args.out):
            print(f"wrote {path}")
        return 0
    if args.cmd in ("keys", "dev-token"):
        return cli_identity.run(args)
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

    from .localstack import LocalStack, mock_ports
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
    if args.mtls_port:
        from .devidentity import prepare, tls_values

        prepare(args.workdir / "certs")
        stack.mtls_values = tls_values(values, args.workdir / "certs", args.mtls_port,
                                       values["envoy"]["admin"]["port"] + 1, args.workdir / "mtls")
    stopped = False

    def stop(*_: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        stack.start()
        print(f"\ngateway-extproc is up on {stack.url} (Envoy admin {stack.admin_url}). Ctrl-C stops all three.\n",
              flush=True)
        while not stopped and all(p.poll() is None for p in stack.procs.values()):
            time.sleep(0.5)
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
