"""Budgets and rate limits: prices, calendar windows, and the reserve/settle store.

The Redis store lives in `gateway_extproc.budgets.redis_store` and is not re-exported here,
so single-replica use (`MemoryBudgetStore`) does not import the Redis client.
"""

from gateway_extproc.budgets.pricing import Price, cost_nano, worst
from gateway_extproc.budgets.store import (
    Bucket,
    BudgetStore,
    BudgetStoreUnavailable,
    Limit,
    MemoryBudgetStore,
    ReserveRequest,
    ReserveResult,
    Usage,
)
from gateway_extproc.budgets.windows import Window, current_windows

__all__ = [
    "Bucket",
    "BudgetStore",
    "BudgetStoreUnavailable",
    "Limit",
    "MemoryBudgetStore",
    "Price",
    "ReserveRequest",
    "ReserveResult",
    "Usage",
    "Window",
    "cost_nano",
    "current_windows",
    "worst",
]
