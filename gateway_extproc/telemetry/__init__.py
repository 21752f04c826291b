"""Metrics, traces and logs: what finance, developers, security and on-call read."""
