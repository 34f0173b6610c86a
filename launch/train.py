"""The coordinator: everything that can fail on bad input is checked (`setup`)
before any worker starts; then the pool starts, the weights load, and the step
loop (loop.py) runs.  The coordinator decides, the workers compute:

    for each step:  STEP per micro-batch (each worker: its strategy's share of
                          forward, backward and weight gradients -> a StepReport)
                    [under MPI: all-reduce of the gradients across ranks]
                    UPDATE (each worker applies AdamW to its shard)
"""
import dataclasses
import hashlib
import json
import os
from datetime import datetime, timezone

from launch.adapters import load_lora, lora_model, parameter_counts, sampling_weights
from launch.config import SETTINGS, check
from launch.console import Console, log
from launch.loop import StepLoop, StopRequest
from launch.rundir import (Metrics, NoMetrics, lock_run_dir, plot_quietly, prepare_out_dir, run_settings,
                           write_failed)
from trainer.checkpoint import check_checkpoint, read_state, stream_checkpoint
from trainer.corpus import prepare_shakespeare
from trainer.data import check_tokens, open_tokens, resolve_data
from trainer.errors import ConfigError, DataError, EngineError, ResourceError, RunError, WeightsError
from trainer.files import atomic_write
from trainer.gemm import Engine, choose
from trainer.base import adapter_dir
from trainer.lora import lora_of
from trainer.models import family_of, preset_config
from trainer.optimizers import DEFAULT as DEFAULT_OPTIMIZER
from trainer.weights import latest_checkpoint, load_checked
from workers import messages as msg
from workers.comm import LocalGroup
from workers.placement import place, read_topology
from workers.pool import WorkerPool
from workers.resources import check as check_resources, lighter_settings, plan_for
from workers.strategies import STRATEGIES

# what a resumed run may change; everything else is the run's own
RESUME_KEEPS = ("steps", "eval_every", "eval_steps", "sample_every", "ckpt_every", "keep_last",
                "no_checkpoint", "workers", "threads_per_worker", "oversubscribe", "skip_nonfinite",
                "profile")


def resume_settings(s, given):
    """-> (settings of the run being resumed, with the flags this invocation gave
    for what may change between sessions (steps, logging, workers); checkpoint; state)."""
    ckpt = latest_checkpoint(s.out_dir) if os.path.isdir(s.out_dir) else None
    if ckpt is None:
        raise DataError(f"--resume: {s.out_dir} has no checkpoint to resume from")
    state = read_state(ckpt)
    saved = {k: v for k, v in state["config"].items() if k in SETTINGS}
    saved.setdefault("optim", DEFAULT_OPTIMIZER)  # a checkpoint from before --optim
    saved.update({k: getattr(s, k) for k in given if k in RESUME_KEEPS})
    if "workers" in given and "threads_per_worker" not in given:
        saved["threads_per_worker"] = None  # derive it again for the new worker count
    saved.update(resume=True, out_dir=s.out_dir, backend=s.backend)
    ignored = sorted(k for k in given if k not in RESUME_KEEPS and k not in ("resume", "out_dir"))
    if ignored:
        log("coregpt: --resume keeps the run's settings; ignored: "
            + " ".join("--" + k.replace("_", "-") for k in ignored))
    return dataclasses.replace(s, **saved), ckpt, state


def build_model(s, ckpt):
    """-> (config, tensors or None).  None means: the family's initialisation, or on
    --resume the checkpoint, streamed into the arenas once they exist."""
    if ckpt is not None:
        return check_checkpoint(ckpt, s.optim), None
    if not s.init_from:
        overrides = dict(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd, block_size=s.block_size)
        return preset_config(s.model, overrides), None
    return load_checked(s.init_from)


def open_data(s, cfg):
    train_path, val_path = resolve_data(s.data, prepare_shakespeare)
    train = open_tokens(train_path)
    check_tokens(train, train_path, s.batch_size * s.seq_len, cfg.vocab_size)
    if s.val_data:
        val_path = s.val_data
    if val_path and s.eval_every:
        try:
            check_tokens(open_tokens(val_path), val_path, s.batch_size * s.seq_len, cfg.vocab_size)
        except DataError as e:
            if s.val_data:
                raise
            log(f"coregpt: evaluation disabled: {e}")
            val_path = None
    return os.path.abspath(train_path), os.path.abspath(val_path) if val_path else None


@dataclasses.dataclass
class Run:
    """What setup found: the settings as the run uses them, the model and data, and
    the GEMM engine and strategy chosen for it."""
    settings: object
    cfg: object
    tensors: dict | None  # weights to load; None: the family's initialisation
    ckpt: str | None  # the checkpoint resumed from
    state: dict | None  # its run state
    train_path: str
    val_path: str | None
    engine: Engine
    engine_text: str
    strategy: type
    lock: int | None  # the run directory's lock (rank 0), held until the run ends
    base: object = None  # a LoRA run's frozen base (trainer.base.Base)


def choose_engine(s):
    """The GEMM engine of the run, chosen once: an engine this machine lacks is bad input."""
    try:
        name, text = choose(s.precision, s.gemm)
        return Engine(name), text
    except EngineError as e:
        raise ConfigError(str(e)) from None


def setup(s, given, group):
    """-> Run.  Everything that can fail on bad input, before any worker starts."""
    ckpt, state, lock = None, None, None
    if s.resume and group.is_root and os.path.isdir(s.out_dir):
        lock = lock_run_dir(s.out_dir)  # a run still going on there is the first thing to say
    if s.resume:
        s, ckpt, state = resume_settings(s, given)
        s = check(s, group if s.backend == "mpi" else None)  # e.g. the new worker count vs cores
    engine, engine_text = choose_engine(s)
    base = None
    if s.lora_rank or (s.init_from and not s.resume and adapter_dir(s.init_from)):
        s, cfg, base, tensors = lora_model(s, ckpt, state)
    else:
        cfg, tensors = build_model(s, ckpt)
    if s.seq_len > cfg.block_size:
        raise DataError(f"--seq-len {s.seq_len} is above the model's context of {cfg.block_size}")
    train_path, val_path = open_data(s, cfg)
    if s.out_dir is None:
        s = dataclasses.replace(s, out_dir=os.path.join("runs", datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")))
    strategy = STRATEGIES[s.parallel]
    plan = plan_for(cfg, s, group.local_size, group.size, engine, strategy)
    def lighter():
        return [(flags, plan_for(cfg, dataclasses.replace(s, **changes), group.local_size, group.size, engine,
                                 strategy)) for flags, changes in lighter_settings(s, group.size)]
    warning = check_resources(plan, s.out_dir if group.is_root else os.devnull, lighter=lighter)
    if group.is_root:
        lock = prepare_out_dir(s, lock)
        try:
            with atomic_write(os.path.join(s.out_dir, "run.json"), "w") as f:
                json.dump(run_settings(s), f, indent=2)
        except OSError as e:
            raise write_failed(os.path.join(s.out_dir, "run.json"), e, s.out_dir) from None
    log(f"coregpt: {plan.describe()}")
    if warning:
        log(f"coregpt: {warning}")
    return Run(s, cfg, tensors, ckpt, state, train_path, val_path, engine, engine_text, strategy, lock, base)


def train(s, given=(), group=None):
    """Run training for settings `s`; `given` names the settings set by flags;
    `group` is the MPI group under --backend mpi.  -> the run directory."""
    group = group or LocalGroup()
    Console.quiet = not group.is_root
    try:
        run = setup(s, given, group)
        error = None
    except (ConfigError, DataError, WeightsError, ResourceError) as e:
        error = e
    group.agree(error)  # under MPI: every rank stops on any rank's bad input
    try:
        return run_pool(run, group)
    finally:
        if run.lock is not None:
            os.close(run.lock)


def run_pool(run, group):
    """Start the workers, load the weights, run the steps -> the run directory."""
    s, cfg = run.settings, run.cfg
    start = run.state["step"] if run.state else 0
    if start >= s.steps and s.resume:
        log(f"coregpt: {s.out_dir} is already at step {start} of {s.steps}; raise --steps to continue")
        return s.out_dir
    metrics = Metrics(s.out_dir, start) if group.is_root else NoMetrics()
    log(f"coregpt: {cfg.n_layer} layers, {cfg.n_embd} channels, {cfg.n_head} heads; "
        f"batch {s.batch_size}x{s.seq_len}"
        + (f"x{s.grad_accum} accumulated" if s.grad_accum > 1 else "")
        + (f" on {group.size} MPI ranks x" if group.size > 1 else " on")
        + f" {s.workers} worker(s) x {s.threads_per_worker} thread(s), {s.parallel} parallel"
        + (", recomputing activations" if s.recompute else "") + "; "
        + f"run dir {s.out_dir}")
    lora = lora_of(s, cfg.family)
    if lora:
        log(f"coregpt: LoRA r={lora.rank}, alpha={lora.alpha:g} on {', '.join(lora.targets)}"
            + (f", dropout {lora.dropout:g}" if lora.dropout else "") + f"; {parameter_counts(cfg, lora)}")
    topo = read_topology()
    cores = place(topo, s.workers, s.threads_per_worker, s.smt, first_worker=group.local_rank * s.workers,
                  total_workers=group.local_size * s.workers) if topo.pinning else None
    log(f"coregpt: {topo.describe(s.smt)}; "
        + ("  ".join(f"worker {r}: cpus {','.join(map(str, c))}" for r, c in enumerate(cores)) if cores
           else "workers not pinned"))
    pool = None
    try:
        with StopRequest() as stop:
            pool = WorkerPool(cfg, s.workers, s.threads_per_worker, pool_rows=s.batch_size // group.size,
                              seq_len=s.seq_len, batch_rows=s.batch_size, train=run.train_path,
                              val=run.val_path, optim=dict(kind=s.optim, beta1=s.beta1, beta2=s.beta2,
                                                           eps=s.eps, weight_decay=s.weight_decay),
                              engine=run.engine, strategy=run.strategy, profile=s.profile,
                              recompute=s.recompute, lora=lora, accumulating=s.grad_accum > 1,
                              first_row=group.rank * (s.batch_size // group.size), cores=cores)
            log(f"coregpt: matmuls: {run.engine_text}; workers' BLAS: {pool.blas or 'none found'}")
            arrays = pool.trained(), pool.optimizer_views()
            if lora:
                load_lora(run, pool)
            else:
                load_state(cfg, s, arrays, run.tensors, run.ckpt)
            run.tensors = None
            pool.request(msg.Cast())  # the bf16 copy of the loaded weights, if any
            StepLoop(s, cfg, pool, group, metrics, arrays, stop, run.val_path,
                     weights=sampling_weights(run, pool) if lora else None,
                     base=run.base.record if lora else None).run(start, run.state or {})
            if group.size > 1:  # every rank applied the same updates: check they agree to the bit
                trained = pool.adapters if lora else pool.params
                digest = hashlib.blake2b(trained.array.data, digest_size=16).digest()
                if not group.identical(digest):
                    raise RunError("the ranks' weights differ after training; the checkpoint is rank 0's")
                log(f"coregpt: all {group.size} ranks hold bit-identical weights (blake2b {digest.hex()})")
    finally:
        metrics.close()
        if pool is not None:
            pool.close()
    if group.is_root:
        plot_quietly(s.out_dir)
    return s.out_dir


def load_state(cfg, s, arrays, tensors, ckpt):
    params, optimizer = arrays
    if ckpt is not None:
        stream_checkpoint(ckpt, cfg, params, optimizer)
    elif tensors is None:
        family_of(cfg).init_params(cfg, params, s.seed)
    else:
        for name, view in params.items():
            view[...] = tensors[name]
