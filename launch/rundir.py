"""The run directory's files, written by the coordinator (MPI rank 0): run.json,
metrics.jsonl, checkpoints and the loss plot.  A failed write (disk full, any I/O
error) is one RunError naming the path, with the last checkpoint intact."""
import json
import os

from launch.console import log
from trainer.checkpoint import prune_checkpoints, save_checkpoint
from trainer.errors import DataError, RunError
from trainer.files import atomic_write
from trainer.weights import latest_checkpoint


def prepare_out_dir(s):
    if os.path.exists(s.out_dir) and not os.path.isdir(s.out_dir):
        raise DataError(f"--out-dir {s.out_dir} is a file, not a directory")
    if not s.resume and os.path.isdir(s.out_dir) and (
            os.path.exists(os.path.join(s.out_dir, "metrics.jsonl"))
            or os.path.exists(os.path.join(s.out_dir, "checkpoints"))):
        raise DataError(f"--out-dir {s.out_dir} already holds a run; pass --resume to continue it "
                        f"or choose another --out-dir")
    os.makedirs(s.out_dir, exist_ok=True)


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
