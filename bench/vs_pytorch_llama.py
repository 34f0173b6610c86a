"""A Llama-family shape (SmolLM2-135M's by default) against PyTorch's fastest CPU
recipes, interleaved in rounds on the same batch, data and machine:

    pip install torch==2.13.0 transformers peft     # benchmark-only
    python bench/vs_pytorch_llama.py [--model smollm2-135m] [--batch-size 2 --seq-len 1024]
                                     [--precision bf16] [--rank 8] [--rounds 2] [--steps 2] [--warmup 3]
                                     [--no-compile] [-- extra coregpt flags]

Each round runs every system once, in its own process: transformers' LlamaForCausalLM
(SDPA attention, random weights from the preset's config) with fused AdamW, bf16
autocast (with --precision bf16) and torch.compile, 2 threads, full fine-tuning and
with peft's LoRA (r, alpha = r, on q_proj and v_proj, peft's default); coregpt at the
same precision, 2 workers x 1 thread, full and --lora-rank r; and coregpt's GPT-2 124M
full fine-tuning at the same shape, for the per-token comparison.  A step is forward +
backward + clip + AdamW; the first --warmup steps of each process are left out.
Prints the raw step times, the medians and the ratios."""
import argparse
import os
import tempfile

import harness  # noqa: E402  (puts the repository on sys.path)
from harness import coregpt_step_times, interleaved, medians  # noqa: E402
from trainer.models.llama import PRESETS, LlamaConfig  # noqa: E402

TORCH = ("pytorch full", "pytorch + peft LoRA")
FULL, LORA, GPT2 = "coregpt full", "coregpt LoRA", "coregpt GPT-2 124M full"


def torch_step_times(model_name, B, T, steps, tokens, rank, lora, bf16, compile):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.set_num_threads(2)
    torch.manual_seed(0)
    hf = LlamaConfig(**PRESETS[model_name]).to_hf()
    config = AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    trained = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trained, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    forward = torch.compile(model) if compile else model
    return harness.torch_steps(harness.hf_loss(forward), trained, opt, tokens, B, T, steps, bf16)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=list(PRESETS))
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per process, after warm-up")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out (torch.compile needs 3)")
    ap.add_argument("--rounds", type=int, default=2, help="every system runs once per round")
    ap.add_argument("--no-compile", action="store_true", help="PyTorch eager (compile is its fastest)")
    ap.add_argument("--json", help="where to write the result (default bench/results/)")
    ap.add_argument("extra", nargs="*", help="extra `launch train` flags for coregpt's systems (after --)")
    ap.add_argument("--torch-only", metavar="RECIPE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    B, T, n, bf16 = args.batch_size, args.seq_len, args.steps + args.warmup, args.precision == "bf16"
    vocab = PRESETS[args.model]["vocab_size"]
    tokens = harness.random_tokens(n * B * T + 1, vocab=vocab)
    if args.torch_only:
        print(harness.json.dumps(torch_step_times(args.model, B, T, n, tokens, args.rank,
                                                  args.torch_only == TORCH[1], bf16, not args.no_compile)))
        return
    flags = ["--precision", args.precision, *args.extra]
    systems = {FULL: (args.model, flags), LORA: (args.model, flags + ["--lora-rank", str(args.rank)]),
               GPT2: ("gpt2", flags)}
    with tempfile.TemporaryDirectory(prefix="coregpt-bench-") as tmp:
        for model in (args.model, "gpt2"):
            os.makedirs(os.path.join(tmp, model))
        data = {model: harness.corpus(os.path.join(tmp, model), n * B * T + 1, vocab=v)
                for model, v in ((args.model, vocab), ("gpt2", 50257))}
        def run(name):
            if name in TORCH:
                return harness.child_run(__file__, ["--torch-only", name, "--model", args.model, "--batch-size", B,
                                                    "--seq-len", T, "--steps", args.steps, "--warmup", args.warmup,
                                                    "--rank", args.rank, "--precision", args.precision]
                                         + (["--no-compile"] if args.no_compile else []))[0]
            model, system_flags = systems[name]
            return coregpt_step_times(model, B, T, n, 2, data[model], system_flags).times
        raw = interleaved(list(TORCH) + list(systems), run, args.rounds, args.warmup)
    recipe = f"{args.precision}{' autocast' if bf16 else ''}, fused AdamW{'' if args.no_compile else ', compile'}"
    print(f"{args.model} shape, B={B}, T={T}, {args.precision} on {harness.fingerprint()['cpu']}, "
          f"{os.cpu_count()} CPUs; PyTorch ({recipe}) with 2 threads; coregpt 2 workers x 1 thread "
          f"{' '.join(args.extra)}")
    med = medians(raw, B * T, width=30)
    summary = {f"coregpt full over PyTorch full ({recipe})": med[TORCH[0]] / med[FULL],
               f"coregpt LoRA over PyTorch + peft ({recipe})": med[TORCH[1]] / med[LORA],
               "coregpt full, this model's step over GPT-2 124M's at the same shape": med[FULL] / med[GPT2]}
    for line, value in summary.items():
        print(f"{line}: {value:.2f}x")
    harness.save("vs_pytorch_llama", {"model": args.model, "batch_size": B, "seq_len": T,
                                      "precision": args.precision, "lora_rank": args.rank, "rounds": args.rounds,
                                      "steps": args.steps, "warmup": args.warmup, "compile": not args.no_compile,
                                      "pytorch_threads": 2, "coregpt_flags": args.extra},
                 harness.timed(raw, med, B * T), summary, out=args.json)


if __name__ == "__main__":
    main()
