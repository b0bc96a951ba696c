"""Checks of config fields, raising ValueError that names the field by its flag path.

A bad value should fail before a model loads or a step compiles, with the flag to fix
(`ppo.minibatches=0 must be an integer >= 1`), not as a ZeroDivisionError or a NaN later.

    check_int(config, "ppo.minibatches", low=1)
    check_number(config, "ppo.gamma", low=0, high=1)
    check_number(config, "target.beta", low=0, low_open=True)
    check_choice(config, "remat", ("full", "dots", "none"))
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax.numpy as jnp


def get(config, path: str):
    """config's field at a dotted path ("ppo.epochs")."""
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def _range_text(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def _in_range(value, low, high, low_open, high_open) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    if high is not None and (value >= high if high_open else value > high):
        return False
    return True


def check_int(config, path: str, low: Optional[int] = None, high: Optional[int] = None):
    """The field is an integer (not a bool) within [low, high]; returns it."""
    value = get(config, path)
    if isinstance(value, bool) or not isinstance(value, int) or not _in_range(value, low, high, False, False):
        raise ValueError(f"{path}={value!r} must be an integer {_range_text(low, high, False, False)}".rstrip())
    return value


def check_number(config, path: str, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False):
    """The field is a finite real number within the bounds (open where asked); returns it."""
    value = get(config, path)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and _in_range(value, low, high, low_open, high_open))
    if not ok:
        raise ValueError(f"{path}={value!r} must be a finite number {_range_text(low, high, low_open, high_open)}".rstrip())
    return value


def check_choice(config, path: str, choices: Sequence):
    """The field is one of `choices`; returns it."""
    value = get(config, path)
    if value not in tuple(choices):
        raise ValueError(f"unknown {path}={value!r}; choose one of {tuple(choices)}")
    return value


def check_float_dtype(config, path: str, allow_empty: bool = False):
    """The field names a floating-point dtype ("float32", "bfloat16", ...); "" where allowed."""
    value = get(config, path)
    if allow_empty and value == "":
        return value
    try:
        ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        hint = ' or "" (float32)' if allow_empty else ""
        raise ValueError(f"{path}={value!r} must name a floating-point dtype such as 'float32' or 'bfloat16'{hint}")
    return value
