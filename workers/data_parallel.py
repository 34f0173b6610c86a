"""Data parallelism: each worker runs the whole model on its own rows, with its
activations in private memory and no barriers, and computes every gradient of its
rows into its own buffer; the W buffers are summed by a reduce-scatter in
shared memory (reduce.py) that overlaps the rest of the backward.  Worker 0
writes the pool's gradient (buffer 0); the others hold a few buckets at a time
(reduce.staging).  With gradient accumulation every worker stages its buckets
and every micro-batch is reduced into the pool's gradient, the first written,
the later ones added.
"""
import numpy as np

from trainer.activations import activation_layout, low_layout
from workers.barrier import PipeProgress
from workers.messages import StepReport
from workers.reduce import ReduceScatter, bucket_ranges, located, staging
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


def gradient_buckets(trains):
    """-> (the layout of what trains, its reduction buckets (buckets_of), their ranges,
    the indices of those written before the backward starts: the embedding's, by the
    lm head)."""
    layout, buckets = trains.layout, buckets_of(trains.weight_tasks())
    early = [j for j, tasks in enumerate(buckets) if tasks and tasks[0].layer is None]
    return layout, buckets, bucket_ranges(layout, buckets), early


def gradient_buffers(trains, n_workers, accumulating):
    """[(what, floats)] of the workers' gradient buffers beside the pool's: staged
    where that is smaller, then also worker 0's with gradient accumulation; else
    whole ones for workers 1… (accumulating in them, through the scratch)."""
    layout, _, ranges, early = gradient_buckets(trains)
    staged = staging(ranges, early)[1]
    if staged >= layout.size:
        return [(f"gradients of worker {r}", layout.size) for r in range(1, n_workers)]
    return [(f"gradients of worker {r}", staged) for r in range(0 if accumulating else 1, n_workers)]


def staged_views(layout, buffer, placement):
    """name -> the view of its gradient in a staged buffer (staging's placement)."""
    views = {}
    for bucket, segments in enumerate(placement):
        for start, end, _ in segments:
            for name, offset in layout.offsets.items():
                if start <= offset < end:
                    shape = layout.shapes[name]
                    views[name] = located(buffer, placement, bucket, offset,
                                          offset + int(np.prod(shape))).reshape(shape)
    return views


class DataParallel(Strategy):
    name = "data"
    summary = "each worker its own rows, gradients reduce-scattered"

    @staticmethod
    def arena_sizes(shape):
        if shape.n_workers == 1:
            return []
        return [(what, size, "float32")
                for what, size in gradient_buffers(shape.trains, shape.n_workers, shape.accumulating)]

    @staticmethod
    def scratch_floats(shape):
        staged_all = shape.n_workers > 1 and "gradients of worker 0" in dict(
            gradient_buffers(shape.trains, shape.n_workers, shape.accumulating))
        return 0 if staged_all else Strategy.scratch_floats(shape)

    @staticmethod
    def private_bytes(shape):
        table, engine = shape.table(shape.rows // shape.n_workers), shape.engine
        low = 2 * low_layout(table).size if engine.low else 0
        return 4 * activation_layout(table, engine.low).size + low

    def __init__(self, worker):
        super().__init__(worker)
        # the arenas say how: worker 0 staged too (gradient accumulation), the others staged, or whole
        self.staged_all = "gradients of worker 0" in worker.elements
        names = [f"gradients of worker {r}" for r in range(0 if self.staged_all else 1, worker.n_workers)]
        layout, self.buckets, ranges, early = gradient_buckets(worker.trains)
        placement, _, waits = staging(ranges, early)
        sources = [worker.attach(name).array for name in names]  # what the reduction adds to the pool's gradient
        placements = [None if worker.elements[name] == layout.size else placement for name in names]
        # where each worker writes: its buffer; worker 0, unless staged_all, the pool's gradient itself
        writes = ([] if self.staged_all else [(worker.grads.array, None)]) + list(zip(sources, placements))
        mine, mine_placement = writes[worker.rank]
        self.grads = layout.views(mine) if mine_placement is None else staged_views(layout, mine, placement)
        self.own_rows = worker.pool_rows // worker.n_workers  # the batch divides (config.check)
        self.model = self.make_model(self.own_rows, self.grads)  # its own rows, private
        self.bucket_of_layer = {tasks[0].layer: tasks for tasks in self.buckets if tasks}
        self.reducer = ReduceScatter(worker.grads.array, sources, placements, worker.rank, worker.n_workers, ranges,
                                     waits, PipeProgress(worker.barrier_ends), mine_staged=mine_placement is not None)

    def rows(self):
        worker = self.worker
        return self.own_rows, worker.first_row + worker.rank * self.own_rows

    def step(self, window, scale, accumulate, last):
        clock = Stopwatch(lambda: self.reducer.waited, self.worker.engine)
        # staged_all: each micro-batch writes its buckets afresh and is reduced, the first
        # written into the pool's gradient, later ones added; else only the last is reduced
        reducing = last or self.staged_all
        if self.staged_all:
            self.reducer.fresh, accumulate = not accumulate, False
        self.load(self.worker.train, self.worker.train_order, window)
        loss = self.model.forward(scale, self.written(self.grads, accumulate))
        forward_s = clock.lap()
        reduce0 = self.reducer.seconds
        def run(tasks):
            if reducing:
                self.reducer.make_room()  # in a staged buffer, a room another bucket may still be in
            for task in tasks:
                self.weight_task(task, self.grads, accumulate)
            if reducing:
                self.reducer.bucket_done()  # reduces whatever every worker has finished
        self.model.backward_inputs(lambda l: run(self.bucket_of_layer[l]))
        if None in self.bucket_of_layer:
            run(self.bucket_of_layer[None])
        backward_s = clock.lap() - (self.reducer.seconds - reduce0)  # the reducing overlaps it
        sumsq = self.reducer.finish() if reducing else None  # the rest, after waiting for slower workers
        return StepReport(loss, sumsq if last else None, forward_s, backward_s, clock.converting, self.reducer.seconds - reduce0)
