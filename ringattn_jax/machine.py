"""Which machine a kernel runs on, in the terms that change its best block sizes.

JAX names every CPU just "cpu", yet the best block sizes of the XLA kernel differ
between, say, an Intel CPU with AMX tiles and an AMD one with AVX2 only: what changes
the answer is the vendor, the model and the matrix/vector instruction sets. On CPU they
are read from the operating system (Linux `/proc/cpuinfo`; `sysctl` on macOS), with no
new dependency; on GPU and TPU the device kind names the chip ("NVIDIA H200",
"TPU v5 lite").

A `Machine` is what tuned block-size tables (`tuning`) are keyed on. Reading it has no
side effects beyond reading those files, and happens per call (cached), never at import.
"""
from __future__ import annotations

import dataclasses
import functools
import platform
import subprocess
from typing import Optional, Sequence, Tuple

import jax

from ringattn_jax import kernel_choice

# Instruction-set flags that change matmul speed (x86 names from /proc/cpuinfo; ARM
# names from its "Features" line). Other flags do not change block sizes and would only
# split machines that behave alike.
ISA_FLAGS = (
    "amx_tile", "amx_bf16", "amx_fp16", "amx_int8",
    "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "avx2", "fma",
    "asimd", "bf16", "i8mm", "sve", "sve2", "sme",
)


@dataclasses.dataclass(frozen=True)
class Machine:
  """A machine as tuning tables see it.

  Attributes:
    backend: "cpu", "gpu" or "tpu".
    vendor: CPU vendor id ("GenuineIntel", "AuthenticAMD", an ARM implementer code), or
      the accelerator's vendor word ("NVIDIA", "TPU"); "" when unknown.
    model: CPU model name ("AMD EPYC 9B14") or device kind ("NVIDIA H200").
    isa: sorted `ISA_FLAGS` the CPU has (empty on GPU/TPU).
  """

  backend: str
  vendor: str
  model: str
  isa: Tuple[str, ...] = ()

  def describe(self) -> str:
    """One line for benchmark headers and warnings."""
    isa = f" [{' '.join(self.isa)}]" if self.isa else ""
    vendor = f"{self.vendor} " if self.vendor and self.vendor not in self.model else ""
    return f"{self.backend}: {vendor}{self.model or 'unknown model'}{isa}"

  def to_json(self) -> dict:
    return dict(backend=self.backend, vendor=self.vendor, model=self.model,
                isa=list(self.isa))

  @classmethod
  def from_json(cls, d: dict, where: str = "machine") -> "Machine":
    if not isinstance(d, dict) or set(d) != {"backend", "vendor", "model", "isa"}:
      raise ValueError(f"{where} must be an object with keys backend, vendor, model, "
                       f"isa; got {d!r}.")
    if not all(isinstance(d[k], str) for k in ("backend", "vendor", "model")) or not (
        isinstance(d["isa"], list) and all(isinstance(f, str) for f in d["isa"])):
      raise ValueError(f"{where}: backend, vendor and model must be strings and isa a "
                       f"list of strings; got {d!r}.")
    try:
      backend = kernel_choice.canonical_backend(d["backend"])
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    return cls(backend, d["vendor"], d["model"], tuple(sorted(d["isa"])))


def parse_cpuinfo(text: str) -> Machine:
  """A CPU `Machine` from the text of Linux's /proc/cpuinfo (first processor).

  x86 has "vendor_id", "model name" and "flags"; ARM has "CPU implementer",
  "CPU part" (and sometimes "model name") and "Features".
  """
  fields = {}
  for line in text.splitlines():
    if not line.strip():
      if fields:
        break  # the first processor's block is enough
      continue
    key, sep, value = line.partition(":")
    if sep:
      fields.setdefault(key.strip().lower(), value.strip())
  flags = set((fields.get("flags") or fields.get("features") or "").split())
  vendor = fields.get("vendor_id") or fields.get("cpu implementer", "")
  model = fields.get("model name") or fields.get("cpu model") or ""
  if not model and "cpu part" in fields:
    model = f"ARM part {fields['cpu part']}"
  return Machine("cpu", vendor, model, tuple(f for f in sorted(flags) if f in ISA_FLAGS))


def _macos_cpu() -> Machine:
  def sysctl(name):
    try:
      return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True,
                            timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""
  model = sysctl("machdep.cpu.brand_string")
  isa = []
  if platform.machine() == "arm64":
    isa.append("asimd")
    if sysctl("hw.optional.arm.FEAT_BF16") == "1":
      isa.append("bf16")
    if sysctl("hw.optional.arm.FEAT_SME") == "1":
      isa.append("sme")
  vendor = "Apple" if model.startswith("Apple") else model.split(" ")[0] if model else ""
  return Machine("cpu", vendor, model, tuple(sorted(isa)))


@functools.lru_cache(maxsize=None)
def cpu_machine() -> Machine:
  """This host's CPU (cached)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      return parse_cpuinfo(f.read())
  except OSError:
    pass
  if platform.system() == "Darwin":
    return _macos_cpu()
  return Machine("cpu", "", platform.processor() or platform.machine())


def accelerator_machine(backend: str, device_kinds: Sequence[str]) -> Machine:
  """A GPU/TPU `Machine` from the device kinds JAX reports (the first one)."""
  kind = device_kinds[0] if device_kinds else ""
  vendor = kind.split(" ")[0] if kind else ""
  return Machine(backend, vendor, kind)


@functools.lru_cache(maxsize=None)
def _accelerator(backend: str) -> Optional[Machine]:
  try:
    devices = jax.devices(backend)
  except RuntimeError:  # no such platform here (e.g. exporting for GPU from a CPU)
    return None
  return accelerator_machine(backend, [d.device_kind for d in devices])


def current(backend: Optional[str] = None) -> Optional[Machine]:
  """The machine of `backend` ("cpu", "gpu", "tpu"; None: jax.default_backend()).

  None when this host has no device of that platform (a program built to export):
  no machine, so no tuned table applies.
  """
  backend = kernel_choice.canonical_backend(backend or jax.default_backend())
  if backend == "cpu":
    return cpu_machine()
  return _accelerator(backend)
