"""Datasheet figures of common accelerators: memory capacity and dense peak FLOP/s. Pure data.

Peaks are dense (no structured sparsity) tensor-core figures for bf16/fp16 and plain FP32 for fp32
(PyTorch does not use TF32 for matmuls unless asked). Capacities are what nvidia-smi / rocm-smi
report for the card. Override with `plan.peak_tflops` or `--capacity` when yours differs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

MiB = 1024**2


@dataclass(frozen=True)
class Gpu:
    key: str  # what users type: --gpu h100-80gb
    name: str  # what the device reports (matched by substrings in `aliases`)
    capacity_bytes: int
    tflops_16bit: float  # bf16/fp16 dense
    tflops_fp32: float
    aliases: tuple[str, ...] = ()

    def peak_flops(self, precision: str) -> float:
        return 1e12 * (self.tflops_fp32 if precision == "fp32" else self.tflops_16bit)


GPUS: tuple[Gpu, ...] = (
    Gpu("h200", "NVIDIA H200", 143771 * MiB, 989.4, 66.9, ("h200",)),
    Gpu("h100-80gb", "NVIDIA H100 80GB HBM3 (SXM)", 81559 * MiB, 989.4, 66.9, ("h100 80gb hbm3", "h100 sxm")),
    Gpu("h100-pcie", "NVIDIA H100 PCIe", 81559 * MiB, 756.0, 51.2, ("h100 pcie",)),
    Gpu("h100-nvl", "NVIDIA H100 NVL", 95830 * MiB, 835.0, 60.0, ("h100 nvl",)),
    Gpu("a100-80gb", "NVIDIA A100 80GB", 81920 * MiB, 312.0, 19.5, ("a100-sxm4-80gb", "a100 80gb", "a100-pcie-80gb")),
    Gpu("a100-40gb", "NVIDIA A100 40GB", 40960 * MiB, 312.0, 19.5, ("a100-sxm4-40gb", "a100-pcie-40gb", "a100 40gb")),
    Gpu("l40s", "NVIDIA L40S", 46068 * MiB, 362.0, 91.6, ("l40s",)),
    Gpu("l4", "NVIDIA L4", 23034 * MiB, 121.0, 30.3, ("nvidia l4",)),
    Gpu("a10g", "NVIDIA A10G", 23028 * MiB, 125.0, 31.2, ("a10g",)),
    Gpu("a10", "NVIDIA A10", 23028 * MiB, 125.0, 31.2, ("nvidia a10",)),
    Gpu("rtx-6000-ada", "NVIDIA RTX 6000 Ada", 49140 * MiB, 364.2, 91.1, ("rtx 6000 ada",)),
    Gpu("rtx-a6000", "NVIDIA RTX A6000", 49140 * MiB, 154.8, 38.7, ("rtx a6000",)),
    Gpu("rtx-4090", "NVIDIA GeForce RTX 4090", 24564 * MiB, 165.2, 82.6, ("rtx 4090",)),
    Gpu("rtx-3090", "NVIDIA GeForce RTX 3090", 24576 * MiB, 71.0, 35.6, ("rtx 3090",)),
    Gpu("v100-32gb", "Tesla V100 32GB", 32768 * MiB, 125.0, 15.7, ("v100-sxm2-32gb", "v100-pcie-32gb", "v100 32gb")),
    Gpu("v100-16gb", "Tesla V100 16GB", 16384 * MiB, 125.0, 15.7, ("v100-sxm2-16gb", "v100-pcie-16gb", "v100")),
    Gpu("t4", "Tesla T4", 15360 * MiB, 65.0, 8.1, ("tesla t4", " t4")),
    Gpu("mi300x", "AMD Instinct MI300X", 196592 * MiB, 1307.4, 163.4, ("mi300x",)),
    Gpu("mi250x", "AMD Instinct MI250X", 131072 * MiB, 383.0, 47.9, ("mi250x",)),
)  # fmt: skip


def lookup(key: str) -> Gpu | None:
    """By the key users type (`h100-80gb`, case and punctuation tolerant)."""
    norm = key.strip().lower().replace("_", "-").replace(" ", "-")
    for gpu in GPUS:
        if gpu.key == norm:
            return gpu
    return None


def suggest(key: str) -> list[str]:
    return difflib.get_close_matches(key.lower(), [g.key for g in GPUS], n=3, cutoff=0.4)


def match_device_name(name: str) -> Gpu | None:
    """The table entry for a device name as torch reports it ('NVIDIA A100-SXM4-80GB')."""
    text = f" {name.lower()}"
    for gpu in GPUS:  # ordered so that specific names come before their prefixes
        if any(alias in text for alias in gpu.aliases):
            return gpu
    return None
