"""Small predicates the argument checks share."""

from __future__ import annotations

import numbers


def is_integer(value: object) -> bool:
    """An int or NumPy integer, not a bool (True is no count, seed or token id anyone means, and
    4.0 == 4 passed membership tests as an integer)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
