"""Time per generated token against prompt length, with the KV cache and without
(re-running the whole prefix each token).  GPT-2 124M shapes, random weights.

    python bench/sample_kv_cache.py [--model gpt2] [--threads 2]
"""
import argparse
import os
import statistics
import time

import numpy as np

import harness  # puts the repository on sys.path
from threadpoolctl import threadpool_limits  # noqa: E402

from trainer.models.gpt2 import VOCAB as GPT2_VOCAB, PRESETS, GPTConfig, init_params as init_gpt2  # noqa: E402
from trainer.models import param_layout  # noqa: E402
from trainer.sample import Sampler  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2", choices=list(PRESETS))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--tokens", type=int, default=16, help="tokens timed per prompt length")
    ap.add_argument("--json", help="where to write the result (default bench/results/)")
    args = ap.parse_args()
    cfg = GPTConfig(**PRESETS[args.model], vocab_size=GPT2_VOCAB)
    _, params = param_layout(cfg).allocate()
    init_gpt2(cfg, params, seed=0)
    sampler = Sampler(cfg, params)
    rng = np.random.default_rng(0)
    print(f"{args.model}, {args.threads} BLAS thread(s); median ms per new token")
    print(f"{'prompt':>7} {'KV cache':>10} {'no cache':>10}")
    rows = []
    with threadpool_limits(args.threads):
        for length in (16, 128, 512, 896):
            prompt = list(rng.integers(0, cfg.vocab_size, length))
            sampler.forward(prompt, 0)
            cached = []
            for i in range(args.tokens):
                t0 = time.perf_counter()
                sampler.forward([7], length + i)
                cached.append(time.perf_counter() - t0)
            uncached = []
            for i in range(min(4, args.tokens)):
                t0 = time.perf_counter()
                sampler.forward(prompt + [7] * (i + 1), 0)
                uncached.append(time.perf_counter() - t0)
            print(f"{length:>7} {1000 * statistics.median(cached):>10.1f} "
                  f"{1000 * statistics.median(uncached):>10.1f}")
            rows.append({"prompt_tokens": length, "kv_cache_ms": 1000 * statistics.median(cached),
                         "rerun_prefix_ms": 1000 * statistics.median(uncached)})
    harness.save("sample_kv_cache", {"model": args.model, "threads": args.threads, "tokens": args.tokens}, rows=rows,
                 out=args.json)


if __name__ == "__main__":
    main()
