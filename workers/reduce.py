"""Data parallelism's gradient reduction through shared memory.

Every worker computes the whole gradient of its own rows into its own buffer;
the W buffers are then summed in the fixed order 0…W−1 (so the result is
deterministic) into buffer 0, which AdamW reads.  The gradient is cut into
buckets in the order the weight gradients are computed: layer L−1 … 0, each as
its backward ends, then the embedding's (with the tensors outside the blocks).  Worker r reduces
slice r of every bucket as soon as every worker has announced that bucket, so the
work is even and reducing one bucket overlaps computing the next.

Only buffer 0 needs the whole gradient.  The other workers' buffers are staged
(ZeRO-2's buckets): the embedding's bucket, which the lm head writes before the
backward starts, has its own room, and the layers' buckets take turns in RING
rooms the size of the largest; a worker waits to write a bucket until every
worker has reduced the one that used its room before (in a step, RING buckets
earlier).  The sums, and their order, are the same as with whole buffers.  With
gradient accumulation worker 0 stages too and every micro-batch is reduced into
buffer 0, the first copied in, later ones added (data_parallel.py).
"""
import time

import numpy as np

from trainer.errors import knob
from trainer.optim import sum_squares
from trainer.params import ALIGN

REDUCE_BLOCK = 1 << 18  # floats summed (and squared) per pass: 1 MB a buffer, fewer NumPy calls
# rooms a staged buffer has for the layers' buckets: one being reduced, one being
# written, one of slack for a worker that runs ahead (COREGPT_GRAD_RING: tests shrink it)
RING = 3


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


def staging(ranges, own_room):
    """Where a staged buffer keeps each bucket (see above): the buckets in own_room
    (indices) a room each, the others RING rooms in turn.  -> (per bucket
    [(start, end, at)]: the layout's floats start…end of each segment are the staged
    buffer's from `at`, ALIGN-aligned; the staged buffer's size; per bucket the one
    that used its room last in a step, which every worker must have reduced before
    it is written, or None)."""
    ring = knob("COREGPT_GRAD_RING", RING)

    def packed(segments, at):
        placed = []
        for start, end in segments:
            placed.append((start, end, at))
            at += -(-(end - start) // ALIGN) * ALIGN
        return placed, at

    at, home = 0, {}
    for j in own_room:
        home[j] = at
        at = packed(ranges[j], at)[1]
    turns = [j for j in range(len(ranges)) if j not in own_room]
    room = max((packed(ranges[j], 0)[1] for j in turns), default=0)
    waits = [None] * len(ranges)
    for k, j in enumerate(turns):
        home[j] = at + k % ring * room
        if k >= ring:
            waits[j] = turns[k - ring]
    placement = [packed(segments, home[j])[0] for j, segments in enumerate(ranges)]
    return placement, at + min(ring, len(turns)) * room, waits


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


def located(buffer, placement, bucket, start, end):
    """The floats start…end of the layout (within one of the bucket's segments) in a
    buffer: whole (placement None) or staged (staging's placement)."""
    if placement is None:
        return buffer[start:end]
    for first, last, at in placement[bucket]:
        if first <= start and end <= last:
            return buffer[at + start - first:at + end - first]
    raise ValueError(f"floats {start}…{end} are not in bucket {bucket}")


class ReduceScatter:
    """One worker's side: `make_room()` before writing each bucket of its own
    gradients, `bucket_done()` after it, `finish()` once its backward is over.
    Worker `part` of n_parts sums slice `part` of each bucket.  total: the pool's
    gradient (whole), to which `sources`, the other gradient buffers in worker order,
    are added; placements: for each source, None (whole) or its staging() placement;
    waits: staging()'s; mine_staged: whether this worker's own gradients are staged.
    With `fresh` the first source is copied, not added (gradient accumulation's first
    micro-batch, when worker 0's buffer is a source)."""

    def __init__(self, total, sources, placements, part, n_parts, ranges, waits, progress, mine_staged):
        self.progress, self.waits, self.n_buckets = progress, waits, len(ranges)
        self.staged, self.fresh = mine_staged, False
        self.tell_reduced = any(p is not None for p in placements)  # someone waits for rooms
        # per bucket: (the sum's view in total, [every source's view]) of each piece of slice `part`
        self.pieces = [[(total[a:b], [located(source, placement, j, a, b)
                                      for source, placement in zip(sources, placements)])
                        for a, b in slice_of(bucket, part, n_parts)]
                       for j, bucket in enumerate(ranges)]
        self.mine = self.reduced = 0  # buckets announced, reduced (counting over steps)
        self.sumsq, self.seconds = 0.0, 0.0
        self.waited = 0.0  # seconds make_room slept, over all steps (the profile's waiting)

    def make_room(self):
        """Before writing the next bucket into a staged buffer: wait until every worker
        has reduced the bucket that used its room before (reducing meanwhile)."""
        j = self.mine % self.n_buckets
        if not self.staged or self.waits[j] is None:
            return
        need = self.mine - j + self.waits[j] + 1  # reduced counts that include that bucket
        self.reduce_ready()
        while min(self.reduced, self.progress.reduced()) < need:
            t0 = time.perf_counter()
            self.progress.wait()
            self.waited += time.perf_counter() - t0
            self.reduce_ready()

    def bucket_done(self):
        self.progress.announce()
        self.mine += 1
        self.reduce_ready()

    def reduce_ready(self):
        ready = min(self.mine, self.progress.finished())
        while self.reduced < ready:
            t0 = time.perf_counter()
            self.reduce(self.pieces[self.reduced % self.n_buckets])
            self.seconds += time.perf_counter() - t0
            self.reduced += 1
            if self.tell_reduced:
                self.progress.announce(reduced=True)

    def finish(self):
        """Reduce what is left, waiting for slower peers -> Σ g² of the slices it summed.
        (`seconds` keeps counting the time spent reducing, over all steps.)"""
        self.reduce_ready()
        while self.reduced < self.mine:
            self.progress.wait()
            self.reduce_ready()
        sumsq, self.sumsq = self.sumsq, 0.0
        return sumsq

    def reduce(self, pieces):
        for total, sources in pieces:
            for s in range(0, total.size, REDUCE_BLOCK):
                block = total[s:s + REDUCE_BLOCK]
                if self.fresh:
                    np.copyto(block, sources[0][s:s + block.size])
                for source in sources[1 if self.fresh else 0:]:  # 0 + 1 + … + W−1, always in this order
                    block += source[s:s + block.size]
                self.sumsq += sum_squares(block)  # while the block is in cache
