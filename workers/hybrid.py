"""The hybrid strategy: the pool's workers share one activation arena (shared
memory) holding every worker's rows.  Row-wise layers run on a worker's own rows;
each matmul runs, between barriers, on the worker's share of it over the rows of
every worker (`ColumnSplit`), so a weight is packed once and every GEMM sees the
whole batch.  Weight gradients are whole matrices, balanced over the workers by
task and computed over the rows of every worker, so none needs summing.
"""
import time

from trainer.activations import Activations, Table, activation_layout, low_layout, rows_of
from trainer.model import Parallel
from workers.barrier import PipeBarrier
from workers.messages import StepReport
from workers.strategy import Stopwatch, Strategy, sumsq_of


class ColumnSplit:
    """The matmul hook: this worker's share of out = fn(inp, weight), between barriers
    (in bf16, the barrier before also publishes the bf16 copies just made)."""

    def __init__(self, barrier, part, n_parts):
        self.barrier, self.part, self.n_parts = barrier, part, n_parts

    def __call__(self, fn, out, inp, weight, transposed=False):
        self.barrier()
        product = weight.T if transposed else weight  # out = inp @ product
        out, inp, product = self.share(out, inp, product)
        fn(out, inp, product.T if transposed else product)
        self.barrier()

    def share(self, out, inp, w):
        """-> this worker's (out, inp, w) of out = inp @ w.  When w is the bigger
        operand: its columns of out for all rows, so each worker packs only its part
        of w; otherwise its own rows (a worker would read all of inp to use a part of
        a small w)."""
        if w.size <= inp.size:
            return rows_of(out, 0, self.part, self.n_parts), rows_of(inp, 0, self.part, self.n_parts), w
        n = out.shape[1]
        c = slice(n * self.part // self.n_parts, n * (self.part + 1) // self.n_parts)
        return out[:, c], inp, w[:, c]


def balance(tasks, n_parts):
    """Weight-gradient tasks -> [[task] by part]: greedy, longest first to the least
    loaded part (ties in list order), which balances them to within one task."""
    parts, load = [[] for _ in range(n_parts)], [0] * n_parts
    for task in sorted(tasks, key=lambda t: -t.cost):
        r = load.index(min(load))
        parts[r].append(task)
        load[r] += task.cost
    return parts


def assign(trains, n_parts):
    """-> [{layer (None: the embedding's): [task]} by part].  Each layer's weight
    gradients run between two barriers, so each layer's are balanced on their own:
    every matrix is cut into n_parts slices of rows, and the embedding into n_parts
    slices of the vocabulary, which balances them to within a few rows."""
    tasks = trains.weight_tasks(n_parts, n_parts)
    layers = {layer: [t for t in tasks if t.layer == layer] for layer in dict.fromkeys(t.layer for t in tasks)}
    shares = {layer: balance(group, n_parts) for layer, group in layers.items()}
    return [{layer: share[r] for layer, share in shares.items()} for r in range(n_parts)]


class Hybrid(Strategy):
    name = "hybrid"
    summary = "matmuls split by columns over every worker's rows"

    @staticmethod
    def batch_unit(n_workers):
        return 1  # token rows, and attention's (row, head) pairs: a batch of 1 splits too

    @staticmethod
    def arena_sizes(shape):
        table, engine = shape.table(shape.rows, shape.n_workers), shape.engine
        sizes = [("activations", activation_layout(table, engine.low).size, "float32")]
        if engine.low:
            sizes.append(("bf16 activations", low_layout(table).size, engine.low_dtype))
        return sizes

    def __init__(self, worker):
        super().__init__(worker)
        self.barrier = PipeBarrier(worker.barrier_ends)
        engine, low = worker.engine, worker.engine.low
        table = Table(worker.cfg, worker.trains, worker.pool_rows, worker.seq_len, True, worker.recompute,
                      worker.n_workers)
        acts = Activations(table, engine, low_dtype=engine.low_dtype if low else None,
                           arena=worker.attach("activations").array,
                           low_arena=worker.attach("bf16 activations", engine.low_dtype).array if low else None,
                           part=worker.rank)
        self.grads = worker.trains.layout.views(worker.grads.array)
        split = ColumnSplit(self.barrier, worker.rank, worker.n_workers)
        self.model = self.make_model(worker.pool_rows, self.grads, acts=acts, parallel=Parallel(split, self.barrier))
        self.tasks = assign(worker.trains, worker.n_workers)[worker.rank]
        self.model.head_slices = [(task.lo, task.hi) for task in self.tasks.get(None, [])]  # its embedding tasks'

    def rows(self):
        return self.worker.pool_rows, self.worker.first_row  # weight gradients read all

    def step(self, window, scale, accumulate, last):
        clock = Stopwatch(lambda: self.barrier.seconds, self.worker.engine)
        self.load(self.worker.train, self.worker.train_order, window)
        loss = self.model.forward(scale, self.written(self.grads, accumulate))
        forward_s = clock.lap()
        sums = [0.0, 0.0]  # Σ g², seconds summing it
        def run(tasks):
            self.barrier()  # every worker's activation gradients are in: the weight gradients read them all
            for task in tasks:
                regions = self.weight_task(task, self.grads, accumulate)
                if last:
                    t0 = time.perf_counter()
                    sums[0] += sumsq_of(regions)  # while in cache
                    sums[1] += time.perf_counter() - t0
        def layer_done(l):
            run(self.tasks[l])
            if l:  # before the next layer's backward overwrites what they read (the embedding's run waits anyway)
                self.barrier()
        self.model.backward_inputs(layer_done)
        run(self.tasks.get(None, []))
        sumsq, summing = sums
        backward_s = clock.lap() - summing
        return StepReport(loss, sumsq if last else None, forward_s, backward_s, clock.converting, summing)
