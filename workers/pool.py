"""The coordinator's side of the workers: shared arenas, worker processes, and
request/reply rounds over pyzmq (ROUTER here, one DEALER per worker, ipc://
inside a private 0700 directory that is removed as soon as all are connected)."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import zmq

from trainer.errors import WorkerError
from trainer.models import param_layout
from trainer.optimizers import DEFAULT as DEFAULT_OPTIMIZER, OPTIMIZERS
from workers import messages as msg
from workers.barrier import close_all, make_pipes
from workers.shm import SharedArena

POLL_MS = 200
START_TIMEOUT_S = 120
PEER_DEATH_S = 2


def blas_coretype():
    """OPENBLAS_CORETYPE for the workers: the user's if set.  Otherwise, on AMD CPUs
    with AVX-512 (Zen 4 and later, which run AVX-512 as two 256-bit halves), 'Zen':
    its AVX2 kernels measured 4 % faster per step than the SkylakeX kernels OpenBLAS
    picks there (GPT-2 124M, 1 and 2 workers).  None: leave OpenBLAS's choice."""
    if os.environ.get("OPENBLAS_CORETYPE"):
        return os.environ["OPENBLAS_CORETYPE"]
    try:
        with open("/proc/cpuinfo") as f:
            first_cpu = f.read().split("\n\n")[0]
    except OSError:
        return None
    fields = {key.strip(): value.strip() for key, value in
              (line.split(":", 1) for line in first_cpu.splitlines() if ":" in line)}
    amd_avx512 = fields.get("vendor_id") == "AuthenticAMD" and "avx512f" in fields.get("flags", "").split()
    return "Zen" if amd_avx512 else None


def arena_sizes(shape, optim=DEFAULT_OPTIMIZER):
    """[(what, elements, dtype)] of the shared arenas of a pool of `shape` (a
    workers.strategy.PoolShape), in creation order: what every pool has (the fp32
    weights and what trains adds to them, the optimizer `optim`'s state and the
    gradients of what trains, with bf16 matmuls the bf16 copies of the weights and of
    what trains adds), then what its strategy adds."""
    trains, engine = shape.trains, shape.engine
    trained = trains.layout
    sizes = trains.weight_arenas(engine.low) + OPTIMIZERS[optim].arenas(trained)
    sizes.append(("gradients", trained.size, "float32"))
    if engine.low:
        sizes.append(("bf16 weights", param_layout(shape.cfg).size, engine.weight_dtype))
        sizes += trains.low_arenas(engine)
    return sizes + shape.strategy.arena_sizes(shape)


class Batches(NamedTuple):
    """Where a pool's tokens come from: the train and val token files, the global
    batch's rows, the first of this pool's (after the pools of earlier MPI ranks),
    and the seed of the training windows' order (None: file order; trainer/data.py)."""
    train: str
    val: str | None
    batch_rows: int
    first_row: int = 0
    order_seed: int | None = None


class WorkerPool:
    def __init__(self, shape, batches, *, threads, optim, profile=False, cores=None):
        """shape: what the pool is made for (workers.strategy.PoolShape); batches:
        where its tokens come from (Batches); threads: each worker's; optim: the
        optimizer's name (trainer/optimizers.py); cores: the logical CPUs of each
        worker (None: not pinned)."""
        self.n, self.trains = shape.n_workers, shape.trains
        self.layout = param_layout(shape.cfg)  # of the model's parameters
        self.base = self.trains.base_layout(shape.engine.low)  # ... held in fp32 (params)
        self.procs, self.arenas, self.tmpdir, self.ctx, self.router = [], [], None, None, None
        try:
            sizes = arena_sizes(shape, optim)
            for _, size, dtype in sizes:  # one by one, so close() frees any made
                self.arenas.append(SharedArena.create(size, dtype))
            # workers find each arena by what arena_sizes calls it
            arena = {what: a for (what, _, _), a in zip(sizes, self.arenas)}
            self.params, self.grads = arena["params"], arena["gradients"]
            self.trained_arena = arena[self.trains.trained_arena]  # what the optimizer updates
            self.optimizer = OPTIMIZERS[optim](self.trains.layout, {what: a.array for what, a in arena.items()},
                                               shape.engine)
            self.low = arena.get("bf16 weights")
            self.socket_dir = self.tmpdir = tempfile.mkdtemp(prefix="coregpt-")  # mode 0700
            self.socket_dir_mode = os.stat(self.tmpdir).st_mode & 0o777
            self.start(sizes, shape, batches, dict(threads=threads, optim=optim, profile=profile, cores=cores))
        except BaseException:
            self.close()
            raise

    def start(self, sizes, shape, batches, settings):
        """Start the workers, hand each its Init, and drop every name they found the pool by."""
        endpoint = f"ipc://{self.tmpdir}/control"
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(endpoint)
        barrier_ends = self._start(endpoint, settings["threads"])
        self._gather(timeout=START_TIMEOUT_S)  # Hello
        cfg, cores = shape.cfg, settings["cores"]
        self.blas = self.request([msg.Init(
            rank=r, n_workers=self.n, model_type=cfg.model_type, config=cfg.fields(), pool_rows=shape.rows,
            first_row=batches.first_row, seq_len=shape.seq_len, batch_rows=batches.batch_rows,
            train=batches.train, val=batches.val, order_seed=batches.order_seed, optim=settings["optim"],
            threads=settings["threads"],
            cores=cores[r] if cores else None, profile=settings["profile"], recompute=shape.recompute,
            gemm=shape.engine.name, training=self.trains.record(), parallel=shape.strategy.name,
            arenas={what: a.name for (what, _, _), a in zip(sizes, self.arenas)},
            elements={what: n for what, n, _ in sizes}, barrier=barrier_ends[r],
        ) for r in range(self.n)], timeout=START_TIMEOUT_S)[0].blas
        for arena in self.arenas:  # every worker maps them now: drop the names
            arena.unlink()
        # every worker is connected too: the socket file is no longer needed, and a
        # directory that no longer exists cannot be left behind by a kill
        shutil.rmtree(self.tmpdir)
        self.tmpdir = None

    def optimizer_views(self):
        """{prefix: {parameter: view}} of the optimizer's state, as checkpoints name it."""
        return self.optimizer.views()

    def trained(self):
        """{name: fp32 view} of what trains: the parameters, or LoRA's adapters."""
        return self.trains.layout.views(self.trained_arena.array)

    def _start(self, endpoint, threads):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        coretype = blas_coretype()
        if coretype:
            env["OPENBLAS_CORETYPE"] = coretype
        ends, fds = make_pipes(self.n)
        try:
            for r in range(self.n):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "workers", endpoint, str(r)], env=env,
                    stdin=subprocess.DEVNULL, pass_fds=ends[r]["read"] + ends[r]["write"]))
        finally:
            close_all(fds)  # each end now lives only in its worker: a dead worker means EOF
        return ends

    def request(self, messages, timeout=None):
        """Send one message to every worker (a message, or a list by rank) -> replies by rank."""
        for r in range(self.n):
            message = messages[r] if isinstance(messages, list) else messages
            self.router.send_multipart([str(r).encode(), msg.encode(message)])
        return self._gather(timeout)

    def _gather(self, timeout=None):
        replies, pending = [None] * self.n, self.n
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            if self.router.poll(POLL_MS):
                ident, data = self.router.recv_multipart()
                rank, reply = int(ident), msg.decode(data)
                if isinstance(reply, msg.Failed):
                    if reply.peer_gone:  # the cause is the dead worker: name it
                        self.wait_for_death(PEER_DEATH_S)
                    raise WorkerError(f"worker {rank} failed: {reply.error}")
                replies[rank] = reply
                pending -= 1
            else:
                self.check_alive()
                if deadline and time.monotonic() > deadline:
                    raise WorkerError(f"workers did not answer within {timeout} s")
        return replies

    def wait_for_death(self, seconds):
        """A worker saw another one go: give the exit time to be reaped, and raise on it."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.check_alive()
            time.sleep(0.01)

    def check_alive(self):
        for r, proc in enumerate(self.procs):
            code = proc.poll()
            if code is not None:
                how = (f"was killed by {signal.Signals(-code).name}" if code < 0
                       else f"exited with status {code}")
                raise WorkerError(f"worker {r} (pid {proc.pid}) {how}")

    def close(self):
        """Stop the workers (kill any that do not stop), remove the socket
        directory and any segment name still linked.  Safe to call twice."""
        alive = [r for r, p in enumerate(self.procs) if p.poll() is None]
        if self.router is not None:
            for r in alive:
                try:
                    self.router.send_multipart([str(r).encode(), msg.encode(msg.Stop())], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        if self.router is not None:
            self.router.close(linger=0)
            self.ctx.term()
            self.router = None
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        for arena in self.arenas:
            arena.unlink()
            arena.close()
        self.arenas = []
