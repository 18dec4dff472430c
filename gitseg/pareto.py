"""The Pareto front of items with a quality to maximise and a cost to minimise: the ensemble's
latency front (ensemble/selection/latency.py) and the multi-objective search's score-latency front."""

from __future__ import annotations

from typing import Callable, TypeVar

Item = TypeVar("Item")


def pareto(items: list[Item], quality: Callable, cost: Callable) -> list[Item]:
    """The items that no other beats on quality at an equal or lower cost, cheapest first.

    `quality(item)` is any comparable value (a number or a tuple, compared as Python compares
    them); of items equal on both, the first given is kept.
    """
    ranked = sorted(items, key=lambda item: cost(item))  # stable: equal costs keep their order
    # Within one cost, the best quality first, so that it alone of that cost can join the front.
    ranked = sorted(ranked, key=lambda item: (cost(item), _Desc(quality(item))))
    front, best = [], None
    for item in ranked:
        if best is None or quality(item) > best:
            front.append(item)
            best = quality(item)
    return front


class _Desc:
    """Sort key wrapper reversing the order of any comparable value."""

    def __init__(self, value):
        self.value = value

    def __lt__(self, other: "_Desc") -> bool:
        return other.value < self.value

    def __eq__(self, other) -> bool:
        return self.value == other.value
