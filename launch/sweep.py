"""`python -m launch sweep [axes] [train flags]`: a throughput study.

Every combination of the axes (comma-separated lists) trains a few steps in its
own process, with --profile: --workers, --threads, --parallel, --batch-size,
--precision.  Each point reports the median step time and tokens/s after the
warm-up steps, speed-up and efficiency against the 1-core point of its series
(same strategy, precision and batch), and the profile split (compute, reduce,
barrier and other waiting, update).  Written to --out-dir: sweep.csv, sweep.json
(points and a fingerprint of the machine), sweep.png (tokens/s against cores used
with the ideal line, one curve per series, and the efficiency), and
sweep-best.toml, the fastest point as a config `launch train --config` takes.
Ctrl-C keeps the points measured so far."""
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

from trainer.errors import ConfigError
from workers.strategies import STRATEGIES
from trainer.profile import clock

AXES = {"workers": ("--workers", int), "threads": ("--threads-per-worker", int),
        "parallel": ("--parallel", str), "batch_size": ("--batch-size", int), "precision": ("--precision", str)}
PHASES = {"compute_ms": ("forward", "backward", "convert"), "reduce_ms": ("reduce",),
          "waiting_ms": ("waiting",), "update_ms": ("update",)}
COLUMNS = ("parallel", "precision", "batch_size", "workers", "threads", "cores_used", "status", "median_step_ms",
           "tokens_per_s", "speedup", "efficiency", *PHASES, "matmuls")


def value_list(text, flag, kind):
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated {'integers' if kind is int else 'names'}, got {text!r}") from None
    if not values or (kind is int and min(values) < 1):
        raise ConfigError(f"{flag} needs positive integers, got {text!r}" if kind is int else
                          f"{flag} needs at least one value")
    return values


def run_point(point, steps, warmup, train_flags, oversubscribe):
    """Train one point -> (fields, status)."""
    with tempfile.TemporaryDirectory(prefix="coregpt-sweep-") as tmp:
        out = os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "launch", "train", *train_flags, "--steps", str(steps), "--eval-every", "0",
               "--sample-every", "0", "--no-checkpoint", "--profile", "--out-dir", out]
        for axis, (flag, _) in AXES.items():
            cmd += [flag, str(point[axis])]
        if oversubscribe:
            cmd.append("--oversubscribe")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 130:
            raise KeyboardInterrupt
        if done.returncode == 2:  # bad flags: the same for every point
            raise ConfigError(done.stderr.strip().splitlines()[-1].removeprefix("coregpt: error: "))
        if done.returncode != 0:
            return {}, (done.stderr.strip().splitlines() or ["failed"])[-1]
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if '"step_ms"' in line][warmup:]
        with open(os.path.join(out, "run.json")) as f:
            settings = json.load(f)
    step_ms = statistics.median(r["step_ms"] for r in rows)
    tokens = settings["batch_size"] * settings["seq_len"] * settings["grad_accum"]
    fields = {"median_step_ms": round(step_ms, 1), "tokens_per_s": round(1000 * tokens / step_ms, 1),
              "matmuls": next((line.split("matmuls: ", 1)[1].split(";")[0] for line in done.stderr.splitlines()
                               if "matmuls: " in line), "")}
    for name, phases in PHASES.items():
        fields[name] = round(statistics.median(sum(r["profile_ms"][p] for p in phases) for r in rows), 1)
    return fields, "ok"


def sweep_parser():
    import argparse
    from launch.config import Parser
    p = Parser(prog="launch sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2,4", help="worker counts, e.g. 1,2,4")
    p.add_argument("--threads", default="1,2", help="BLAS threads per worker, e.g. 1,2")
    p.add_argument("--parallel", default="hybrid", help="strategies, e.g. hybrid,data")
    p.add_argument("--batch-size", help="global batch sizes, e.g. 4,16,64 (default: the config's)")
    p.add_argument("--precision", default="fp32", help="precisions, e.g. fp32,bf16")
    p.add_argument("--steps", type=int, default=6, help="steps per point")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--oversubscribe", action="store_true", help="also run workers × threads > cores")
    p.add_argument("--out-dir", help="where the results go (default runs/sweep-<UTC>)")
    return p


def parse(argv):
    """-> (sweep's arguments, the train flags passed through, {axis: values})."""
    args, train_flags = sweep_parser().parse_known_args(argv)
    axes = {"workers": value_list(args.workers, "--workers", int),
            "threads": value_list(args.threads, "--threads", int),
            "parallel": value_list(args.parallel, "--parallel", str),
            "batch_size": value_list(args.batch_size, "--batch-size", int) if args.batch_size else [None],
            "precision": value_list(args.precision, "--precision", str)}
    if args.steps <= args.warmup_steps or args.warmup_steps < 0:
        raise ConfigError("--steps must be larger than --warmup-steps (and that not negative)")
    return args, train_flags, axes


def sweep(argv):
    from workers.placement import fingerprint, read_topology
    args, train_flags, axes = parse(argv)
    base = base_settings(train_flags)
    axes["batch_size"] = [b or base["batch_size"] for b in axes["batch_size"]]
    out_dir = args.out_dir or os.path.join("runs", "sweep-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out-dir {out_dir} is a file")
    cores = read_topology().available()
    points = [dict(parallel=par, precision=prec, batch_size=b, workers=w, threads=t)
              for par in axes["parallel"] for prec in axes["precision"] for b in axes["batch_size"]
              for w in axes["workers"] for t in axes["threads"]]
    rows, start, interrupted = [], time.monotonic(), False
    def splits(pt):  # --parallel data gives each worker whole rows; hybrid splits any batch
        strategy = STRATEGIES.get(pt["parallel"])  # an unknown one fails in its run, with train's message
        return strategy is None or pt["batch_size"] % strategy.batch_unit(pt["workers"]) == 0
    runs = [pt for pt in points if (pt["workers"] * pt["threads"] <= cores or args.oversubscribe) and splits(pt)]
    try:
        for point in points:
            row = dict(point, cores_used=point["workers"] * point["threads"])
            if not splits(point):
                row["status"] = f"skipped: batch {point['batch_size']} not divisible by {point['workers']} workers"
            elif row["cores_used"] > cores and not args.oversubscribe:
                row["status"] = f"skipped: oversubscribed ({point['workers']}x{point['threads']} > {cores} cores)"
            else:
                fields, status = run_point(point, args.steps, args.warmup_steps, train_flags, args.oversubscribe)
                row.update(fields, status=status if row["cores_used"] <= cores or status != "ok" else "oversubscribed")
            rows.append(row)
            progress(row, rows, runs, start)
    except KeyboardInterrupt:
        interrupted = True
        print("coregpt: interrupted: keeping the points measured so far", file=sys.stderr)
    add_scaling(rows)
    os.makedirs(out_dir, exist_ok=True)
    write_results(out_dir, rows, fingerprint(), base)
    print("\n" + table(rows))
    best = max((r for r in rows if "tokens_per_s" in r), key=lambda r: r["tokens_per_s"], default=None)
    if best:
        print(f"\nbest: {describe(best)}: {best['tokens_per_s']} tokens/s")
    print("\n" + "\n".join(os.path.join(out_dir, f) for f in ("sweep.csv", "sweep.json", "sweep.png",
                                                                "sweep-best.toml") if os.path.exists(
        os.path.join(out_dir, f))))
    return 130 if interrupted else 0


def base_settings(train_flags):
    """The training settings the sweep's flags (and --config) give, checked now."""
    from launch.config import merge, train_parser
    flags = vars(train_parser().parse_args(train_flags))
    return vars(merge(flags.pop("config", None), flags))


def describe(r):
    return (f"{r['workers']} worker(s) x {r['threads']} thread(s), {r['parallel']}, {r['precision']}, "
            f"batch {r['batch_size']}")


def progress(row, rows, runs, start):
    done = sum(1 for r in rows if "median_step_ms" in r or not r["status"].startswith("skipped"))
    elapsed = time.monotonic() - start
    eta = elapsed / done * (len(runs) - done) if done else 0
    print(f"[{done}/{len(runs)}] {describe(row)}: {row.get('tokens_per_s', '-')} tokens/s ({row['status']}) "
          f"| elapsed {clock(elapsed)} | ETA {clock(eta)}", file=sys.stderr, flush=True)


def series(r):
    return (r["parallel"], r["precision"], r["batch_size"])


def add_scaling(rows):
    """Speed-up and efficiency against the 1-core point of each series."""
    base = {series(r): r["tokens_per_s"] for r in rows if r["cores_used"] == 1 and "tokens_per_s" in r}
    for r in rows:
        if series(r) in base and "tokens_per_s" in r:
            r["speedup"] = round(r["tokens_per_s"] / base[series(r)], 3)
            r["efficiency"] = round(r["speedup"] / r["cores_used"], 3)


def write_results(out_dir, rows, machine, base):
    with open(os.path.join(out_dir, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in COLUMNS} for r in rows)
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump({"machine": machine, "points": rows}, f, indent=2)
    best = max((r for r in rows if "tokens_per_s" in r), key=lambda r: r["tokens_per_s"], default=None)
    if best:
        write_best(os.path.join(out_dir, "sweep-best.toml"), base, best)
    if any("tokens_per_s" in r for r in rows):
        plot(rows, os.path.join(out_dir, "sweep.png"))


def write_best(path, base, best):
    """The fastest point over the sweep's own training settings, as TOML."""
    settings = {k: v for k, v in base.items() if v is not None and k not in ("out_dir", "resume")}
    settings.update(workers=best["workers"], threads_per_worker=best["threads"], parallel=best["parallel"],
                    precision=best["precision"], batch_size=best["batch_size"])
    lines = [f"# fastest point of a coregpt sweep: {describe(best)}, {best['tokens_per_s']} tokens/s",
             "# python -m launch train --config sweep-best.toml"]
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def table(rows):
    head = (f"{'parallel':>8} {'prec':>4} {'batch':>5} {'workers':>7} {'threads':>7} {'ms/step':>9} {'tokens/s':>9} "
            f"{'speedup':>7} {'effic.':>6} {'compute':>7} {'reduce':>6} {'wait':>5} {'update':>6}  status")
    lines = [head]
    for r in rows:
        lines.append(f"{r['parallel']:>8} {r['precision']:>4} {r['batch_size']:>5} {r['workers']:>7} {r['threads']:>7} "
                     f"{r.get('median_step_ms', '-'):>9} {r.get('tokens_per_s', '-'):>9} {r.get('speedup', '-'):>7} "
                     f"{r.get('efficiency', '-'):>6} {r.get('compute_ms', '-'):>7} {r.get('reduce_ms', '-'):>6} "
                     f"{r.get('waiting_ms', '-'):>5} {r.get('update_ms', '-'):>6}  {r['status']}")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from trainer.files import atomic_write
    fig, (ax, eff) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    for key in sorted({series(r) for r in rows if "tokens_per_s" in r}, key=str):
        points = sorted(((r["cores_used"], r) for r in rows if series(r) == key and "tokens_per_s" in r),
                        key=lambda x: (x[0], -x[1]["tokens_per_s"]))
        best = {}
        for cores, r in points:  # per core count, the best workers x threads split
            best.setdefault(cores, r)
        cores = sorted(best)
        label = f"{key[0]}, {key[1]}, batch {key[2]}"
        line, = ax.plot(cores, [best[c]["tokens_per_s"] for c in cores], "o-", label=label)
        if 1 in best:
            ax.plot(cores, [best[1]["tokens_per_s"] * c for c in cores], ":", color=line.get_color())
            eff.plot(cores, [best[c]["tokens_per_s"] / best[1]["tokens_per_s"] / c for c in cores], "o-",
                     color=line.get_color(), label=label)
    ticks = sorted({r["cores_used"] for r in rows if "tokens_per_s" in r})
    ax.set_xticks(ticks)
    eff.set_xticks(ticks)
    ax.set_xlabel("cores used (workers x threads; best split per count)")
    ax.set_ylabel("tokens/s (median)")
    ax.set_title("throughput (dotted: ideal from 1 core)")
    ax.legend(fontsize=8)
    eff.set_xlabel("cores used")
    eff.set_ylabel("scaling efficiency (speed-up / cores)")
    eff.set_ylim(0, 1.1)
    eff.set_title("efficiency")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
