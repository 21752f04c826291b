# `helm test` (templates/tests/test-gateway.yaml), also run by tests/test_chart_conventions.py
# against a real gateway: a request without a key must get the ext_proc's 401.
import json
import ssl
import sys
import urllib.error
import urllib.request

request = urllib.request.Request(sys.argv[1], data=b"{}", headers={"content-type": "application/json"})
try:
    urllib.request.urlopen(request, timeout=10, context=ssl._create_unverified_context())
    sys.exit(f"{sys.argv[1]}: answered 2xx without a key; expected 401 missing_api_key")
except urllib.error.HTTPError as err:
    code = json.loads(err.read() or b"{}").get("error", {}).get("code")
    print(f"{sys.argv[1]}: {err.code} {code}")
    sys.exit(0 if (err.code, code) == (401, "missing_api_key") else 1)
