"""The run directory's files, written by the coordinator (MPI rank 0): run.json,
metrics.jsonl, checkpoints and the loss plot.  A failed write (disk full, any I/O
error) is one RunError naming the path, with the last checkpoint intact.

One run per directory: before anything is written the coordinator takes an
advisory lock (flock) on RUN/.lock and holds it while it lives; the kernel drops
it when the process ends, however it ends, so a killed run never blocks its resume."""
import fcntl
import json
import os

from launch.console import log
from trainer.checkpoint import mark_best, prune_checkpoints, save_checkpoint
from trainer.errors import DataError, RunError
from trainer.files import atomic_write
from trainer.weights import latest_checkpoint


LOCK_FILE = ".lock"


def prepare_out_dir(settings, lock=None):
    """Create and lock the run directory (unless `lock` holds it already) -> the
    lock's file descriptor (the lock lasts while it is open).  Raises DataError
    (exit 2) when the directory is someone else's: a file, a run in progress, a
    finished run (without --resume), or not writable."""
    if os.path.exists(settings.out_dir) and not os.path.isdir(settings.out_dir):
        raise DataError(f"--out-dir {settings.out_dir} is a file, not a directory")
    if lock is None:
        lock = lock_run_dir(settings.out_dir)
    if not settings.resume and (os.path.exists(os.path.join(settings.out_dir, "metrics.jsonl"))
                                or os.path.exists(os.path.join(settings.out_dir, "checkpoints"))):
        os.close(lock)
        if latest_checkpoint(settings.out_dir) is None:  # stopped (Ctrl-C twice) before it wrote one
            raise DataError(f"--out-dir {settings.out_dir} already holds a run, which stopped before its first "
                            f"checkpoint (nothing to resume); remove it or choose another --out-dir")
        raise DataError(f"--out-dir {settings.out_dir} already holds a run; pass --resume to continue it "
                        f"or choose another --out-dir")
    return lock


def lock_run_dir(out_dir):
    """-> the descriptor of out_dir's lock, taken (out_dir is made if need be)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(os.path.join(out_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DataError(f"--out-dir {out_dir} cannot be created or written ({e.strerror or e}); "
                        f"choose another --out-dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live process
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DataError(f"--out-dir {out_dir} is in use by another coregpt run (pid {holder}); wait for it "
                        f"to end or choose another --out-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


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


def checkpoint(settings, start, step, arrays, counts, best=None):
    """start: where the weights came from (launch.start.Start); arrays: (trained
    tensors, optimizer state); best: {"step", "val_loss"} of the lowest validation
    loss so far (--keep-best), marked as RUN/checkpoints/best when it is this step's."""
    params, optimizer = arrays
    state = {"seed": settings.seed, "data_window": step * settings.grad_accum, "adam_steps": counts["updates"],
             "skipped_nonfinite": counts["skipped"], "config": run_settings(settings), **start.checkpoint_state()}
    if best is not None:
        state["best"] = best
    from safetensors import SafetensorError
    try:  # a failed write leaves no partial directory, and `latest` still names the previous one
        path = save_checkpoint(settings.out_dir, step, start.trains, params, optimizer, state,
                               start.tokenizer.carried() if start.tokenizer else None)
    except (OSError, SafetensorError) as e:
        raise write_failed(f"the step {step} checkpoint in {os.path.join(settings.out_dir, 'checkpoints')}",
                           e, settings.out_dir) from None
    if best is not None and best["step"] == step:
        mark_best(settings.out_dir, path)
    if settings.keep_last:
        prune_checkpoints(settings.out_dir, settings.keep_last)
    return path


def run_settings(settings):
    return {k: v for k, v in vars(settings).items() if k not in ("resume", "config")}


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
