"""Aspect-ratio buckets for training at a fixed pixel area (the paper's stage 2, section IV-A:
area about 512 x 512, aspect ratio at most 1.3, sides multiples of 64)."""
from __future__ import annotations

import math

AREA_TOLERANCE = 0.1  # a bucket's w * h lies within area * (1 -/+ AREA_TOLERANCE)


def area_buckets(area: int = 512 * 512, max_aspect: float = 1.3, multiple: int = 64,
                 tolerance: float = AREA_TOLERANCE) -> list[tuple[int, int]]:
    """All (w, h) with w and h multiples of `multiple`, 1/max_aspect <= w/h <= max_aspect and
    |w*h - area| <= tolerance * area. For each width, of the two heights around area / w (the
    multiples just below and above) the one whose area is closest to `area` that satisfies both
    rules is taken (ties: the smaller), and so is its transpose (h, w). Sorted by aspect w/h.

    area_buckets(512*512, 1.3, 64) == [(448, 576), (512, 512), (576, 448)]."""
    if area <= 0 or multiple <= 0 or max_aspect < 1 or tolerance < 0:
        raise ValueError(f"bad bucket parameters: area={area}, multiple={multiple}, max_aspect={max_aspect}, "
                         f"tolerance={tolerance}")
    eps = 1e-9
    out = set()
    w_max = math.isqrt(int(area * (1 + tolerance) * max_aspect)) + multiple
    for w in range(multiple, w_max + 1, multiple):
        lo = max(multiple, (area // w) // multiple * multiple)
        best = None
        for h in (lo, lo + multiple):
            aspect, err = w / h, abs(w * h - area)
            if 1 / max_aspect - eps <= aspect <= max_aspect + eps and err <= tolerance * area + eps:
                if best is None or err < abs(best[0] * best[1] - area):
                    best = (w, h)
        if best:
            out.update((best, best[::-1]))  # the rules are symmetric: keep the set closed under transpose
    if not out:
        raise ValueError(f"no {multiple}-multiple sizes within {tolerance:.0%} of area {area} with aspect <= "
                         f"{max_aspect}; raise the area or the tolerance")
    return sorted(out, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(w: int, h: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect is closest to w/h in log space (so 2:1 and 1:2 are equally far
    from square); ties go to the earlier bucket in the list."""
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {w}x{h}")
    if not buckets:
        raise ValueError("empty bucket list")
    target = math.log(w / h)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


def bucket_groups(dataset) -> list[list[int]]:
    """The dataset's indices grouped by bucket (`bucket_of(i)`), buckets in sorted order, indices
    ascending; one group when the dataset has no `bucket_of`. The one grouping every batcher uses."""
    everything = [list(range(len(dataset)))]
    if not hasattr(dataset, "bucket_of"):
        return everything
    groups: dict = {}
    try:
        for i in range(len(dataset)):
            groups.setdefault(tuple(dataset.bucket_of(i)), []).append(i)
    except AttributeError:  # a wrapper (e.g. MaskedLatents) forwarding bucket_of to data without it
        return everything
    return [groups[k] for k in sorted(groups)]
