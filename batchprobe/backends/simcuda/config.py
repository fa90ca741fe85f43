"""What the simulated GPU is: its size, its libraries' appetites, where it fails."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from batchprobe.units import parse_bytes

MiB = 1024**2

#: the library errors the simulator raises when a library's own scratch does not fit
LIBRARY_ERRORS = {
    "cublas": "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasLtMatmul( ltHandle, "
    "computeDesc.descriptor(), &alpha_val, mat1_ptr, Adesc.descriptor(), mat2_ptr, "
    "Bdesc.descriptor(), &beta_val, result_ptr, Cdesc.descriptor(), result_ptr, "
    "Cdesc.descriptor(), &heuristicResult.algo, workspace.mutable_data_ptr(), workspaceSize, "
    "at::cuda::getCurrentCUDAStream())`",
    "cufft": "cuFFT error: CUFFT_ALLOC_FAILED",
}


@dataclass(frozen=True)
class SimConfig:
    #: what get_device_properties reports, and the size cudaMemGetInfo reports (an H100 SXM:
    #: 81,089 MiB, 79.19 GiB — less than the 80 GB on the box)
    name: str = "NVIDIA H100 80GB HBM3"
    total_bytes: int = 81089 * MiB
    capability: tuple[int, int] = (9, 0)
    multiprocessors: int = 132
    device_count: int = 1
    #: the CUDA context, created by the first CUDA call (CUDA 12 with lazy loading: ~300-600 MiB)
    context_bytes: int = 500 * MiB
    #: cuBLAS's workspace per thread; None: torch's default for the capability
    cublas_workspace_bytes: int | None = None
    cublas_handle_bytes: int = 4 * MiB
    cublas_create_error: str = "CUBLAS_STATUS_NOT_INITIALIZED"
    cudnn_handle_bytes: int = 8 * MiB
    cudnn_default_workspace_bytes: int = 1 * MiB
    cudnn_max_workspace_bytes: int = 1024 * MiB
    #: input elements beyond which a convolution raises CUDNN_STATUS_NOT_SUPPORTED
    cudnn_unsupported_above: int | None = None
    #: per-call scratch outside the allocator, by library (cublas, cudnn, cufft, raw)
    library_scratch: dict[str, int] = field(default_factory=dict)
    #: the text raised when that scratch does not fit (default: the library's usual one)
    library_errors: dict[str, str] = field(default_factory=dict)
    #: ops (aten names) whose scratch is a raw cudaMalloc: "CUDA error: out of memory"
    raw_scratch_ops: tuple[str, ...] = ()
    #: NCCL's buffers per communicator, outside the allocator (intra-node: ~0.5-1.6 GiB)
    nccl_buffer_bytes: int = 512 * MiB
    #: shared between processes: the memory each holds on each physical GPU
    state_dir: str | None = None
    #: the physical GPU that device 0 is (a launcher giving each rank one visible GPU)
    physical_id: int = 0
    #: statistics calls raise after a sticky error too (the strictest reading)
    sticky_stats_raise: bool = True
    #: collectives: "nccl" (gloo underneath, with NCCL's buffers and watchdog) or "gloo"
    collectives: str = "nccl"

    def workspace_bytes(self) -> int:
        """cuBLAS's default workspace (CUBLAS_WORKSPACE_CONFIG ':4096:8' on sm90 and later,
        ':4096:2:16:8' before)."""
        if self.cublas_workspace_bytes is not None:
            return self.cublas_workspace_bytes
        return 4096 * 8 * 1024 if self.capability[0] >= 9 else 4096 * 1024 * 2 + 16 * 1024 * 8

    def library_error(self, library: str, benchmark: bool) -> str:
        if library in self.library_errors:
            return self.library_errors[library]
        if library == "cudnn":  # cuDNN v9's frontend: no engine whose workspace fits
            mode = "FIND" if benchmark else "GET"
            return f"{mode} was unable to find an engine to execute this computation"
        return LIBRARY_ERRORS[library]

    def collective_backend(self) -> str:
        return "batchprobe_simnccl" if self.collectives == "nccl" else "gloo"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SimConfig:
        """From BATCHPROBE_SIMULATE_CUDA: '1' for the defaults, or a JSON object of fields
        (sizes as bytes or text such as '24GiB')."""
        data: dict[str, Any] = {} if text.strip() in ("1", "true") else json.loads(text)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(fields)
        if unknown:
            raise ValueError(f"unknown simulated-CUDA settings: {', '.join(sorted(unknown))}")
        for key, value in list(data.items()):
            if key.endswith("_bytes") and isinstance(value, str):
                data[key] = parse_bytes(value)
            elif key == "library_scratch":
                data[key] = {k: parse_bytes(v) for k, v in value.items()}
            elif key in ("capability", "raw_scratch_ops"):
                data[key] = tuple(value)
        return cls(**data)
