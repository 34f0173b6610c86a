"""Model weights in and out: Hugging Face safetensors (with config.json), llm.c .bin
(trainer/llmc.py), GGUF in (trainer/gguf_file.py), coregpt checkpoints.

Everything is read as plain arrays (safetensors, raw binary, JSON); nothing is
ever unpickled.  Loaders return (config, {name: float32 array}), the names and the
config the model family's (trainer/models).
"""
import json
import logging
import os
import socket

import numpy as np

from trainer import gguf_file, models
from trainer.errors import WeightsError
from trainer.files import plain_mode
from trainer.llmc import load_llmc

# .safetensors read straight from the file: F32 as it is, BF16 and F16 (how Hugging Face
# ships most Llama-family models) widened to float32, exactly
STORED = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16}


def safetensors_header(path):
    """-> (byte offset of the data, {name: entry}) of a .safetensors file."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
    except (OSError, ValueError, MemoryError, AttributeError) as e:
        raise WeightsError(f"{path} is not a readable .safetensors file ({e})") from None
    return 8 + size, header


def tensor_entries(path):
    """-> {name: (file, first byte, end byte, dtype, shape)} of a .safetensors file, or
    of every shard a model.safetensors.index.json names."""
    entries = {}
    for file in shard_files(path) if path.endswith(".index.json") else [path]:
        start, header = safetensors_header(file)
        try:
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                entries[name] = (file, start + begin, start + end, entry["dtype"], tuple(entry["shape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{file} is not a readable .safetensors file (entry {e})") from None
    return entries


def read_entry(name, entry, out=None):
    """One tensor (a tensor_entries entry) -> float32 array (into out, when given)."""
    file, begin, end, dtype, shape = entry
    if dtype not in STORED:
        raise WeightsError(f"{file}: tensor {name} is {dtype}; coregpt reads F32, BF16 and F16")
    count = int(np.prod(shape))
    out = np.empty(count, dtype=np.float32) if out is None else out.reshape(-1)
    raw = out if dtype == "F32" else np.empty(count, dtype=STORED[dtype])
    with open(file, "rb") as f:
        f.seek(begin)
        if end - begin != raw.nbytes or f.readinto(memoryview(raw).cast("B")) != raw.nbytes:
            raise WeightsError(f"{file}: tensor {name} is truncated")
    if dtype == "BF16":  # the top half of a float32's bits, widened in place
        bits = out.view(np.uint32)
        bits[...] = raw
        bits <<= 16
    elif dtype == "F16":
        out[...] = raw
    return out.reshape(shape)


def read_safetensors(path):
    """Every tensor of a .safetensors file (or a sharded model's index) -> {name: float32 array}."""
    return {name: read_entry(name, entry) for name, entry in tensor_entries(path).items()}


def read_hf_config(path):
    """An HF config.json -> the config of its model family."""
    with open(path) as f:
        try:
            hf = json.load(f)
        except ValueError as e:
            raise WeightsError(f"{path}: not a model config ({e})") from None
    try:
        family = models.family(hf.get("model_type", models.DEFAULT) if isinstance(hf, dict) else models.DEFAULT)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    try:
        return family.Config.from_hf(hf)
    except WeightsError as e:  # what the family refuses, by name
        raise WeightsError(f"{path}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{path}: not a {family.MODEL_TYPE} config ({e})") from None


def shard_files(index):
    """model.safetensors.index.json -> the shard files its weight_map names."""
    try:
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{index}: not a safetensors index ({e})") from None
    for shard in shards:
        if not os.path.isfile(os.path.join(os.path.dirname(index), shard)):
            raise WeightsError(f"{index} names {shard}, which is not beside it")
    return [os.path.join(os.path.dirname(index), shard) for shard in shards]


def load_safetensors(path, hf_config=None):
    """-> (config, {name: array}): the config from hf_config, else inferred from the
    tensors' shapes; the names as the family names them (tensor_name).  path: one
    .safetensors, or the index of a sharded model."""
    raw = read_safetensors(path)
    if hf_config is not None:
        cfg = read_hf_config(hf_config)
    else:
        cfg = models.infer_config({name: tuple(value.shape) for name, value in raw.items()}, path)
    named = ((cfg.family.tensor_name(name), value) for name, value in raw.items())
    return cfg, {name: value for name, value in named if name is not None}


def latest_checkpoint(run_dir, pointer="latest"):
    """The checkpoint directory RUN/checkpoints/latest (or another pointer file) names, or None."""
    latest = os.path.join(run_dir, "checkpoints", pointer)
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        path = os.path.join(run_dir, "checkpoints", f.read().strip())
    return path if os.path.isdir(path) else None


def pointed(source):
    """RUN/checkpoints/latest or RUN/checkpoints/best (a file naming a checkpoint) ->
    the checkpoint directory it names; anything else is itself."""
    folder, name = os.path.split(os.path.normpath(source))
    if name in ("latest", "best") and os.path.basename(folder) == "checkpoints" and os.path.isfile(source):
        return latest_checkpoint(os.path.dirname(folder), name) or source
    return source


def source_family(source):
    """The model family of what --init-from SOURCE names, from the model_type of its
    config.json (a directory's, or the one beside a file; llm.c's .bin is GPT-2's);
    None where that cannot be told yet (loading it will say why)."""
    source = pointed(str(source))
    if source.endswith(".bin"):
        return models.family(models.DEFAULT)
    if gguf_file.is_gguf(source) and os.path.isfile(source):
        try:
            return models.family(gguf_file.read_config(source).model_type)
        except WeightsError:
            return None
    directory = checkpoint_dir(source) if os.path.isdir(source) else os.path.dirname(source)
    try:
        if os.path.isfile(os.path.join(directory, "config.json")):
            with open(os.path.join(directory, "config.json")) as f:
                return models.family(json.load(f).get("model_type", models.DEFAULT))
        with open(os.path.join(directory, "adapter_config.json")) as f:  # a peft adapter: its base's
            base = json.load(f)["base_model_name_or_path"]
        return source_family(base) if os.path.exists(base) else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError, WeightsError):
        return None


def checkpoint_dir(path):
    """A coregpt run directory -> its latest checkpoint directory; else path itself."""
    return latest_checkpoint(path) or path


def load_weights(source):
    """--init-from: HF directory or .safetensors, llm.c .bin, a GGUF file, coregpt
    checkpoint or run."""
    path, config = weights_files(source)
    if path.endswith(".bin"):
        return load_llmc(path)
    if gguf_file.is_gguf(path):
        return gguf_file.load(path)
    return load_safetensors(path, config)


def weights_files(source):
    """--init-from SOURCE -> (the weights file it names, its config.json or None):
    gpt2…gpt2-xl from the hub (cached or downloaded), an HF or coregpt directory (a
    run: its latest checkpoint; RUN/checkpoints/best), a .safetensors, an llm.c .bin
    or a GGUF file."""
    source = pointed(source)
    if source in models.hub_names() and not os.path.exists(source):
        return download_hf(source)
    if not os.path.exists(source):
        raise WeightsError(f"--init-from {source} does not exist")
    if os.path.isdir(source):
        directory = checkpoint_dir(source)
        model = os.path.join(directory, "model.safetensors")
        if not os.path.isfile(model) and os.path.isfile(model + ".index.json"):
            model += ".index.json"  # sharded: transformers' name for the shards' index
        if not os.path.isfile(model):
            pickled = " (only pytorch_model.bin, a pickle coregpt never loads)" if os.path.isfile(
                os.path.join(directory, "pytorch_model.bin")) else ""
            raise WeightsError(f"{source} holds no model.safetensors{pickled}")
        config = os.path.join(directory, "config.json")
        return model, config if os.path.isfile(config) else None
    refuse_pickle(source)
    if source.endswith(".bin") or gguf_file.is_gguf(source):  # each holds its own config
        return source, None
    config = os.path.join(os.path.dirname(source), "config.json")
    return source, config if os.path.isfile(config) else None


def refuse_pickle(path):
    """PyTorch .bin/.pt files are pickles (zip or raw), which can run code when loaded."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        raise WeightsError(f"{path} is a pickle (PyTorch) file; coregpt never unpickles. "
                           f"Convert it to .safetensors or pass an llm.c .bin")


def download_hf(name):
    """gpt2 … gpt2-xl from the Hugging Face hub: a cached copy if there is one,
    else a download, failing at once (not after retries) when offline."""
    advice = "pass a local path: a GPT-2 directory, .safetensors or llm.c .bin"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise WeightsError(f"--init-from {name} needs huggingface_hub to download; {advice}") from None
    files = ("model.safetensors", "config.json")
    try:
        return tuple(hf_hub_download(name, f, local_files_only=True) for f in files)
    except Exception:  # noqa: BLE001 - not cached: try the network below
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        if offline:
            raise OSError("HF_HUB_OFFLINE is set")
        socket.getaddrinfo("huggingface.co", 443)
    except OSError as e:
        raise WeightsError(f"cannot download '{name}': no network ({e}); {advice}") from None
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        return tuple(hf_hub_download(name, f) for f in files)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"cannot download '{name}' ({type(e).__name__}); {advice}") from None


def load_checked(source):
    """load_weights, then check_tensors: every tensor present with its shape."""
    cfg, tensors = load_weights(source)
    check_tensors(cfg, tensors, source)
    return cfg, tensors


def check_tensors(cfg, tensors, source):
    """Every tensor present with the shape the config implies; name the first that is not."""
    for name, shape in models.param_shapes(cfg):
        if name not in tensors:
            raise WeightsError(f"{source}: tensor {name} is missing")
        if tuple(tensors[name].shape) != shape:
            raise WeightsError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                               f"expected {shape}")


def save_model(directory, cfg, params):
    """model.safetensors (the family's HF names) + config.json into an existing directory."""
    from safetensors.numpy import save_file
    path = os.path.join(directory, "model.safetensors")
    save_file(dict(params), path, metadata={"format": "pt"})
    plain_mode(path)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
