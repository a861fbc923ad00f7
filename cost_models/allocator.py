"""PyTorch's CUDA caching allocator, simulated: how a sequence of tensor requests and
frees turns into reserved memory (what ``torch.cuda.max_memory_reserved`` and
torchtitan's logged memory see), block rounding and best-fit reuse included; and the
loss's own request sequence, whose freed blocks are what the allocator strands.
"""

from __future__ import annotations

from functools import lru_cache

from .activations import FP32, chunk_tokens
from .config import TrainConfig
from .executors import ExecutorProfile
from .specs import ModelSpec

# c10/cuda/CUDACachingAllocator.cpp (torch 2.13): requests are rounded to 512 B
# (kMinBlockSize); > 1 MiB (kSmallSize) go to the large pool; a cudaMalloc for a large
# request is 20 MiB (kLargeBuffer) below 10 MiB (kMinLargeAlloc), else rounded up to
# 2 MiB (kRoundLarge). A request takes the smallest cached free block that fits
# (best fit) and splits off the rest; freed blocks merge with free neighbours of the
# same segment and stay reserved. With expandable_segments one segment per stream grows
# at its end (2 MiB pages), so a request may extend a free tail block.
MIN_BLOCK_BYTES = 512
SMALL_SIZE_BYTES = 1 << 20
MIN_LARGE_ALLOC_BYTES = 10 << 20
LARGE_BUFFER_BYTES = 20 << 20
ROUND_LARGE_BYTES = 2 << 20


def _round_up(value: float, step: int) -> int:
    return int(-(-int(value) // step) * step)


def _segment_bytes(request: int) -> int:
    if request <= SMALL_SIZE_BYTES:
        return 2 << 20  # small pool: 2 MiB segments (kSmallBuffer)
    if request < MIN_LARGE_ALLOC_BYTES:
        return LARGE_BUFFER_BYTES
    return _round_up(request, ROUND_LARGE_BYTES)


def simulate_allocator(events: list[tuple[str, str, float]], expandable_segments: bool = False
                       ) -> tuple[float, float]:
    """(peak reserved, peak allocated) bytes of a sequence of ``("alloc", name, bytes)`` /
    ``("free", name, 0)`` events on one stream, starting from an empty cache."""
    segments: list[list[list]] = []  # per segment: blocks [size, name or None]
    live: dict[str, tuple[int, int]] = {}
    allocated = peak_allocated = reserved = peak_reserved = 0

    def find(size):
        best = None
        for si, seg in enumerate(segments):
            for bi, (bsize, owner) in enumerate(seg):
                if owner is None and bsize >= size and (best is None or bsize < best[0]):
                    best = (bsize, si, bi)
        return best

    for kind, name, nbytes in events:
        if kind == "alloc":
            size = _round_up(max(nbytes, 1), MIN_BLOCK_BYTES)
            hit = find(size)
            if hit is None:
                if expandable_segments and segments and segments[0][-1][1] is None:
                    tail = segments[0][-1][0]
                    grow = _round_up(size - tail, ROUND_LARGE_BYTES)
                    segments[0][-1][0] += grow
                    reserved += grow
                elif expandable_segments and segments:
                    grow = _round_up(size, ROUND_LARGE_BYTES)
                    segments[0].append([grow, None])
                    reserved += grow
                else:
                    grow = _segment_bytes(size)
                    segments.append([[grow, None]])
                    reserved += grow
                hit = find(size)
            bsize, si, bi = hit
            seg = segments[si]
            seg[bi] = [size, name]
            if bsize - size > (SMALL_SIZE_BYTES if size > SMALL_SIZE_BYTES else 0):
                seg.insert(bi + 1, [bsize - size, None])
            else:
                seg[bi][0] = bsize
            live[name] = (si, size)
            allocated += size
        else:
            si, size = live.pop(name)
            seg = segments[si]
            bi = next(i for i, b in enumerate(seg) if b[1] == name)
            allocated -= size
            seg[bi][1] = None
            # merge with free neighbours
            if bi + 1 < len(seg) and seg[bi + 1][1] is None:
                seg[bi][0] += seg.pop(bi + 1)[0]
            if bi > 0 and seg[bi - 1][1] is None:
                seg[bi - 1][0] += seg.pop(bi)[0]
        peak_allocated = max(peak_allocated, allocated)
        peak_reserved = max(peak_reserved, reserved)
    return float(peak_reserved), float(peak_allocated)


def loss_allocation_events(model: ModelSpec, cfg: TrainConfig, executor: ExecutorProfile
                           ) -> list[tuple[str, str, float]]:
    """The loss's large tensors in the order they are requested and freed, per chunk
    (the sequences behind ``loss_working_bytes``)."""
    return _loss_events(model, cfg.tokens_per_gpu, cfg.parallelism.tp, executor)


def _loss_events(model: ModelSpec, tokens_per_gpu: int, tp: int, executor: ExecutorProfile
                 ) -> list[tuple[str, str, float]]:
    chunk = chunk_tokens(tokens_per_gpu, executor)
    L = chunk * model.vocab_size / tp
    b = executor.logits_bytes
    up = FP32 if executor.loss_upcast_fp32 else b
    n_chunks = max(1, tokens_per_gpu // chunk)
    events: list[tuple[str, str, float]] = []
    for c in range(n_chunks if n_chunks <= 8 else 2):  # repeats reuse the same blocks
        k = f"{c}:"
        A = lambda name, n: events.append(("alloc", k + name, n))  # noqa: E731
        F = lambda name: events.append(("free", k + name, 0.0))  # noqa: E731
        if executor.compile and executor.loss_compiled_with_model:
            A("logits", b * L); A("grad", b * L); F("logits"); F("grad")
            continue
        if tp > 1:  # loss_parallel (see loss_working_bytes)
            A("logits", b * L); A("up", up * L); A("shifted", up * L); A("exp", up * L); F("exp")
            A("result", up * L); F("shifted"); F("up")
            if executor.logits_freed_before_backward:
                F("logits")
            A("zeros", up * L); A("exp2", up * L); A("sum", up * L)
            F("zeros"); F("exp2"); A("grad", b * L); F("sum"); F("result")
        else:  # F.cross_entropy(logits.float()): log_softmax + nll_loss
            A("logits", b * L); A("up", up * L); A("lsm", up * L); F("up")
            if executor.logits_freed_before_backward:
                F("logits")
            A("gnll", up * L); A("glsm", up * L); F("gnll"); F("lsm"); A("grad", b * L); F("glsm")
        if not executor.logits_freed_before_backward:
            F("logits")
        F("grad")
    return events


def allocator_loss_stranded_bytes(model: ModelSpec, cfg: TrainConfig, executor: ExecutorProfile) -> float:
    """Reserved bytes the loss's request sequence leaves stranded: its peak reserved less
    its peak allocated. Full-sequence fp32 cross-entropy with ``del pred`` before backward
    strands the bf16 logits' block: the fp32 copy and the logits free into one block of
    6 bytes/element that the first 4-byte grad reuses, leaving 2 bytes/element that the
    second 4-byte grad does not fit."""
    return _stranded_bytes(model, cfg.tokens_per_gpu, cfg.parallelism.tp, executor)


@lru_cache(maxsize=4096)
def _stranded_bytes(model: ModelSpec, tokens_per_gpu: int, tp: int, executor: ExecutorProfile) -> float:
    """The loss's requests depend only on the local tokens, tp and the executor: the
    planner prices thousands of layouts that share a few of these."""
    reserved, allocated = simulate_allocator(_loss_events(model, tokens_per_gpu, tp, executor),
                                             executor.expandable_segments)
    return max(0.0, reserved - allocated)
