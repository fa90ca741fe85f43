"""Datasheet figures of common accelerators: memory capacity and dense peak FLOP/s. Pure data.

Capacities are what `torch.cuda.mem_get_info()` (cudaMemGetInfo) reports as the total — a little
less than nvidia-smi shows and than the box says (an H100 SXM 80GB: 81,559 MiB in nvidia-smi,
81,089 MiB = 79.19 GiB to torch). Where such a report was found the figure is that (`reported`);
elsewhere it is nvidia-smi's figure less 512 MiB, the middle of the 470-770 MiB gap seen on
H100 and A100 cards (`derived`). On a card that is present, batchprobe uses what it reports.

Peaks are dense (no structured sparsity) tensor-core figures: bf16/fp16; TF32 for float32 math
that runs in TF32 (cuDNN convolutions by default; matmuls when `allow_tf32` or
`float32_matmul_precision` says so); plain FP32 otherwise. Override with `plan.peak_tflops`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

MiB = 1024**2
_SMI_GAP = 512 * MiB  # nvidia-smi's total less what torch sees, where no report was found


@dataclass(frozen=True)
class Gpu:
    key: str  # what users type: --gpu h100-80gb
    name: str  # what the device reports (matched by substrings in `aliases`)
    capacity_bytes: int  # the total torch sees
    tflops_16bit: float  # bf16/fp16 dense
    tflops_tf32: float  # TF32 dense (= FP32 on cards without TF32)
    tflops_fp32: float
    aliases: tuple[str, ...] = ()
    capacity_source: Literal["reported", "derived"] = "derived"

    @property
    def major(self) -> int:
        """Compute capability major: what sets cuBLAS's default workspace."""
        if self.key.startswith(("h100", "h200")):
            return 9
        return 7 if self.key.startswith(("v100", "t4")) else 8

    def peak_flops(self, precision: str, tf32: bool = False) -> float:
        if precision != "fp32":
            return 1e12 * self.tflops_16bit
        return 1e12 * (self.tflops_tf32 if tf32 else self.tflops_fp32)


def _derived(smi_mib: int) -> int:
    return smi_mib * MiB - _SMI_GAP


GPUS: tuple[Gpu, ...] = (
    Gpu("h200", "NVIDIA H200", _derived(143771), 989.4, 494.7, 66.9, ("h200",)),
    Gpu("h100-80gb", "NVIDIA H100 80GB HBM3 (SXM)", 81089 * MiB, 989.4, 494.7, 66.9, ("h100 80gb hbm3", "h100 sxm"), "reported"),
    Gpu("h100-pcie", "NVIDIA H100 PCIe", 81008 * MiB, 756.0, 378.0, 51.2, ("h100 pcie",), "reported"),
    Gpu("h100-nvl", "NVIDIA H100 NVL", _derived(95830), 835.0, 417.5, 60.0, ("h100 nvl",)),
    Gpu("a100-80gb", "NVIDIA A100 80GB", 81152 * MiB, 312.0, 156.0, 19.5, ("a100-sxm4-80gb", "a100 80gb", "a100-pcie-80gb"), "reported"),
    Gpu("a100-40gb", "NVIDIA A100 40GB", 40448 * MiB, 312.0, 156.0, 19.5, ("a100-sxm4-40gb", "a100-pcie-40gb", "a100 40gb"), "reported"),
    Gpu("l40s", "NVIDIA L40S", _derived(46068), 362.0, 183.0, 91.6, ("l40s",)),
    Gpu("l4", "NVIDIA L4", _derived(23034), 121.0, 60.0, 30.3, ("nvidia l4",)),
    Gpu("a10g", "NVIDIA A10G", _derived(23028), 125.0, 62.5, 31.2, ("a10g",)),
    Gpu("a10", "NVIDIA A10", _derived(23028), 125.0, 62.5, 31.2, ("nvidia a10",)),
    Gpu("rtx-6000-ada", "NVIDIA RTX 6000 Ada", _derived(49140), 364.2, 182.1, 91.1, ("rtx 6000 ada",)),
    Gpu("rtx-a6000", "NVIDIA RTX A6000", _derived(49140), 154.8, 77.4, 38.7, ("rtx a6000",)),
    Gpu("rtx-4090", "NVIDIA GeForce RTX 4090", _derived(24564), 165.2, 82.6, 82.6, ("rtx 4090",)),
    Gpu("rtx-3090", "NVIDIA GeForce RTX 3090", _derived(24576), 71.0, 35.6, 35.6, ("rtx 3090",)),
    Gpu("v100-32gb", "Tesla V100 32GB", _derived(32768), 125.0, 15.7, 15.7, ("v100-sxm2-32gb", "v100-pcie-32gb", "v100 32gb")),
    Gpu("v100-16gb", "Tesla V100 16GB", _derived(16384), 125.0, 15.7, 15.7, ("v100-sxm2-16gb", "v100-pcie-16gb", "v100")),
    Gpu("t4", "Tesla T4", _derived(15360), 65.0, 8.1, 8.1, ("tesla t4", " t4")),
    Gpu("mi300x", "AMD Instinct MI300X", _derived(196592), 1307.4, 653.7, 163.4, ("mi300x",)),
    Gpu("mi250x", "AMD Instinct MI250X", _derived(131072), 383.0, 47.9, 47.9, ("mi250x",)),
)  # fmt: skip


#: what people type for a card, where it names the usual variant
SHORTHANDS = {
    "h100": "h100-80gb",
    "h100-sxm": "h100-80gb",
    "a100": "a100-80gb",
    "v100": "v100-32gb",
    "a6000": "rtx-a6000",
    "6000-ada": "rtx-6000-ada",
    "4090": "rtx-4090",
    "3090": "rtx-3090",
}


def _norm(key: str) -> str:
    return key.strip().lower().replace("_", "-").replace(" ", "-")


def _bare(key: str) -> str:
    return "".join(c for c in key.lower() if c.isalnum())


def lookup(key: str) -> Gpu | None:
    """By the key users type: `h100-80gb`, case and punctuation tolerant (`H100_80GB`,
    `rtx4090`), and the usual shorthands (`h100` is the 80 GB SXM card, `a100` the 80 GB)."""
    norm = _norm(key)
    norm = SHORTHANDS.get(norm, SHORTHANDS.get(_bare(norm), norm))
    for gpu in GPUS:
        if gpu.key == norm or _bare(gpu.key) == _bare(norm):
            return gpu
    return None


def suggest(key: str) -> list[str]:
    """Close keys: those that start with what was typed, then spelling neighbours."""
    norm = _norm(key)
    starts = [g.key for g in GPUS if g.key.startswith(norm) or _bare(g.key).startswith(_bare(norm))]
    close = difflib.get_close_matches(norm, [g.key for g in GPUS], n=3, cutoff=0.4)
    return list(dict.fromkeys([*starts, *close]))[:4]


def match_device_name(name: str) -> Gpu | None:
    """The table entry for a device name as torch reports it ('NVIDIA A100-SXM4-80GB')."""
    text = f" {name.lower()}"
    for gpu in GPUS:  # ordered so that specific names come before their prefixes
        if any(alias in text for alias in gpu.aliases):
            return gpu
    return None
