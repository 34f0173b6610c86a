"""The README's exactness figures, measured: the parity case of tests/test_parity.py
(tiny GPT-2, 8 steps through `python -m launch train`) against PyTorch 2.13's
AdamW + clip_grad_norm_, for hybrid and data at 1, 2 and 4 workers.

    python bench/exactness.py [--attention-block 8]

Prints, per run, the largest |loss − PyTorch's|, |weight − PyTorch's| and relative
|grad_norm − the float64 norm|, and against one hybrid worker's run."""
import argparse
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from conftest import write_tiny_inputs  # noqa: E402
from test_parity import N_TOKENS, RUNS, torch_reference, train_tiny  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention-block", type=int, default=8, help="COREGPT_ATTENTION_BLOCK of the runs")
    args = p.parse_args()
    env = {"COREGPT_ATTENTION_BLOCK": str(args.attention_block)}
    with tempfile.TemporaryDirectory(prefix="coregpt-exactness-") as tmp:
        from pathlib import Path
        root = Path(tmp)
        state, tokens = write_tiny_inputs(root, seed=0, n_tokens=N_TOKENS)
        losses, weights, norms = torch_reference(state, tokens)
        runs = {}
        for parallel, workers in RUNS:
            extra = ["--parallel", parallel] + (["--oversubscribe"] if workers > 2 else [])
            runs[parallel, workers] = train_tiny(root, workers, f"{parallel}{workers}", *extra, env=env)
        one = runs["hybrid", 1]
        print(f"{'run':<10} {'loss':>9} {'weights':>9} {'grad norm':>9}   vs hybrid W=1: {'loss':>9} {'weights':>9}")
        for (parallel, workers), (run_losses, run_weights, rows, _) in runs.items():
            logged = np.array([r["grad_norm"] for r in rows if "grad_norm" in r])
            print(f"{parallel} W={workers:<3} {np.abs(np.array(run_losses) - losses).max():9.2e} "
                  f"{max(np.abs(run_weights[n] - w).max() for n, w in weights.items()):9.2e} "
                  f"{(np.abs(logged - norms) / np.array(norms)).max():9.2e}                  "
                  f"{np.abs(np.array(run_losses) - one[0]).max():9.2e} "
                  f"{max(np.abs(run_weights[n] - w).max() for n, w in one[1].items()):9.2e}")


if __name__ == "__main__":
    main()
