"""Per-stream processors: the router-level one and the per-attempt upstream one."""
