"""Checks of constructor and function arguments that the layers, models and ops share."""
from __future__ import annotations


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer (Python's, NumPy's, ...: anything with ``__index__``) other than a bool."""
    return not isinstance(value, bool) and hasattr(type(value), "__index__")


def check_int(owner: str, name: str, value: object, minimum: int) -> int:
    """``value`` as an int if it is an integer (not a bool) of at least ``minimum``.

    Raises TypeError for anything but an integer and ValueError below ``minimum``, naming ``owner``'s
    argument ``name``.
    """
    if not is_integer(value):
        raise TypeError(f"{owner}: {name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        least = "a positive integer" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"{owner}: {name} must be {least}, got {value}")
    return value


def check_bool(owner: str, name: str, value: object) -> bool:
    """``value`` if it is a bool; TypeError naming ``owner``'s argument ``name`` otherwise (a truthy
    string or number would otherwise pass as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {type(value).__name__} {value!r}")
    return value
