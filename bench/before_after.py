"""coregpt against another checkout of itself (the commit before a change), on the
same data and machine, interleaved in rounds (the machine is shared and noisy).

    git worktree add /tmp/before <commit>
    python bench/before_after.py --before /tmp/before [--batch-size 2 --seq-len 1024]
    python bench/before_after.py --before . --before-flags="--gemm numpy" --after-flags="--gemm onednn"

Each round runs, per precision, this checkout and the other one in turn (the
order alternates between rounds), each in its own process: GPT-2 124M (--model),
2 workers x 1 thread.  Prints every raw step time after the warm-up steps, each
side's median, after/before, and each side's peak memory (PSS of the coordinator
and its workers, shared memory once) from a separate untimed run.  --before-flags
and --after-flags add `launch train` flags to one side: with --before . they
compare two settings of this checkout."""
import argparse
import os
import shlex
import sys
import tempfile

import harness  # puts the repository on sys.path
from harness import coregpt_step_times  # noqa: E402
from trainer.models.gpt2 import PRESETS  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, metavar="CHECKOUT", help="the other checkout")
    p.add_argument("--model", default="gpt2", choices=list(PRESETS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--precision", default="bf16,fp32", help="comma-separated")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process, after warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--before-flags", default="", help="extra `launch train` flags of the before side")
    p.add_argument("--after-flags", default="", help="extra `launch train` flags of the after side")
    p.add_argument("--json", help="where to write the result (default bench/results/)")
    args = p.parse_args()
    extra = {"after": shlex.split(args.after_flags), "before": shlex.split(args.before_flags)}
    B, T, n = args.batch_size, args.seq_len, args.steps + args.warmup
    sides = {"after": harness.REPO, "before": os.path.abspath(args.before)}
    precisions = args.precision.split(",")
    raw = {(side, prec): [] for side in sides for prec in precisions}
    with tempfile.TemporaryDirectory(prefix="coregpt-bench-") as tmp:
        data = harness.corpus(tmp, (n + 4) * B * T + 1)
        for r in range(args.rounds):
            for prec in precisions:
                for side in (["after", "before"] if r % 2 == 0 else ["before", "after"]):
                    times = coregpt_step_times(args.model, B, T, n, args.workers, data,
                                               ["--precision", prec] + extra[side], repo=sides[side]).times
                    raw[side, prec].append(times[args.warmup:])
                    print(f"round {r + 1}: {side} {prec}: " + " ".join(f"{t:.3f}" for t in times[args.warmup:]),
                          file=sys.stderr, flush=True)
        peaks = {(side, prec): coregpt_step_times(args.model, B, T, 3, args.workers, data,
                                                  ["--precision", prec] + extra[side], watch_memory=True,
                                                  repo=sides[side]).peak
                 for side in sides for prec in precisions}
    print(f"{args.model}, B={B}, T={T}, {args.workers} workers x 1 thread; median of {args.rounds} rounds x "
          f"{args.steps} steps after {args.warmup} warm-up")
    names = {(side, prec): " ".join([side, prec] + extra[side]) for side in sides for prec in precisions}
    med = harness.medians({names[key]: raw[key] for key in raw}, B * T)
    summary = {}
    for prec in precisions:
        after, before = names["after", prec], names["before", prec]
        step, peak = med[after] / med[before], peaks["after", prec] / peaks["before", prec]
        summary.update({f"{prec}: after's step over before's": step, f"{prec}: after's peak over before's": peak})
        print(f"{prec} after/before: {step:.3f} s/step, {peak:.3f} peak")
    harness.save("before_after", {"model": args.model, "batch_size": B, "seq_len": T, "workers": args.workers,
                                  "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                                  "before": args.before},
                 harness.timed({names[key]: raw[key] for key in raw}, med, B * T,
                               {names[key]: peak for key, peak in peaks.items()}), summary, out=args.json)


if __name__ == "__main__":
    main()
