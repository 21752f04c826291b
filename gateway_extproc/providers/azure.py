"""Azure OpenAI: the OpenAI schema behind a per-deployment path, an api-version query and
an `api-key` header. Responses are OpenAI-shaped already, so openai's identity ones serve."""

from __future__ import annotations

from urllib.parse import quote

from ..errors import GatewayError
from .base import JSON, Outbound, Target
from .openai import response, stream, with_model

__all__ = ["TRANSLATES_RESPONSE", "request", "response", "stream"]

TRANSLATES_RESPONSE = False
# The OpenAI endpoints an Azure deployment serves under /openai/deployments/{name}.
_SUFFIXES = ("/chat/completions", "/embeddings")


def request(target: Target, suffix: str, body: JSON, stream: bool) -> Outbound:
    if suffix not in _SUFFIXES:
        raise GatewayError("unsupported_endpoint",
                           f"Azure OpenAI deployments do not serve /v1{suffix} through this gateway")
    deployment = quote(target.model, safe="")
    path = (f"{target.base_path}/openai/deployments/{deployment}{suffix}"
            f"?api-version={quote(target.options['apiVersion'], safe='')}")
    return Outbound(path=path, headers={"api-key": target.credential},
                    body=with_model(body, target.model), remove=("authorization",))
