"""PyTorch's CUDA caching allocator, simulated: how a sequence of tensor requests and
frees turns into reserved memory (what ``torch.cuda.max_memory_reserved`` and
torchtitan's logged memory see), block rounding and best-fit reuse included.
"""

from __future__ import annotations

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
