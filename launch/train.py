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

from launch.config import SETTINGS, check
from launch.console import Console, log
from launch.loop import StepLoop, StopRequest
from launch.rundir import (Metrics, NoMetrics, lock_run_dir, plot_quietly, prepare_out_dir, run_settings,
                           write_failed)
from launch.adapters import lora_start
from launch.start import full_start, run_tokenizer
from trainer.chat_data import check_packed
from trainer.checkpoint import best_checkpoint, read_state
from trainer.corpus import prepare_shakespeare
from trainer.data import check_tokens, open_tokens, order_seed, resolve_data
from trainer.errors import ConfigError, DataError, EngineError, ResourceError, RunError, WeightsError
from trainer.files import atomic_write
from trainer.gemm import Engine, choose
from trainer.optimizers import DEFAULT as DEFAULT_OPTIMIZER
from trainer.tokenizer import gpt2_tokenizer
from trainer.trainable import kind_of
from trainer.weights import latest_checkpoint
from workers import messages as msg
from workers.comm import LocalGroup
from workers.placement import place, read_topology
from workers.pool import Batches, WorkerPool
from workers.resources import check as check_resources, lighter_settings, plan_for
from workers.strategy import PoolShape
from workers.strategies import strategy_for

# where the weights come from, by what trains (trainer.trainable.kind_of): settings, checkpoint,
# its state -> (settings, start record); the settings change where a peft adapter brings its own
STARTS = {"full": full_start, "lora": lora_start}

# what a resumed run may change; everything else is the run's own
RESUME_KEEPS = ("steps", "eval_every", "eval_steps", "sample_every", "ckpt_every", "keep_last", "keep_best",
                "no_checkpoint", "workers", "threads_per_worker", "oversubscribe", "skip_nonfinite",
                "profile")


def resume_settings(settings, given):
    """-> (settings of the run being resumed, with the flags this invocation gave
    for what may change between sessions (steps, logging, workers); checkpoint; state)."""
    ckpt = latest_checkpoint(settings.out_dir) if os.path.isdir(settings.out_dir) else None
    if ckpt is None:
        stopped = os.path.exists(os.path.join(settings.out_dir, "metrics.jsonl"))
        raise DataError(f"--resume: {settings.out_dir} has no checkpoint to resume from"
                        + ("; its run stopped before its first checkpoint: remove it, or train afresh with "
                           "another --out-dir" if stopped else ""))
    state = read_state(ckpt)
    saved = {k: v for k, v in state["config"].items() if k in SETTINGS}
    saved.setdefault("optim", DEFAULT_OPTIMIZER)  # a checkpoint from before --optim
    saved.setdefault("data_order", "sequential")  # ... from before --data-order: it read the file in order
    saved.update({k: getattr(settings, k) for k in given if k in RESUME_KEEPS})
    if "workers" in given and "threads_per_worker" not in given:
        saved["threads_per_worker"] = None  # derive it again for the new worker count
    saved.update(resume=True, out_dir=settings.out_dir, backend=settings.backend)
    ignored = sorted(k for k in given if k not in RESUME_KEEPS and k not in ("resume", "out_dir"))
    if ignored:
        log("coregpt: --resume keeps the run's settings; ignored: "
            + " ".join("--" + k.replace("_", "-") for k in ignored))
    return dataclasses.replace(settings, **saved), ckpt, state


def open_data(settings, cfg):
    train_path, val_path = resolve_data(settings.data, lambda: prepare_shakespeare(gpt2_tokenizer()))
    check_packed(train_path, settings.seq_len)
    train = open_tokens(train_path)
    check_tokens(train, train_path, settings.batch_size * settings.seq_len, cfg.vocab_size)
    if settings.val_data:
        val_path = settings.val_data
    if val_path and settings.eval_every:
        try:
            check_packed(val_path, settings.seq_len)
            check_tokens(open_tokens(val_path), val_path, settings.batch_size * settings.seq_len, cfg.vocab_size)
        except DataError as e:
            if settings.val_data or settings.keep_best:
                raise
            log(f"coregpt: evaluation disabled: {e}")
            val_path = None
    if settings.keep_best and not val_path:
        raise DataError(f"--keep-best needs validation data: {settings.data} has no val.bin beside it; "
                        f"pass --val-data FILE")
    return os.path.abspath(train_path), os.path.abspath(val_path) if val_path else None


@dataclasses.dataclass
class Run:
    """What setup found: the settings as the run uses them, where its weights come
    from (launch.start.Start: the model, what trains, the source), the data, and the
    GEMM engine and strategy chosen for it."""
    settings: object
    start: object
    train_path: str
    val_path: str | None
    engine: Engine
    engine_text: str
    strategy: type
    strategy_why: str | None  # why --parallel auto chose it (None: named by --parallel)
    lock: int | None  # the run directory's lock (rank 0), held until the run ends


def choose_engine(settings):
    """The GEMM engine of the run, chosen once: an engine this machine lacks is bad input."""
    try:
        name, text = choose(settings.precision, settings.gemm)
        return Engine(name), text
    except EngineError as e:
        raise ConfigError(str(e)) from None


def setup(settings, given, group):
    """-> Run.  Everything that can fail on bad input, before any worker starts."""
    ckpt, state, lock = None, None, None
    if settings.resume and group.is_root and os.path.isdir(settings.out_dir):
        lock = lock_run_dir(settings.out_dir)  # a run still going on there is the first thing to say
    if settings.resume:
        settings, ckpt, state = resume_settings(settings, given)
        settings = check(settings, group if settings.backend == "mpi" else None)  # e.g. workers vs cores
    engine, engine_text = choose_engine(settings)
    settings, start = STARTS[kind_of(settings)](settings, ckpt, state)
    start.tokenizer = run_tokenizer(settings, ckpt, start.cfg)
    if settings.seq_len > start.cfg.block_size:
        raise DataError(f"--seq-len {settings.seq_len} is above the model's context of {start.cfg.block_size}")
    train_path, val_path = open_data(settings, start.cfg)
    if settings.out_dir is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        settings = dataclasses.replace(settings, out_dir=os.path.join("runs", stamp))
    ranks = group.local_size, group.size
    strategy, why = strategy_for(settings, start, engine, ranks)
    plan = plan_for(settings, start, engine, strategy, ranks)
    def lighter():
        return [(flags, plan_for(dataclasses.replace(settings, **changes), start, engine, strategy, ranks))
                for flags, changes in lighter_settings(settings, group.size, strategy)]
    warning = check_resources(plan, settings.out_dir if group.is_root else os.devnull, lighter=lighter)
    if group.is_root:
        lock = prepare_out_dir(settings, lock)
        try:
            with atomic_write(os.path.join(settings.out_dir, "run.json"), "w") as f:
                json.dump(run_settings(settings), f, indent=2)
        except OSError as e:
            raise write_failed(os.path.join(settings.out_dir, "run.json"), e, settings.out_dir) from None
    log(f"coregpt: {plan.describe()}")
    if warning:
        log(f"coregpt: {warning}")
    return Run(settings, start, train_path, val_path, engine, engine_text, strategy, why, lock)


def train(settings, given=(), group=None):
    """Run training for `settings`; `given` names the settings set by flags;
    `group` is the MPI group under --backend mpi.  -> the run directory."""
    group = group or LocalGroup()
    Console.quiet = not group.is_root
    try:
        run = setup(settings, given, group)
        error = None
    except (ConfigError, DataError, WeightsError, ResourceError) as e:
        error = e
    group.agree(error)  # under MPI: every rank stops on any rank's bad input
    try:
        return run_pool(run, group)
    finally:
        if run.lock is not None:
            os.close(run.lock)


def header(run, group):
    """The header's lines on the model, the batch and what trains."""
    settings, cfg = run.settings, run.start.cfg
    log(f"coregpt: {cfg.describe()}; "
        f"batch {settings.batch_size}x{settings.seq_len}"
        + (f"x{settings.grad_accum} accumulated" if settings.grad_accum > 1 else "")
        + (f" on {group.size} MPI ranks x" if group.size > 1 else " on")
        + f" {settings.workers} worker(s) x {settings.threads_per_worker} thread(s), {run.strategy.name} parallel"
        + (f" (auto: {run.strategy_why})" if run.strategy_why else "")
        + (", recomputing activations" if settings.recompute else "") + "; "
        + f"run dir {settings.out_dir}")
    log(f"coregpt: weights {run.start.origin}")
    tokenizer = run.start.tokenizer
    if tokenizer is None:
        log("coregpt: no tokenizer.json beside the model: samples are off (--tokenizer DIR names one)")
    elif tokenizer.describe():
        log(f"coregpt: {tokenizer.describe()}")
    trains = run.start.trains.describe()
    if trains:
        log(f"coregpt: {trains}")


def start_pool(run, group, cores):
    """The run's WorkerPool (its workers started)."""
    settings, start = run.settings, run.start
    rows = settings.batch_size // group.size
    shape = PoolShape(start.cfg, start.trains, rows, settings.seq_len, run.engine, run.strategy, settings.workers,
                      settings.recompute, settings.grad_accum > 1)
    batches = Batches(run.train_path, run.val_path, settings.batch_size, group.rank * rows,
                      order_seed(settings.data_order, settings.seed))
    return WorkerPool(shape, batches,
                      threads=settings.threads_per_worker, optim=settings.optim, profile=settings.profile,
                      cores=cores)


def run_pool(run, group):
    """Start the workers, load the weights, run the steps -> the run directory."""
    settings, start = run.settings, run.start
    if start.step >= settings.steps and settings.resume:
        log(f"coregpt: {settings.out_dir} is already at step {start.step} of {settings.steps}; "
            f"raise --steps to continue")
        return settings.out_dir
    metrics = Metrics(settings.out_dir, start.step) if group.is_root else NoMetrics()
    header(run, group)
    topo = read_topology()
    cores = place(topo, settings.workers, settings.threads_per_worker, settings.smt,
                  first_worker=group.local_rank * settings.workers,
                  total_workers=group.local_size * settings.workers) if topo.pinning else None
    log(f"coregpt: {topo.describe(settings.smt)}; "
        + ("  ".join(f"worker {r}: cpus {','.join(map(str, c))}" for r, c in enumerate(cores)) if cores
           else "workers not pinned"))
    pool = None
    try:
        with StopRequest() as stop:
            pool = start_pool(run, group, cores)
            log(f"coregpt: matmuls: {run.engine_text}; workers' BLAS: {pool.blas or 'none found'}")
            arrays = pool.trained(), pool.optimizer_views()
            start.fill(pool, arrays, run.engine, settings.seed)
            pool.request(msg.Cast())  # the bf16 copy of the loaded weights, if any
            StepLoop(run, pool, group, metrics, arrays, stop).run(start.step, start.state or {})
            if group.size > 1:  # every rank applied the same updates: check they agree to the bit
                digest = hashlib.blake2b(pool.trained_arena.array.data, digest_size=16).digest()
                if not group.identical(digest):
                    raise RunError("the ranks' weights differ after training; the checkpoint is rank 0's")
                log(f"coregpt: all {group.size} ranks hold bit-identical weights (blake2b {digest.hex()})")
    finally:
        metrics.close()
        if pool is not None:
            pool.close()
    if group.is_root:
        plot_quietly(settings.out_dir)
        log(f"coregpt: {outputs(settings.out_dir)}")
    return settings.out_dir


def outputs(run_dir):
    """The line that ends a run: where its files are, and how to go on."""
    files = [name for name in ("metrics.jsonl", "loss.png") if os.path.exists(os.path.join(run_dir, name))]
    checkpoint, best = latest_checkpoint(run_dir), best_checkpoint(run_dir)
    return (f"run dir {run_dir}: " + ", ".join(files)
            + (f", checkpoint {os.path.relpath(checkpoint, run_dir)} (go on with --resume --out-dir {run_dir})"
               if checkpoint else "")
            + (f", best {os.path.relpath(best, run_dir)} (val loss {read_state(best)['best']['val_loss']:.4f})"
               if best else ""))
