"""Packed chat examples with document-masked attention against the same rows with
plain causal attention, in `launch train` runs interleaved in rounds:

    python bench/packing.py [--model gpt2] [--seq-len 1024] [--example 200] [--rounds 3]

Examples of 100 to 300 tokens (random ids, --example on average) are packed into
rows of T as `prepare --chat` packs them; "documents" trains on them with their
positions and loss mask (each example attends only to itself: the attention kernel
skips the blocks between examples), "causal" on the same token file alone.  Prints
the median step of each, their ratio, and the attention layers' time of each from
a profiled run (--profile)."""
import argparse
import os
import re
import shutil
import sys
import tempfile

import numpy as np

import harness  # puts the repository on sys.path
from harness import coregpt_step_times, interleaved, medians, save, timed  # noqa: E402
from trainer.chat_data import pack, write_packed  # noqa: E402
from trainer.models import preset_config  # noqa: E402


def write_data(directory, model, T, rows, mean, seed=0):
    """directory/documents (packed examples, mask and positions) and directory/causal (the same tokens)."""
    vocab = preset_config(model, {}).vocab_size
    rng = np.random.default_rng(seed)
    examples = []
    while sum(t.size for t, _ in examples) < rows * T * 0.97:
        n = int(rng.integers(mean // 2, 3 * mean // 2))
        examples.append((rng.integers(0, vocab, n), np.arange(n) >= n // 3))  # a prompt, then the reply
    packed = pack(examples, T, pad=0)
    for name in ("documents", "causal"):
        os.makedirs(os.path.join(directory, name))
    write_packed(os.path.join(directory, "documents", "train.bin"), packed, vocab, T)
    with open(os.path.join(directory, "documents", "chat.json"), "w") as f:
        f.write(f'{{"seq_len": {T}}}')
    shutil.copy(os.path.join(directory, "documents", "train.bin"), os.path.join(directory, "causal", "train.bin"))
    return len(examples), (packed.tokens.size - 1) // T


def attention_ms(log):
    """The attention rows of a --profile table -> ms a step."""
    return sum(float(m.group(1)) for m in re.finditer(r"attention_\w+\s+([\d.]+)", log))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--example", type=int, default=200, help="mean tokens of an example")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run, after one warm-up step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="where to write the result (default bench/results/)")
    args = p.parse_args()
    B, T = args.batch_size, args.seq_len
    with tempfile.TemporaryDirectory(prefix="coregpt-packing-") as tmp:
        n_examples, rows = write_data(tmp, args.model, T, B * (args.steps + 2), args.example)
        print(f"{args.model}, B={B}, T={T}, {n_examples} examples of ~{args.example} tokens in {rows} rows, "
              f"{args.workers} workers, {args.precision}", file=sys.stderr)
        extra = ["--precision", args.precision, "--data-order", "sequential"]

        def run(name, profile=False):
            return coregpt_step_times(args.model, B, T, args.steps + 1, args.workers, os.path.join(tmp, name),
                                      extra + (["--profile"] if profile else []))
        raw = interleaved(["documents", "causal"], lambda name: run(name).times, args.rounds, warmup=1)
        med = medians(raw, B * T)
        attention = {name: attention_ms(run(name, profile=True).log) for name in raw}
    ratio = med["causal"] / med["documents"]
    print(f"document-masked step {ratio:.2f}x faster; attention (profiled, ms a step per worker): "
          f"documents {attention['documents']:.0f}, causal {attention['causal']:.0f} "
          f"({attention['causal'] / max(attention['documents'], 1e-9):.2f}x)")
    save("packing", {"model": args.model, "batch_size": B, "seq_len": T, "example_tokens": args.example,
                     "workers": args.workers, "precision": args.precision, "examples": n_examples},
         timed(raw, med, B * T), {"document-masked step vs causal step (speed-up)": ratio},
         [{"system": name, "attention forward + backward, ms a step (one worker, profiled)": attention[name]}
          for name in raw], out=args.json)


if __name__ == "__main__":
    main()
