"""Envoy ext_proc API, generated code copied from xds-protos==1.85.0 by proto/vendor_envoy.py (do not edit)."""
