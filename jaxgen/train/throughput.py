"""Throughput accounting: FLOPs of the compiled train step, achieved TFLOP/s and MFU.

FLOPs come from XLA's cost analysis of the compiled (SPMD-partitioned) step, i.e. the FLOPs
one device executes per step, backward pass and gradient accumulation included. MFU divides
the achieved per-device rate by the device's dense peak for the compute dtype; devices not in
`PEAK_TFLOPS` get no MFU rather than a guessed one.
"""

from typing import Optional

import jax

# Dense (no sparsity) peak TFLOP/s per device, keyed by a substring of `device.device_kind`
# (first match wins, so more specific names come first). "float32" is what an fp32 matmul
# runs at under JAX's default precision: TF32 tensor cores on NVIDIA GPUs, one bf16 pass on
# TPUs (so the same number as bf16 there).
PEAK_TFLOPS = (
    ("H200", {"bfloat16": 989.4, "float32": 494.7}),
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float32": 494.7}),  # SXM / HBM3.
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),  # v5e.
    ("TPU v5e", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5p", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),  # v5p reports "TPU v5".
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
)


def peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
  """The table's peak for `device_kind` and "bfloat16" | "float32", or None if unknown."""
  for key, peaks in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


def compiled_flops(compiled) -> Optional[float]:
  """Per-device FLOPs of a compiled computation (None when the backend does not say)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per partition.
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def compiled_temp_bytes(compiled) -> Optional[int]:
  """Scratch memory per device of a compiled computation, from XLA's memory analysis."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  return None if stats is None else int(getattr(stats, "temp_size_in_bytes", 0))


class Throughput:
  """Turns steps/s into images/s, achieved TFLOP/s per device and MFU."""

  def __init__(self, flops_per_step: Optional[float], batch_size: int, dtype: str,
               device_kind: Optional[str] = None):
    self.flops = flops_per_step
    self.batch_size = batch_size
    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    self.device_kind = kind
    self.peak = peak_tflops(kind, dtype)

  def scalars(self, steps_per_sec: float) -> dict:
    out = {"steps_per_sec": steps_per_sec, "images_per_sec": steps_per_sec * self.batch_size}
    if self.flops:
      out["tflops_per_device"] = self.flops * steps_per_sec / 1e12
      if self.peak:
        out["mfu"] = out["tflops_per_device"] / self.peak
    return out


def fmt_bytes(n: float) -> str:
  if n < 1024:
    return f"{int(n)} B"
  for unit in ("KiB", "MiB", "GiB"):
    n /= 1024.0
    if n < 1024 or unit == "GiB":
      break
  return f"{n:.1f} {unit}"


def describe_flops(flops: Optional[float]) -> str:
  return "unknown" if not flops else f"{flops / 1e9:.3g} GFLOP"

