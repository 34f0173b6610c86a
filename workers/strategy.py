"""What a parallel strategy is: everything that differs between the ways a pool's
workers share a step.  The coordinator, the pool, the memory plan and the rest of
the worker ask a strategy; none of them branch on which one it is.

A strategy class says, before any process starts,
  - what a pool's batch rows must divide by (`batch_unit`),
  - the shared arenas it needs beyond parameters, Adam m and v and the gradient
    buffer every pool has (`arena_sizes`), and the private bytes of each worker
    (`private_bytes`: its activations, when they are not shared);
and, built inside each worker (`__init__(worker)`),
  - its model (the model family's Model over an activation table, with its matmul split),
  - which token rows a worker loads (`load`),
  - the schedule of one micro-batch (`step` -> a StepReport), including how the
    weight-gradient tasks of the family's `weight_tasks` are shared and how the
    gradients end up summed in the pool's gradient buffer.  A layer's weight
    gradients run as soon as its backward is done (`Model.backward_inputs(layer_done)`),
    the embedding's after the last.
Register a new one in workers/strategies.py.
"""
import time
from typing import NamedTuple

import numpy as np

from trainer.activations import Table
from trainer.model import Parallel
from trainer.models import family_of
from trainer.optim import sum_squares
from trainer.params import Layout


class PoolShape(NamedTuple):
    """What a pool is made for, known before any process starts: the model `cfg`,
    what trains (trainer/trainable.py), `rows` batch rows of `seq_len` tokens shared
    by `n_workers` workers, the GEMM engine, the strategy class, activation
    recompute, and whether steps accumulate several micro-batches."""
    cfg: object
    trains: object
    rows: int
    seq_len: int
    engine: object
    strategy: type
    n_workers: int
    recompute: bool = False
    accumulating: bool = False

    def table(self, rows, n_parts=1):
        """The training activation table of `rows` of the pool's batch rows, shared by n_parts."""
        return Table(self.cfg, self.trains, rows, self.seq_len, True, self.recompute, n_parts)


def scratch_name(family, name):
    """A tensor's room in the scratch: its own, or "block.…" for a block's (family.block_tensor)."""
    block = family.block_tensor(name)
    return name if block is None else "block." + block[1]


def scratch_layout(family, layout):
    """The layout of a micro-batch's private gradient scratch (gradient accumulation):
    the tensors outside the blocks each their own room (the tied lm head writes the
    embedding's in the forward, long before its task adds it), and one block's room
    for the tensors of every block, since weight_task adds a task's gradients to the
    step's as soon as it has written them."""
    rooms = {}
    for name, shape in layout.shapes.items():
        block = family.block_tensor(name)
        if block is None or block[0] == 0:
            rooms[scratch_name(family, name)] = shape
    outside = [(name, shape) for name, shape in rooms.items() if not name.startswith("block.")]
    return Layout(outside + [(name, shape) for name, shape in rooms.items() if name.startswith("block.")])


def scratch_views(family, layout):
    """A zeroed scratch (scratch_layout) -> {name of layout: its view}."""
    room = scratch_layout(family, layout)
    views = room.views(np.zeros(room.size, dtype=np.float32))
    return {name: views[scratch_name(family, name)] for name in layout.shapes}


class Strategy:
    name = None

    @staticmethod
    def batch_unit(n_workers):
        """What a pool's batch rows must divide by: each worker takes whole rows."""
        return n_workers

    @staticmethod
    def arena_sizes(shape):
        """[(what, elements, dtype)] of the shared arenas it adds to a pool of `shape`
        (a PoolShape)."""
        return []

    @staticmethod
    def scratch_floats(shape):
        """Floats of each worker's private gradient scratch (see written)."""
        return scratch_layout(shape.cfg.family, shape.trains.layout).size if shape.accumulating else 0

    @staticmethod
    def private_bytes(shape):
        """Bytes of activations each worker holds in private memory."""
        return 0

    def __init__(self, worker):
        self.worker = worker
        self.scratch = None  # gradient views for accumulation, made on first use

    def make_model(self, rows, grads, acts=None, parallel=Parallel()):
        worker = self.worker
        return family_of(worker.cfg).Model(worker.cfg, rows, worker.seq_len, worker.weights, grads,
                                           layers=worker.layers, acts=acts, parallel=parallel,
                                           recompute=worker.recompute)

    def rows(self):
        """-> (rows, first row in the global batch) of the tokens this worker loads."""
        raise NotImplementedError

    def load(self, data, order, window):
        """This worker's rows of micro-batch `window` of `data` (a trainer.data.TokenData)
        in `order` (a trainer.data.WindowOrder)."""
        worker = self.worker
        rows, first = self.rows()
        start = order.start(window) + first * worker.seq_len
        tokens, mask, positions = data.window(start, rows * worker.seq_len)
        self.model.load_batch(tokens, (window, first * worker.seq_len), mask, positions)

    def step(self, window, scale, accumulate, last):
        """One micro-batch -> messages.StepReport."""
        raise NotImplementedError

    def written(self, grads, accumulate):
        """Where a micro-batch's weight gradients go: the gradient views `grads` for the
        first micro-batch of a step; for later ones (gradient accumulation) a private
        scratch (scratch_layout), added to grads by weight_task."""
        if accumulate and self.scratch is None:
            self.scratch = scratch_views(self.worker.cfg.family, self.worker.trains.layout)
        return self.scratch if accumulate else grads

    def weight_task(self, task, grads, accumulate):
        """One WeightTask into the gradient views `grads` (see written) -> the regions
        written."""
        self.model.backward_weights(task, self.written(grads, accumulate))
        regions = []
        for name, lo, hi in task.params:
            if accumulate:
                grads[name][lo:hi] += self.scratch[name][lo:hi]
            regions.append(grads[name][lo:hi])
        return regions


def sumsq_of(regions):
    """Σ g² of gradient regions, in order."""
    return sum(sum_squares(region.reshape(-1)) for region in regions)


class Stopwatch:
    """Seconds of work between laps, less the time spent waiting at the barrier and
    converting to bf16 (each counted apart)."""

    def __init__(self, barrier_seconds, engine):
        self.barrier_seconds, self.engine = barrier_seconds, engine
        self.start = self.mark = self.now()
        self.converting = 0.0

    def now(self):
        return time.perf_counter(), self.barrier_seconds(), self.engine.convert_seconds

    def lap(self):
        (t0, wait0, conv0), (t1, wait1, conv1) = self.mark, self.now()
        self.mark = (t1, wait1, conv1)
        self.converting += conv1 - conv0
        return t1 - t0 - (wait1 - wait0) - (conv1 - conv0)
