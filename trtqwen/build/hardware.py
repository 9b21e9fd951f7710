"""GPU profiles the planner reasons about, and detection of the GPUs this machine has."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trtqwen.errors import UserError


@dataclass(frozen=True)
class GpuProfile:
    name: str
    memory_gib: float  # what the driver reports as total
    bandwidth_gbs: float  # peak DRAM bandwidth, GB/s
    fp16_tflops: float  # dense FP16/BF16 tensor, FP32 accumulate
    int8_tops: float  # dense INT8 tensor
    fp8_tflops: float  # dense FP8 tensor; 0 = no FP8
    compute_capability: str
    p2p: bool  # GPU peer-to-peer between cards
    link_gbs: float  # per-direction bandwidth one card gets for all-reduce traffic
    allreduce_latency_us: float  # latency of one small all-reduce (decode-sized)

    @property
    def has_fp8(self) -> bool:
        return self.fp8_tflops > 0

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30

    def to_dict(self) -> dict:
        return asdict(self)


# PCIe 4.0 x16 without P2P: all-reduce staged through host memory (NCCL SHM), ~half of ~25 GB/s.
_PCIE4_NO_P2P = dict(p2p=False, link_gbs=12.0, allreduce_latency_us=60.0)
_PCIE4_P2P = dict(p2p=True, link_gbs=22.0, allreduce_latency_us=25.0)
# NVLink (H100 SXM): a decode-sized all-reduce inside a CUDA graph took ~10 µs in a 2-GPU probe (FACTS §3) but
# 16–25 µs inside the runtime's decode graphs at TP 2–4 (docs/PERFORMANCE.md §5); the latter is what a step pays.
_NVLINK = dict(p2p=True, link_gbs=350.0, allreduce_latency_us=20.0)

PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in [
        GpuProfile("rtx4090d", 23.99, 1008, 147, 588, 294, "8.9", **_PCIE4_NO_P2P),
        GpuProfile("rtx4090", 23.99, 1008, 165, 660, 330, "8.9", **_PCIE4_NO_P2P),
        GpuProfile("l40s", 44.99, 864, 362, 733, 733, "8.9", **_PCIE4_P2P),
        GpuProfile("a100-40g", 39.39, 1555, 312, 624, 0, "8.0", **_NVLINK),
        GpuProfile("a100-80g", 79.15, 2039, 312, 624, 0, "8.0", **_NVLINK),
        GpuProfile("h100", 79.10, 3350, 989, 1979, 1979, "9.0", **_NVLINK),
        GpuProfile("h200", 139.80, 4800, 989, 1979, 1979, "9.0", **_NVLINK),
    ]
}


def get_profile(name: str) -> GpuProfile:
    key = name.strip().lower().replace("_", "-")
    if key not in PROFILES:
        raise UserError(
            f"unknown GPU profile {name!r}",
            f"use one of {', '.join(PROFILES)} or describe it with --gpu custom --memory-gib --bandwidth-gbs --tflops",
        )
    return PROFILES[key]


def custom_profile(memory_gib: float, bandwidth_gbs: float, fp16_tflops: float, fp8: bool = False) -> GpuProfile:
    if min(memory_gib, bandwidth_gbs, fp16_tflops) <= 0:
        raise UserError("a custom GPU needs positive --memory-gib, --bandwidth-gbs and --tflops")
    return GpuProfile(
        "custom", memory_gib, bandwidth_gbs, fp16_tflops, 2 * fp16_tflops, 2 * fp16_tflops if fp8 else 0, "?",
        **_PCIE4_NO_P2P,
    )


def detect_gpus() -> list[dict]:
    """The GPUs NVML sees (name, memory, compute capability); empty without a driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append({
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_gib": round(mem.total / 2**30, 2),
                "memory_free_gib": round(mem.free / 2**30, 2),
                "compute_capability": f"{major}.{minor}",
            })
        return gpus
    finally:
        pynvml.nvmlShutdown()


def profile_for_gpu_name(gpu_name: str) -> str | None:
    """Map an NVML name ("NVIDIA GeForce RTX 4090 D") to a profile key, if one fits."""
    n = gpu_name.lower().replace(" ", "")
    for needle, key in [("4090d", "rtx4090d"), ("4090", "rtx4090"), ("l40s", "l40s"), ("h200", "h200"),
                        ("h100", "h100"), ("a100-sxm4-40", "a100-40g"), ("a100", "a100-80g")]:
        if needle in n:
            return key
    return None


def compute_capability(value) -> str | None:
    """Compute capability as "8.9", from "8.9", "sm_89", "89" or (8, 9)."""
    if value is None or value == "":
        return None
    if isinstance(value, (tuple, list)):
        return f"{int(value[0])}.{int(value[1])}"
    text = str(value).strip().lower().removeprefix("sm_").removeprefix("sm")
    if "." in text:
        return text
    return f"{text[:-1]}.{text[-1]}" if text.isdigit() and len(text) >= 2 else text
