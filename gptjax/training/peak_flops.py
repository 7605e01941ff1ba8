"""The peak FLOP/s that MFU is taken against: the device's nominal peak where it is known, else
(CPU, unknown accelerators) the best matmul rate measured in this process, refreshed as it goes
(a run started within the refresh interval of an earlier one in the process reuses its timing).

Nominal peaks are dense (no sparsity) per jax device. On GPUs, XLA runs float32 dots at its
default precision as TF32 on tensor cores, so their float32 entries are the dense TF32 peaks;
TPUs have no float32 entry (their float32 dots take bf16 passes whose count depends on the
precision setting), so a float32 run there falls back to a measured peak, labelled as such.
"""

from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp

from gptjax.training import flops

# (substring of jax's device_kind, lower case; first match wins) -> {dtype: TFLOP/s per device},
# from the vendors' data sheets (dense, i.e. half the "with sparsity" figures)
NOMINAL_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100 pcie", {"bfloat16": 756.0, "float32": 378.0}),
    ("h100", {"bfloat16": 989.0, "float32": 494.7}),  # SXM; also H100 80GB HBM3
    ("h200", {"bfloat16": 989.0, "float32": 494.7}),  # GH200 too
    ("h800", {"bfloat16": 989.0, "float32": 494.7}),
    ("a100", {"bfloat16": 312.0, "float32": 156.0}),
    ("a800", {"bfloat16": 312.0, "float32": 156.0}),
    ("l40s", {"bfloat16": 362.0, "float32": 183.0}),
    ("a10g", {}),  # not the A10's numbers; measured
    ("a10", {"bfloat16": 125.0, "float32": 62.5}),
    ("l40", {}),  # the L40 (not L40S): measured
    ("l4", {"bfloat16": 121.0, "float32": 60.0}),
    ("tpu v6 lite", {"bfloat16": 918.0}),  # v6e
    ("tpu v5 lite", {"bfloat16": 197.0}),  # v5e
    ("tpu v5p", {"bfloat16": 459.0}),
    ("tpu v5", {"bfloat16": 459.0}),  # v5p reports itself as "TPU v5"
    ("tpu v4", {"bfloat16": 275.0}),  # one device = one chip (megacore)
    ("tpu v3", {"bfloat16": 61.5}),  # one device = one core, half a chip
    ("tpu v2", {"bfloat16": 22.5}),
)
MEASURE_N = 2048  # side of the square matmuls timed for a measured peak
REFRESH_SECONDS = 60.0  # a measured peak is measured again at a log step this long after the last


def nominal_peak(device_kind: str, dtype: str) -> Optional[float]:
  """Dense FLOP/s of one device of `device_kind` computing in `dtype`, or None when unknown."""
  kind = device_kind.lower()
  for key, by_dtype in NOMINAL_TFLOPS:
    if key in kind:
      tflops = by_dtype.get(dtype)
      return None if tflops is None else tflops * 1e12
  return None


def measure_matmul_rate(dtype: str, n: int = MEASURE_N, repeats: int = 3) -> float:
  """FLOP/s of the best of `repeats` n x n matmuls on the default device, measured now."""
  return flops.measure_matmul_peak.__wrapped__(jnp.dtype(dtype), n=n, repeats=repeats)


# dtype -> (best rate, perf_counter time) of this process's default-measure timings, so that a
# run started within the refresh interval of another (a sweep in one process) reuses it
_PROCESS_BEST: dict[str, tuple[float, float]] = {}


class Peak:
  """The FLOP/s of the whole run's devices that MFU divides by, and where it came from.

  `source` is "nominal:<device_kind>" or "measured" (the best rate of this process's timed
  matmuls so far; on CPU the devices share the host's cores, so it is not multiplied by them).
  """

  def __init__(self, dtype: str, device=None, measure=measure_matmul_rate,
               refresh_seconds: float = REFRESH_SECONDS):
    device = device or jax.devices()[0]
    self.dtype, self._measure, self._refresh_seconds = dtype, measure, refresh_seconds
    nominal = nominal_peak(device.device_kind, dtype) if device.platform != "cpu" else None
    if nominal is not None:
      self.flops = nominal * jax.device_count()
      self.source = f"nominal:{device.device_kind}"
      self._measured_at = None
    else:
      self.source = "measured"
      self.flops, self._measured_at = 0.0, None
      self.refresh()

  @property
  def measured(self) -> bool:
    """Whether the peak comes from timed matmuls (and is refreshed) rather than a table."""
    return self.source == "measured"

  def refresh(self) -> None:
    """Measures the matmul rate again and keeps the highest rate seen (measured peaks only)."""
    if not self.measured:
      return
    if self._measure is not measure_matmul_rate:
      self.flops = max(self.flops, self._measure(self.dtype) * jax.process_count())
      self._measured_at = time.perf_counter()
      return
    best, at = _PROCESS_BEST.get(self.dtype, (0.0, -float("inf")))
    if self._measured_at is None and time.perf_counter() - at < self._refresh_seconds:
      self.flops, self._measured_at = max(self.flops, best * jax.process_count()), at
      return  # measured by an earlier run of this process less than the interval ago
    rate = max(best, self._measure(self.dtype))
    self._measured_at = time.perf_counter()
    _PROCESS_BEST[self.dtype] = (rate, self._measured_at)
    self.flops = max(self.flops, rate * jax.process_count())

  def refresh_due(self) -> bool:
    """Whether a measured peak is older than the refresh interval."""
    return self.measured and time.perf_counter() - self._measured_at >= self._refresh_seconds

  def fields(self) -> dict:
    """What metrics.jsonl records beside each MFU: the peak and its source."""
    return {"peak_flops": float(self.flops), "peak_source": self.source}
