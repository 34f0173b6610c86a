"""Data parallelism's gradient reduction through shared memory.

Every worker computes the whole gradient of its own rows into its own buffer;
the W buffers are then summed in the fixed order 0…W−1 (so the result is
deterministic) into buffer 0, which AdamW reads.  The gradient is cut into
buckets in the order the weight gradients are computed: layer L−1 … 0, each as
its backward ends, then the tied embedding with wpe and ln_f.  Worker r reduces
slice r of every bucket as soon as every worker has announced that bucket, so the
work is even and reducing one bucket overlaps computing the next.
"""
import time

import numpy as np

from trainer.optim import sum_squares
from trainer.params import ALIGN

REDUCE_BLOCK = 1 << 18  # floats summed (and squared) per pass: 1 MB a buffer, fewer NumPy calls


def bucket_ranges(layout, buckets):
    """[[(start, end) in the flat arena]] of each bucket of weight-gradient tasks: the
    parameters they write, neighbours in the layout merged (with the padding between)."""
    order = {name: i for i, name in enumerate(layout.offsets)}
    ranges = []
    for tasks in buckets:
        names = sorted({name for task in tasks for name, _, _ in task.params}, key=order.get)
        segments, previous = [], None
        for name in names:
            start = layout.offsets[name]
            end = start + int(np.prod(layout.shapes[name]))
            if previous is not None and order[name] == order[previous] + 1:
                segments[-1] = (segments[-1][0], end)
            else:
                segments.append((start, end))
            previous = name
        ranges.append(segments)
    return ranges


def slice_of(segments, part, n_parts):
    """Part `part` of n_parts nearly equal, ALIGN-aligned slices of a bucket's segments."""
    total = sum(e - s for s, e in segments)
    lo, hi = (total * k // n_parts // ALIGN * ALIGN for k in (part, part + 1))
    hi = total if part == n_parts - 1 else hi
    out, seen = [], 0
    for s, e in segments:
        a, b = max(s, s + lo - seen), min(e, s + hi - seen)
        if a < b:
            out.append((a, b))
        seen += e - s
    return out


class ReduceScatter:
    """One worker's side: `bucket_done()` after each bucket of its own gradients,
    `finish()` once its backward is over."""

    def __init__(self, buffers, part, ranges, progress):
        self.buffers, self.progress = buffers, progress
        self.ranges = [slice_of(bucket, part, len(buffers)) for bucket in ranges]
        self.mine = self.reduced = 0  # buckets announced, reduced (counting over steps)
        self.sumsq, self.seconds = 0.0, 0.0

    def bucket_done(self):
        self.progress.announce()
        self.mine += 1
        self.reduce_ready()

    def reduce_ready(self):
        ready = min(self.mine, self.progress.finished())
        while self.reduced < ready:
            t0 = time.perf_counter()
            self.reduce(self.ranges[self.reduced % len(self.ranges)])
            self.seconds += time.perf_counter() - t0
            self.reduced += 1

    def finish(self):
        """Reduce what is left, waiting for slower peers -> Σ g² of the slices it summed.
        (`seconds` keeps counting the time spent reducing, over all steps.)"""
        self.reduce_ready()
        while self.reduced < self.mine:
            self.progress.wait()
            self.reduce_ready()
        sumsq, self.sumsq = self.sumsq, 0.0
        return sumsq

    def reduce(self, segments):
        total, others = self.buffers[0], self.buffers[1:]
        for start, end in segments:
            for s in range(start, end, REDUCE_BLOCK):
                block = total[s:min(s + REDUCE_BLOCK, end)]
                for other in others:  # 0 + 1 + … + W−1, always in this order
                    block += other[s:s + block.size]
                self.sumsq += sum_squares(block)  # while the block is in cache
