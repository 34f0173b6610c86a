"""coregpt against PyTorch eager on the same GPT-2, batch and machine, in one run.

    pip install torch==2.13.0        # benchmark-only; never a runtime dependency
    python bench/vs_pytorch.py [--model gpt2] [--batch-size 4] [--seq-len 64] [--steps 8]

Times full training steps (forward + backward + clip + AdamW) and reports
medians after --warmup steps: PyTorch with 1 and 2 threads, coregpt with 1 and
2 workers of 1 thread, the ratios, and coregpt's peak memory (PSS of the
coordinator and its workers, so shared memory counts once).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from trainer.params import GPT2_VOCAB, PRESETS  # noqa: E402


def torch_step_times(model_name, B, T, steps, threads, tokens):
    """nanoGPT-style eager PyTorch model, trained the way coregpt trains."""
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
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    model = GPT()
    decay = [q for q in model.parameters() if q.dim() == 2]
    rest = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
    times = []
    for s in range(steps):
        window = torch.from_numpy(tokens[s * B * T:(s + 1) * B * T + 1].astype(np.int64))
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(window[:-1].view(B, T), window[1:].view(B, T))
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


def coregpt_step_times(model_name, B, T, steps, workers, data, extra, watch_memory=False):
    """-> (step times, peak GB or None).  Reading smaps costs kernel time on the
    cores being timed, so memory is watched only in a run that is not timed."""
    with tempfile.TemporaryDirectory(prefix="coregpt-bench-") as tmp:
        out = os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "launch", "train", "--model", model_name, "--data", data,
               "--batch-size", str(B), "--seq-len", str(T), "--steps", str(steps), "--lr-schedule",
               "constant", "--workers", str(workers), "--threads-per-worker", "1", "--eval-every", "0",
               "--no-checkpoint", "--out-dir", out, *extra]
        proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak = [0]

        def watch():
            while proc.poll() is None:
                peak[0] = max(peak[0], sum(pss_kb(p) for p in process_tree(proc.pid)))
                time.sleep(0.5)
        watcher = threading.Thread(target=watch, daemon=True)
        if watch_memory:
            watcher.start()
        _, err = proc.communicate()
        if watch_memory:
            watcher.join()
        if proc.returncode != 0:
            raise SystemExit(f"coregpt run failed:\n{err[-2000:]}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        return [r["step_ms"] / 1000 for r in rows if "step_ms" in r], peak[0] / 1e6 if watch_memory else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2", choices=list(PRESETS))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="timed steps after warm-up")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-torch-1", action="store_true", help="skip PyTorch with 1 thread")
    ap.add_argument("extra", nargs="*", help="extra `launch train` flags for coregpt (after --)")
    ap.add_argument("--torch-only", type=int, metavar="THREADS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    B, T, n = args.batch_size, args.seq_len, args.steps + args.warmup
    tokens = np.random.default_rng(0).integers(0, GPT2_VOCAB, n * B * T + 1).astype(np.uint16)
    if args.torch_only:
        print(json.dumps(torch_step_times(args.model, B, T, n, args.torch_only, tokens)))
        return
    with tempfile.TemporaryDirectory(prefix="coregpt-bench-") as tmp:
        data = os.path.join(tmp, "tokens.bin")
        header = np.zeros(256, dtype=np.int32)
        header[:3] = (20240520, 1, tokens.size)
        with open(data, "wb") as f:
            f.write(header.tobytes() + tokens.tobytes())
        results = {}
        for threads in ([2] if args.skip_torch_1 else [1, 2]):
            # its own process: an idle PyTorch thread pool must not share the cores with coregpt
            done = subprocess.run([sys.executable, __file__, "--torch-only", str(threads), "--model",
                                   args.model, "--batch-size", str(B), "--seq-len", str(T),
                                   "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                  capture_output=True, text=True, check=True)
            results[f"pytorch {threads} thread(s)"] = (json.loads(done.stdout), None)
        for workers in (2, 1):
            results[f"coregpt {workers} worker(s) x 1 thread"] = coregpt_step_times(
                args.model, B, T, n, workers, data, args.extra)
        _, peak = coregpt_step_times(args.model, B, T, 3, 2, data, args.extra, watch_memory=True)
    print(f"{args.model}, B={B}, T={T}: median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'':34} {'s/step':>8} {'tokens/s':>9}  raw s/step")
    medians = {}
    for name, (times, _) in results.items():
        timed = times[args.warmup:]
        medians[name] = statistics.median(timed)
        print(f"{name:34} {medians[name]:8.3f} {B * T / medians[name]:9.1f}  "
              f"{' '.join(f'{t:.3f}' for t in timed)}")
    w2, w1 = medians["coregpt 2 worker(s) x 1 thread"], medians["coregpt 1 worker(s) x 1 thread"]
    print(f"peak memory of coregpt 2x1 (coordinator + workers, PSS, shared memory once): {peak:.2f} GB")
    print(f"speed-up of coregpt 2x1 over PyTorch 2 threads: {medians['pytorch 2 thread(s)'] / w2:.2f}x")
    print(f"scaling coregpt 1 -> 2 workers: {w1 / w2:.2f}x")


if __name__ == "__main__":
    main()
