"""Near-duplicate search at studio scale: N distinct 512² JPEG images (smooth random colour fields
with a few random shapes, so no two are alike) plus, for 5 % of them, one edit each from
demo/near_dups.py; then what OboroDedupDataset does without a CLIP model: list, hash-embed
(decode + 32² YCbCr DCT), the partitioned DBSCAN (partitions of 2000), and whole-set DBSCAN as
the reference. Prints seconds per phase, peak RSS, and whether the injected copies were found.

  nice python bench/dedup_scale.py [--n 5000] [--size 512] [--work /tmp/oboro_dedup_bench]

Images are generated once into --work (about 0.3 GB for 5,000) and reused by later runs.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import oboro_env  # noqa: E402

oboro_env.import_oboro()
from oboro.oboro_model.data import dedup  # noqa: E402
from oboro.demo.near_dups import EDITS  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_image(rng: np.random.Generator, size: int) -> Image.Image:
    field = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(2, 6)):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(size // 16, size // 4))
        box = [int(x - r), int(y - r), int(x + r), int(y + r)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img


def generate(work: Path, n: int, size: int) -> dict:
    """work/<i>.jpg, and work/copies/<i>_<edit>.jpg for every 20th image; returns {copy: source}."""
    done = work / f".done_{n}_{size}"
    copies = {f"copies/{i:05d}_{EDITS[(i // 20) % len(EDITS)].__name__}.jpg": f"{i:05d}.jpg" for i in range(0, n, 20)}
    if done.exists():
        return copies
    (work / "copies").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(n):
        img = make_image(rng, size)
        img.save(work / f"{i:05d}.jpg", quality=90)
        if i % 20 == 0:
            edit = EDITS[(i // 20) % len(EDITS)]
            edit(img).save(work / f"copies/{i:05d}_{edit.__name__}.jpg", quality=90)
    done.write_text("ok")
    print(f"generated {n} images of {size}² in {time.perf_counter() - t:.0f}s", flush=True)
    return copies


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--work", default="/tmp/oboro_dedup_bench")
    p.add_argument("--partition-size", type=int, default=dedup.PARTITION_SIZE)
    opts = p.parse_args(argv)
    os.nice(10)
    work = Path(opts.work) / f"{opts.n}_{opts.size}"
    copies = generate(work, opts.n, opts.size)
    import sklearn.cluster  # noqa: F401  (imported before timing: a one-off ~3 s here)
    base = rss_mib()
    t0 = time.perf_counter()
    files = dedup.list_images(work)
    emb = dedup.embed_folder(work, files)
    t1 = time.perf_counter()
    rss_embed = rss_mib()
    groups, rounds = dedup.iterative_dbscan(emb.vectors, dedup.HASH_EPS, partition_size=opts.partition_size)
    t2 = time.perf_counter()
    rss_iter = rss_mib()
    whole = dedup.dbscan_groups(emb.vectors, dedup.HASH_EPS)
    t3 = time.perf_counter()
    rss_whole = rss_mib()
    found = {frozenset(emb.files[i] for i in g) for g in groups if len(g) > 1}
    want = {frozenset((c, s)) for c, s in copies.items()}
    same = sorted(sorted(g) for g in groups) == whole
    print(f"images: {len(files)} ({len(copies)} injected copies), embedded {len(emb.files)}, "
          f"skipped {len(emb.skipped)}")
    print(f"embed (decode + hash): {t1 - t0:.1f}s ({1000 * (t1 - t0) / len(files):.1f} ms/image)")
    print(f"partitioned DBSCAN ({opts.partition_size}/partition, {rounds} rounds): {t2 - t1:.1f}s")
    print(f"whole-set DBSCAN: {t3 - t2:.1f}s; same groups as partitioned: {same}")
    print(f"peak RSS: {base:.0f} MiB before, {rss_embed:.0f} after embedding, {rss_iter:.0f} after partitioned, "
          f"{rss_whole:.0f} after whole-set")
    print(f"duplicate groups: {len(found)}; injected copies found with their source: {len(want & found)}/{len(want)}; "
          f"other groups: {len(found - want)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
