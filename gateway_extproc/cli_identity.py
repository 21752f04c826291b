"""`gateway-extproc keys …` (virtual keys) and `dev-token` (a demo OIDC token for `make run`).

`keys create` without `--admin-url` prints a key and the values entry holding its hash
(keys defined in values; __main__.py). With an admin URL (flag or GATEWAY_ADMIN_URL) every subcommand
drives the key admin API (keyadmin.py); the admin token comes from GATEWAY_ADMIN_TOKEN or
--token-file, never from the command line, where `ps` would show it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml



def register(sub: Any, ksub: Any, create: argparse.ArgumentParser) -> None:
    """Add `dev-token` to the commands, the admin API subcommands to `keys`, and the admin
    API options to `keys create` (which without them writes a values entry, __main__.py)."""
    d = sub.add_parser("dev-token", help="mint an OIDC token signed by `make run`'s throwaway demo key",
                       description="Mint a token `make run`'s Envoy accepts (docs/identity.md). Not for production.")
    d.add_argument("--sub", required=True, help="subject (the user)")
    d.add_argument("--team", help="team claim")
    d.add_argument("--expires-in", type=int, default=3600, metavar="SECONDS",
                   help="lifetime (negative: already expired; default: %(default)s)")
    d.add_argument("--certs", type=Path, default=Path("run/certs"), metavar="DIR",
                   help="where `make run` made the demo key (default: %(default)s)")
    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--admin-url", default=os.environ.get("GATEWAY_ADMIN_URL"), metavar="URL",
                     help="key admin API, e.g. http://127.0.0.1:9190 (default: $GATEWAY_ADMIN_URL)")
    api.add_argument("--token-file", type=Path, metavar="FILE",
                     help="file holding the admin token (default: $GATEWAY_ADMIN_TOKEN)")
    for action in api._actions:
        if action.dest != "help":
            create._add_action(action)
    create.add_argument("--user", help="user the key belongs to (user budgets)")
    create.add_argument("--owner", help="who asked for it (admin API only; default: the admin)")
    ksub.add_parser("list", parents=[api], help="list keys (admin API; never a secret or hash)")
    kr = ksub.add_parser("rotate", parents=[api], help="new secret; the old one works for --grace seconds")
    kr.add_argument("id", help="id of the key to rotate")
    kr.add_argument("--grace", type=int, default=3600, help="seconds the old secret keeps working (default 3600)")
    kv = ksub.add_parser("revoke", parents=[api], help="revoke a key (every replica within seconds)")
    kv.add_argument("id", help="id of the key to revoke")
    ku = ksub.add_parser("update", parents=[api], help="change a key's expiry or model allow-list")
    ku.add_argument("id", help="id of the key to change")
    ku.add_argument("--expires", help="ISO 8601 expiry, or 'never'")
    ku.add_argument("--models", help="comma-separated models, or '*' for all")
    ka = ksub.add_parser("admin-token", help="print a new admin token and its identity.keyAdmin.admins entry")
    ka.add_argument("--name", required=True, help="who holds it (shown as actor in admin_action events)")


def run(args: argparse.Namespace) -> int:
    if args.command == "dev-token":
        from .devidentity import mint

        if not (args.certs / "dev-signing-key.pem").exists():
            print(f"error: no demo signing key in {args.certs}; start `make run` first", file=sys.stderr)
            return 1
        print(mint(args.certs, args.sub, args.team, args.expires_in))
        return 0
    if args.keys_command == "admin-token":
        from .keyadmin import admin_token

        token, digest = admin_token()
        print("Admin token (shown once; give it to the admin, the gateway keeps only its hash):")
        print(f"  {token}")
        print("\nAdd to `identity.keyAdmin.admins:` in your values file:")
        print(yaml.safe_dump([{"name": args.name, "sha256": digest}], sort_keys=False).rstrip())
        return 0
    if not args.admin_url:
        print("error: --admin-url (or GATEWAY_ADMIN_URL) is required", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()] if getattr(args, "models", None) else None
    if args.keys_command == "create":
        body = {"team": args.team, "id": args.id, "user": args.user, "owner": args.owner, "models": models,
                "expires_at": args.expires}
        status, out = _call(args, "POST", "/admin/keys", {k: v for k, v in body.items() if v is not None})
    elif args.keys_command == "list":
        status, out = _call(args, "GET", "/admin/keys")
    elif args.keys_command == "rotate":
        status, out = _call(args, "POST", f"/admin/keys/{args.id}/rotate", {"grace_seconds": args.grace})
    elif args.keys_command == "revoke":
        status, out = _call(args, "DELETE", f"/admin/keys/{args.id}")
    else:
        body = {}
        if args.expires:
            body["expires_at"] = None if args.expires == "never" else args.expires
        if args.models:
            body["models"] = None if args.models.strip() == "*" else models
        status, out = _call(args, "PATCH", f"/admin/keys/{args.id}", body)
    if status >= 400:
        err = out.get("error", {}) if isinstance(out, dict) else {}
        print(f"error: {status} {err.get('code')}: {err.get('message')}", file=sys.stderr)
        return 1
    if isinstance(out, dict) and "key" in out:
        print("API key (shown once; store it now, the gateway keeps only its hash):", file=sys.stderr)
    print(json.dumps(out, indent=2))
    return 0


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None
          ) -> tuple[int, Any]:
    token = (args.token_file.read_text().strip() if args.token_file else os.environ.get("GATEWAY_ADMIN_TOKEN", ""))
    req = urllib.request.Request(args.admin_url.rstrip("/") + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
