"""One worker process: pinned to its cores, it runs forward and input-gradient
backward of its rows of each batch on the shared parameters, then its share of
the weight gradients over the rows of every worker (activations are shared), and
applies AdamW to its shard of the parameters.  Started by the coordinator as
`python -m workers ENDPOINT RANK`; every instruction arrives over pyzmq.
"""
import os
import signal
import sys
import time

import numpy as np
import zmq

from trainer import gemm
from trainer.data import open_tokens, window_start
from trainer.gpt import GPT, task_params, weight_grad_tasks
from trainer.optim import BLOCK, adamw_update, sum_squares
from trainer.params import GPTConfig, decay_segments, param_layout, shard_bounds
from trainer.profile import LayerTimes
from workers.barrier import PeerGone, PipeBarrier, PipeProgress
from workers.reduce import ReduceScatter, bucket_ranges, bucket_tasks
from workers.shm import SharedArena

PARENT_POLL_MS = 500


class Worker:
    def __init__(self, init):
        from threadpoolctl import threadpool_info, threadpool_limits
        self.rank, self.n_workers = init["rank"], init["n_workers"]
        if init["cores"] and hasattr(os, "sched_setaffinity"):  # macOS has no CPU affinity
            os.sched_setaffinity(0, init["cores"])
        self.engine = gemm.install(init["gemm"])  # loads oneDNN and its OpenMP runtime, if used
        self.blas_limits = threadpool_limits(limits=init["threads"])  # BLAS and OpenMP alike
        self.blas = ", ".join(
            f"{lib['internal_api']} {lib['version']} {lib.get('architecture') or ''}".strip()
            for lib in threadpool_info() if lib["user_api"] == "blas")
        cfg = GPTConfig(**init["config"])
        self.layout = layout = param_layout(cfg)
        self.scratch = None  # gradient views for accumulation, made on first use
        names = init["arenas"]
        self.data = init["parallel"] == "data"
        attach = lambda what: SharedArena.attach(names[what], layout.size)  # noqa: E731
        self.params, self.m, self.v = attach("params"), attach("Adam m"), attach("Adam v")
        self.grads = attach("gradients")  # data: buffer 0, which receives the sum
        self.buffers = [self.grads] + [attach(f"gradients of worker {r}")
                                       for r in range(1, self.n_workers) if self.data]
        self.grad_views = layout.views(self.buffers[self.rank if self.data else 0].array)
        self.rows, self.T, self.batch_rows = init["rows"], init["seq_len"], init["batch_rows"]
        self.first_row = init["first_row"]
        self.lo, self.hi = shard_bounds(layout.size, self.n_workers)[self.rank]
        self.barrier = PipeBarrier(init["barrier"])
        # the arena objects are kept: dropping one would unmap it
        self.params_low = self.activations = self.activations_low = low_params = None
        if self.engine.low:
            self.params_low = SharedArena.attach(names["bf16 weights"], layout.size, self.engine.low_dtype)
            low_params = layout.views(self.params_low.array)
        params = layout.views(self.params.array)
        if self.data:  # its own rows, in private memory, with no barriers
            self.model = GPT(cfg, self.rows, self.T, params, self.grad_views, low_params=low_params)
            self.buckets = bucket_tasks(cfg)
            self.reducer = ReduceScatter([b.array for b in self.buffers], self.rank,
                                         bucket_ranges(layout, cfg), PipeProgress(init["barrier"]))
        else:  # hybrid: shared activations of the pool's rows, matmuls split by columns
            self.activations = SharedArena.attach(names["activations"], init["elements"]["activations"])
            if self.engine.low:
                self.activations_low = SharedArena.attach(names["bf16 activations"],
                                                          init["elements"]["bf16 activations"], self.engine.low_dtype)
            self.model = GPT(cfg, self.rows, self.T, params, self.grad_views, self.activations.array,
                             part=self.rank, n_parts=self.n_workers, sync=self.barrier, low_params=low_params,
                             low_arena=self.activations_low.array if self.activations_low else None)
            self.tasks = weight_grad_tasks(cfg, self.n_workers)[self.rank]
        self.train = open_tokens(init["train"])
        self.val = open_tokens(init["val"]) if init["val"] else None
        self.segments = [(max(s, self.lo), min(e, self.hi), decays)
                         for s, e, decays in decay_segments(layout) if s < self.hi and e > self.lo]
        self.optim = init["optim"]
        self.layer_times = None
        if init["profile"]:
            self.layer_times = LayerTimes()
            self.layer_times.install()
        self.tmp = np.empty(BLOCK, dtype=np.float32)

    def load_rows(self, tokens, window):
        """The tokens of this worker's rows (data) or of the pool's (hybrid: weight
        gradients read them all)."""
        rows, first = (self.rows, self.first_row + self.rank * self.rows) if self.data else (
            self.rows * self.n_workers, self.first_row)
        start = window_start(window, tokens.size, self.batch_rows * self.T) + first * self.T
        self.model.load_batch(tokens[start:start + rows * self.T + 1])

    def step(self, window, scale, accumulate, last):
        """Forward and the activation gradients of this worker's rows (data: also its
        weight gradients and the reduce-scatter, on the last micro-batch of a step).
        The times exclude barrier waits, reducing and the bf16 conversions."""
        t0, wait0, conv0 = time.perf_counter(), self.barrier.seconds, self.engine.convert_seconds
        self.load_rows(self.train, window)
        loss = self.model.forward()
        t1, wait1, conv1 = time.perf_counter(), self.barrier.seconds, self.engine.convert_seconds
        self.model.backward_inputs(scale)
        reply, reducing = {"loss": loss}, 0.0
        if self.data:
            reduce0 = self.reducer.seconds
            for tasks in self.buckets:
                for task in tasks:
                    self.weight_task(task, accumulate)
                if last:
                    self.reducer.bucket_done()  # reduces whatever every worker has finished
            reducing = self.reducer.seconds - reduce0  # inside the backward, overlapping it
        t2, wait2, conv2 = time.perf_counter(), self.barrier.seconds, self.engine.convert_seconds
        if self.data and last:
            reply["sumsq"] = self.reducer.finish()  # the rest, after waiting for slower workers
            reply["reduce_s"] = self.reducer.seconds - reduce0
        return dict(reply, forward_s=t1 - t0 - (wait1 - wait0) - (conv1 - conv0),
                    backward_s=t2 - t1 - (wait2 - wait1) - (conv2 - conv1) - reducing, convert_s=conv2 - conv0)

    def weight_task(self, task, accumulate):
        """One weight-gradient task into this worker's gradients -> the regions written.
        The first micro-batch of a step writes them; later ones (gradient accumulation)
        go through a private scratch and are added."""
        own = self.grad_views
        if accumulate and self.scratch is None:
            self.scratch = self.layout.allocate()[1]
        self.model.backward_weights(task, self.scratch if accumulate else own)
        regions = []
        for name, lo, hi in task_params(task):
            if accumulate:
                own[name][lo:hi] += self.scratch[name][lo:hi]
            regions.append(own[name][lo:hi])
        return regions

    def weight_grads(self, accumulate):
        """Hybrid: this worker's weight-gradient tasks over the rows of every worker,
        once all have finished `step`.  -> Σ g² of what it wrote and the seconds
        spent summing it."""
        sumsq, t_sum = 0.0, 0.0
        for task in self.tasks:
            regions = self.weight_task(task, accumulate)
            t0 = time.perf_counter()
            sumsq += sum(sum_squares(region.reshape(-1)) for region in regions)  # while in cache
            t_sum += time.perf_counter() - t0
        return {"sumsq": sumsq, "sum_s": t_sum}

    def evaluate(self, windows):
        loss = 0.0
        for window in range(windows):
            self.load_rows(self.val, window)
            loss += self.model.forward()
        return {"loss": loss}

    def sumsq(self):
        """Σ g² of this worker's optimizer shard (after an MPI all-reduce changed the gradients)."""
        return {"sumsq": sum_squares(self.grads.array[self.lo:self.hi])}

    def update(self, lr, scale, t):
        """AdamW on this worker's shard; with bf16 matmuls it also writes the shard's
        bf16 copy, block by block while the block is in cache."""
        p, g, m, v = self.params.array, self.grads.array, self.m.array, self.v.array
        low = self.params_low.array if self.params_low else None
        o, conv0 = self.optim, self.engine.convert_seconds
        for s, e, decays in self.segments:
            adamw_update(p[s:e], g[s:e], m[s:e], v[s:e], self.tmp, lr=lr, t=t,
                         beta1=o["beta1"], beta2=o["beta2"], eps=o["eps"],
                         weight_decay=o["weight_decay"] if decays else 0.0, grad_scale=scale,
                         p_low=None if low is None else low[s:e])
        return {"convert_s": self.engine.convert_seconds - conv0}

    def cast(self):
        """The bf16 copy of this worker's shard of freshly loaded weights."""
        if self.params_low:
            gemm.to_low(self.params_low.array[self.lo:self.hi], self.params.array[self.lo:self.hi])
        return {}

    def handle(self, msg):
        op = msg["op"]
        t0 = time.perf_counter()
        if op == "step":
            return self.step(msg["window"], msg["scale"], msg["accumulate"], msg["last"])
        if op == "grads":
            return dict(self.weight_grads(msg["accumulate"]), seconds=time.perf_counter() - t0)
        if op == "sumsq":
            return dict(self.sumsq(), seconds=time.perf_counter() - t0)
        if op == "update":
            return dict(self.update(msg["lr"], msg["scale"], msg["t"]), seconds=time.perf_counter() - t0)
        if op == "cast":
            return self.cast()
        if op == "eval":
            return self.evaluate(msg["windows"])
        if op == "profile":
            return {"layers": self.layer_times.seconds if self.layer_times else {}}
        raise ValueError(f"unknown instruction {op!r}")


def serve(sock, parent):
    """Answer instructions until 'stop', or until the coordinator is gone."""
    worker = None
    while True:
        if not sock.poll(PARENT_POLL_MS):
            if os.getppid() != parent:
                return 1  # the coordinator died (even SIGKILL): exit; shared memory goes with us
            continue
        msg = sock.recv_json()
        if msg["op"] == "stop":
            sock.send_json({"op": "stopped"})
            return 0
        try:
            if msg["op"] == "init":
                worker = Worker(msg)
                reply = {"blas": worker.blas}
            else:
                reply = worker.handle(msg)
        except Exception as e:  # report to the coordinator, which explains and stops the run
            sock.send_json({"op": "error", "error": f"{type(e).__name__}: {e}",
                            "peer_gone": isinstance(e, PeerGone)})
            return 1
        reply["op"] = "done"
        sock.send_json(reply)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    endpoint, rank = argv[0], int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    parent = os.getppid()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.IDENTITY, str(rank).encode())
    sock.connect(endpoint)
    sock.send_json({"op": "hello"})
    try:
        return serve(sock, parent)
    finally:
        sock.close()
        ctx.term()
