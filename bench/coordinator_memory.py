"""What saving and resuming a checkpoint adds to the coordinator's own memory: a
`launch train` run (default GPT-2 large, fp32 AdamW, B=1, T=64, 2 workers) writes
its checkpoint after --steps steps, then `--resume` trains one more; the
coordinator's private memory (USS: Private_Clean + Private_Dirty of its smaps
outside /dev/shm, so the shared arenas and the page cache do not count) is sampled
every 20 ms.

    python bench/coordinator_memory.py [--model gpt2-large] [--steps 2]

Prints, for each run, the coordinator's steady state (the largest USS while steps
run), its peak while the checkpoint is written (training run) or read (resumed run),
and the difference; with --check-exact also whether the resumed run's final
checkpoint (weights, Adam moments) and losses equal, to the byte, those of a run that
never stopped."""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import harness  # puts the repository on sys.path
from harness import REPO


def uss_kb(pid):
    """Private memory of the process outside its shared-memory mappings (pages of an
    arena only it has touched yet count as private in smaps, but they are the arena's)."""
    total, in_shm = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):  # a mapping's header line
                    in_shm = "/dev/shm/" in line
                elif not in_shm and first in ("Private_Clean:", "Private_Dirty:"):
                    total += int(line.split()[1])
    except OSError:
        return 0
    return total


def watched(cmd):
    """Run cmd -> [(seconds, USS kB)] samples and [(seconds, stderr line)]."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stderr=subprocess.PIPE, text=True)
    t0, samples, lines = time.monotonic(), [], []
    def read():
        for line in proc.stderr:
            lines.append((time.monotonic() - t0, line.rstrip()))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        samples.append((time.monotonic() - t0, uss_kb(proc.pid)))
        time.sleep(0.02)
    reader.join()
    if proc.returncode:
        raise SystemExit("\n".join(line for _, line in lines[-5:]))
    return samples, lines


def phases(samples, lines, marker):
    """-> (steady GB: max USS between the first and last step line, phase GB: max USS
    in the phase `marker` says: 'save' after the last step line, 'load' before the first)."""
    steps = [t for t, line in lines if line.startswith("step ")]
    first, last = steps[0], steps[-1]
    steady = max(u for t, u in samples if first <= t <= last)
    window = [u for t, u in samples if (t > last if marker == "save" else t < first)]
    return steady / 1e6, max(window) / 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-large")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--check-exact", action="store_true", help="also train the same steps without stopping")
    p.add_argument("--json", help="where to write the result (default bench/results/)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="coregpt-coord-") as tmp:
        out = os.path.join(tmp, "run")
        data = harness.corpus(tmp, 10 * 64 + 1)
        base = [sys.executable, "-m", "launch", "train", "--model", args.model, "--data", data, "--batch-size", "1",
                "--seq-len", "64", "--workers", "2", "--threads-per-worker", "1", "--eval-every", "0",
                "--out-dir", out]
        for what, cmd in (("save", base + ["--steps", str(args.steps)]),
                          ("load", [sys.executable, "-m", "launch", "train", "--resume", "--out-dir", out,
                                    "--steps", str(args.steps + 2)])):
            steady, peak = phases(*watched(cmd), what)
            print(f"{args.model}: coordinator USS steady {steady:.3f} GB, while the checkpoint is "
                  f"{'written' if what == 'save' else 'read'} {peak:.3f} GB: adds {peak - steady:+.3f} GB", flush=True)
            rows.append({"checkpoint": what, "steady_uss_gb": steady, "peak_uss_gb": peak, "adds_gb": peak - steady})
        if args.check_exact:
            whole = os.path.join(tmp, "whole")
            cmd = base[:-1] + [whole, "--steps", str(args.steps + 2), "--lr-schedule", "constant"]
            resumed = os.path.join(tmp, "run2")
            first = base[:-1] + [resumed, "--steps", str(args.steps), "--lr-schedule", "constant"]
            for c in (cmd, first, [sys.executable, "-m", "launch", "train", "--resume", "--out-dir", resumed,
                                   "--steps", str(args.steps + 2)]):
                watched(c)
            final = [os.path.join(run, "checkpoints", f"step_{args.steps + 2:06d}") for run in (whole, resumed)]
            same = all(digest(os.path.join(final[0], f)) == digest(os.path.join(final[1], f))
                       for f in ("model.safetensors", "optimizer.safetensors"))
            losses = [[r["loss"] for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "loss" in r]
                      for run in (whole, resumed)]
            print(f"{args.model}: resumed run's final weights and Adam moments byte-identical to an unstopped "
                  f"run's: {same}; losses identical: {losses[0] == losses[1]} ({losses[0]})")
            rows.append({"checkpoint": "resume against an unstopped run", "byte_identical": same,
                         "losses_identical": losses[0] == losses[1]})
    harness.save("coordinator_memory", {"model": args.model, "batch_size": 1, "seq_len": 64, "steps": args.steps},
                 rows=rows, out=args.json)


def digest(path):
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


if __name__ == "__main__":
    main()
