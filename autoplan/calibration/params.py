"""The parameters a calibration may fit, and where each lives (GPU spec or executor profile)."""

from __future__ import annotations

GPU_PARAMS = ("matmul_efficiency", "attention_efficiency", "intra_node_bus_efficiency", "inter_node_bus_efficiency",
              "clock_fraction_at_limit")
EXECUTOR_PARAMS = ("allocator_fragmentation", "cuda_context_bytes")
# The clock under a power cap is fitted only on records of capped parts (--params).
DEFAULT_PARAMS = GPU_PARAMS[:4] + ("allocator_fragmentation",)
KNOWN_PARAMS = GPU_PARAMS + EXECUTOR_PARAMS

# A fitted parameter whose standard error exceeds this fraction of its value is not
# identified by the records: it is reported as such and kept at its prior.
MAX_RELATIVE_STD_ERROR = 0.25
# Step times repeat to about 1% between runs of the same plan; the standard errors use
# at least this much scatter, so a fit through a handful of points is not over-trusted.
NOISE_FLOOR = 0.01
PEAK_MEMORY_KINDS = ("allocated", "reserved", "device")

NOT_SEEN_HINT = {
    "inter_node_bus_efficiency": "no record sends traffic across nodes where it is not hidden behind compute",
    "intra_node_bus_efficiency": "no record's intra-node communication is exposed (it is hidden behind compute)",
    "attention_efficiency": "no record spends measurable time in attention",
    "matmul_efficiency": "no record spends measurable time in matmuls",
    "allocator_fragmentation": "no record measured reserved or device memory (peak_memory_kind allocated only sees tensors)",
    "cuda_context_bytes": "no record measured device memory (peak_memory_kind device)",
    "clock_fraction_at_limit": "no record ran on a power-capped GPU (the clock only slows capped parts)",
}
