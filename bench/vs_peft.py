"""coregpt's LoRA against PyTorch + Hugging Face peft on the same GPT-2, batch, data
and machine, interleaved in rounds (the machine is shared and noisy).

    pip install torch==2.13.0 transformers peft     # benchmark-only
    python bench/vs_peft.py [--rounds 2] [--steps 3] [--warmup 3] [--compile]
                            [--batch-size 2 --seq-len 1024] [--rank 8] [--recompute] [--precision fp32]
                            [-- --parallel data]

Each round runs every system once, in its own process: transformers' GPT2LMHeadModel
(SDPA attention) with peft's LoRA (r, alpha = r, on c_attn), bf16 autocast (fp32 with
--precision fp32: the faster on CPUs without bf16 units) and fused
AdamW over the adapters, 2 threads; with --compile also torch.compile of it; coregpt
bf16, 2 workers x 1 thread, with --lora-rank r (and with --recompute also with it), and
coregpt's full fine-tuning bf16 2 x 1 at the same shape (flags after -- go to every
coregpt system: at T=1024 `--parallel data` is coregpt's faster strategy).  A step is forward + backward
+ clip + AdamW; the first --warmup steps of each process are left out.  Prints the raw
step times, the medians, the ratios and each system's peak memory (PSS, shared memory
once) in a separate untimed run.
"""
import argparse
import os
import tempfile

import harness  # noqa: E402  (puts the repository on sys.path)
from harness import coregpt_step_times, interleaved, medians  # noqa: E402
from trainer.models.gpt2 import PRESETS  # noqa: E402


def systems_of(precision):
    """-> ({peft recipe: compiled}, coregpt LoRA, LoRA --recompute, full) names at `precision`."""
    recipe = "bf16 autocast" if precision == "bf16" else "fp32"
    lora = f"coregpt LoRA {precision}, 2 workers x 1 thread"
    return ({f"pytorch + peft, {recipe}, fused AdamW": False, f"pytorch + peft, {recipe}, fused AdamW, compile": True},
            lora, lora + ", --recompute", f"coregpt full fine-tuning {precision}, 2 workers x 1 thread")


def peft_step_times(model_name, B, T, steps, threads, tokens, rank, compile, bf16=True):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    p = PRESETS[model_name]
    config = GPT2Config(n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"], n_positions=p["block_size"],
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "sdpa"  # read at every forward
    model = GPT2LMHeadModel(config)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=["c_attn"], lora_dropout=0.0,
                                             fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM"))
    trained = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trained, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    forward = torch.compile(model) if compile else model
    return harness.torch_steps(harness.hf_loss(forward), trained, opt, tokens, B, T, steps, bf16)


def peft_run(name, args, steps, warmup, watch_memory=False):
    """One peft recipe in its own process -> (step times, peak GB or None)."""
    return harness.child_run(__file__, ["--torch-only", name, "--model", args.model, "--batch-size", args.batch_size,
                                        "--seq-len", args.seq_len, "--steps", steps, "--warmup", warmup,
                                        "--rank", args.rank, "--precision", args.precision], watch_memory)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2", choices=list(PRESETS))
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="of every system")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process, after warm-up")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out (torch.compile needs 3)")
    ap.add_argument("--rounds", type=int, default=2, help="every system runs once per round")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the peft recipe")
    ap.add_argument("--recompute", action="store_true", help="also coregpt's LoRA with --recompute")
    ap.add_argument("--json", help="where to write the result (default bench/results/DATE-vs_peft-B-T.json)")
    ap.add_argument("extra", nargs="*", help="extra `launch train` flags for coregpt's systems (after --)")
    ap.add_argument("--torch-only", metavar="RECIPE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    B, T, n = args.batch_size, args.seq_len, args.steps + args.warmup
    tokens = harness.random_tokens(n * B * T + 1)
    PEFT, LORA, LORA_RECOMPUTE, FULL = systems_of(args.precision)
    if args.torch_only:
        print(harness.json.dumps(peft_step_times(args.model, B, T, n, 2, tokens, args.rank, PEFT[args.torch_only],
                                                 args.precision == "bf16")))
        return
    recipes = [r for r in PEFT if args.compile or not PEFT[r]]
    lora = ["--precision", args.precision, "--lora-rank", str(args.rank), *args.extra]
    systems = {LORA: lora, FULL: ["--precision", args.precision, *args.extra]}
    if args.recompute:
        systems[LORA_RECOMPUTE] = lora + ["--recompute"]
    with tempfile.TemporaryDirectory(prefix="coregpt-bench-") as tmp:
        data = harness.corpus(tmp, n * B * T + 1)
        def run(name):
            if name in PEFT:
                return peft_run(name, args, args.steps, args.warmup)[0]
            return coregpt_step_times(args.model, B, T, n, 2, data, systems[name]).times
        raw = interleaved(recipes + list(systems), run, args.rounds, args.warmup)
        peaks = {name: peft_run(name, args, 1, 3 if PEFT[name] else 2, watch_memory=True)[1] for name in recipes}
        peaks.update({name: coregpt_step_times(args.model, B, T, 3, 2, data, flags, watch_memory=True).peak
                      for name, flags in systems.items()})
    print(f"{args.model}, LoRA r={args.rank} on c_attn, B={B}, T={T} on {harness.fingerprint()['cpu']}, {os.cpu_count()} CPUs; "
          f"PyTorch with 2 threads; coregpt's extra flags: {' '.join(args.extra) or 'none'}")
    print(f"median of {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps each")
    med = medians(raw, B * T, width=55)
    best = min(recipes, key=med.get)
    summary = {f"coregpt LoRA over the fastest PyTorch + peft recipe ({best})": med[best] / med[LORA],
               "coregpt LoRA over coregpt's full fine-tuning": med[FULL] / med[LORA]}
    if args.recompute:
        summary["coregpt LoRA --recompute over the fastest PyTorch + peft recipe"] = med[best] / med[LORA_RECOMPUTE]
    for line, value in summary.items():
        print(f"{line}: {value:.2f}x")
    print("peak memory (PSS of the process and its children, shared memory once):")
    for name, peak in peaks.items():
        print(f"  {name:55} {peak:6.2f} GB")
    harness.save("vs_peft", {"model": args.model, "batch_size": B, "seq_len": T, "lora_rank": args.rank,
                             "precision": args.precision,
                             "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                             "pytorch_threads": 2, "coregpt_flags": args.extra},
                 harness.timed(raw, med, B * T, peaks), summary, out=args.json)


if __name__ == "__main__":
    main()
