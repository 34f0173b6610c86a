"""One worker process: pinned to its cores, it runs its parallel strategy's share of
each step on the shared parameters and applies AdamW to its shard of them.
Started by the coordinator as `python -m workers ENDPOINT RANK`; every instruction
arrives over pyzmq as a typed message (messages.py).
"""
import os
import signal
import sys
import time

import numpy as np
import zmq

from trainer.gemm import Engine
from trainer.data import WindowOrder, open_data
from trainer.optim import sum_squares
from trainer.optimizers import OPTIMIZERS
from trainer.model import Layers
from trainer.models import config_from_fields, param_layout
from trainer.profile import TimedLayers
from trainer.trainable import Weights, of_record
from workers import messages as msg
from workers.barrier import PeerGone
from workers.shm import SharedArena
from workers.strategies import STRATEGIES

PARENT_POLL_MS = 500


class Worker:
    def __init__(self, init):
        from threadpoolctl import threadpool_info, threadpool_limits
        self.rank, self.n_workers = init.rank, init.n_workers
        if init.cores and hasattr(os, "sched_setaffinity"):  # macOS has no CPU affinity
            os.sched_setaffinity(0, init.cores)
        self.engine = Engine(init.gemm)  # loads oneDNN and its OpenMP runtime, if used
        self.blas_limits = threadpool_limits(limits=init.threads)  # BLAS and OpenMP alike
        self.blas = ", ".join(
            f"{lib['internal_api']} {lib['version']} {lib.get('architecture') or ''}".strip()
            for lib in threadpool_info() if lib["user_api"] == "blas")
        self.cfg = config_from_fields(init.model_type, init.config)
        self.trains = of_record(self.cfg, init.training)  # what trains
        self.layout = param_layout(self.cfg)  # the model's parameters
        layout = self.trains.layout  # what gradients and the optimizer cover
        self.arena_names, self.elements, self.barrier_ends = init.arenas, init.elements, init.barrier
        self.pool_rows, self.first_row = init.pool_rows, init.first_row
        self.seq_len, self.batch_rows, self.recompute = init.seq_len, init.batch_rows, init.recompute
        self.attached = {}  # what -> SharedArena, kept: dropping one would unmap it
        self.params, self.grads = self.attach("params"), self.attach("gradients")
        kind = OPTIMIZERS[init.optim]
        self.optimizer = kind(layout, {what: self.attach(what, np.dtype(dtype)).array
                                       for what, _, dtype in kind.arenas(layout)}, self.engine)
        self.weights = self.weight_views()
        self.lo, self.hi = kind.shards(layout, self.n_workers)[self.rank]
        # (tensor, start, end) of each parameter's part of this worker's shard
        self.segments = [(name, max(first, self.lo), min(first + int(np.prod(shape)), self.hi))
                         for name, shape in layout.shapes.items()
                         for first in (layout.offsets[name],)
                         if first < self.hi and first + int(np.prod(shape)) > self.lo]
        self.train = open_data(init.train)
        self.val = open_data(init.val) if init.val else None
        batch_tokens = self.batch_rows * self.seq_len
        self.train_order = WindowOrder(self.train.tokens.size, batch_tokens, init.order_seed)
        self.val_order = WindowOrder(self.val.tokens.size, batch_tokens) if self.val is not None else None
        self.layers = TimedLayers(Layers(self.engine)) if init.profile else Layers(self.engine)
        self.strategy = STRATEGIES[init.parallel](self)

    def attach(self, what, dtype=np.float32):
        """The pool's arena `what` (mapped once)."""
        if what not in self.attached:
            self.attached[what] = SharedArena.attach(self.arena_names[what], self.elements[what], dtype)
        return self.attached[what]

    def weight_views(self):
        """-> trainer.trainable.Weights over the arenas; also sets self.trained and
        self.trained_low, what trains in fp32 and (bf16 matmuls, else None) bf16:
        the parameters, or what the what-trains adds (LoRA's adapters)."""
        trains, low_dtype = self.trains, self.engine.weight_dtype
        layout = trains.layout
        self.trained = self.attach(trains.trained_arena)
        self.trained_low = self.attach(trains.low_trained_arena, low_dtype) if self.engine.low else None
        low_params = self.layout.views(self.attach("bf16 weights", low_dtype).array) if self.engine.low else None
        return Weights(trains.base_layout(self.engine.low).views(self.params.array), trains, low_params,
                       layout.views(self.trained.array),
                       layout.views(self.trained_low.array) if self.trained_low else None)

    def evaluate(self, windows):
        loss = 0.0
        for window in range(windows):
            self.strategy.load(self.val, self.val_order, window)
            loss += self.strategy.model.forward()
        return msg.EvalReport(loss)

    def sumsq(self):
        """Σ g² of this worker's optimizer shard (after an MPI all-reduce changed the gradients)."""
        t0 = time.perf_counter()
        return msg.SumSqReport(sum_squares(self.grads.array[self.lo:self.hi]), time.perf_counter() - t0)

    def update(self, hyper):
        """The optimizer's step (hyper: its hyper-parameters) on this worker's shard;
        with bf16 matmuls it also writes the shard's bf16 copy, block by block while
        the block is in cache."""
        t0, conv0 = time.perf_counter(), self.engine.convert_seconds
        params, grads = self.trained.array, self.grads.array
        low = self.trained_low.array if self.trained_low else None
        for name, lo, hi in self.segments:
            self.optimizer.update(name, lo, hi, params[lo:hi], grads[lo:hi], None if low is None else low[lo:hi],
                                  hyper)
        return msg.UpdateReport(time.perf_counter() - t0, self.engine.convert_seconds - conv0)

    def cast(self):
        """The bf16 copy of this worker's shard of freshly loaded weights (with LoRA,
        adapters: the coordinator wrote the frozen base's copy as it loaded it)."""
        if self.trained_low:
            self.engine.to_low(self.trained_low.array[self.lo:self.hi], self.trained.array[self.lo:self.hi])
        return msg.Done()

    def handle(self, message):
        match message:
            case msg.Step(window, scale, accumulate, last):
                return self.strategy.step(window, scale, accumulate, last)
            case msg.SumSq():
                return self.sumsq()
            case msg.Update(hyper):
                return self.update(hyper)
            case msg.Cast():
                return self.cast()
            case msg.Eval(windows):
                return self.evaluate(windows)
            case msg.Profile():
                if isinstance(self.layers, TimedLayers):
                    return msg.ProfileReport(self.layers.seconds, self.layers.flops)
                return msg.ProfileReport()
        raise ValueError(f"unknown instruction {message!r}")


def serve(sock, parent):
    """Answer instructions until Stop, or until the coordinator is gone."""
    worker = None
    while True:
        if not sock.poll(PARENT_POLL_MS):
            if os.getppid() != parent:
                return 1  # the coordinator died (even SIGKILL): exit; shared memory goes with us
            continue
        message = msg.decode(sock.recv())
        if isinstance(message, msg.Stop):
            sock.send(msg.encode(msg.Stopped()))
            return 0
        try:
            if isinstance(message, msg.Init):
                worker = Worker(message)
                reply = msg.Ready(worker.blas)
            else:
                reply = worker.handle(message)
        except Exception as e:  # report to the coordinator, which explains and stops the run
            sock.send(msg.encode(msg.Failed(f"{type(e).__name__}: {e}", isinstance(e, PeerGone))))
            return 1
        sock.send(msg.encode(reply))


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
    sock.send(msg.encode(msg.Hello()))
    try:
        return serve(sock, parent)
    finally:
        sock.close()
        ctx.term()
