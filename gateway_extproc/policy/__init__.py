"""Data classification and guardrails: detectors, one-pass scanner, decisions, redaction.

Pure functions over text and parsed JSON; no gRPC, no I/O. See `scanner` for the design.
"""

from .detectors import (
    BUILTIN_DETECTORS,
    DEFAULT_INJECTION_PATTERNS,
    DEFAULT_INJECTION_PHRASES,
    DETECTOR_NAMES,
    PROMPT_INJECTION,
    Detector,
)
from .scanner import (
    ACTIONS,
    BINARY_KEYS,
    DEFAULT_RULES,
    DEFAULT_TIERS,
    MODES,
    AllowEntry,
    CustomRule,
    Decision,
    DecisionParams,
    Finding,
    InjectionConfig,
    LimitExceeded,
    PlaceholderMap,
    Rule,
    Scanner,
    decide,
    map_strings,
    redact,
    redact_strings,
    walk_strings,
)
from .stream import StreamRedactor

__all__ = [
    "ACTIONS", "BINARY_KEYS", "BUILTIN_DETECTORS", "DEFAULT_INJECTION_PATTERNS",
    "DEFAULT_INJECTION_PHRASES", "DEFAULT_RULES", "DEFAULT_TIERS", "DETECTOR_NAMES", "MODES",
    "PROMPT_INJECTION", "AllowEntry", "CustomRule", "Decision", "DecisionParams", "Detector",
    "Finding", "InjectionConfig", "LimitExceeded", "PlaceholderMap", "Rule", "Scanner",
    "StreamRedactor", "decide", "map_strings", "redact", "redact_strings", "walk_strings",
]
