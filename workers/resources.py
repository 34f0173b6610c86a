"""What a run needs (shared memory, memory, disk for a checkpoint) against what
the machine has, checked before anything is written or allocated.

Limits that bite users: Docker's 64 MB /dev/shm, a cgroup memory limit, a model
whose parameters, gradients and Adam moments (16 bytes a parameter) exceed the
machine, an --out-dir that cannot hold a checkpoint.  Each is one line naming the
need, what is there, and the fix; the header prints the plan."""
import os

import numpy as np

from trainer.errors import ResourceError

# one Python process with NumPy, pyzmq, the BLAS libraries and its multiprocessing
# resource tracker (a worker measured 40 MB, PSS less shared memory); the coordinator
# also reads GPT-2's BPE when it first samples (24 MB) and imports matplotlib to draw
# loss.png (26 MB): measured 83 MB while sampling, ~110 MB drawing after it
WORKER_BYTES = 60 * 2 ** 20
COORDINATOR_BYTES = 112 * 2 ** 20
MB, GB = 1e6, 1e9
ACTIVATIONS = ("activations", "bf16 activations")  # shared arenas first touched by a step
WEIGHTS = ("params", "adapters", "gradients", "bf16 weights", "bf16 adapters")  # arenas of any batch


def meminfo_available(path="/proc/meminfo"):
    """MemAvailable in bytes, or None where there is no /proc (macOS)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cgroup_memory_left(root="/sys/fs/cgroup", proc_self="/proc/self/cgroup"):
    """Bytes left under this process's cgroup memory limit (v2 memory.max or v1
    memory.limit_in_bytes, minus what is in use), or None without a limit."""
    from workers.placement import cgroup_dirs, read_text
    left = []
    for here, v1 in cgroup_dirs("memory", root, proc_self):
        limit_file, used_file = ("memory.limit_in_bytes", "memory.usage_in_bytes") if v1 else (
            "memory.max", "memory.current")
        limit, used = read_text(os.path.join(here, limit_file)), read_text(os.path.join(here, used_file))
        if limit and limit.isdigit() and int(limit) < 2 ** 60:
            left.append(int(limit) - int(used or 0))
    return min(left) if left else None


def free_bytes(path):
    """Free bytes for an unprivileged writer on the filesystem holding `path`
    (or its nearest existing parent), or None where it cannot be asked."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def plan_for(settings, start, engine, strategy, ranks=(1, 1)):
    """The Plan of training `settings` on this machine, for weights from `start`
    (launch.start.Start: the model, what trains, what loading them holds), with the
    run's GEMM engine and strategy class; ranks: (on this machine, in all)."""
    from trainer.gemm import WIDEN
    from trainer.optimizers import OPTIMIZERS
    from trainer.profile import PEAKS_BYTES
    from workers.pool import arena_sizes
    from workers.strategy import PoolShape
    local_ranks, all_ranks = ranks
    cfg, trains, workers = start.cfg, start.trains, settings.workers
    pool_rows = settings.batch_size // all_ranks
    shape = PoolShape(cfg, trains, pool_rows, settings.seq_len, engine, strategy, workers, settings.recompute,
                      settings.grad_accum > 1)
    arenas = [(what, n * np.dtype(dtype).itemsize) for what, n, dtype in arena_sizes(shape, settings.optim)]
    # each worker's own buffers: the rows every layernorm weight gradient normalises
    # (N x C), bf16's one-layer fp32 rows, attention's blocks, NumPy's temporaries:
    # 8 floats per row and channel of the pool holds the measured peaks (README);
    # with gradient accumulation also a micro-batch's gradient scratch; where bf16 is
    # emulated, the weights widened for its fp32 GEMMs
    private = 4 * pool_rows * settings.seq_len * cfg.n_embd * 8 + 4 * strategy.scratch_floats(shape)
    if engine.weight_dtype != engine.low_dtype:
        private += 4 * WIDEN
    private += strategy.private_bytes(shape) + trains.private_bytes(pool_rows, settings.seq_len)
    if settings.no_checkpoint:
        kept = 0
    elif settings.keep_last:
        kept = settings.keep_last + 1  # the newest is written before the oldest goes
    else:
        kept = (settings.steps // settings.ckpt_every if settings.ckpt_every else 0) + 1
    # what the coordinator holds while it fills the arenas (start.loading); a
    # checkpoint is written straight from the arenas
    optimizer = sum(n * np.dtype(dtype).itemsize for _, n, dtype in OPTIMIZERS[settings.optim].arenas(trains.layout))
    measuring = PEAKS_BYTES + (4 * WIDEN if engine.weight_dtype != engine.low_dtype else 0) if settings.profile else 0
    return Plan(arenas, trains.layout.size, workers, local_ranks, private, kept, 4 * start.loading, optimizer,
                measuring)


def lighter_settings(settings, ranks, strategy):
    """Changes to settings `s` that need less memory, cheapest first -> [(flags,
    {setting: value})]: --recompute; 8-bit Adam moments (alone, then with it); then
    the batch per step halved, quartered, … with --grad-accum multiplied to keep the
    batch (each also with --recompute, and with 8-bit moments); strategy: the run's
    strategy class."""
    lighter = [] if settings.recompute else [("--recompute", {"recompute": True})]
    rows = ranks * strategy.batch_unit(settings.workers)  # what the batch must divide by
    k = 2
    while settings.batch_size % (k * rows) == 0:
        batch, accum = settings.batch_size // k, settings.grad_accum * k
        changes = {"batch_size": batch, "grad_accum": accum}
        lighter.append((f"--batch-size {batch} --grad-accum {accum}", changes))
        if not settings.recompute:
            lighter.append((f"--batch-size {batch} --grad-accum {accum} --recompute", {**changes, "recompute": True}))
        k *= 2
    from trainer.optimizers import OPTIMIZERS
    smaller = OPTIMIZERS[settings.optim].lighter  # an optimizer whose state takes less memory
    if smaller is None:
        return lighter
    def with_smaller(flags, changes):
        return f"{flags} --optim {smaller}".strip(), {**changes, "optim": smaller}
    first = [] if settings.recompute else lighter[:1]  # --recompute alone: the same numbers, only slower
    options = first + [with_smaller("", {})] + [with_smaller(*option) for option in first]
    for option in lighter[len(first):]:
        options += [option, with_smaller(*option)]
    return options


class Plan:
    """Bytes one machine needs for a run: `local_ranks` pools of `workers` workers."""

    def __init__(self, arenas, params, workers, local_ranks, private_per_worker, checkpoints, loading=0,
                 optimizer=None, measuring=0):
        """optimizer: bytes of the optimizer's state (default: AdamW's fp32 m and v);
        measuring: what the coordinator holds while --profile measures the machine's
        peaks, after the steps, with every arena still in use."""
        self.arenas = arenas  # [(what, bytes)] of one pool
        self.weights = sum(b for what, b in arenas if what in WEIGHTS or what.startswith("Adam"))
        self.shm = local_ranks * sum(b for _, b in arenas)
        self.params = params
        processes = local_ranks * (COORDINATOR_BYTES + workers * WORKER_BYTES)
        # the coordinator holds what it loads (weights, Adam state read from files) only
        # while it fills the arenas, before any activation is touched: the peak is the
        # larger of that moment and the steps'
        filling = self.shm - local_ranks * sum(b for what, b in arenas if what in ACTIVATIONS) + local_ranks * loading
        steps = self.shm + local_ranks * (workers * private_per_worker + measuring)
        self.private = processes + max(filling, steps) - self.shm
        self.memory = self.shm + self.private
        self.optimizer = 8 * params if optimizer is None else optimizer
        self.checkpoint = 4 * params + self.optimizer + 2 ** 20  # weights, optimizer state, JSON
        self.checkpoints = checkpoints  # how many the run keeps at most (0: none written)

    def describe(self):
        parts = ", ".join(f"{what} {b / MB:,.0f} MB" for what, b in self.arenas)
        return (f"memory plan: shared {self.shm / GB:.2f} GB ({parts}), private ~{self.private / GB:.2f} GB"
                + (f"; a checkpoint {self.checkpoint / GB:.2f} GB" if self.checkpoints else ""))


MACHINE = object()  # "read it from the machine"


def fits(plan):
    """Whether the plan's memory and shared memory fit this machine now."""
    try:
        check(plan, None, disk_free=None)
    except ResourceError:
        return False
    return True


def check(plan, out_dir, shm_dir="/dev/shm", memory=MACHINE, cgroup=MACHINE, shm_free=MACHINE,
          disk_free=MACHINE, lighter=list):
    """Raise ResourceError if the plan does not fit; -> a warning line or None.
    The keyword arguments replace what is read from the machine (None: unknown);
    lighter() -> [(flags, Plan)] of lighter settings, cheapest first: the memory
    error names the first that fits."""
    memory = meminfo_available() if memory is MACHINE else memory
    cgroup = cgroup_memory_left() if cgroup is MACHINE else cgroup
    limits = [(m, where) for m, where in ((memory, "available"), (cgroup, "left under the cgroup limit"))
              if m is not None]
    if limits:
        have, where = min(limits)
        if plan.memory > have:
            fits = next(((flags, p) for flags, p in lighter() if p.memory <= have), None)
            fix = f"{fits[0]} fits ({fits[1].memory / GB:.1f} GB); or " if fits else ""
            raise ResourceError(
                f"memory: this run needs {plan.memory / GB:.1f} GB (weights, gradients and optimizer state "
                f"take {plan.weights / GB:.1f} GB) but {have / GB:.1f} GB are {where}; {fix}choose a smaller "
                f"--model or --batch-size, fewer --workers, or a machine with more memory")
    if shm_free is MACHINE:  # no /dev/shm (macOS): POSIX shared memory is not a filesystem there
        shm_free = free_bytes(shm_dir) if os.path.isdir(shm_dir) else None
    if shm_free is not None and plan.shm > shm_free:
        need_gib = int(np.ceil(plan.shm * 1.1 / 2 ** 30))  # Docker's sizes are binary: 64m is 64 MiB
        raise ResourceError(
            f"shared memory: this run needs {plan.shm / 2 ** 20:,.0f} MiB in {shm_dir} but "
            f"{shm_free / 2 ** 20:,.0f} MiB are free; in Docker run with --shm-size={need_gib}g (or "
            f"--ipc=host), or choose a smaller --model or --batch-size")
    if not plan.checkpoints:
        return None
    disk_free = free_bytes(out_dir) if disk_free is MACHINE else disk_free
    if disk_free is None:
        return None
    if plan.checkpoint > disk_free:
        raise ResourceError(
            f"disk: a checkpoint of this model takes {plan.checkpoint / MB:,.0f} MB but the filesystem of "
            f"--out-dir {out_dir} has {disk_free / MB:,.0f} MB free; free space, choose another --out-dir, "
            f"or pass --no-checkpoint")
    if plan.checkpoints * plan.checkpoint > disk_free:
        return (f"warning: keeping {plan.checkpoints} checkpoints takes {plan.checkpoints * plan.checkpoint / GB:.1f}"
                f" GB but --out-dir has {disk_free / GB:.1f} GB free; set --keep-last or a larger --ckpt-every")
    return None
