"""Readers for ext_proc responses, shared by the processor unit tests."""

from __future__ import annotations

from gateway_extproc._proto.envoy.config.core.v3.base_pb2 import HeaderValueOption
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep


def set_headers(common: ep.CommonResponse) -> dict[str, str]:
    """Headers a response sets; every one must overwrite (never append to) the client's."""
    out = {}
    for opt in common.header_mutation.set_headers:
        assert opt.append_action == HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        out[opt.header.key] = opt.header.raw_value.decode()
    return out
