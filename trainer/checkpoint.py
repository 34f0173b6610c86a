"""Run checkpoints: RUN/checkpoints/step_NNNNNN/ with model.safetensors (the model
family's HF names), config.json, optimizer.safetensors and state.json.  A LoRA run's holds
the adapter as peft writes it (adapter_model.safetensors, adapter_config.json:
the checkpoint is a peft adapter directory) instead of model.safetensors, and
its state.json names the frozen base by path (or seed) and sha256 (trainer/base.py).

A checkpoint is written under a temporary name, every file fsynced, then
renamed into place; `checkpoints/latest` is replaced last.  A crash at any
point leaves the previous latest checkpoint whole.
"""
import json
import os
import shutil

from trainer.files import atomic_write, plain_mode
from trainer.optimizers import OPTIMIZERS
from trainer.weights import WeightsError, latest_checkpoint, read_hf_config


def optimizer_tensors(trains, optim):
    """{prefix: {parameter: (shape, safetensors dtype)}} of the state optimizer `optim`
    (a name in trainer/optimizers.py) keeps for each tensor of what trains."""
    return OPTIMIZERS[optim].tensors(list(trains.layout.shapes.items()))


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir, step, trains, tensors, optimizer, state, files=None):
    """tensors: {name: array} of what trains (trainer/trainable.py: the parameters,
    or LoRA's adapters); optimizer: {prefix: {name: array}} (as optimizer_tensors
    names them); state: JSON-able run state (with LoRA its "base"); files: {name:
    path} copied in (a tokenizer's) -> checkpoint path."""
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
        trains.save(tmp, tensors, state)
        for file, source in (files or {}).items():
            shutil.copyfile(source, os.path.join(tmp, file))
        save_file({prefix + name: a for prefix, views in optimizer.items() for name, a in views.items()},
                  os.path.join(tmp, "optimizer.safetensors"))
        plain_mode(os.path.join(tmp, "optimizer.safetensors"))
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


def mark_best(run_dir, ckpt_dir):
    """RUN/checkpoints/best names ckpt_dir (--keep-best), replaced atomically like `latest`."""
    with atomic_write(os.path.join(run_dir, "checkpoints", "best"), "w") as f:
        f.write(os.path.basename(ckpt_dir) + "\n")


def best_checkpoint(run_dir):
    """The checkpoint directory RUN/checkpoints/best names, or None."""
    return latest_checkpoint(run_dir, "best")


def prune_checkpoints(run_dir, keep):
    """Delete all but the `keep` newest step_* checkpoints (never the latest or the best)."""
    root = os.path.join(run_dir, "checkpoints")
    kept = {os.path.basename(latest_checkpoint(run_dir) or ""), os.path.basename(best_checkpoint(run_dir) or "")}
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_") and d not in kept)
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


def checkpoint_config(ckpt_dir):
    """The model config a checkpoint's config.json holds."""
    try:
        return read_hf_config(os.path.join(ckpt_dir, "config.json"))
    except (OSError, WeightsError) as e:
        raise WeightsError(f"{ckpt_dir}: unreadable config.json ({e})") from None


def check_checkpoint(ckpt_dir, optim, trains):
    """A checkpoint to resume, of the model checkpoint_config read, is whole: its
    files' headers show every tensor of what trains (`trains`) and of optimizer
    `optim`'s state with its shape and dtype (no tensor is read: see stream_checkpoint)."""
    from safetensors import SafetensorError, safe_open
    weights, expected = trains.checkpoint_file()
    files = ((weights, {"": expected}), ("optimizer.safetensors", optimizer_tensors(trains, optim)))
    for file, expected in files:
        path = os.path.join(ckpt_dir, file)
        try:
            with safe_open(path, framework="numpy") as f:
                found = {}  # name -> (shape, dtype), from the header
                for name in f.keys():
                    tensor = f.get_slice(name)
                    found[name] = tuple(tensor.get_shape()), tensor.get_dtype()
        except (OSError, SafetensorError) as e:
            raise WeightsError(f"{path} is not a readable .safetensors file ({e})") from None
        for prefix, tensors in expected.items():
            for name, (shape, dtype) in tensors.items():
                name = prefix + name
                if name not in found:
                    raise WeightsError(f"{path}: tensor {name} is missing")
                if found[name][0] != shape:
                    raise WeightsError(f"{path}: tensor {name} has shape {found[name][0]}, expected {shape}")
                if found[name][1] != dtype:
                    raise WeightsError(f"{path}: tensor {name} is {found[name][1]}, expected {dtype}")


def stream_checkpoint(ckpt_dir, trains, tensors, optimizer):
    """Read a checkpoint (checked by check_checkpoint) into the views {name: view} of
    what trains (`tensors`) and {prefix: {name: view}} of optimizer: each tensor's
    bytes go from the file straight into its view, with no copy in between and no
    mapping of the file (mapped pages would count as the coordinator's memory), so
    loading needs nothing beside the arenas."""
    for file, views_of in ((trains.checkpoint_file()[0], {"": trains.file_views(tensors)}),
                           ("optimizer.safetensors", optimizer)):
        path = os.path.join(ckpt_dir, file)
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
            for prefix, views in views_of.items():
                for name, view in views.items():
                    begin, end = header[prefix + name]["data_offsets"]
                    target = memoryview(view).cast("B")
                    f.seek(8 + header_size + begin)
                    if end - begin != target.nbytes or f.readinto(target) != target.nbytes:
                        raise WeightsError(f"{path}: tensor {prefix + name} is truncated")
