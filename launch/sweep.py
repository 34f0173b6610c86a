"""`python -m launch sweep --workers 1,2,4 --threads 1,2 [train flags]`: a
throughput study.  Each combination trains a few steps in its own process;
the table (stdout), sweep.csv and sweep.png report median tokens/s after
warm-up and the scaling efficiency against 1 worker × 1 thread."""
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

from launch.config import ConfigError

COLUMNS = ("workers", "threads", "cores_used", "status", "median_step_ms", "tokens_per_s", "speedup",
           "efficiency")


def int_list(text, flag):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} needs positive integers, got {text!r}")
    return values


def run_one(workers, threads, steps, warmup, train_flags, oversubscribe):
    with tempfile.TemporaryDirectory(prefix="coregpt-sweep-") as tmp:
        out = os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "launch", "train", *train_flags, "--workers", str(workers),
               "--threads-per-worker", str(threads), "--steps", str(steps), "--eval-every", "0",
               "--sample-every", "0", "--no-checkpoint", "--out-dir", out]
        if oversubscribe:
            cmd.append("--oversubscribe")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 2:  # bad flags: the same for every combination
            raise ConfigError(done.stderr.strip().splitlines()[-1].removeprefix("coregpt: error: "))
        if done.returncode != 0:
            return None, (done.stderr.strip().splitlines() or ["failed"])[-1]
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        with open(os.path.join(out, "run.json")) as f:
            settings = json.load(f)
        times = [r["step_ms"] for r in rows if "step_ms" in r][warmup:]
        tokens = settings["batch_size"] * settings["seq_len"] * settings["grad_accum"]
        return (statistics.median(times), tokens), "ok"


def sweep(argv):
    import argparse
    from launch.cli import Parser
    p = Parser(prog="launch sweep", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2,4", help="worker counts, e.g. 1,2,4")
    p.add_argument("--threads", default="1,2", help="BLAS threads per worker, e.g. 1,2")
    p.add_argument("--steps", type=int, default=6, help="steps per combination")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--oversubscribe", action="store_true", help="also run workers × threads > cores")
    p.add_argument("--out-dir", help="where sweep.csv and sweep.png go (default runs/sweep-<UTC>)")
    args, train_flags = p.parse_known_args(argv)
    workers, threads = int_list(args.workers, "--workers"), int_list(args.threads, "--threads")
    if args.steps <= args.warmup_steps or args.warmup_steps < 0:
        raise ConfigError("--steps must be larger than --warmup-steps (and that not negative)")
    out_dir = args.out_dir or os.path.join(
        "runs", "sweep-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out-dir {out_dir} is a file")
    from workers.placement import read_topology
    cores = read_topology().available()
    rows = []
    for w in workers:
        for t in threads:
            row = dict(workers=w, threads=t, cores_used=w * t)
            if w * t > cores and not args.oversubscribe:
                row["status"] = f"skipped: oversubscribed ({w}x{t} > {cores} cores)"
            else:
                result, status = run_one(w, t, args.steps, args.warmup_steps, train_flags,
                                         args.oversubscribe)
                row["status"] = status if w * t <= cores else "oversubscribed"
                if result:
                    step_ms, tokens = result
                    row.update(median_step_ms=round(step_ms, 1), tokens_per_s=round(1000 * tokens / step_ms, 1))
            rows.append(row)
            print_row(row, first=len(rows) == 1)
    base = next((r["tokens_per_s"] for r in rows if r["cores_used"] == 1 and "tokens_per_s" in r), None)
    for r in rows:
        if base and "tokens_per_s" in r:
            r["speedup"] = round(r["tokens_per_s"] / base, 3)
            r["efficiency"] = round(r["speedup"] / r["cores_used"], 3)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in COLUMNS} for r in rows)
    print("\n" + table(rows))
    plot(rows, os.path.join(out_dir, "sweep.png"))
    print(f"\n{out_dir}/sweep.csv\n{out_dir}/sweep.png")
    return 0


def print_row(row, first):
    if first:
        print("running each combination...", file=sys.stderr)
    print(f"  {row['workers']} worker(s) x {row['threads']} thread(s): "
          f"{row.get('tokens_per_s', '-')} tokens/s ({row['status']})", file=sys.stderr, flush=True)


def table(rows):
    lines = [f"{'workers':>7} {'threads':>7} {'ms/step':>9} {'tokens/s':>9} {'speedup':>8} "
             f"{'efficiency':>10}  status"]
    for r in rows:
        lines.append(f"{r['workers']:>7} {r['threads']:>7} {r.get('median_step_ms', '-'):>9} "
                     f"{r.get('tokens_per_s', '-'):>9} {r.get('speedup', '-'):>8} "
                     f"{r.get('efficiency', '-'):>10}  {r['status']}")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in rows if "tokens_per_s" in r]
    labels = [f"{r['workers']}w x {r['threads']}t" for r in done]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(done) + 2), 4.5), dpi=100)
    bars = ax.bar(labels, [r["tokens_per_s"] for r in done], color="tab:blue")
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("tokens/s (median)")
    ax.set_xlabel("workers x BLAS threads per worker")
    if any("efficiency" in r for r in done):
        eff = ax.twinx()
        eff.plot(labels, [r.get("efficiency", float("nan")) for r in done], "o-", color="tab:orange")
        eff.set_ylabel("scaling efficiency (speedup / cores)", color="tab:orange")
        eff.set_ylim(0, 1.1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
