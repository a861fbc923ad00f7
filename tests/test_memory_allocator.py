"""The caching-allocator and NCCL terms of the memory model, by hand-derived numbers.

The allocator rules are those of c10/cuda/CUDACachingAllocator.cpp (torch 2.13): 512 B
rounding, 20 MiB segments for large requests under 10 MiB, 2 MiB rounding above,
best-fit reuse of cached blocks with splitting, merging of free neighbours in a segment.
"""

import pytest

from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.executors import resolve_executor
from cost_models.memory import memory_terms, nccl_bytes, simulate_allocator
from cost_models.specs import MODEL_PRESETS

MiB = 2**20
L8B = MODEL_PRESETS["llama3-8b"]


def test_segment_sizes_follow_the_allocator_constants():
    assert simulate_allocator([("alloc", "a", 5 * MiB)]) == (20 * MiB, 5 * MiB)  # kLargeBuffer
    assert simulate_allocator([("alloc", "a", 11 * MiB + 1)]) == (12 * MiB, 11 * MiB + 512)  # 2 MiB round
    assert simulate_allocator([("alloc", "a", 1000)]) == (2 * MiB, 1024)  # small pool, 512 B round


def test_freed_block_is_reused_by_a_smaller_request_not_a_larger_one():
    smaller = [("alloc", "a", 100 * MiB), ("free", "a", 0), ("alloc", "b", 60 * MiB)]
    assert simulate_allocator(smaller)[0] == 100 * MiB
    larger = [("alloc", "a", 100 * MiB), ("free", "a", 0), ("alloc", "b", 120 * MiB)]
    assert simulate_allocator(larger)[0] == 220 * MiB
    # Two freed neighbours in one expandable segment merge and serve a request of their sum.
    merged = [("alloc", "a", 100 * MiB), ("alloc", "b", 100 * MiB), ("alloc", "c", 10 * MiB),
              ("free", "a", 0), ("free", "b", 0), ("alloc", "d", 200 * MiB)]
    assert simulate_allocator(merged, expandable_segments=True)[0] == 210 * MiB
    assert simulate_allocator(merged, expandable_segments=False)[0] == 410 * MiB


@pytest.mark.parametrize("expandable", [False, True])
def test_full_sequence_fp32_loss_strands_the_logits_block(expandable):
    """By hand (L = tokens x vocab elements, bytes per element): forward holds logits (2),
    the fp32 copy (4) and log-softmax (4) = 10 L; the copy and, after ``del pred``, the
    logits are freed. Backward: nll grad (4) reuses the copy's block (or 4 of the merged
    6), log-softmax's grad (4) fits no free block: a new one. Reserved 14 L, allocated at
    most 12 L: 2 L stranded, with or without expandable segments."""
    cfg = TrainConfig(Parallelism(dp_shard=8), 8192, 2, ac=ACPolicy.uniform("selective", 32))
    ex = resolve_executor("torchtitan").with_overrides(expandable_segments=expandable)
    L = 16384 * 128256
    assert memory_terms(L8B, cfg, ex).loss_stranded_bytes == pytest.approx(2 * L, abs=ROUND)
    # Keeping the logits through backward (no ``del pred``) strands nothing but holds 14 L.
    kept = ex.with_overrides(logits_freed_before_backward=False)
    assert memory_terms(L8B, cfg, kept).loss_stranded_bytes == 0
    # A compiled loss (fused upcast + log-softmax) requests only logits-sized blocks.
    fused = ex.with_overrides(compile=True, loss_compiled_with_model=True)
    assert memory_terms(L8B, cfg, fused).loss_stranded_bytes == 0


ROUND = 2 * MiB


def test_side_stream_pools_by_hand():
    """FSDP2's all-gather outputs (copy-in stream) and reduce-scatter outputs = sharded
    grads (reduce-scatter stream), for Llama 3 8B on 8 ranks: the root unit's bf16 params
    (embedding + output + final norm, 2 x 128256 x 4096 + 4096) and every fp32 sharded grad (8.03e9 / 8 x 4)."""
    cfg = TrainConfig(Parallelism(dp_shard=8), 8192, 2, ac=ACPolicy.uniform("selective", 32))
    terms = memory_terms(L8B, cfg, "torchtitan")
    root = 2 * 128256 * 4096 + 4096  # embedding + output + the final norm's weight
    assert terms.allocator_pool_bytes == pytest.approx(2 * root + L8B.num_params / 8 * 4)


def test_nccl_per_communicator_and_all_to_all_peer():
    ex = resolve_executor("torchtitan")
    one = TrainConfig(Parallelism(dp_shard=8), 8192)
    assert nccl_bytes(one, ex) == ex.nccl_communicator_bytes  # 1-D mesh: the default group
    # FSDP (dp_shard x cp), CP and TP groups; the ring's dK/dV permute adds one peer pair.
    ring = TrainConfig(Parallelism(dp_shard=2, cp=4, tp=2), 8192, cp_impl="ring-allgather")
    assert nccl_bytes(ring, ex) == 3 * ex.nccl_communicator_bytes + ex.nccl_alltoall_peer_bytes
    gather = TrainConfig(Parallelism(dp_shard=2, cp=4, tp=2), 8192, cp_impl="allgather-kv")
    assert nccl_bytes(gather, ex) == 3 * ex.nccl_communicator_bytes
    # The cited figures: #964 544-688 MB per group (midpoint 616 MB = 587 MiB); #1685
    # (4.34 - 1.06) GB / 7 peers = 0.469 GB = 447 MiB per all-to-all peer.
    assert ex.nccl_communicator_bytes == round((544e6 + 688e6) / 2 / MiB) * MiB
    assert ex.nccl_alltoall_peer_bytes == round((4.34e9 - 1.06e9) / 7 / MiB) * MiB
