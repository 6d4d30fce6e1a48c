"""Reading safetensors checkpoints with numpy only: memory-mapped, no copies.

The `safetensors` package's numpy API cannot return bfloat16, so the documented format
is parsed here (an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the
data) and bfloat16 comes from ml_dtypes. A tensor is a read-only numpy view of the
mapped file, so a caller that slices it reads only that slice from disk.
"""
from __future__ import annotations

import json
import math
import pathlib
import struct
from typing import Dict, Mapping

import ml_dtypes
import numpy as np

# safetensors dtype tags we read (little-endian, as the format specifies).
DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
          "BF16": np.dtype(ml_dtypes.bfloat16)}


class SafetensorsFile:
  """A memory-mapped safetensors file (format in the module docstring)."""

  def __init__(self, filename: pathlib.Path):
    self.filename = filename
    size = filename.stat().st_size
    with open(filename, "rb") as f:
      head = f.read(8)
      n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
      if n < 2 or 8 + n > size:
        raise ValueError(f"{filename} is not a safetensors file (bad header length).")
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise ValueError(f"{filename} is not a safetensors file (header: {e}).") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self.entries: Dict[str, dict] = header
    self._start, self._data_size = 8 + n, size - 8 - n
    self._map = None

  def array(self, name: str) -> np.ndarray:
    """The tensor as a read-only numpy view of the mapped file (no copy)."""
    entry = self.entries[name]
    dtype = DTYPES[entry["dtype"]]  # checked by the caller
    shape = tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= self._data_size:
      raise ValueError(f"{name} in {self.filename} has data_offsets {[begin, end]} that do not "
                       f"fit its shape {shape} {entry['dtype']} (corrupt or truncated file).")
    if self._map is None:
      self._map = np.memmap(self.filename, dtype=np.uint8, mode="r")
    return self._map[self._start + begin:self._start + end].view(dtype).reshape(shape)


def open_tensors(path: pathlib.Path) -> Dict[str, SafetensorsFile]:
  """Tensor name -> the file that holds it, for a single-file or sharded checkpoint."""
  single, index = path / "model.safetensors", path / "model.safetensors.index.json"
  if single.is_file():
    f = SafetensorsFile(single)
    return {name: f for name in f.entries}
  if not index.is_file():
    found = sorted(p.name for p in path.iterdir())[:20]
    raise FileNotFoundError(
        f"{path} has neither model.safetensors nor model.safetensors.index.json (found "
        f"{found}); only safetensors checkpoints are read (convert .bin/.pth ones with "
        "transformers first).")
  weight_map = json.loads(index.read_text()).get("weight_map")
  if not isinstance(weight_map, Mapping):
    raise ValueError(f"{index} has no 'weight_map' dict.")
  files: Dict[str, SafetensorsFile] = {}
  out = {}
  for name, filename in weight_map.items():
    if filename not in files:
      if not (path / filename).is_file():
        raise FileNotFoundError(f"{index} puts tensor {name!r} in {filename!r}, which is not in "
                                f"{path}.")
      files[filename] = SafetensorsFile(path / filename)
    if name not in files[filename].entries:
      raise ValueError(f"{index} puts tensor {name!r} in {filename!r}, which has no such tensor.")
    out[name] = files[filename]
  for f in files.values():  # tensors the index forgot still count (as unexpected)
    for name in f.entries:
      out.setdefault(name, f)
  return out

