"""ConfigDict sections built from dataclasses: every field settable on the command line.

A field whose value is None becomes an ml_collections placeholder typed by the field's
annotation (`Optional[int]` -> `placeholder(int)`; a union of several types, or a
generic such as `Mapping[str, Any]` -> `placeholder(object)`, which takes any value and
parses the command line as a Python literal, else as a string). A bare None would
accept any assignment in Python but could not be overridden from the command line.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

import ml_collections


def placeholder_for(hint: Any) -> ml_collections.FieldReference:
  """An unset placeholder for a field annotated `hint` (None excluded from the type)."""
  types = [t for t in typing.get_args(hint) if t is not type(None)]
  if not types and isinstance(hint, type) and hint is not type(None):
    types = [hint]
  field_type = types[0] if len(types) == 1 and isinstance(types[0], type) else object
  return ml_collections.config_dict.placeholder(field_type)


def section(cls: type, values: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A ConfigDict of `values` (field name -> value) of dataclass `cls`; None values
  become placeholders typed by `cls`'s annotations. Keys that are not fields of `cls`
  are kept as they are."""
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  return ml_collections.ConfigDict({
      k: placeholder_for(hints[k]) if v is None and k in fields else v
      for k, v in values.items()})
