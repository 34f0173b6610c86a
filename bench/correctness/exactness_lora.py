"""The LoRA exactness figures of docs/exactness.md, measured: tests/test_lora.py's parity case
(tiny GPT-2, r=4, alpha=8 on all four targets, 8 steps through `python -m launch
train` from an adapter peft wrote) against transformers + peft with torch's AdamW and
clip_grad_norm_, for hybrid and data at 1 and 2 workers, and one step's adapter
gradients in process.

    python bench/correctness/exactness_lora.py

Prints, per run, the largest |loss − peft's|, |adapter weight − peft's| and relative
|grad_norm − the float64 norm|."""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from conftest import read_metrics  # noqa: E402
from references import LORA_RUNS as RUNS, SMALL_CHUNKS, final, make_case, train_adapter as train  # noqa: E402


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with tempfile.TemporaryDirectory(prefix="coregpt-exact-") as tmp:
        root, *_, (losses, adapters, norms) = make_case(Path(tmp))
        print(f"{'run':12} {'max |dloss|':>12} {'max |dweight|':>14} {'max rel dnorm':>14}")
        for parallel, workers in RUNS:
            out, _ = train(root, f"{parallel}{workers}", "--parallel", parallel, workers=workers, env=SMALL_CHUNKS)
            rows = [r for r in read_metrics(out) if "loss" in r]
            got = final(out)
            dloss = np.abs(np.array([r["loss"] for r in rows]) - losses).max()
            dweight = max(np.abs(got[k] - v).max() for k, v in adapters.items())
            dnorm = (np.abs(np.array([r["grad_norm"] for r in rows]) - norms) / np.array(norms)).max()
            print(f"{parallel + ' W=' + str(workers):12} {dloss:12.2e} {dweight:14.2e} {dnorm:14.2e}", flush=True)


if __name__ == "__main__":
    main()
