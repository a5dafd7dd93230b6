"""GPUs the estimator knows, the headroom a run needs beyond its tensors, and the GPU this process has.

`memory_gib` is what `torch.cuda.get_device_properties(i).total_memory` reports (a little under the
marketing number: HBM/GDDR sizes are GiB, and the driver reserves some). `bf16_tflops` is the dense
BF16 (FP16 on GPUs without BF16) tensor-core rate with FP32 accumulation from the vendor datasheets;
`attainable_tflops` is what large matmuls reach: measured 790 on the H100 (an 8192^3
bf16 matmul), 80% of the datasheet elsewhere (not measured: a stated assumption).

Hand-written hardware tables say (7B: 16 GB minimum / RTX 3090; 13B: 24 GB / A100-40GB; 70B: 80 GB /
several A100s); `lmpipeline estimate` computes the same answer from the model and the config instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

GIB = 2**30

# Beyond torch.cuda.max_memory_allocated(): the CUDA context and library handles (cuBLAS, NCCL) live
# outside the caching allocator, and the allocator keeps freed blocks it cannot reuse for other sizes.
# The bench shows reserved/allocated of 1.04-1.30 (../shared/bench/*.jsonl: 3.95/3.39, 4.51/3.46,
# 21.3/20.7 GiB), so a run needs its peak tensors plus this headroom to be safe.
CUDA_CONTEXT_GIB = 0.5
ALLOCATOR_FRACTION = 0.12
ALLOCATOR_MIN_GIB = 0.25


def headroom_bytes(peak_bytes: float) -> float:
    return CUDA_CONTEXT_GIB * GIB + max(ALLOCATOR_FRACTION * peak_bytes, ALLOCATOR_MIN_GIB * GIB)


def required_bytes(peak_bytes: float) -> float:
    """Device memory a run with this allocated peak needs, headroom included."""
    return peak_bytes + headroom_bytes(peak_bytes)


def max_peak_for(memory_bytes: float) -> float:
    """The largest allocated peak that fits `memory_bytes` of device memory (inverse of required_bytes)."""
    usable = memory_bytes - CUDA_CONTEXT_GIB * GIB
    return max(0.0, min(usable / (1 + ALLOCATOR_FRACTION), usable - ALLOCATOR_MIN_GIB * GIB))


@dataclass(frozen=True)
class GPU:
    name: str
    label: str
    memory_gib: float
    bf16_tflops: float
    bf16: bool = True  # T4 and V100 have no bfloat16 tensor cores: train in fp16 there
    attainable_tflops: float | None = None

    @property
    def flash_attention(self) -> bool:
        """PyTorch's flash (varlen) kernel needs compute capability 8.0, the same GPUs as bf16 tensor cores."""
        return self.bf16

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    @property
    def matmul_tflops(self) -> float:
        return self.attainable_tflops or 0.8 * self.bf16_tflops


# Sorted by memory, then speed: `smallest_fitting` walks this list.
GPUS: tuple[GPU, ...] = (
    GPU("t4-16gb", "NVIDIA T4 16 GB", 14.6, 65.0, bf16=False),
    GPU("v100-16gb", "NVIDIA V100 16 GB", 15.8, 125.0, bf16=False),
    GPU("l4-24gb", "NVIDIA L4 24 GB", 22.0, 121.0),
    GPU("a10-24gb", "NVIDIA A10 24 GB", 22.1, 125.0),
    GPU("rtx-3090-24gb", "GeForce RTX 3090 24 GB", 23.6, 71.0),
    GPU("rtx-4090-24gb", "GeForce RTX 4090 24 GB", 23.6, 165.0),
    GPU("v100-32gb", "NVIDIA V100 32 GB", 31.7, 125.0, bf16=False),
    GPU("a100-40gb", "NVIDIA A100 40 GB", 39.4, 312.0),
    GPU("l40s-48gb", "NVIDIA L40S 48 GB", 44.4, 362.0),
    GPU("a6000-48gb", "NVIDIA RTX A6000 48 GB", 47.5, 155.0),
    GPU("a100-80gb", "NVIDIA A100 80 GB", 79.2, 312.0),
    GPU("h100-80gb", "NVIDIA H100 80 GB (SXM)", 79.2, 989.0, attainable_tflops=790.0),
    GPU("h200-141gb", "NVIDIA H200 141 GB", 139.8, 989.0, attainable_tflops=790.0),
)
GPU_NAMES = tuple(g.name for g in GPUS)
_ALIASES = {"h100": "h100-80gb", "h200": "h200-141gb", "a100": "a100-80gb", "a100-40": "a100-40gb",
            "a100-80": "a100-80gb", "l4": "l4-24gb", "4090": "rtx-4090-24gb", "rtx-4090": "rtx-4090-24gb",
            "3090": "rtx-3090-24gb", "rtx-3090": "rtx-3090-24gb", "a10": "a10-24gb", "a10g": "a10-24gb",
            "t4": "t4-16gb", "l40s": "l40s-48gb", "a6000": "a6000-48gb", "v100": "v100-32gb"}


def gpu(name: str) -> GPU:
    """A GPU by table name or a common alias (h100, 4090, a10g, ...); ValueError for unknown names."""
    key = _ALIASES.get(name.lower(), name.lower())
    for g in GPUS:
        if g.name == key:
            return g
    raise ValueError(f"unknown GPU `{name}`; known: {', '.join(GPU_NAMES)}")


def fits(peak_bytes: float, device: GPU) -> bool:
    return required_bytes(peak_bytes) <= device.memory_bytes


def smallest_fitting(peak_bytes: float | Callable[[GPU], float]) -> GPU | None:
    """The first GPU of the table (by memory) whose memory holds this peak plus headroom. `peak_bytes` may
    depend on the GPU (a function of it): a run without the flash kernel lays its rows out differently."""
    for g in sorted(GPUS, key=lambda g: (g.memory_gib, g.bf16_tflops)):  # equal memory: the slower (cheaper) one
        if fits(peak_bytes(g) if callable(peak_bytes) else peak_bytes, g):
            return g
    return None


def usable_memory_bytes(props, device_index: int) -> float:
    """The memory this process may use on a device: its total, times the cap a process set with
    torch.cuda.set_per_process_memory_fraction (a shared GPU, or a test that plays a smaller one)."""
    import torch

    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda i: 1.0)(device_index)
    return props.total_memory * min(1.0, fraction)


def detect_gpu() -> GPU | None:
    """The GPU this process would train on, with the memory it may use (None without CUDA).

    Known models take their speed from the table; the memory is always the device's own, less any
    per-process cap (usable_memory_bytes)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        usable = usable_memory_bytes(props, index) / GIB
    except Exception:  # noqa: BLE001 - a broken CUDA set-up is reported by the training code itself
        return None
    name = props.name
    mem = props.total_memory / GIB
    lowered = name.lower()
    best = None
    for g in GPUS:
        family = g.name.split("-")[0] if not g.name.startswith("rtx") else g.name.split("-")[1]
        if family in lowered.replace(" ", "").replace("-", "") and abs(g.memory_gib - mem) < 8:
            best = g
            break
    if usable < mem:
        name = f"{name} (capped to {usable:.1f} GiB for this process)"
    if best is not None:
        return GPU(best.name, name, usable, best.bf16_tflops, best.bf16, best.attainable_tflops)
    major = getattr(props, "major", 8)
    return GPU("this-gpu", name, usable, 100.0, bf16=major >= 8)
