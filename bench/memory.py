"""A run's planned and measured memory: `launch train` for a few steps on random
tokens, 1 thread per worker, with the header's memory plan and the peak PSS of the
coordinator and its workers (shared memory once), sampled every 0.1 s.

    python bench/memory.py --model gpt2-medium --batch-size 4 --seq-len 1024 -- --precision bf16 --recompute

Prints the plan, the measured peak, planned / measured, and each step's time.  With
--resume the run also writes its checkpoint, and a second `launch train --resume`
trains one more step from it; its peak and step are printed too."""
import argparse
import os
import re
import sys
import tempfile

import harness  # puts the repository on sys.path
from harness import coregpt_run, coregpt_step_times  # noqa: E402
from trainer.models import preset_config, presets  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", choices=list(presets()))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="checkpoint, then resume for one more step")
    p.add_argument("--json", help="where to write the result (default bench/results/)")
    p.add_argument("extra", nargs="*", help="extra `launch train` flags (after --)")
    args = p.parse_args()
    B, T = args.batch_size, args.seq_len
    with tempfile.TemporaryDirectory(prefix="coregpt-memory-") as tmp:
        data = harness.corpus(tmp, (args.steps + 1) * B * T + 1, vocab=preset_config(args.model, {}).vocab_size)
        out = os.path.join(tmp, "run") if args.resume else None
        run = coregpt_step_times(args.model, B, T, args.steps, args.workers, data, args.extra, watch_memory=True,
                                 out=out)
        if args.resume:
            cmd = [sys.executable, "-m", "launch", "train", "--resume", "--out-dir", out, "--steps", str(args.steps + 1)]
            resumed = coregpt_run(cmd, out, watch_memory=True)
    shared, private = map(float, re.search(r"memory plan: shared ([\d.]+) GB .*private ~([\d.]+) GB",
                                           run.log).groups())
    print(f"{args.model} B={B} T={T} {' '.join(args.extra)}, {args.workers} workers x 1 thread")
    print(f"planned {shared + private:.2f} GB (shared {shared:.2f}, private {private:.2f}), measured peak "
          f"{run.peak:.2f} GB, planned / measured {(shared + private) / run.peak:.3f}")
    print("s/step: " + " ".join(f"{t:.2f}" for t in run.times))
    rows = [{"run": "train", "planned_gb": round(shared + private, 3), "measured_peak_gb": round(run.peak, 3),
             "s_per_step": " ".join(f"{t:.2f}" for t in run.times)}]
    if args.resume:
        print(f"checkpoint written; --resume: measured peak {resumed.peak:.2f} GB, step {args.steps + 1} "
              f"{resumed.times[0]:.2f} s")
        rows.append({"run": "--resume", "measured_peak_gb": round(resumed.peak, 3),
                     "s_per_step": f"{resumed.times[0]:.2f}"})
    harness.save("memory", {"model": args.model, "batch_size": B, "seq_len": T, "workers": args.workers,
                            "steps": args.steps, "coregpt_flags": args.extra}, rows=rows, out=args.json)


if __name__ == "__main__":
    main()
