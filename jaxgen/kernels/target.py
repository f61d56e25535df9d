"""The platform jaxgen's kernels are chosen for: the default backend, or a lowering target.

Kernel paths depend on where the program runs: Pallas on GPU / TPU, shifted multiply-adds on
XLA:CPU, XLA's grouped conv elsewhere (`jaxgen.kernels.depthwise_conv`, `ca_depthwise_conv`'s
"auto"). Normally that is `jax.default_backend()`. `jax.export` lowers for another platform
(a CUDA artifact on a CPU-only machine), so `jaxgen.export` traces inside
`lowering_for(platform)`:

* `platform()` is then the target's ("cuda" / "rocm" -> "gpu"), not the machine's;
* the choice is limited to paths whose serialized form stays loadable: no Triton custom calls
  (Pallas on GPU; Triton IR carries no compatibility guarantee, and jax.export's safety check
  refuses them), while Mosaic TPU kernels ("tpu_custom_call") are on jax.export's stable list;
* jax's in-memory trace caches are cleared on entry and exit: a module-level `jax.jit` traced
  earlier for the machine's backend would otherwise be reused with the other platform's
  kernels baked in.
"""

import contextlib
import contextvars
from typing import Iterator, Optional

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}

# The lowering target while inside `lowering_for`, else None (the default backend).
_TARGET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "jaxgen_kernel_target", default=None)


def normalize(name: str) -> str:
  """A backend or jax.export platform name -> the kernel platform: "cuda" / "rocm" -> "gpu";
  others ("cpu", "gpu", "tpu", ...) lower-cased as they are."""
  name = name.lower()
  return _ALIASES.get(name, name)


def platform() -> str:
  """"cpu" | "gpu" | "tpu": the lowering target inside `lowering_for`, else the default
  backend."""
  target = _TARGET.get()
  return target if target is not None else normalize(jax.default_backend())


def exporting() -> bool:
  """Whether the trace is for a serialized artifact (`lowering_for`)."""
  return _TARGET.get() is not None


def pallas_available() -> bool:
  """Whether "auto" kernels may take the Pallas path: on GPU / TPU, except a GPU artifact
  (its Triton custom call is not a stable export target)."""
  target = platform()
  if target == "gpu":
    return not exporting()
  return target == "tpu"


@contextlib.contextmanager
def lowering_for(target: str) -> Iterator[str]:
  """Traces inside pick kernels for `target` (a jax.export platform name); yields the
  normalized platform."""
  if normalize(target) not in PLATFORMS:
    raise ValueError(f"unknown lowering platform {target!r}; known: "
                     f"{sorted(PLATFORMS + tuple(_ALIASES))}")
  token = _TARGET.set(normalize(target))
  jax.clear_caches()
  try:
    yield _TARGET.get()
  finally:
    _TARGET.reset(token)
    jax.clear_caches()
