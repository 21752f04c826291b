"""The key admin API's error bodies quote no value an admin sent that could be a key: the
data plane's rule (errors.quoted: a refused value is shown only when it is a plain word)
holds on the admin listener too. A key pasted into the wrong field (`team`), or into a
report's query parameter, used to come back whole (up to 40-60 characters of it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway_extproc import keys
from gateway_extproc.keyadmin import AdminApp

from .test_keyadmin import app, audited, call  # noqa: F401 (fixtures)


def test_a_key_sent_as_the_team_is_not_quoted_back(app: AdminApp) -> None:  # noqa: F811
    secret = keys.generate("victim")
    status, body = call(app, "POST", "/admin/keys", {"team": secret})
    assert status == 400 and body["error"]["param"] == "team"
    assert secret[:12] not in str(body) and secret[-12:] not in str(body)
    status, body = call(app, "POST", "/admin/keys", {"team": "nosuchteam"})
    assert status == 400 and "'nosuchteam'" in body["error"]["message"]  # a plain word still helps


@pytest.mark.parametrize("query", ["month={s}", "month=2026-01&timezone={s}", "month=2026-01&format={s}"])
def test_a_key_in_a_report_parameter_is_not_quoted_back(audited: AdminApp, query: str) -> None:  # noqa: F811
    secret = keys.generate("victim")
    status, body = call(audited, "GET", "/admin/reports/chargeback?" + query.format(s=secret))
    assert status == 400 and body["error"]["code"] == "invalid_request"
    assert secret[:12] not in str(body) and secret[-12:] not in str(body)


@pytest.mark.parametrize("path", ["/admin/reports/inventory?from={s}", "/admin/reports/admin?to={s}"])
def test_a_key_in_a_report_window_is_not_quoted_back(audited: AdminApp, path: str) -> None:  # noqa: F811
    secret = keys.generate("victim")
    status, body = call(audited, "GET", path.format(s=secret))
    assert status == 400 and body["error"]["code"] == "invalid_request"
    assert secret[:12] not in str(body) and secret[-12:] not in str(body)
