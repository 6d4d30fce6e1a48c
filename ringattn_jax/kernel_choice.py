"""Which blockwise kernel an attention call runs, on which platform, and why.

One rule for every attention function (`flash_attention`, `ring_attention`,
`sharded_attention`, the models): `impl` names the kernel and `backend` the platform
it is built for.

  impl      "xla": the pure-XLA blockwise kernel (`flash_xla`): portable, the fast
              path on CPU, the only one that takes dense bias/mask tensors.
            "pallas": the Pallas kernels (`flash_pallas`): Triton on GPU, Mosaic on TPU,
              the Pallas interpreter on CPU (slow; for tests).
            "auto": Pallas on GPU and TPU when it supports the call's mask features,
              the XLA kernel otherwise.
            "reference": the dense oracle (`flash_attention` only).
  backend   "cpu", "gpu" or "tpu" ("cuda"/"rocm" mean "gpu"); None means
            `jax.default_backend()`. Naming another platform than the machine's builds
            that platform's program (to export it with `jax.export`; it cannot run
            here). It is the platform, never the attention method (that is `method`).

`which_kernel` is the public question "which kernel will this call use, and why";
the attention functions ask it too, so its answer is what they do.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from ringattn_jax.masking import MaskSpec

IMPLS = ("auto", "xla", "pallas", "reference")
# The kernels that run on every device of the sequence-parallel functions (and models).
SEQUENCE_PARALLEL_IMPLS = ("auto", "xla", "pallas")
BACKENDS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def canonical_backend(backend: Optional[str]) -> str:
  """"cpu", "gpu" or "tpu" for `backend` (None: `jax.default_backend()`)."""
  if backend is None:
    backend = jax.default_backend()
  if not isinstance(backend, str) or _ALIASES.get(backend, backend) not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} (or {tuple(_ALIASES)}, meaning "
                     f"'gpu'), or None for jax.default_backend(); got {backend!r}.")
  return _ALIASES.get(backend, backend)


def pallas_unsupported(spec: MaskSpec) -> Optional[str]:
  """The first feature of `spec` the Pallas kernels lack (a phrase), or None."""
  if spec.has_bias:
    return "a dense bias tensor (bias=...)"
  if spec.has_mask:
    return "a dense mask tensor (mask=...)"
  return None


@dataclasses.dataclass(frozen=True)
class KernelChoice:
  """The kernel a call runs.

  Attributes:
    impl: "xla", "pallas" or "reference".
    backend: the platform it is built for ("cpu", "gpu", "tpu").
    interpret: Pallas only: runs in the Pallas interpreter (False for the others).
    reason: why, in a sentence.
  """

  impl: str
  backend: str
  interpret: bool
  reason: str

  def __str__(self):
    how = " (interpreted)" if self.interpret else ""
    return f"{self.impl}{how} on {self.backend}: {self.reason}"


def choose(impl: str, spec: MaskSpec, backend: Optional[str] = None,
           interpret: Optional[bool] = None, impls=IMPLS) -> KernelChoice:
  """The kernel for a call with mask `spec` (see the module docstring).

  Args:
    impl: one of `impls` (the function's own choices, a subset of IMPLS).
    spec: the call's static mask description.
    backend: the platform; None for `jax.default_backend()`.
    interpret: Pallas only: force the interpreter on or off; None: on exactly on CPU.

  Raises:
    ValueError: an unknown impl or backend; impl="pallas" with a feature the Pallas
      kernels lack; Pallas compiled for CPU; `interpret` with another kernel.
  """
  if impl not in impls:
    raise ValueError(f"impl must be one of {impls}; got {impl!r}.")
  backend = canonical_backend(backend)
  missing = pallas_unsupported(spec)
  if impl == "auto":
    if backend == "cpu":
      impl, reason = "xla", ("impl='auto' on CPU: the XLA kernel (Pallas would only "
                             "run in its slow interpreter)")
    elif missing:
      impl, reason = "xla", (f"impl='auto' on {backend}: the call has {missing}, which "
                             "the Pallas kernels do not take")
    else:
      impl, reason = "pallas", (f"impl='auto' on {backend}: the Pallas kernels "
                                f"({'Triton' if backend == 'gpu' else 'Mosaic'}) "
                                "support every mask feature of the call")
  else:
    reason = f"impl={impl!r} was asked for"
  if impl != "pallas":
    if interpret is not None:
      raise ValueError(f"interpret applies to impl='pallas' only; the call runs "
                       f"impl={impl!r}.")
    return KernelChoice(impl, backend, False, reason)
  if missing:
    raise ValueError(f"impl='pallas' does not support {missing}; use impl='xla' (or "
                     "'auto'), or express the mask with is_causal, local_window_size, "
                     "segment_ids or sequence lengths.")
  if interpret is None:
    interpret = backend == "cpu"
  if not interpret and backend == "cpu":
    raise ValueError("Pallas kernels compile for GPU or TPU, not backend='cpu'; pass "
                     "interpret=True (the default on CPU) or use impl='xla'.")
  if interpret:
    reason += "; the Pallas interpreter runs it" + (" (CPU)" if backend == "cpu" else "")
  else:
    reason += f"; compiled by {'Triton' if backend == 'gpu' else 'Mosaic'}"
  return KernelChoice("pallas", backend, bool(interpret), reason)


def which_kernel(impl: str = "auto", *, backend: Optional[str] = None,
                  interpret: Optional[bool] = None, bias=None, mask=None) -> KernelChoice:
  """Which kernel an attention call with these arguments runs, and why.

  Pass what the call passes: `impl` and `backend` as given to `flash_attention`,
  `ring_attention` or `sharded_attention` (a model: its `flash_impl` and `backend`),
  `interpret` as given to `flash_attention` (the others always take the default), and
  `bias` / `mask` if the call has dense bias/mask tensors (the arrays, or True). The
  other mask keywords never change the choice.

  Returns:
    A `KernelChoice`: impl ("xla", "pallas" or "reference"), backend, interpret and the
    reason; `str()` of it reads as a sentence.

  Raises:
    ValueError: as the call would (see `choose`).
  """
  present = lambda a: a is not None and a is not False
  spec = MaskSpec(has_bias=present(bias), has_mask=present(mask))
  return choose(impl, spec, backend, interpret)
