"""Record, or compare, the exact numbers of the parity runs: a refactor that must not
change results is checked by running this before and after it.

    python bench/correctness/digest_runs.py --out before.json              # on the old code
    python bench/correctness/digest_runs.py --out after.json --compare before.json

Each run is the tiny parity model (2 layers, 64 channels) for 8 steps through
`python -m launch train`: hybrid and data, 1, 2 and 4 workers, fp32 and bf16; and,
for both strategies at 2 workers, two micro-batches of gradient accumulation (fp32
and bf16), --recompute, 8-bit AdamW, LoRA (r=4 on every target, fp32 and bf16, with
dropout) and LoRA with 8-bit AdamW; and (with mpiexec) 2 MPI ranks.  Per run it
keeps every loss and grad norm as logged (JSON floats, exact) and a sha256 of the
final weights (a LoRA run's adapters) and of the optimizer state."""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from trainer.data import write_tokens  # noqa: E402
B, T, STEPS = 4, 32, 8
RUNS = [(parallel, workers, precision, extra) for precision in ("fp32", "bf16")
        for parallel in ("hybrid", "data") for workers in (1, 2, 4) for extra in ("",)]
RUNS += [(parallel, 2, precision, extra) for parallel in ("hybrid", "data")
         for precision, extra in (("fp32", "accum"), ("bf16", "accum"), ("fp32", "recompute"),
                                  ("bf16", "recompute"), ("fp32", "adamw8bit"), ("fp32", "lora"),
                                  ("bf16", "lora"), ("fp32", "lora adamw8bit"))]
RUNS += [(parallel, 1, "fp32", "mpi") for parallel in ("hybrid", "data")]


FLAGS = {"recompute": ["--recompute"], "adamw8bit": ["--optim", "adamw8bit"],
         "lora": ["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1",
                  "--lora-targets", "c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"]}


def write_inputs(root):
    """Random tiny GPT-2 weights (HF safetensors) and random tokens, from a fixed seed."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    C, V, L, ctx = 64, 50257, 2, 64
    state = {"wte.weight": rng.normal(0, 0.02, (V, C)), "wpe.weight": rng.normal(0, 0.02, (ctx, C)),
             "ln_f.weight": 1 + rng.normal(0, 0.1, C), "ln_f.bias": rng.normal(0, 0.1, C)}
    for l in range(L):
        for name, shape in (("ln_1", (C,)), ("ln_2", (C,))):
            state[f"h.{l}.{name}.weight"] = 1 + rng.normal(0, 0.1, shape)
            state[f"h.{l}.{name}.bias"] = rng.normal(0, 0.1, shape)
        for name, (i, o) in (("attn.c_attn", (C, 3 * C)), ("attn.c_proj", (C, C)),
                             ("mlp.c_fc", (C, 4 * C)), ("mlp.c_proj", (4 * C, C))):
            state[f"h.{l}.{name}.weight"] = rng.normal(0, 0.02, (i, o))
            state[f"h.{l}.{name}.bias"] = rng.normal(0, 0.02, o)
    os.makedirs(os.path.join(root, "init"))
    save_file({k: v.astype(np.float32) for k, v in state.items()}, os.path.join(root, "init", "model.safetensors"))
    with open(os.path.join(root, "init", "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "n_layer": L, "n_head": 4, "n_embd": C, "n_positions": ctx,
                   "vocab_size": V}, f)
    write_tokens(os.path.join(root, "tokens.bin"), rng.integers(0, V, 5 * B * T + 7))


def digest(path):
    tensors = load_file(path)
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].tobytes())
    return h.hexdigest()


def supports_data_order():
    done = subprocess.run([sys.executable, "-m", "launch", "train", "--help"], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True)
    return "--data-order" in done.stdout


def run(root, parallel, workers, precision, extra):
    out = os.path.join(root, f"{parallel}-{workers}-{precision}-{extra}")
    cmd = [sys.executable, "-m", "launch", "train", "--init-from", os.path.join(root, "init"),
           "--data", os.path.join(root, "tokens.bin"), "--batch-size", str(B), "--seq-len", str(T),
           "--steps", str(STEPS), "--lr", "1e-3", "--lr-schedule", "constant", "--weight-decay", "0.1",
           "--grad-clip", "1.0", "--workers", str(workers), "--threads-per-worker", "1", "--eval-every", "0",
           "--parallel", parallel, "--precision", precision, "--oversubscribe", "--out-dir", out]
    if supports_data_order():  # file order, as checkouts from before --data-order read
        cmd += ["--data-order", "sequential"]
    if extra == "accum":
        cmd[cmd.index("--batch-size") + 1] = str(B // 2)
        cmd += ["--grad-accum", "2"]
    for flag in ("recompute", "adamw8bit", "lora"):
        if flag in extra.split():
            cmd += FLAGS[flag]
    if extra == "lora adamw8bit":  # adapters of 4,096+ elements, which 8-bit AdamW quantises
        cmd += ["--lora-rank", "16"]
    if extra == "mpi":
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        cmd = [mpiexec if os.path.exists(mpiexec) else shutil.which("mpiexec"), "-n", "2"] + cmd
        cmd += ["--backend", "mpi"]
    done = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    ckpt = os.path.join(out, "checkpoints", f"step_{STEPS:06d}")
    return {"loss": [r["loss"] for r in rows if "loss" in r], "grad_norm": [r["grad_norm"] for r in rows
                                                                          if "grad_norm" in r],
            "weights": digest(os.path.join(ckpt, "adapter_model.safetensors" if "lora" in extra
                                           else "model.safetensors")),
            "adam": digest(os.path.join(ckpt, "optimizer.safetensors"))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--compare", help="a JSON file written before: exit 1 unless every number is identical")
    p.add_argument("--only", help="only the runs whose extra (accum, recompute, lora, ...) contains this")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="coregpt-digest-") as root:
        write_inputs(root)
        for parallel, workers, precision, extra in RUNS:
            if args.only and args.only not in extra:
                continue
            key = f"{parallel} W={workers} {precision}" + (f" {extra}" if extra else "")
            results[key] = run(root, parallel, workers, precision, extra)
            print(f"{key:<34} final loss {results[key]['loss'][-1]!r:<22} weights {results[key]['weights'][:12]}",
                  flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)
        differ = [key for key in before if key in results and before[key] != results[key]]
        missing = [key for key in before if key not in results]
        if missing:
            print(f"not run: {', '.join(missing)}")
        print(f"{len(before) - len(differ)} of {len(before)} runs bit-identical to {args.compare}"
              + (f"; differ: {', '.join(differ)}" if differ else ""))
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
