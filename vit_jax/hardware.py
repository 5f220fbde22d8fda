"""The chips vit_jax runs on and compiles for: peak FLOP/s, HBM and network bandwidths.

Figures are the vendors' data sheets (cited per row). TPU rows are per JAX device: on
TPU v2 and v3 a device is one TensorCore (two per chip), from v4 on one chip (v4 and
v5p run their two TensorCores as one device, megacore). Network bandwidths are per
chip: ICI both directions over all its links, DCN the chip's share of its host's or
pod's data-centre network. A field the data sheet does not give is None.
"""
from __future__ import annotations

import dataclasses

GiB = 2 ** 30
GB = 1e9
Gbit = 1e9 / 8


@dataclasses.dataclass(frozen=True)
class Tpu:
  generation: str             # the topology prefix: 'v5e' in 'v5e:4x4'
  device_kind: str            # jax's device.device_kind
  devices_per_chip: int
  hbm_bytes: int              # per device
  hbm_bandwidth: float        # bytes/s per device
  peak_bf16: float            # dense FLOP/s per device
  ici_bandwidth: float | None  # bytes/s per chip
  dcn_bandwidth: float | None  # bytes/s per chip
  accelerator_type: str       # libtpu's name for a one-host slice (quiets its start-up)

  @property
  def peak_flops(self) -> dict:
    # TPUs run float32 matmuls as several bfloat16 passes.
    return {"bfloat16": self.peak_bf16, "float32": self.peak_bf16 / 4}


TPUS = {t.generation: t for t in (
    # JAX's own chip table (jax/_src/tpu_info.py): 46 TFLOP/s, 16 GB and 716 GB/s per
    # chip; the Cloud TPU v2 page gives no figures.
    Tpu("v2", "TPU v2", 2, 8 * GiB, 716 * GB / 2, 46e12 / 2, None, None, "v2-8"),
    # cloud.google.com/tpu/docs/v3: 123 TFLOP/s, 32 GiB and 900 GBps per chip.
    Tpu("v3", "TPU v3", 2, 16 * GiB, 900 * GB / 2, 123e12 / 2, None, None, "v3-8"),
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s, 32 GiB, 1200 GBps per chip.
    Tpu("v4", "TPU v4", 1, 32 * GiB, 1200 * GB, 275e12, None, None, "v4-8"),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s, 16 GB, 819 GBps, ICI 1600 Gbps per chip;
    # DCN 6.4 Tbps per 256-chip pod.
    Tpu("v5e", "TPU v5 lite", 1, 16 * GiB, 819 * GB, 197e12, 1600 * Gbit, 6.4e12 / 8 / 256,
        "v5litepod-4"),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s, 95 GiB, 2765 GBps, ICI 1200 GBps and
    # DCN 50 Gbps per chip.
    Tpu("v5p", "TPU v5", 1, 95 * GiB, 2765 * GB, 459e12, 1200 * GB, 50 * Gbit, "v5p-8"),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s, 32 GB, 1640 GBps (1600 in later
    # revisions of the page), ICI 800 GBps per chip; DCN 25.6 Tbps per 256-chip pod.
    Tpu("v6e", "TPU v6 lite", 1, 32 * GiB, 1640 * GB, 918e12, 800 * GB, 25.6e12 / 8 / 256,
        "v6e-4"),
)}

# Dense peak FLOP/s per GPU (no sparsity) by compute dtype, SXM parts (PCIe/NVL parts
# are slightly lower); float32 matmuls run as TF32 under JAX's default precision.
# NVIDIA data sheets: B200, H100/H200, A100, L4.
GPU_PEAK_FLOPS = {
    "b200": {"bfloat16": 2250e12, "float16": 2250e12, "float32": 1100e12},
    "h200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "h100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "a100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "l4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
}

# Peak FLOP/s per JAX device, keyed by a lower-case substring of `device.device_kind`
# (matched longest first: 'tpu v5 lite' before 'tpu v5').
PEAK_FLOPS = {**GPU_PEAK_FLOPS,
              **{t.device_kind.lower(): t.peak_flops for t in TPUS.values()},
              "tpu v5e": TPUS["v5e"].peak_flops, "tpu v5p": TPUS["v5p"].peak_flops,
              "tpu v6": TPUS["v6e"].peak_flops}


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
  """Data-sheet dense peak FLOP/s of one device for `dtype`, or None if unknown."""
  kind = device_kind.lower()
  for key in sorted(PEAK_FLOPS, key=len, reverse=True):
    if key in kind:
      table = PEAK_FLOPS[key]
      return table.get(dtype, table["bfloat16"])
  return None


def tpu(generation: str) -> Tpu | None:
  """The TPU generation named by a topology's prefix ('v5e'), or None."""
  return TPUS.get(generation.lower())
