"""RUN/loss.png: train and val loss against step (bottom axis) and tokens (top axis)."""
import json
import os

from trainer.files import atomic_write


def plot_run(run_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training steps to plot")
    with open(os.path.join(run_dir, "run.json")) as f:
        s = json.load(f)
    tokens_per_step = s["batch_size"] * s["seq_len"] * s.get("grad_accum", 1)

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(*zip(*train), label="train loss", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", linewidth=2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(title=os.path.basename(os.path.normpath(run_dir)))
    top = ax.secondary_xaxis("top", functions=(lambda x: x * tokens_per_step,
                                                 lambda t: t / tokens_per_step))
    top.set_xlabel("tokens")
    fig.tight_layout()
    path = os.path.join(run_dir, "loss.png")
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path
