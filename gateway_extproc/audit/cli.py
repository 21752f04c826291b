"""`gateway-extproc audit ...` and `gateway-extproc report ...` (docs/audit.md).

`register` adds both subcommands to the main parser; each sets `audit_run`, the function
that runs it, so __main__ dispatches with one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

DEFAULT_DIR = Path("run/audit")  # where `make run` writes


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    a = sub.add_parser("audit", help="the tamper-evident audit trail: keygen, verify, export")
    asub = a.add_subparsers(dest="audit_cmd", required=True)
    kg = asub.add_parser("keygen", help="write a new Ed25519 signing key (0600) and FILE.pub")
    kg.add_argument("--out", type=Path, required=True, metavar="FILE", help="where the private key goes (FILE.pub beside it)")
    kg.add_argument("--if-missing", action="store_true", help="do nothing when FILE exists")
    kg.set_defaults(audit_run=_keygen)
    v = asub.add_parser("verify", help="check every chain; name the first bad record")
    v.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="audit directory or export bundle")
    v.add_argument("--public-key", type=Path, action="append", required=True,
                   help="a published public key (PEM); repeat it for every key used over the period")
    v.add_argument("--strict", action="store_true", help="also fail on open or truncated chain ends")
    v.add_argument("--format", choices=("text", "json"), default="text", help="report format (default: %(default)s)")
    v.set_defaults(audit_run=_verify)
    e = asub.add_parser("export", help="a bundle of records, checkpoints and configs for [from, to]")
    e.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="audit directory (default: %(default)s)")
    e.add_argument("--from", dest="start", required=True, help="ISO date or time (UTC)")
    e.add_argument("--to", dest="end", required=True, help="ISO date or time (UTC), inclusive")
    e.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory the bundle is written to")
    e.set_defaults(audit_run=_export)

    r = sub.add_parser("report", help="reports from the audit trail: chargeback, inventory, admin")
    rsub = r.add_subparsers(dest="report_cmd", required=True)
    cb = rsub.add_parser("chargeback", help="per team (and key, user, model, provider) for one month")
    cb.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="audit directory or export bundle (default: %(default)s)")
    cb.add_argument("--month", required=True, help="YYYY-MM")
    cb.add_argument("--timezone", default="UTC", help="IANA zone the month is in; use budgets.timezone (default UTC)")
    cb.add_argument("--format", choices=("csv", "json"), default="csv", help="output format (default: %(default)s)")
    cb.set_defaults(audit_run=_chargeback)
    for name, help_, run in (
            ("inventory", "which team uses which model and provider; refused attempts", _inventory),
            ("admin", "key admin API actions: who created, rotated, updated, revoked which key", _admin)):
        sub = rsub.add_parser(name, help=help_)
        sub.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                         help="audit directory or export bundle (default: %(default)s)")
        sub.add_argument("--from", dest="start", help="ISO date or time (UTC)")
        sub.add_argument("--to", dest="end", help="ISO date or time (UTC), inclusive")
        sub.add_argument("--format", choices=("csv", "json"), default="csv", help="output format (default: %(default)s)")
        sub.set_defaults(audit_run=run)


def _keygen(args: argparse.Namespace) -> int:
    from .signing import generate

    if args.if_missing and args.out.exists():
        return 0
    if args.out.exists():
        print(f"error: {args.out} exists; remove it first or pick another path", file=sys.stderr)
        return 1
    key, pub = generate(args.out)
    print(f"wrote {key} (private: mount it as a Secret, audit.signingKey)\nwrote {pub} (public: publish it, "
          "audit.publicKey; auditors verify with it)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .reports import printable
    from .signing import SigningKeyError, key_id, load_public
    from .verify import MANIFEST, verify_dir

    try:
        public = [load_public(p) for p in args.public_key]
    except SigningKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if _not_a_dir(args.dir):
        return 2
    results = verify_dir(args.dir, public)
    if args.format == "json":
        print(orjson.dumps([r.__dict__ for r in results], option=orjson.OPT_INDENT_2).decode())
    else:
        # Names and notes come from the files (directory names, a checkpoint's key): for a terminal.
        print(printable(f"public key {', '.join(key_id(k) for k in public)}; {len(results)} chains in {args.dir}"))
        if (args.dir / MANIFEST).exists():  # say so: in a live directory, it is a planted manifest
            print("an export bundle (manifest.json): its chains may start and end where the export cut them")
        for r in results:
            print(printable(r.line()))
    bad = any(r.status == "bad" for r in results) or not results
    if args.strict:
        bad = bad or any(r.status != "ok" for r in results)
    return 1 if bad else 0


def _export(args: argparse.Namespace) -> int:
    from .export import export
    from .reports import ReportError, iso_param

    if _not_a_dir(args.dir):
        return 2
    try:
        manifest = export(args.dir, args.out, iso_param("from", args.start), iso_param("to", args.end, end=True))
    except ReportError as exc:
        print(f"error: --{exc}", file=sys.stderr)  # messages start with the parameter name
        return 1
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(manifest['chains'])} chains, {len(manifest['configs'])} config versions; "
          f"verify with `gateway-extproc audit verify --dir {args.out} --public-key <published key>`")
    return 0


def _chargeback(args: argparse.Namespace) -> int:
    return _report("chargeback", args, {"month": args.month, "timezone": args.timezone, "format": args.format})


def _inventory(args: argparse.Namespace) -> int:
    return _report("inventory", args, {"from": args.start, "to": args.end, "format": args.format})


def _admin(args: argparse.Namespace) -> int:
    return _report("admin", args, {"from": args.start, "to": args.end, "format": args.format})


def _report(kind: str, args: argparse.Namespace, params: dict[str, str | None]) -> int:
    """The same function the admin listener serves (reports.render)."""
    from .reports import ReportError, render

    if _not_a_dir(args.dir):
        return 2
    try:
        _, body = render(kind, args.dir, params)
    except ReportError as exc:
        print(f"error: --{exc}", file=sys.stderr)  # messages start with the parameter name
        return 1
    sys.stdout.buffer.write(body)
    sys.stdout.flush()
    return 0


def _not_a_dir(path: Path) -> bool:
    """A mistyped --dir would read as an empty trail: a quiet month, an empty bundle."""
    if path.is_dir():
        return False
    print(f"error: {path} is not a directory", file=sys.stderr)
    return True
