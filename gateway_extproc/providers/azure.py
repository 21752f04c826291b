"""Azure OpenAI: the OpenAI schema behind a per-deployment path, an api-version query and
an `api-key` header. Responses are OpenAI-shaped already, so openai's identity ones serve."""

from __future__ import annotations

import re
from urllib.parse import quote

from ..errors import GatewayError
from .base import JSON, Outbound, Target
from .openai import response, stream, with_model

__all__ = ["TRANSLATES_RESPONSE", "request", "response", "stream", "takes_stream_options"]

TRANSLATES_RESPONSE = False
# The OpenAI endpoints an Azure deployment serves under /openai/deployments/{name}.
_SUFFIXES = ("/chat/completions", "/embeddings")
# The first api-version whose chat completions take `stream_options` (2024-09-01-preview; the
# stable 2024-10-21): older ones answer 400 "Unrecognized request argument supplied".
_STREAM_OPTIONS_SINCE = "2024-09-01"
_DATED = re.compile(r"\d{4}-\d{2}-\d{2}")


def takes_stream_options(api_version: str) -> bool:
    """Whether a deployment called with this api-version takes `stream_options`: a dated one
    from 2024-09-01 on, or an undated one (the v1 API's `preview`, `latest`)."""
    dated = _DATED.match(api_version)
    return dated is None or dated.group() >= _STREAM_OPTIONS_SINCE


def request(target: Target, suffix: str, body: JSON, stream: bool) -> Outbound:
    if suffix not in _SUFFIXES:
        raise GatewayError("unsupported_endpoint",
                           f"Azure OpenAI deployments do not serve /v1{suffix} through this gateway")
    version = target.options["apiVersion"]
    if "stream_options" in body and not takes_stream_options(version):
        # Only the router's own request for usage gets here (fields.refusal refuses a
        # caller's): the stream ends without usage and is charged its counted text.
        body = {k: v for k, v in body.items() if k != "stream_options"}
    deployment = quote(target.model, safe="")
    path = f"{target.base_path}/openai/deployments/{deployment}{suffix}?api-version={quote(version, safe='')}"
    return Outbound(path=path, headers={"api-key": target.credential},
                    body=with_model(body, target.model), remove=("authorization",))
