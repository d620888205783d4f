"""Token-budget batching: group streamed items so that each batch's total size (voxels, tokens) stays
within a budget, which keeps peak memory predictable whatever the per-sample sizes."""
from __future__ import annotations

import logging
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class BudgetPacker(Generic[T]):
    """Accumulates items while their summed size stays <= budget (and count <= max_items)."""

    def __init__(self, budget: int, max_items: int | None = None) -> None:
        if budget <= 0:
            raise ValueError(f"token budget must be positive, got {budget}")
        self.budget, self.max_items = budget, max_items
        self.items: list[T] = []
        self.total = 0

    def fits(self, size: int) -> bool:
        """True when an item of ``size`` can join the current batch (an empty batch takes any item <= budget)."""
        if self.max_items is not None and len(self.items) >= self.max_items:
            return False
        return self.total + size <= self.budget

    def add(self, item: T, size: int) -> None:
        self.items.append(item)
        self.total += size

    def pop(self) -> list[T]:
        """Return the current batch and start a new one."""
        items, self.items, self.total = self.items, [], 0
        return items

    def __len__(self) -> int:
        return len(self.items)


def token_budget_batches(
    items: Iterable[T],
    budget: int,
    size: Callable[[T], int],
    max_items: int | None = None,
    drop_last: bool = False,
) -> Iterator[list[T]]:
    """Batches (lists) of consecutive items with sum(size(item)) <= budget, in stream order.

    Items of size 0 and items larger than the budget alone are dropped with a warning.
    """
    packer: BudgetPacker[T] = BudgetPacker(budget, max_items)
    for item in items:
        n = size(item)
        if n <= 0 or n > budget:
            log.warning("dropping an item of size %d (budget %d)", n, budget)
            continue
        if not packer.fits(n):
            yield packer.pop()
        packer.add(item, n)
    if len(packer) and not drop_last:
        yield packer.pop()
