"""What every speed and memory bench shares: a random token corpus, a coregpt run
and its step times, PyTorch recipes each in its own process, the memory sampler,
interleaved rounds and medians, and the JSON result (machine fingerprint, commit,
command, raw numbers) that docs/benchmarks/ is generated from (bench/report.py).

A bench script imports it as `import harness` (bench/ is on its path); it puts the
repository on sys.path."""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from typing import NamedTuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from trainer.data import write_tokens  # noqa: E402
from trainer.models.gpt2 import VOCAB as GPT2_VOCAB  # noqa: E402
from workers.placement import fingerprint  # noqa: E402


def random_tokens(n, seed=0, vocab=GPT2_VOCAB):
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16 if vocab <= 1 << 16 else np.uint32)


def corpus(directory, n, seed=0, vocab=GPT2_VOCAB):
    """An llm.c token file of n random token ids below `vocab` (GPT-2's by default)
    in `directory` -> its path."""
    path = os.path.join(directory, "tokens.bin")
    write_tokens(path, random_tokens(n, seed, vocab), vocab)
    return path


# --- the memory sampler ---------------------------------------------------------

def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def process_tree(pid):
    pids, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        pids.update(kids)
        frontier += kids
    return pids


def tree_pss_kb(root):
    """PSS in kB of a process and all its descendants (shared memory counted once),
    or None if the tree changed while it was read (a process starting or exiting
    shifts PSS between the others)."""
    tree = process_tree(root)
    total = sum(pss_kb(p) for p in tree)
    return total if process_tree(root) == tree else None


def run_watched(cmd, cwd=None, env=None, watch_memory=False):
    """Run cmd -> (return code, stdout, stderr, peak GB of its process tree's PSS or
    None).  Reading smaps costs kernel time on the cores being timed, so memory is
    watched only in runs that are not timed."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss_kb(proc.pid) or 0)
            time.sleep(0.1)
    watcher = threading.Thread(target=watch, daemon=True)
    if watch_memory:
        watcher.start()
    out, err = proc.communicate()
    if watch_memory:
        watcher.join()
    return proc.returncode, out, err, peak[0] / 1e6 if watch_memory else None


# --- running the systems --------------------------------------------------------

class CoregptRun(NamedTuple):
    times: list  # seconds of each step
    peak: float | None  # GB, when watched
    log: str  # its stderr (the header, with the memory plan)


def coregpt_step_times(model_name, B, T, steps, workers, data, extra, watch_memory=False, repo=REPO, out=None):
    """`launch train` on `data`, 1 thread per worker -> CoregptRun.  out: the run
    directory to keep, with its checkpoint (default: a temporary one, no checkpoint)."""
    with tempfile.TemporaryDirectory(prefix="coregpt-bench-") as tmp:
        run_dir = out or os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "launch", "train", "--model", model_name, "--data", data,
               "--batch-size", str(B), "--seq-len", str(T), "--steps", str(steps), "--lr-schedule",
               "constant", "--workers", str(workers), "--threads-per-worker", "1", "--eval-every", "0",
               *([] if out else ["--no-checkpoint"]), "--out-dir", run_dir, *extra]
        return coregpt_run(cmd, run_dir, watch_memory, repo)


def coregpt_run(cmd, run_dir, watch_memory=False, repo=REPO):
    """A `launch train` command writing run_dir -> CoregptRun of the steps it added."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    before = os.path.getsize(metrics) if os.path.exists(metrics) else 0
    code, _, err, peak = run_watched(cmd, repo, dict(os.environ, PYTHONPATH=repo), watch_memory)
    if code != 0:
        raise SystemExit(f"coregpt run failed:\n{err[-2000:]}")
    with open(metrics) as f:
        f.seek(before)
        rows = [json.loads(line) for line in f]
    return CoregptRun([r["step_ms"] / 1000 for r in rows if "step_ms" in r], peak, err)


def child_run(script, args, watch_memory=False):
    """`python script ARGS` printing its step times as JSON (a PyTorch recipe, in its
    own process: an idle torch pool must not share the cores) -> (times, peak GB or None)."""
    code, out, err, peak = run_watched([sys.executable, script, *map(str, args)], watch_memory=watch_memory)
    if code:
        raise SystemExit(f"{os.path.basename(script)} {' '.join(map(str, args))} failed:\n{err[-2000:]}")
    return json.loads(out), peak


def torch_steps(loss_of, trained, opt, tokens, B, T, steps, bf16):
    """PyTorch training steps (forward, backward, clip_grad_norm_ to 1, the optimizer)
    on consecutive windows of `tokens`, under bf16 autocast if asked -> [seconds per
    step].  loss_of(idx, targets) -> the mean cross-entropy, (B, T) int64 tensors."""
    import torch
    times = []
    for s in range(steps):
        window = torch.from_numpy(tokens[s * B * T:(s + 1) * B * T + 1].astype(np.int64))
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(window[:-1].view(B, T), window[1:].view(B, T))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def hf_loss(forward):
    """loss_of for a transformers causal LM (or its compiled forward)."""
    import torch.nn.functional as F
    def loss_of(idx, targets):
        logits = forward(input_ids=idx).logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
    return loss_of


def interleaved(names, run, rounds, warmup):
    """Every system once a round, who goes first rotating; run(name) -> its step times.
    -> {name: [step times after warm-up, by round]} (each printed as it comes)."""
    raw = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            raw[name].append(run(name)[warmup:])
            print(f"round {r + 1}: {name}: " + " ".join(f"{t:.3f}" for t in raw[name][-1]), file=sys.stderr,
                  flush=True)
    return raw


def medians(raw, tokens, width=50):
    """Print each system's median, tokens/s, round medians and raw times -> {name: median}."""
    print(f"{'':{width}} {'s/step':>7} {'tokens/s':>9}  round medians | raw s/step")
    med = {}
    for name, rounds in raw.items():
        med[name] = statistics.median(t for times in rounds for t in times)
        print(f"{name:{width}} {med[name]:7.3f} {tokens / med[name]:9.1f}  "
              + " ".join(f"{statistics.median(times):.3f}" for times in rounds) + " | "
              + " / ".join(" ".join(f"{t:.3f}" for t in times) for times in rounds))
    return med


# --- results --------------------------------------------------------------------

def commit():
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_flags():
    """The CPU features a step's speed turns on (AVX-512, bf16 units, AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]


def save(bench, settings, systems=None, summary=None, rows=None, out=None):
    """Write a bench's result as JSON -> its path.  settings: what was measured (shape,
    options); systems: {name: {"raw": [[s/step] by round], "median_s", "peak_gb"}} for
    a timed comparison; summary: {line: ratio} it printed; rows: [{column: value}] for
    a table of another kind.  bench/report.py renders every one of them."""
    machine = dict(fingerprint(), cpu_flags=cpu_flags())
    machine.pop("argv", None)
    now = datetime.now(timezone.utc)
    result = {"bench": bench, "date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H:%M:%S UTC"),
              "commit": commit(), "command": "python " + " ".join(
                  [os.path.relpath(os.path.abspath(sys.argv[0]), REPO)] + sys.argv[1:]),
              "machine": machine, "settings": settings, "systems": systems or {}, "summary": summary or {},
              "rows": rows or []}
    path = out or os.path.join(RESULTS, f"{result['date']}-{bench}-{slug(settings)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"result: {os.path.relpath(path)}")
    return path


def timed(raw, medians, tokens, peaks=None):
    """-> save()'s systems: each system's raw step times by round, median, tokens/s, peak."""
    return {name: {"raw": raw[name], "median_s": medians[name], "tokens_per_s": tokens / medians[name],
                   "peak_gb": (peaks or {}).get(name)} for name in raw}


def slug(settings):
    """The model and shape in a result's file name: gpt2-b4-s64 (a bench's one model), b4-s64."""
    parts = [str(settings["model"])] if isinstance(settings.get("model"), str) else []
    parts += [f"{k[0]}{settings[k]}" for k in ("batch_size", "seq_len") if k in settings]
    return "-".join(parts) or "run"
