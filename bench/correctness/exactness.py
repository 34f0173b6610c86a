"""The exactness figures of docs/exactness.md, measured: the parity cases of tests/test_parity.py
(tiny GPT-2, 8 steps through `python -m launch train`) against PyTorch 2.13's
AdamW + clip_grad_norm_: at T=32 for hybrid and data at 1, 2 and 4 workers and,
with --recompute, at 1 and 2; at a context of 512 (T=512, the default attention
blocks and lm-head chunks) for both strategies at 1 and 2 workers, with and
without --recompute; and one step's gradients against autograd on the tiny
model and at GPT-2 124M shapes (tests/test_model.py).

    python bench/correctness/exactness.py [--attention-block 8] [--head-rows 40]

Prints, per run, the largest |loss − PyTorch's|, |weight − PyTorch's| and relative
|grad_norm − the float64 norm|, and (T=32) against one hybrid worker's run."""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from conftest import write_tiny_inputs  # noqa: E402
from references import (LONG_B, LONG_T, N_TOKENS, RUNS, STRATEGIES, compare_gradients, torch_reference,  # noqa: E402
                        train_tiny)


def deviations(run, expected):
    """-> (max |Δloss|, max |Δweight|, max relative |Δgrad norm|) of a run against torch_reference's."""
    (losses, weights, rows, _), (expected_losses, expected_weights, norms) = run, expected
    logged = np.array([r["grad_norm"] for r in rows if "grad_norm" in r])
    return (np.abs(np.array(losses) - expected_losses).max(),
            max(np.abs(weights[n] - w).max() for n, w in expected_weights.items()),
            (np.abs(logged - norms) / np.array(norms)).max())


def name(parallel, workers, recompute):
    return f"{parallel} W={workers}{' recompute' if recompute else ''}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention-block", type=int, default=8, help="COREGPT_ATTENTION_BLOCK of the T=32 runs")
    p.add_argument("--head-rows", type=int, default=40, help="COREGPT_HEAD_ROWS of the T=32 runs")
    args = p.parse_args()
    env = {"COREGPT_ATTENTION_BLOCK": str(args.attention_block), "COREGPT_HEAD_ROWS": str(args.head_rows)}
    with tempfile.TemporaryDirectory(prefix="coregpt-exactness-") as tmp:
        root = Path(tmp) / "t32"
        root.mkdir()
        state, tokens = write_tiny_inputs(root, seed=0, n_tokens=N_TOKENS)
        expected = torch_reference(state, tokens)
        runs = {}
        for parallel, workers, recompute in RUNS:
            extra = (["--parallel", parallel] + (["--oversubscribe"] if workers > 2 else [])
                     + (["--recompute"] if recompute else []))
            runs[parallel, workers, recompute] = train_tiny(root, workers, name(parallel, workers, recompute)
                                                            .replace(" ", "-"), *extra, env=env)
        one = runs["hybrid", 1, False]
        print("T=32:")
        print(f"{'run':<22} {'loss':>9} {'weights':>9} {'grad norm':>9}   vs hybrid W=1: {'loss':>9} {'weights':>9}")
        for key, run in runs.items():
            loss, weight, norm = deviations(run, expected)
            print(f"{name(*key):<22} {loss:9.2e} {weight:9.2e} {norm:9.2e}                  "
                  f"{np.abs(np.array(run[0]) - one[0]).max():9.2e} "
                  f"{max(np.abs(run[1][n] - w).max() for n, w in one[1].items()):9.2e}")
        root = Path(tmp) / "t512"
        root.mkdir()
        state, tokens = write_tiny_inputs(root, seed=1, n_tokens=5 * LONG_B * LONG_T + 7, n_ctx=LONG_T)
        expected = torch_reference(state, tokens, B=LONG_B, T=LONG_T)
        print(f"T=512 (B={LONG_B}, context 512, default blocks and chunks):")
        for parallel in STRATEGIES:
            for workers in (1, 2):
                for recompute in (False, True):
                    run = train_tiny(root, workers, name(parallel, workers, recompute).replace(" ", "-"),
                                     "--parallel", parallel, *(["--recompute"] if recompute else []),
                                     B=LONG_B, T=LONG_T)
                    loss, weight, norm = deviations(run, expected)
                    print(f"{name(parallel, workers, recompute):<22} {loss:9.2e} {weight:9.2e} {norm:9.2e}")
    shapes = {"tiny, B=4, T=32": (2, 4, 64, 64, 4, 32), "GPT-2 124M, B=2, T=64": (12, 12, 768, 1024, 2, 64)}
    for label, shape in shapes.items():
        n_layer, n_head, n_embd, n_ctx, B, T = shape
        loss, torch_loss, rel = compare_gradients(n_layer, n_head, n_embd, n_ctx, B=B, T=T)
        print(f"gradients, {label}: loss {abs(loss - torch_loss):.2e}, worst relative {max(rel.values()):.2e}")


if __name__ == "__main__":
    main()
