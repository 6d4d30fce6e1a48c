"""Argument checks shared by the library, the models and the experiments.

Every check raises a ValueError that names the argument, the value it got and what
would be valid, and returns the value in canonical form (a plain `int`, `float` or
`bool`), so callers write `n = checks.positive_int("n", n)` instead of repeating the
isinstance tests (where `True` is an `int` and numpy integers are not).
"""
from __future__ import annotations

import math
from typing import Any, Collection, Optional

import numpy as np


def is_int(value: Any) -> bool:
  """A Python or numpy integer, not a bool."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
  """A Python or numpy real number (int or float), not a bool."""
  return is_int(value) or isinstance(value, (float, np.floating))


def integer(name: str, value: Any, *, minimum: Optional[int] = None,
            maximum: Optional[int] = None, optional: bool = False,
            what: str = "") -> Optional[int]:
  """`value` as an int in [minimum, maximum] (either bound may be None).

  Args:
    name: how the caller calls the argument, e.g. "block_q" or "config.train.steps".
    optional: None is accepted (and returned).
    what: a few words on what the value is, appended to the message, e.g.
      "(the number of CPU devices)".
  """
  if optional and value is None:
    return None
  if not is_int(value) or (minimum is not None and value < minimum) or (
      maximum is not None and value > maximum):
    if minimum == 1 and maximum is None:
      kind = "a positive int"
    elif minimum == 0 and maximum is None:
      kind = "a non-negative int"
    else:
      lo = "" if minimum is None else f" >= {minimum}"
      hi = "" if maximum is None else f" <= {maximum}"
      kind = "an int" + lo + ("," if lo and hi else "") + hi
    none = "None or " if optional else ""
    tail = f" {what}" if what else ""
    raise ValueError(f"{name} must be {none}{kind}{tail}; got {value!r}.")
  return int(value)


def positive_int(name: str, value: Any, *, optional: bool = False,
                 what: str = "") -> Optional[int]:
  """`value` as an int >= 1 (None too if `optional`)."""
  return integer(name, value, minimum=1, optional=optional, what=what)


def number(name: str, value: Any, *, low: Optional[float] = None,
           high: Optional[float] = None, low_inclusive: bool = True,
           high_inclusive: bool = True, optional: bool = False) -> Optional[float]:
  """`value` as a finite float within the given bounds."""
  if optional and value is None:
    return None
  ok = is_number(value) and math.isfinite(value)
  if ok and low is not None:
    ok = value >= low if low_inclusive else value > low
  if ok and high is not None:
    ok = value <= high if high_inclusive else value < high
  if not ok:
    bounds = []
    if low is not None:
      bounds.append(f"{'>=' if low_inclusive else '>'} {low}")
    if high is not None:
      bounds.append(f"{'<=' if high_inclusive else '<'} {high}")
    kind = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    raise ValueError(f"{name} must be {'None or ' if optional else ''}{kind}; "
                     f"got {value!r}.")
  return float(value)


def boolean(name: str, value: Any) -> bool:
  """A Python (or numpy) bool, nothing else (0/1 are easy to pass by mistake)."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be a bool (True or False); got {value!r}.")
  return bool(value)


def choice(name: str, value: Any, choices: Collection[Any]) -> Any:
  """`value` if it is one of `choices`."""
  if value not in tuple(choices):
    raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}.")
  return value


def round_up(n: int, m: int) -> int:
  """The smallest multiple of m that is >= n."""
  return -(-n // m) * m


def positive_int_fields(obj: Any, names: Collection[str]) -> None:
  """Checks that the named attributes of a (data)class are positive ints.

  For frozen `BlockSizes`-style dataclasses: call it from `__post_init__`; the
  message names `ClassName.field`. Each field is stored back as a plain `int` (a numpy
  integer would otherwise reach JSON writers and kernel block shapes).
  """
  for name in names:
    value = positive_int(f"{type(obj).__name__}.{name}", getattr(obj, name))
    object.__setattr__(obj, name, value)


def type_name(value: Any) -> str:
  """`module.QualName` of value's type, for error messages (several classes share a
  name, e.g. each kernel's BlockSizes)."""
  t = type(value)
  if t.__module__ == "builtins":
    return t.__qualname__
  return f"{t.__module__}.{t.__qualname__}"
