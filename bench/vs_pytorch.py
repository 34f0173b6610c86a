"""coregpt against PyTorch's fastest CPU recipes on the same GPT-2, batch, data and
machine, interleaved in rounds (the machine is shared and noisy).

    pip install torch==2.13.0        # benchmark-only; never a runtime dependency
    python bench/vs_pytorch.py [--rounds 3] [--steps 6] [--warmup 2] [--compile]
                               [--batch-size 2 --seq-len 1024] [--recompute] [--two-workers-only]
                               [--bf16-only | --fp32-only]

Each round runs every system once, in turn, in its own process: PyTorch 2 threads
with fp32 + AdamW(fused=True); bf16 autocast + fused AdamW; with --compile also
torch.compile of both; coregpt fp32 and bf16 with 2 workers x 1 thread and
(unless --two-workers-only) 1 worker x 1 thread, and with --recompute also
coregpt bf16 2 x 1 with --recompute.  --fp32-only leaves out every bf16 system,
for CPUs without bf16 units (AVX2), where PyTorch's bf16 autocast takes minutes
a step at GPT-2 124M.  Each ratio is against the fastest PyTorch recipe of the
same precision in the run.  A step is forward + backward + clip + AdamW; the first
--warmup steps of every process (compilation included) are left out.  Prints
every raw step time, each system's median over all rounds, the ratios, and the
peak memory (PSS, shared memory once) of every PyTorch recipe and of coregpt's
2-worker systems, each in a separate untimed run.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from trainer.data import write_tokens  # noqa: E402
from trainer.models.gpt2 import VOCAB as GPT2_VOCAB, PRESETS  # noqa: E402

TORCH_RECIPES = {
    "pytorch fp32, fused AdamW": dict(bf16=False, compile=False),
    "pytorch bf16 autocast, fused AdamW": dict(bf16=True, compile=False),
    "pytorch bf16 autocast, fused AdamW, compile": dict(bf16=True, compile=True),
    "pytorch fp32, fused AdamW, compile": dict(bf16=False, compile=True),
}
COREGPT = {
    "coregpt fp32, 2 workers x 1 thread": (2, ["--precision", "fp32"]),
    "coregpt bf16, 2 workers x 1 thread": (2, ["--precision", "bf16"]),
    "coregpt fp32, 1 worker x 1 thread": (1, ["--precision", "fp32"]),
    "coregpt bf16, 1 worker x 1 thread": (1, ["--precision", "bf16"]),
}
RECOMPUTE = "coregpt bf16, 2 workers x 1 thread, --recompute"


def torch_step_times(model_name, B, T, steps, threads, tokens, bf16, compile):
    """nanoGPT-style PyTorch model, trained the way coregpt trains, with PyTorch's
    fast CPU options: fused AdamW, optionally bf16 autocast and torch.compile."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    p = PRESETS[model_name]
    C, NH, L = p["n_embd"], p["n_head"], p["n_layer"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(GPT2_VOCAB, C), nn.Embedding(p["block_size"], C)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(T))
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))

    model = GPT()
    decay = [q for q in model.parameters() if q.dim() == 2]
    rest = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    forward = torch.compile(model) if compile else model
    times = []
    for s in range(steps):
        window = torch.from_numpy(tokens[s * B * T:(s + 1) * B * T + 1].astype(np.int64))
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(window[:-1].view(B, T), window[1:].view(B, T))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


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


def run_watched(cmd, cwd, env, watch_memory):
    """Run cmd -> (return code, stdout, stderr, peak GB of its process tree's PSS or
    None).  Reading smaps costs kernel time on the cores being timed, so memory is
    watched only in runs that are not timed (see tree_pss_kb for dropped samples)."""
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


class CoregptRun(NamedTuple):
    times: list  # seconds of each step
    peak: float | None  # GB, when watched
    log: str  # its stderr (the header, with the memory plan)


def coregpt_step_times(model_name, B, T, steps, workers, data, extra, watch_memory=False, repo=REPO, out=None):
    """`launch train` on `data` -> CoregptRun.  out: the run directory to keep, with
    its checkpoint (default: a temporary one, no checkpoint)."""
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


def torch_run(name, args, steps, warmup, watch_memory=False):
    """One PyTorch recipe in its own process (an idle torch pool must not share the
    cores) -> (step times, peak GB or None)."""
    code, out, err, peak = run_watched(
        [sys.executable, __file__, "--torch-only", name, "--model", args.model, "--batch-size",
         str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(steps), "--warmup", str(warmup)],
        None, None, watch_memory)
    if code:
        raise SystemExit(f"{name} failed:\n{err[-2000:]}")
    return json.loads(out), peak


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


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2", choices=list(PRESETS))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per process, after warm-up")
    ap.add_argument("--warmup", type=int, default=4, help="steps left out (torch.compile needs 3)")
    ap.add_argument("--rounds", type=int, default=3, help="every system runs once per round")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the bf16 recipe")
    ap.add_argument("--recompute", action="store_true", help="also coregpt bf16 2x1 with --recompute")
    ap.add_argument("--two-workers-only", action="store_true", help="leave out coregpt's 1-worker systems")
    ap.add_argument("--bf16-only", action="store_true", help="leave out the fp32 systems (slow at T=1024)")
    ap.add_argument("--fp32-only", action="store_true",
                    help="leave out the bf16 systems (CPUs without bf16 units, where PyTorch's autocast "
                         "takes minutes a step)")
    ap.add_argument("extra", nargs="*", help="extra `launch train` flags for coregpt (after --)")
    ap.add_argument("--torch-only", metavar="RECIPE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bf16_only and args.fp32_only:
        ap.error("--bf16-only and --fp32-only leave nothing to run")
    if args.fp32_only and args.recompute:
        ap.error("--recompute adds a bf16 system, which --fp32-only leaves out")
    B, T, n = args.batch_size, args.seq_len, args.steps + args.warmup
    tokens = np.random.default_rng(0).integers(0, GPT2_VOCAB, n * B * T + 1).astype(np.uint16)
    if args.torch_only:
        print(json.dumps(torch_step_times(args.model, B, T, n, 2, tokens, **TORCH_RECIPES[args.torch_only])))
        return
    precisions = {"fp32"} if args.fp32_only else {"bf16"} if args.bf16_only else {"bf16", "fp32"}
    recipes = [r for r in TORCH_RECIPES if (args.compile or not TORCH_RECIPES[r]["compile"])
               and ("bf16" if TORCH_RECIPES[r]["bf16"] else "fp32") in precisions]
    systems = {name: (workers, flags) for name, (workers, flags) in COREGPT.items()
               if (workers == 2 or not args.two_workers_only) and flags[1] in precisions}
    if args.recompute:
        systems[RECOMPUTE] = (2, ["--precision", "bf16", "--recompute"])
    with tempfile.TemporaryDirectory(prefix="coregpt-bench-") as tmp:
        data = os.path.join(tmp, "tokens.bin")
        write_tokens(data, tokens)
        def run(name):
            if name in TORCH_RECIPES:
                return torch_run(name, args, args.steps, args.warmup)[0]
            workers, flags = systems[name]
            return coregpt_step_times(args.model, B, T, n, workers, data, flags + args.extra).times
        raw = interleaved(recipes + list(systems), run, args.rounds, args.warmup)
        # peak memory, in runs apart: 3 steps (torch.compile's warm-up included)
        peaks = {name: torch_run(name, args, 1, 3 if TORCH_RECIPES[name]["compile"] else 2, watch_memory=True)[1]
                 for name in recipes}
        peaks.update({name: coregpt_step_times(args.model, B, T, 3, 2, data, flags + args.extra,
                                               watch_memory=True).peak
                      for name, (workers, flags) in systems.items() if workers == 2})
    print(f"{args.model}, B={B}, T={T} on {cpu_model()}, {os.cpu_count()} CPUs; PyTorch with 2 threads")
    print(f"median of {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps each")
    med = medians(raw, B * T)
    if "bf16" in precisions:
        best_bf16 = min((n for n in recipes if TORCH_RECIPES[n]["bf16"]), key=med.get)
        c16 = med["coregpt bf16, 2 workers x 1 thread"]
        print(f"coregpt bf16 2x1 over the fastest PyTorch bf16 recipe ({best_bf16}): {med[best_bf16] / c16:.2f}x")
    if "fp32" in precisions:
        best_fp32 = min((n for n in recipes if not TORCH_RECIPES[n]["bf16"]), key=med.get)
        c32 = med["coregpt fp32, 2 workers x 1 thread"]
        print(f"coregpt fp32 2x1 over the fastest PyTorch fp32 recipe ({best_fp32}): {med[best_fp32] / c32:.2f}x")
    if not args.two_workers_only:
        scaling = {p: med[f"coregpt {p}, 1 worker x 1 thread"] / med[f"coregpt {p}, 2 workers x 1 thread"]
                   for p in ("bf16", "fp32") if f"coregpt {p}, 1 worker x 1 thread" in systems}
        print("scaling 1 -> 2 workers: " + ", ".join(f"{p} {x:.2f}x" for p, x in scaling.items()))
    if args.recompute:
        print(f"coregpt bf16 2x1 --recompute over the fastest PyTorch bf16 recipe: "
              f"{med[best_bf16] / med[RECOMPUTE]:.2f}x; its step over coregpt's without it: "
              f"{med[RECOMPUTE] / c16:.2f}x")
    print("peak memory (PSS of the process and its children, shared memory once):")
    for name, peak in peaks.items():
        print(f"  {name:50} {peak:6.2f} GB")
    precision, eager = ("fp32", "pytorch fp32, fused AdamW") if args.fp32_only else \
        ("bf16", "pytorch bf16 autocast, fused AdamW")
    print(f"peak over {eager} (eager)'s: " + ", ".join(
        f"{name} {peaks[name] / peaks[eager]:.2f}x" for name in systems if name in peaks and precision in name))


if __name__ == "__main__":
    main()
