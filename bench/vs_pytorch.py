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
2-worker systems, each in a separate untimed run, and writes it all as JSON
(bench/results/; `python bench/report.py` makes docs/benchmarks/ from it).
"""
import argparse
import os
import tempfile

import harness  # noqa: E402  (puts the repository on sys.path)
from harness import coregpt_step_times, interleaved, medians  # noqa: E402
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
    return harness.torch_steps(forward, list(model.parameters()), opt, tokens, B, T, steps, bf16)


def torch_run(name, args, steps, warmup, watch_memory=False):
    """One PyTorch recipe in its own process -> (step times, peak GB or None)."""
    return harness.child_run(__file__, ["--torch-only", name, "--model", args.model, "--batch-size", args.batch_size,
                                        "--seq-len", args.seq_len, "--steps", steps, "--warmup", warmup],
                             watch_memory)


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
    ap.add_argument("--json", help="where to write the result (default bench/results/DATE-vs_pytorch-B-T.json)")
    ap.add_argument("extra", nargs="*", help="extra `launch train` flags for coregpt (after --)")
    ap.add_argument("--torch-only", metavar="RECIPE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bf16_only and args.fp32_only:
        ap.error("--bf16-only and --fp32-only leave nothing to run")
    if args.fp32_only and args.recompute:
        ap.error("--recompute adds a bf16 system, which --fp32-only leaves out")
    B, T, n = args.batch_size, args.seq_len, args.steps + args.warmup
    tokens = harness.random_tokens(n * B * T + 1)
    if args.torch_only:
        print(harness.json.dumps(torch_step_times(args.model, B, T, n, 2, tokens, **TORCH_RECIPES[args.torch_only])))
        return
    precisions = {"fp32"} if args.fp32_only else {"bf16"} if args.bf16_only else {"bf16", "fp32"}
    recipes = [r for r in TORCH_RECIPES if (args.compile or not TORCH_RECIPES[r]["compile"])
               and ("bf16" if TORCH_RECIPES[r]["bf16"] else "fp32") in precisions]
    systems = {name: (workers, flags) for name, (workers, flags) in COREGPT.items()
               if (workers == 2 or not args.two_workers_only) and flags[1] in precisions}
    if args.recompute:
        systems[RECOMPUTE] = (2, ["--precision", "bf16", "--recompute"])
    with tempfile.TemporaryDirectory(prefix="coregpt-bench-") as tmp:
        data = harness.corpus(tmp, n * B * T + 1)
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
    print(f"{args.model}, B={B}, T={T} on {harness.fingerprint()['cpu']}, {os.cpu_count()} CPUs; "
          f"PyTorch with 2 threads")
    print(f"median of {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps each")
    med = medians(raw, B * T)
    summary = ratios(med, recipes, systems, precisions, args)
    for line, value in summary.items():
        print(f"{line}: {value:.2f}x")
    print("peak memory (PSS of the process and its children, shared memory once):")
    for name, peak in peaks.items():
        print(f"  {name:50} {peak:6.2f} GB")
    harness.save("vs_pytorch", {"model": args.model, "batch_size": B, "seq_len": T, "rounds": args.rounds,
                                "steps": args.steps, "warmup": args.warmup, "pytorch_threads": 2,
                                "coregpt_flags": args.extra},
                 harness.timed(raw, med, B * T, peaks), summary, out=args.json)


def ratios(med, recipes, systems, precisions, args):
    """-> {what: ratio}: coregpt against the fastest PyTorch recipe of each precision,
    1 -> 2 workers, --recompute's cost."""
    summary = {}
    for precision in sorted(precisions):
        fastest = min((n for n in recipes if TORCH_RECIPES[n]["bf16"] == (precision == "bf16")), key=med.get)
        summary[f"coregpt {precision} 2x1 over the fastest PyTorch {precision} recipe ({fastest})"] = \
            med[fastest] / med[f"coregpt {precision}, 2 workers x 1 thread"]
        one = f"coregpt {precision}, 1 worker x 1 thread"
        if one in systems:
            summary[f"coregpt {precision}: 1 -> 2 workers"] = med[one] / med[f"coregpt {precision}, 2 workers x 1 thread"]
    if args.recompute:
        fastest = min((n for n in recipes if TORCH_RECIPES[n]["bf16"]), key=med.get)
        summary["coregpt bf16 2x1 --recompute over the fastest PyTorch bf16 recipe"] = med[fastest] / med[RECOMPUTE]
        summary["coregpt bf16 2x1: step with --recompute over without"] = \
            med[RECOMPUTE] / med["coregpt bf16, 2 workers x 1 thread"]
    return summary


if __name__ == "__main__":
    main()
