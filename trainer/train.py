"""The coordinator's training loop.  It decides, the workers compute:

    for each step:  STEP (forward and activation gradients of each worker's rows)
                    GRADS (each worker computes whole weight gradients over the rows
                           of all workers, through the shared activations)
                    [under MPI: all-reduce of the gradients across ranks]
                    UPDATE (each worker applies AdamW to its shard)
"""
import hashlib
import json
import math
import os
import signal
import sys
import time
from datetime import datetime, timezone

from launch.config import ConfigError, check
from trainer.checkpoint import load_optimizer, prune_checkpoints, save_checkpoint
from trainer.corpus import prepare_shakespeare
from trainer.data import DataError, check_tokens, open_tokens, resolve_data
from trainer.files import atomic_write
from trainer.gemm import Engine, choose
from trainer.optim import clip_scale, lr_at
from trainer.params import GPT2_VOCAB, init_gpt2
from trainer.profile import clock, layer_table
from trainer.sample import sample_text
from trainer.weights import WeightsError, latest_checkpoint, load_checked, preset_config
from workers.comm import LocalGroup
from workers.placement import place, read_topology
from workers.pool import WorkerPool
from workers.resources import ResourceError, check as check_resources, plan_for

PHASES = ("forward", "backward", "convert", "reduce", "update", "waiting")
# what a resumed run may change; everything else is the run's own
RESUME_KEEPS = ("steps", "eval_every", "eval_steps", "sample_every", "ckpt_every", "keep_last",
                "no_checkpoint", "workers", "threads_per_worker", "oversubscribe", "skip_nonfinite",
                "profile")


class RunError(RuntimeError):
    """The run stopped for a reason the user must see (non-finite loss, ...)."""


class Console:
    """Progress goes to stderr from one process only (MPI rank 0)."""
    quiet = False


def log(message):
    if not Console.quiet:
        print(message, file=sys.stderr, flush=True)


def prepare_out_dir(s):
    if os.path.exists(s.out_dir) and not os.path.isdir(s.out_dir):
        raise DataError(f"--out-dir {s.out_dir} is a file, not a directory")
    if not s.resume and os.path.isdir(s.out_dir) and (
            os.path.exists(os.path.join(s.out_dir, "metrics.jsonl"))
            or os.path.exists(os.path.join(s.out_dir, "checkpoints"))):
        raise DataError(f"--out-dir {s.out_dir} already holds a run; pass --resume to continue it "
                        f"or choose another --out-dir")
    os.makedirs(s.out_dir, exist_ok=True)


def resume_settings(s, given):
    """Settings of the run being resumed, with the flags this invocation gave
    for what may change between sessions (steps, logging, workers)."""
    ckpt = latest_checkpoint(s.out_dir) if os.path.isdir(s.out_dir) else None
    if ckpt is None:
        raise DataError(f"--resume: {s.out_dir} has no checkpoint to resume from")
    _, _, state = load_optimizer(ckpt)
    saved = dict(state["config"])
    saved.update({k: v for k, v in vars(s).items() if k in given and k in RESUME_KEEPS})
    if "workers" in given and "threads_per_worker" not in given:
        saved["threads_per_worker"] = None  # derive it again for the new worker count
    saved.update(resume=True, out_dir=s.out_dir, backend=s.backend)
    ignored = sorted(k for k in given if k not in RESUME_KEEPS and k not in ("resume", "out_dir"))
    if ignored:
        log("coregpt: --resume keeps the run's settings; ignored: "
            + " ".join("--" + k.replace("_", "-") for k in ignored))
    return saved, ckpt, state


def build_model(s, ckpt):
    """-> (GPTConfig, tensors or None).  None means: GPT-2 initialisation."""
    if ckpt is None and not s.init_from:
        overrides = dict(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd, block_size=s.block_size)
        return preset_config(s.model, overrides, GPT2_VOCAB), None
    return load_checked(ckpt or s.init_from)


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


class NoMetrics:
    """What ranks other than 0 write."""

    def write(self, row):
        pass

    def close(self):
        pass


def write_failed(what, error, out_dir):
    """An I/O error (disk full, ...) writing `what`: the RunError the user sees."""
    reason = getattr(error, "strerror", None) or str(error)
    previous = latest_checkpoint(out_dir) if os.path.isdir(out_dir) else None
    return RunError(f"writing {what} failed: {reason}; "
                    + (f"the last checkpoint ({os.path.basename(previous)}) is intact; " if previous else "")
                    + f"free space, then continue with --resume --out-dir {out_dir}")


class Metrics:
    """metrics.jsonl, one JSON object a line; on resume rows past the checkpoint are dropped."""

    def __init__(self, out_dir, keep_through_step):
        self.path, self.out_dir = os.path.join(out_dir, "metrics.jsonl"), out_dir
        rows = []
        if os.path.isfile(self.path):
            with open(self.path) as f:
                rows = [line for line in f if line.strip() and json.loads(line)["step"] <= keep_through_step]
        try:
            with atomic_write(self.path, "w") as f:
                f.writelines(rows)
            self.file = open(self.path, "a")
        except OSError as e:
            raise write_failed(self.path, e, out_dir) from None

    def write(self, row):
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:
            raise write_failed(self.path, e, self.out_dir) from None

    def close(self):
        try:
            self.file.close()
        except OSError:
            pass  # a failed flush was reported by write()


class StopRequest:
    """First Ctrl-C / SIGTERM: finish the step, checkpoint it, exit 130 / 143.
    A second signal aborts at once (the workers are still stopped cleanly)."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log(f"coregpt: {signal.Signals(signum).name}: stopping after this step "
            f"(press Ctrl-C again to abort now)")


class Interrupted(Exception):
    def __init__(self, signum, step, out_dir):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; "
                         f"continue with --resume --out-dir {out_dir}")
        self.exit_code = 128 + signum


def setup(s, given, group):
    """Everything that can fail on bad input, before any worker starts."""
    ckpt, state = None, None
    if s.resume:
        saved, ckpt, state = resume_settings(s, given)
        vars(s).update(saved)
        check(s, group if s.backend == "mpi" else None)  # e.g. the new worker count vs cores
    cfg, tensors = build_model(s, ckpt)
    if s.seq_len > cfg.block_size:
        raise DataError(f"--seq-len {s.seq_len} is above the model's context of {cfg.block_size}")
    train_path, val_path = open_data(s, cfg)
    if s.out_dir is None:
        s.out_dir = os.path.join("runs", datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))
    plan = plan_for(cfg, s, group.local_size, group.size, Engine(choose(s.precision, s.gemm)[0]))
    warning = check_resources(plan, s.out_dir if group.is_root else os.devnull)
    if group.is_root:
        prepare_out_dir(s)
        try:
            with atomic_write(os.path.join(s.out_dir, "run.json"), "w") as f:
                json.dump(run_settings(s), f, indent=2)
        except OSError as e:
            raise write_failed(os.path.join(s.out_dir, "run.json"), e, s.out_dir) from None
    log(f"coregpt: {plan.describe()}")
    if warning:
        log(f"coregpt: {warning}")
    return cfg, tensors, ckpt, state, train_path, val_path


def train(s, given=(), group=None):
    """Run training for settings `s`; `given` names the settings set by flags;
    `group` is the MPI group under --backend mpi."""
    group = group or LocalGroup()
    Console.quiet = not group.is_root
    try:
        cfg, tensors, ckpt, state, train_path, val_path = setup(s, given, group)
        error = None
    except (ConfigError, DataError, WeightsError, ResourceError) as e:
        error = e
    group.agree(error)  # under MPI: every rank stops on any rank's bad input
    start = state["step"] if state else 0
    if start >= s.steps and s.resume:
        log(f"coregpt: {s.out_dir} is already at step {start} of {s.steps}; raise --steps to continue")
        return s.out_dir
    metrics = Metrics(s.out_dir, start) if group.is_root else NoMetrics()
    workers = group.size * s.workers
    log(f"coregpt: {cfg.n_layer} layers, {cfg.n_embd} channels, {cfg.n_head} heads; "
        f"batch {s.batch_size}x{s.seq_len}"
        + (f"x{s.grad_accum} accumulated" if s.grad_accum > 1 else "")
        + (f" on {group.size} MPI ranks x" if group.size > 1 else " on")
        + f" {s.workers} worker(s) x {s.threads_per_worker} thread(s), {s.parallel} parallel; "
        + f"run dir {s.out_dir}")
    engine, engine_text = choose(s.precision, s.gemm)
    topo = read_topology()
    cores = place(topo, s.workers, s.threads_per_worker, s.smt, first_worker=group.local_rank * s.workers,
                  total_workers=group.local_size * s.workers) if topo.pinning else None
    log(f"coregpt: {topo.describe(s.smt)}; "
        + ("  ".join(f"worker {r}: cpus {','.join(map(str, c))}" for r, c in enumerate(cores)) if cores
           else "workers not pinned"))
    pool = None
    try:
        with StopRequest() as stop:
            pool = WorkerPool(cfg, s.workers, s.threads_per_worker, rows=s.batch_size // workers,
                              seq_len=s.seq_len, batch_rows=s.batch_size, train=train_path,
                              val=val_path, optim=dict(beta1=s.beta1, beta2=s.beta2, eps=s.eps,
                                                       weight_decay=s.weight_decay),
                              gemm=engine, parallel=s.parallel, profile=s.profile,
                              worker_offset=group.rank * s.workers,
                              cores=cores)
            log(f"coregpt: matmuls: {engine_text}; workers' BLAS: {pool.blas or 'none found'}")
            arrays = tuple(pool.layout.views(a.array) for a in (pool.params, pool.m, pool.v))
            load_state(cfg, s, arrays, tensors, ckpt)
            del tensors
            pool.request({"op": "cast"})  # the bf16 copy of the loaded weights, if any
            run_steps(s, cfg, pool, group, metrics, start, state or {}, val_path, arrays, stop)
            if group.size > 1:  # every rank applied the same updates: check they agree to the bit
                digest = hashlib.blake2b(pool.params.array.data, digest_size=16).digest()
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
    params, m, v = arrays
    if tensors is None:
        init_gpt2(cfg, params, s.seed)
    else:
        for name, view in params.items():
            view[...] = tensors[name]
    if ckpt is not None:
        saved_m, saved_v, _ = load_optimizer(ckpt)
        for name in params:
            m[name][...], v[name][...] = saved_m[name], saved_v[name]


def run_steps(s, cfg, pool, group, metrics, start, state, val_path, arrays, stop):
    counts = {"updates": state.get("adam_steps", start), "skipped": state.get("skipped_nonfinite", 0)}
    batch_tokens = s.batch_size * s.seq_len
    step_tokens = batch_tokens * s.grad_accum
    step, began = start, time.perf_counter()
    for step in range(start + 1, s.steps + 1):
        t0 = time.perf_counter()
        loss, phases = 0.0, dict.fromkeys(PHASES, 0.0)
        for micro in range(s.grad_accum):
            last = micro == s.grad_accum - 1
            replies = pool.request({"op": "step", "window": (step - 1) * s.grad_accum + micro,
                                    "scale": 1.0 / step_tokens, "accumulate": micro > 0, "last": last})
            loss += sum(r["loss"] for r in replies)
            phases["forward"] += max(r["forward_s"] for r in replies)
            phases["backward"] += max(r["backward_s"] for r in replies)
            phases["convert"] += max(r["convert_s"] for r in replies)
            if s.parallel == "data":  # the gradients are summed inside the step, on its last micro-batch
                phases["reduce"] += max(r.get("reduce_s", 0.0) for r in replies)
                continue
            # every worker's activation gradients are in: the weight gradients can read them all
            replies = pool.request({"op": "grads", "accumulate": micro > 0})
            phases["backward"] += max(r["seconds"] - r["sum_s"] for r in replies)
            phases["reduce"] += max(r["sum_s"] for r in replies)
        loss = group.sum(loss) / step_tokens
        if group.size > 1:  # across machines; the norm is of the global sum
            t_reduce = time.perf_counter()
            group.allreduce(pool.grads.array)
            replies = pool.request({"op": "sumsq"})
            phases["reduce"] += time.perf_counter() - t_reduce
        grad_norm = math.sqrt(sum(r["sumsq"] for r in replies))
        lr = lr_at(step, s.lr, s.lr_schedule, s.warmup, s.steps, s.min_lr)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            counts["updates"] += 1  # AdamW's own step count: skipped steps do not advance it
            replies = pool.request({"op": "update", "lr": lr, "t": counts["updates"],
                                    "scale": clip_scale(grad_norm, s.grad_clip)})
            phases["update"] = max(r["seconds"] - r["convert_s"] for r in replies)
            phases["convert"] += max(r["convert_s"] for r in replies)
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "step_ms": round(dt * 1000, 3), "tokens_per_s": round(step_tokens / dt, 1)}
            if s.profile:
                phases["waiting"] = dt - sum(phases.values())  # messages, imbalance, coordinator
                row["profile_ms"] = {k: round(1000 * v, 3) for k, v in phases.items()}
            metrics.write(row)
            elapsed = time.perf_counter() - began
            log(f"step {step:>6}/{s.steps} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm:.3f} "
                f"| {dt * 1000:.0f} ms | {step_tokens / dt:,.0f} tok/s | {clock(elapsed)} elapsed, ETA "
                f"{clock(elapsed / (step - start) * (s.steps - step))}")
        elif s.skip_nonfinite:
            counts["skipped"] += 1
            metrics.write({"step": step, "loss": None, "lr": lr, "grad_norm": None,
                           "skipped_nonfinite": counts["skipped"]})
            log(f"step {step:>6}/{s.steps} | loss {loss} / grad norm {grad_norm} not finite: "
                f"step skipped ({counts['skipped']} so far)")
        else:
            raise RunError(f"step {step}: loss {loss} / grad norm {grad_norm} is not finite; "
                           f"the step was not applied (lower --lr, or pass --skip-nonfinite)")
        last = step == s.steps
        if val_path and s.eval_every and (step % s.eval_every == 0 or last):
            val = group.sum(sum(r["loss"] for r in pool.request({"op": "eval", "windows": s.eval_steps})))
            val /= s.eval_steps * batch_tokens
            metrics.write({"step": step, "val_loss": val})
            log(f"step {step:>6}/{s.steps} | val loss {val:.4f}")
        if s.sample_every and (step % s.sample_every == 0 or last) and group.is_root:
            text = sample_text(cfg, arrays[0], "\n", max_new_tokens=64, seed=s.seed)
            log(f"step {step:>6}/{s.steps} | sample:\n{text}\n")
        if group.any(stop.signum is not None):  # every rank stops after the same step
            if not s.no_checkpoint and group.is_root:
                log(f"coregpt: checkpoint {checkpoint(s, cfg, step, arrays, counts)}")
            raise Interrupted(stop.signum or signal.SIGINT, step, s.out_dir)
        if s.ckpt_every and step % s.ckpt_every == 0 and not last and not s.no_checkpoint \
                and group.is_root:
            checkpoint(s, cfg, step, arrays, counts)
    if s.profile and step > start:
        layers = [r["layers"] for r in pool.request({"op": "profile"})]
        log("coregpt: time inside each worker by layer type (mean over workers)\n"
            + layer_table(layers, step - start))
    if not s.no_checkpoint and step > start and group.is_root:
        log(f"coregpt: checkpoint {checkpoint(s, cfg, step, arrays, counts)}")


def checkpoint(s, cfg, step, arrays, counts):
    params, m, v = arrays
    state = {"seed": s.seed, "data_window": step * s.grad_accum, "adam_steps": counts["updates"],
             "skipped_nonfinite": counts["skipped"], "config": run_settings(s)}
    from safetensors import SafetensorError
    try:  # a failed write leaves no partial directory, and `latest` still names the previous one
        path = save_checkpoint(s.out_dir, step, cfg, params, m, v, state)
    except (OSError, SafetensorError) as e:
        raise write_failed(f"the step {step} checkpoint in {os.path.join(s.out_dir, 'checkpoints')}",
                           e, s.out_dir) from None
    if s.keep_last:
        prune_checkpoints(s.out_dir, s.keep_last)
    return path


def run_settings(s):
    return {k: v for k, v in vars(s).items() if k not in ("resume", "config")}


def plot_quietly(run_dir):
    """The loss plot is a convenience: a failure to draw it is one line, and an
    I/O error writing it (disk full) fails the run like any other write."""
    try:
        from trainer.plot import plot_run
        plot_run(run_dir)
    except OSError as e:
        raise write_failed(os.path.join(run_dir, "loss.png"), e, run_dir) from None
    except Exception as e:  # noqa: BLE001
        log(f"coregpt: no loss plot ({type(e).__name__}: {e})")
