"""Data parallelism: each worker runs the whole model on its own rows, with its
activations in private memory and no barriers, and computes every gradient of its
rows into its own buffer; the W buffers are summed by a reduce-scatter in
shared memory (reduce.py) that overlaps the rest of the backward.  Buffer 0 is
the pool's gradient; the others hold a few buckets at a time (reduce.staging),
except with gradient accumulation, where each keeps its sum over micro-batches.
"""
import numpy as np

from trainer.activations import activation_layout, low_layout
from trainer.gpt import weight_tasks
from trainer.lora import trainable_layout
from workers.barrier import PipeProgress
from workers.messages import StepReport
from workers.reduce import ReduceScatter, bucket_ranges, ring_waits, staging
from workers.shm import SharedArena
from workers.strategy import Stopwatch, Strategy


def buckets_of(tasks):
    """Weight-gradient tasks -> reduction buckets in the order they are computed: each
    layer's as its backward ends, last layer first, then the embedding's (it reads
    dresidual[0])."""
    layers = {}
    for task in tasks:
        if task.layer is not None:
            layers.setdefault(task.layer, []).insert(0, task)
    embedding = [task for task in tasks if task.layer is None]
    return [layers[l] for l in sorted(layers, reverse=True)] + ([embedding] if embedding else [])


def gradient_buckets(cfg, lora):
    """-> (the trainable layout, its reduction buckets (buckets_of), their ranges, the
    indices of those written before the backward starts: the embedding's, by the lm head)."""
    layout, buckets = trainable_layout(cfg, lora), buckets_of(weight_tasks(cfg, lora=lora))
    early = [j for j, tasks in enumerate(buckets) if tasks and tasks[0].layer is None]
    return layout, buckets, bucket_ranges(layout, buckets), early


def other_buffer_size(cfg, lora, accumulating):
    """Floats of the gradient buffer of each worker but the first: staged, when that
    is smaller and no micro-batches add up."""
    layout, _, ranges, early = gradient_buckets(cfg, lora)
    return layout.size if accumulating else min(layout.size, staging(ranges, early)[1])


def staged_views(layout, buffer, placement):
    """name -> the view of its gradient in a staged buffer (staging's placement)."""
    views = {}
    for segments in placement:
        for start, end, at in segments:
            for name, offset in layout.offsets.items():
                if start <= offset < end:
                    shape = layout.shapes[name]
                    views[name] = buffer[at + offset - start:][:int(np.prod(shape))].reshape(shape)
    return views


class DataParallel(Strategy):
    name = "data"
    summary = "each worker its own rows, gradients reduce-scattered"

    @staticmethod
    def arena_sizes(cfg, pool_rows, seq_len, engine, n_workers, recompute=False, lora=None, accumulating=False):
        size = other_buffer_size(cfg, lora, accumulating)  # buffer 0, the pool's gradients, receives the sum
        return [(f"gradients of worker {r}", size, "float32") for r in range(1, n_workers)]

    @staticmethod
    def private_bytes(cfg, pool_rows, seq_len, engine, n_workers, recompute=False, lora=None):
        rows = pool_rows // n_workers
        low = 2 * low_layout(cfg, rows, seq_len, True, recompute, lora=lora).size if engine.low else 0
        return 4 * activation_layout(cfg, rows, seq_len, True, engine.low, recompute, lora=lora).size + low

    def __init__(self, worker):
        super().__init__(worker)
        w = worker
        others = [f"gradients of worker {r}" for r in range(1, w.n_workers)]
        self.buffers = [w.grads] + [SharedArena.attach(w.arena_names[o], w.elements[o]) for o in others]
        layout, self.buckets, ranges, early = gradient_buckets(w.cfg, w.lora)
        placement = staging(ranges, early)[0]  # the arena's size says whether buffers are staged
        placements = [None] + [None if w.elements[o] == layout.size else placement for o in others]
        mine = self.buffers[w.rank].array
        self.grads = layout.views(mine) if placements[w.rank] is None else staged_views(layout, mine, placement)
        self.own_rows = w.pool_rows // w.n_workers  # the batch divides (config.check)
        self.model = self.make_model(self.own_rows, self.grads)  # its own rows, private
        self.bucket_of_layer = {tasks[0].layer: tasks for tasks in self.buckets if tasks}
        self.reducer = ReduceScatter([b.array for b in self.buffers], placements, w.rank, ranges,
                                     ring_waits(len(ranges), early), PipeProgress(w.barrier_ends))

    def rows(self):
        w = self.worker
        return self.own_rows, w.first_row + w.rank * self.own_rows

    def step(self, window, scale, accumulate, last):
        clock = Stopwatch(lambda: self.reducer.waited, self.worker.engine)
        self.load(self.worker.train, window)
        loss = self.model.forward(scale, self.written(self.grads, accumulate))
        forward_s = clock.lap()
        reduce0 = self.reducer.seconds
        def run(tasks):
            if last:
                self.reducer.make_room()  # in a staged buffer, a room another bucket may still be in
            for task in tasks:
                self.weight_task(task, self.grads, accumulate)
            if last:
                self.reducer.bucket_done()  # reduces whatever every worker has finished
        self.model.backward_inputs(lambda l: run(self.bucket_of_layer[l]))
        if None in self.bucket_of_layer:
            run(self.bucket_of_layer[None])
        backward_s = clock.lap() - (self.reducer.seconds - reduce0)  # the reducing overlaps it
        sumsq = self.reducer.finish() if last else None  # the rest, after waiting for slower workers
        return StepReport(loss, sumsq, forward_s, backward_s, clock.converting, self.reducer.seconds - reduce0)
