"""Data parallelism: each worker runs the whole model on its own rows, with its
activations in private memory and no barriers, and computes every gradient of its
rows into its own buffer; the W buffers are summed by a reduce-scatter in
shared memory (reduce.py) that overlaps the rest of the backward.
"""
from trainer.activations import activation_layout, low_layout
from trainer.gpt import weight_tasks
from trainer.lora import trainable_layout
from workers.barrier import PipeProgress
from workers.messages import StepReport
from workers.reduce import ReduceScatter, bucket_ranges
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


class DataParallel(Strategy):
    name = "data"
    summary = "each worker its own rows, gradients reduce-scattered"

    @staticmethod
    def arena_sizes(cfg, pool_rows, seq_len, engine, n_workers, recompute=False, lora=None):
        trained = trainable_layout(cfg, lora).size  # buffer 0, the pool's gradients, receives the sum
        return [(f"gradients of worker {r}", trained, "float32") for r in range(1, n_workers)]

    @staticmethod
    def private_bytes(cfg, pool_rows, seq_len, engine, n_workers, recompute=False, lora=None):
        rows = pool_rows // n_workers
        low = 2 * low_layout(cfg, rows, seq_len, True, recompute, lora=lora).size if engine.low else 0
        return 4 * activation_layout(cfg, rows, seq_len, True, engine.low, recompute, lora=lora).size + low

    def __init__(self, worker):
        super().__init__(worker)
        w = worker
        self.buffers = [w.grads] + [SharedArena.attach(w.arena_names[f"gradients of worker {r}"], w.trainable.size)
                                    for r in range(1, w.n_workers)]
        self.grads = w.trainable.views(self.buffers[w.rank].array)
        self.own_rows = w.pool_rows // w.n_workers  # the batch divides (config.check)
        self.model = self.make_model(self.own_rows, self.grads)  # its own rows, private
        self.buckets = buckets_of(weight_tasks(w.cfg, lora=w.lora))  # (with LoRA, no embedding bucket)
        self.bucket_of_layer = {tasks[0].layer: tasks for tasks in self.buckets if tasks}
        self.reducer = ReduceScatter([b.array for b in self.buffers], w.rank,
                                     bucket_ranges(w.trainable, self.buckets), PipeProgress(w.barrier_ends))

    def rows(self):
        w = self.worker
        return self.own_rows, w.first_row + w.rank * self.own_rows

    def step(self, window, scale, accumulate, last):
        clock = Stopwatch(lambda: 0.0, self.worker.engine)
        self.load(self.worker.train, window)
        loss = self.model.forward(scale, self.written(self.grads, accumulate))
        forward_s = clock.lap()
        reduce0 = self.reducer.seconds
        def run(tasks):
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
