"""The coordinator's step loop, the same for every strategy: per micro-batch one
Step round whose typed reports are combined one way (loss and Σ g² summed over
workers, each phase the slowest worker's), then the update, evaluation, samples
and checkpoints."""
import math
import signal
import time

from launch.console import log
from launch.rundir import checkpoint
from trainer.data import WindowOrder, open_data, order_seed
from trainer.optim import clip_scale, lr_at
from trainer.optimizers import OPTIMIZERS
from trainer.profile import clock, layer_table, measure_peaks, phase_line
from trainer.sample import sample_text
from trainer.errors import RunError
from workers import messages as msg

PHASES = ("forward", "backward", "convert", "reduce", "update", "waiting")


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



class StepLoop:
    def __init__(self, run, pool, group, metrics, arrays, stop):
        """run: what setup found (launch.train.Run: the settings, where the weights came
        from, the data); arrays: (trained tensors, optimizer state) as checkpoints hold them."""
        settings = run.settings
        self.settings, self.start, self.cfg = settings, run.start, run.start.cfg
        self.pool, self.group, self.metrics = pool, group, metrics
        self.arrays, self.stop, self.val_path = arrays, stop, run.val_path
        self.engine, self.phase_ms = run.engine, []  # --profile: the peaks' engine, each step's phases
        self.weights = run.start.sampling_weights(pool)
        self.batch_tokens = settings.batch_size * settings.seq_len
        self.step_tokens = self.batch_tokens * settings.grad_accum
        # the loss is the mean over the targets it counts (chat data: its mask's)
        self.train = open_data(run.train_path)
        self.order = WindowOrder(self.train.tokens.size, self.batch_tokens,
                                 order_seed(settings.data_order, settings.seed))
        self.windows_per_pass = self.order.per_pass
        if self.val_path:
            val = open_data(self.val_path)
            order = WindowOrder(val.tokens.size, self.batch_tokens)  # the workers' validation order
            self.val_targets = sum(val.targets(order.start(window), self.batch_tokens)
                                   for window in range(settings.eval_steps))

    def run(self, start, state):
        settings = self.settings
        self.counts = {"updates": state.get("adam_steps", start), "skipped": state.get("skipped_nonfinite", 0)}
        self.best, self.saved = state.get("best"), start  # the lowest validation loss; the step last saved
        step, self.began = start, time.perf_counter()
        if self.val_path and settings.eval_every and start == 0 < settings.steps:
            self.evaluate(0)  # the loss the run starts from (a fine-tune's base)
        first = None  # each worker's layer totals after the run's first step (profiling)
        for step in range(start + 1, settings.steps + 1):
            self.log_epoch(step)
            self.train_step(step, start)
            if settings.profile and step == start + 1 < settings.steps:
                first = self.layer_totals()
            last = step == settings.steps
            if self.val_path and settings.eval_every and (step % settings.eval_every == 0 or last):
                self.evaluate(step)
            if settings.sample_every and (step % settings.sample_every == 0 or last) and self.group.is_root \
                    and self.start.tokenizer:
                text = sample_text(self.cfg, self.weights(), self.start.tokenizer, "\n", max_new_tokens=64,
                                   seed=settings.seed)
                log(f"step {step:>6}/{settings.steps} | sample:\n{text}\n")
            if self.group.any(self.stop.signum is not None):  # every rank stops after the same step
                if not settings.no_checkpoint and self.group.is_root and self.saved != step:
                    log(f"coregpt: checkpoint {self.checkpoint(step)}")
                raise Interrupted(self.stop.signum or signal.SIGINT, step, settings.out_dir)
            if settings.ckpt_every and step % settings.ckpt_every == 0 and not last and not settings.no_checkpoint \
                    and self.group.is_root and self.saved != step:
                self.checkpoint(step)
        if settings.profile and step > start:
            self.log_profile(first, start, step)
        if not settings.no_checkpoint and step > start and self.group.is_root and self.saved != step:
            log(f"coregpt: checkpoint {self.checkpoint(step)}")

    def log_epoch(self, step):
        """A line when one of step's micro-batches begins a new pass over the training windows."""
        first, per_pass = (step - 1) * self.settings.grad_accum, self.windows_per_pass
        epoch = (first + self.settings.grad_accum - 1) // per_pass
        if first and epoch > (first - 1) // per_pass:
            log(f"coregpt: epoch {epoch + 1} begins at step {step} ({per_pass} windows a pass, "
                f"{self.settings.data_order})")

    def layer_totals(self):
        """-> each worker's ({layer function: seconds}, {layer function: FLOPs}) so far (--profile)."""
        return [(r.layers, r.flops) for r in self.pool.request(msg.Profile())]

    def log_profile(self, first, start, step):
        """--profile's tables: by layer type, the phases, and this machine's peaks."""
        settings, layers, steps, which = self.settings, self.layer_totals(), step - start, ""
        if first is not None:  # taken after the first of several steps, all of which ran
            # the first step's one-time costs (oneDNN building its primitives, pages
            # touched the first time) would inflate a short run's table
            layers = [tuple({name: t - before[name] for name, t in now.items()} for now, before in zip(mine, was))
                      for mine, was in zip(layers, first)]
            steps = steps - 1
            which = f", step {step}" if steps == 1 else f", steps {start + 2}-{step}"
        log(f"coregpt: time inside each worker by layer type (mean over workers{which})\n"
            + layer_table(layers, steps))
        rows = self.phase_ms[-steps:]  # none where every step was skipped as not finite
        if rows:
            update_bytes = OPTIMIZERS[settings.optim].bytes_moved * self.start.trains.layout.size
            log(f"coregpt: {phase_line(rows, update_bytes, settings.workers)}")
        gflops, gbs = measure_peaks(self.engine, settings.threads_per_worker)
        log(f"coregpt: this machine's peaks with one worker's {settings.threads_per_worker} thread(s), measured "
            f"now: {gflops:.0f} GFLOP/s for the engine's GEMM (1024x768 @ 768x3072), {gbs:.1f} GB/s adding arrays")

    def gradients(self, step):
        """Every micro-batch's Step round -> (mean loss, grad norm, phase seconds)."""
        settings, pool, group = self.settings, self.pool, self.group
        loss, phases = 0.0, dict.fromkeys(PHASES, 0.0)
        windows = range((step - 1) * settings.grad_accum, step * settings.grad_accum)
        targets = max(1, sum(self.train.targets(self.order.start(window), self.batch_tokens) for window in windows))
        for micro, window in enumerate(windows):
            reports = pool.request(msg.Step(window=window, scale=1.0 / targets,
                                            accumulate=micro > 0, last=micro == settings.grad_accum - 1))
            loss += sum(r.loss for r in reports)
            for phase in ("forward", "backward", "convert", "reduce"):
                phases[phase] += max(getattr(r, phase + "_s") for r in reports)
        sumsq = [r.sumsq for r in reports]  # of the last micro-batch: the whole step's gradients
        loss = group.sum(loss) / targets
        if group.size > 1:  # across machines; the norm is of the global sum
            t_reduce = time.perf_counter()
            group.allreduce(pool.grads.array)
            sumsq = [r.sumsq for r in pool.request(msg.SumSq())]
            phases["reduce"] += time.perf_counter() - t_reduce
        return loss, math.sqrt(sum(sumsq)), phases

    def train_step(self, step, start):
        settings, counts, t0 = self.settings, self.counts, time.perf_counter()
        loss, grad_norm, phases = self.gradients(step)
        lr = lr_at(step, settings.lr, settings.lr_schedule, settings.warmup, settings.steps, settings.min_lr)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            counts["updates"] += 1  # the optimizer's own step count: skipped steps do not advance it
            clip = clip_scale(grad_norm, settings.grad_clip)
            hyper = OPTIMIZERS[settings.optim].hyper(settings, lr, counts["updates"], clip)
            reports = self.pool.request(msg.Update(hyper))
            phases["update"] = max(r.seconds - r.convert_s for r in reports)
            phases["convert"] += max(r.convert_s for r in reports)
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "step_ms": round(dt * 1000, 3), "tokens_per_s": round(self.step_tokens / dt, 1)}
            if settings.profile:
                phases["waiting"] = dt - sum(phases.values())  # messages, imbalance, coordinator
                row["profile_ms"] = {k: round(1000 * v, 3) for k, v in phases.items()}
                self.phase_ms.append(row["profile_ms"])
            self.metrics.write(row)
            elapsed = time.perf_counter() - self.began
            log(f"step {step:>6}/{settings.steps} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm:.3f} "
                f"| {dt * 1000:.0f} ms | {self.step_tokens / dt:,.0f} tok/s | {clock(elapsed)} elapsed, ETA "
                f"{clock(elapsed / (step - start) * (settings.steps - step))}")
        elif settings.skip_nonfinite:
            counts["skipped"] += 1
            self.metrics.write({"step": step, "loss": None, "lr": lr, "grad_norm": None,
                                "skipped_nonfinite": counts["skipped"]})
            log(f"step {step:>6}/{settings.steps} | loss {loss} / grad norm {grad_norm} not finite: "
                f"step skipped ({counts['skipped']} so far)")
        else:
            raise RunError(f"step {step}: loss {loss} / grad norm {grad_norm} is not finite; "
                           f"the step was not applied (lower --lr, or pass --skip-nonfinite)")

    def evaluate(self, step):
        settings = self.settings
        val = self.group.sum(sum(r.loss for r in self.pool.request(msg.Eval(windows=settings.eval_steps))))
        val /= max(1, self.val_targets)
        self.metrics.write({"step": step, "val_loss": val})
        improved = settings.keep_best and (self.best is None or val < self.best["val_loss"])
        log(f"step {step:>6}/{settings.steps} | val loss {val:.4f}" + (" (best so far)" if improved else ""))
        if improved:  # every rank knows the loss; the root keeps the weights that gave it
            self.best = {"step": step, "val_loss": val}
            if self.group.is_root:
                self.checkpoint(step)

    def checkpoint(self, step):
        self.saved = step
        return checkpoint(self.settings, self.start, step, self.arrays, self.counts, self.best)
