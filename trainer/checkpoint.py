"""Run checkpoints: RUN/checkpoints/step_NNNNNN/ with model.safetensors (HF GPT-2
names), config.json, optimizer.safetensors and state.json.

A checkpoint is written under a temporary name, every file fsynced, then
renamed into place; `checkpoints/latest` is replaced last.  A crash at any
point leaves the previous latest checkpoint whole.
"""
import json
import os
import shutil

from trainer.files import atomic_write
from trainer.weights import WeightsError, latest_checkpoint, read_safetensors, save_model


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir, step, cfg, params, m, v, state):
    """params, m, v: {hf_name: array}; state: JSON-able run state -> checkpoint path."""
    from safetensors.numpy import save_file
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    for leftover in os.listdir(root):  # from a writer killed mid-checkpoint
        if leftover.startswith((".tmp-", ".old-")):
            shutil.rmtree(os.path.join(root, leftover), ignore_errors=True)
    name = f"step_{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}-{os.getpid()}")
    os.makedirs(tmp)
    try:
        save_model(tmp, cfg, params)
        optimizer = {f"m.{k}": a for k, a in m.items()} | {f"v.{k}": a for k, a in v.items()}
        save_file(optimizer, os.path.join(tmp, "optimizer.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(dict(state, step=step), f, indent=2)
        for file in os.listdir(tmp):
            with open(os.path.join(tmp, file), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        if os.path.exists(final):  # rewriting a step after a resume: swap it out whole
            old = os.path.join(root, f".old-{name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
        with atomic_write(os.path.join(root, "latest"), "w") as f:
            f.write(name + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prune_checkpoints(run_dir, keep):
    """Delete all but the `keep` newest step_* checkpoints (never the latest)."""
    root = os.path.join(run_dir, "checkpoints")
    latest = os.path.basename(latest_checkpoint(run_dir) or "")
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_") and d != latest)
    for name in steps[:max(0, len(steps) - (keep - 1))]:
        shutil.rmtree(os.path.join(root, name))


def read_state(ckpt_dir):
    try:
        with open(os.path.join(ckpt_dir, "state.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{ckpt_dir}: unreadable state.json ({e})") from None


def saved_setting(run_dir, key):
    """A setting of the run in run_dir, from its latest checkpoint (None if none)."""
    ckpt = latest_checkpoint(run_dir)
    return read_state(ckpt)["config"].get(key) if ckpt else None


def load_optimizer(ckpt_dir):
    """-> ({name: m}, {name: v}, state dict)"""
    tensors = read_safetensors(os.path.join(ckpt_dir, "optimizer.safetensors"))
    m = {k[2:]: a for k, a in tensors.items() if k.startswith("m.")}
    v = {k[2:]: a for k, a in tensors.items() if k.startswith("v.")}
    return m, v, read_state(ckpt_dir)
