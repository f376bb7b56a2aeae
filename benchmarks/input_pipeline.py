"""Images per second of the full stage-1 caption pipeline vs a bare decode+resize loop on the same JPEGs.

Why: JPEG decoding on the host decides stage-1 throughput (DESIGN.md §5: ~800 images/s per 8-chip host).
The pipeline does more than decoding — tar index, deterministic order, worker hand-off, CLIP
preprocessing (random resized crop + flip + normalisation at 224 px), caption tokenisation, static-shape
batches with image slots — and this measures what that costs: its images/s over the images/s of the
least a loader must do (read the bytes, PIL open, convert to RGB, resize to 224×224 bicubic, to a float
array), with the same number of processes doing the image work. Target: ≥ 0.85 of the bare loop.

The script writes its own shards (random smooth pictures, 256–512 px per side, JPEG quality 90) to a
temporary folder, reads every byte once so both sides start from the page cache, then runs, for each
worker count W: the pipeline with `num_workers=W` (W = 0: decoding inline in the main process) and the
bare loop in W processes (a `multiprocessing` spawn pool, as the pipeline uses, whose workers drop their
arrays instead of sending them back: an upper bound; W = 0 and 1: inline). Besides images/s (wall time)
it prints CPU milliseconds per image summed over all processes (from /proc), the per-core cost, which
other load on the machine distorts much less than wall time.
Ratios are measured within one run; timings are noisy on a loaded machine.

    PYTHONPATH=. python benchmarks/input_pipeline.py [--images 2000] [--workers 0 1 2] [--batch 16] [--eval]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from data_pipelines.captions import CaptionPipeline
from data_pipelines.shards import index_tar
from data_pipelines.tokenizers import ToyWordTokenizer
from data_pipelines.writer import ShardWriter

SIZE = 224
TOKENS_PER_IMAGE = 65


def make_picture(rng: np.random.Generator) -> bytes:
    """A smooth random picture (a bicubic-upsampled colour grid plus mild noise): compresses and decodes
    like a photo, unlike white noise."""
    w, h = (int(x) for x in rng.integers(256, 513, size=2))
    grid = rng.integers(0, 256, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), np.int16)
    image = np.clip(image + rng.integers(-12, 13, size=image.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: str, count: int, per_shard: int = 500, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    with ShardWriter(os.path.join(folder, "bench-%05d.tar"), per_shard) as writer:
        for i in range(count):
            writer.write_caption(f"{i:07d}", make_picture(rng), f"a picture with number {i}")
    return writer.paths


def bare_decode(where: tuple[str, int, int]) -> np.ndarray:
    """The bare loop's work for one image: read, decode, RGB, resize, float array."""
    path, offset, size = where
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
    return np.asarray(image, np.float32) / 255.0


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live children (the worker pools), from /proc:
    a per-image cost that other load on the machine does not inflate the way it inflates wall time."""
    total = time.process_time()
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # fields[1] = ppid; fields[11], [12] = utime, stime
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Meter:
    """Wall time and CPU time (this process + children) from construction to `stop()`."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def stop(self) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def bare_work(where: tuple[str, int, int]) -> None:
    """`bare_decode` in a pool worker: the array is dropped, not sent back, so the parallel bare loop pays
    no hand-off (an upper bound; the pipeline hands every image to the main process)."""
    bare_decode(where)


def bare_rate(images: list[tuple[str, int, int]], workers: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the bare loop over `images`, in `workers` processes (<= 1: inline)."""
    if workers <= 1:
        m = Meter()
        for where in images:
            bare_decode(where)
        m.stop()
        return len(images) / m.wall, 1e3 * m.cpu / len(images)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        list(pool.imap(bare_work, images[:4 * workers]))  # start-up outside the timing
        time.sleep(0.2)  # let the workers settle (CPU ticks are 10 ms)
        m = Meter()
        for _ in pool.imap(bare_work, images, chunksize=8):
            pass
        m.stop()
        return len(images) / m.wall, 1e3 * m.cpu / len(images)


def pipeline_rate(shards: list[str], workers: int, batch: int, train: bool) -> tuple[float, float]:
    """(images/s, CPU ms per image) of CaptionPipeline batches over one epoch; the first batch (pool
    start, shard indexing) is not timed."""
    p = CaptionPipeline(shards, tokenizer=ToyWordTokenizer(512), seq_len=96, rows=batch, image_budget=batch,
                        image_size=SIZE, tokens_per_image=TOKENS_PER_IMAGE, train=train, num_workers=workers,
                        prefetch=64, shuffle_shards=len(shards), epochs=1)
    try:
        next(p)
        count, m = 0, Meter()
        for b in p:
            count += b["pixel_values"].shape[0]
        m.stop()
        return count / m.wall, 1e3 * m.cpu / count
    finally:
        p.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                    help="worker counts to compare (0 = inline in the main process)")
    ap.add_argument("--batch", type=int, default=16, help="rows (= images) per pipeline batch")
    ap.add_argument("--eval", action="store_true", help="eval preprocessing (plain resize) instead of train "
                                                        "augmentation (random resized crop + flip)")
    ap.add_argument("--dir", default=None, help="keep the shards here (default: a temporary folder)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="owl_bench_") as tmp:
        folder = args.dir or tmp
        os.makedirs(folder, exist_ok=True)
        t0 = time.perf_counter()
        shards = write_shards(folder, args.images)
        images = [(ref.path, *ref.members()["jpg"]) for s in shards for ref in index_tar(s, s).samples]
        total = sum(os.path.getsize(s) for s in shards)
        for s in shards:  # into the page cache
            with open(s, "rb") as f:
                while f.read(1 << 22):
                    pass
        print(f"{len(images)} JPEGs (256-512 px, {total / len(images) / 1024:.0f} KiB mean) in {len(shards)} "
              f"shards, written in {time.perf_counter() - t0:.1f}s; {os.cpu_count()} CPUs; "
              f"pipeline preprocessing: {'eval resize' if args.eval else 'train crop + flip'} to {SIZE}px")
        print("images/s (wall) and CPU ms per image (all processes; the per-core cost, robust to other load)")
        print(f"{'workers':>7} {'pipeline img/s':>15} {'bare img/s':>11} {'ratio':>6}   "
              f"{'pipeline CPU ms':>15} {'bare CPU ms':>11} {'bare/pipeline':>13}")
        for w in args.workers:
            bare, bare_cpu = bare_rate(images, w)
            rate, cpu = pipeline_rate(shards, w, args.batch, train=not args.eval)
            print(f"{w:>7} {rate:>15.1f} {bare:>11.1f} {rate / bare:>6.2f}   {cpu:>15.2f} {bare_cpu:>11.2f} "
                  f"{bare_cpu / cpu:>13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
