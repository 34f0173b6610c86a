"""Model weights in and out: Hugging Face GPT-2 safetensors, llm.c .bin, coregpt checkpoints.

Everything is read as plain arrays (safetensors, raw binary, JSON); nothing is
ever unpickled.  Loaders return (GPTConfig, {hf_name: float32 array}).
"""
import json
import logging
import os
import socket

import numpy as np

from trainer.errors import WeightsError
from trainer.params import GPTConfig, PRESETS, param_shapes

LLMC_MAGIC = 20240326
HF_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def llmc_order(cfg, padded_vocab):
    """llm.c's tensors in file order: (HF name, or per-layer suffix if layered;
    llm.c shape; stored (out, in), i.e. transposed from HF's Conv1D; layered)."""
    C, L = cfg.n_embd, cfg.n_layer
    per_layer = [("ln_1.weight", (C,), False), ("ln_1.bias", (C,), False),
                 ("attn.c_attn.weight", (3 * C, C), True), ("attn.c_attn.bias", (3 * C,), False),
                 ("attn.c_proj.weight", (C, C), True), ("attn.c_proj.bias", (C,), False),
                 ("ln_2.weight", (C,), False), ("ln_2.bias", (C,), False),
                 ("mlp.c_fc.weight", (4 * C, C), True), ("mlp.c_fc.bias", (4 * C,), False),
                 ("mlp.c_proj.weight", (C, 4 * C), True), ("mlp.c_proj.bias", (C,), False)]
    return ([("wte.weight", (padded_vocab, C), False, False),
             ("wpe.weight", (cfg.block_size, C), False, False)]
            + [(name, (L,) + shape, t, True) for name, shape, t in per_layer]
            + [("ln_f.weight", (C,), False, False), ("ln_f.bias", (C,), False, False)])


def load_llmc(path):
    """llm.c checkpoint: version 3 (fp32) or 5 (bf16), header magic 20240326."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    if header.size < 256 or header[0] != LLMC_MAGIC:
        raise WeightsError(f"{path} is not an llm.c checkpoint (bad magic)")
    version = int(header[1])
    if version not in (3, 5):
        raise WeightsError(f"{path}: unknown llm.c checkpoint version {version} (coregpt reads 3 and 5)")
    maxT, V, L, NH, C, Vp = (int(x) for x in header[2:8])
    try:
        cfg = GPTConfig(n_layer=L, n_head=NH, n_embd=C, block_size=maxT, vocab_size=V).check()
    except ValueError as e:
        raise WeightsError(f"{path}: bad header ({e})") from None
    order = llmc_order(cfg, Vp)
    need = sum(int(np.prod(shape)) for _, shape, _, _ in order)
    raw = np.fromfile(path, dtype=np.float32 if version == 3 else np.uint16, offset=1024)
    if raw.size < need:
        raise WeightsError(f"{path} is truncated: {raw.size} values, the header implies {need}")
    if version == 5:  # bf16 is the top half of a float32
        raw = (raw[:need].astype(np.uint32) << 16).view(np.float32)
    tensors, offset = {}, 0
    for name, shape, transposed, layered in order:
        block = raw[offset:offset + int(np.prod(shape))].reshape(shape)
        offset += block.size
        for i, tensor in (enumerate(block) if layered else [(None, block)]):
            key = name if i is None else f"h.{i}.{name}"
            tensors[key] = np.ascontiguousarray(tensor.T if transposed else tensor)
    tensors["wte.weight"] = tensors["wte.weight"][:V]
    return cfg, tensors


def read_safetensors(path):
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise WeightsError(f"{path} is not a readable .safetensors file ({e})") from None
    except (TypeError, ValueError) as e:  # e.g. bf16, which numpy cannot hold
        raise WeightsError(f"{path}: {e}") from None


def infer_config(shapes, path):
    """A bare .safetensors: the config from its tensors' {name: shape}; n_head = n_embd / 64."""
    if "wte.weight" not in shapes or "wpe.weight" not in shapes:
        raise WeightsError(f"{path} has no tensor wte.weight / wpe.weight: not GPT-2 weights")
    V, C = shapes["wte.weight"]
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("h.")}
    return GPTConfig(n_layer=len(layers), n_head=max(1, C // 64), n_embd=C,
                     block_size=shapes["wpe.weight"][0], vocab_size=V).check()


def read_hf_config(path):
    """An HF GPT-2 config.json -> GPTConfig."""
    with open(path) as f:
        try:
            return GPTConfig.from_hf(json.load(f))
        except (ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{path}: not a GPT-2 config ({e})") from None


def load_safetensors(path, hf_config=None):
    tensors = {}
    for name, value in read_safetensors(path).items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # causal-mask buffers, and the head tied to wte
        tensors[name] = value
    if hf_config is not None:
        cfg = read_hf_config(hf_config)
    else:
        cfg = infer_config({name: tuple(value.shape) for name, value in tensors.items()}, path)
    return cfg, tensors


def latest_checkpoint(run_dir):
    """The checkpoint directory RUN/checkpoints/latest names, or None."""
    latest = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        path = os.path.join(run_dir, "checkpoints", f.read().strip())
    return path if os.path.isdir(path) else None


def checkpoint_dir(path):
    """A coregpt run directory -> its latest checkpoint directory; else path itself."""
    return latest_checkpoint(path) or path


def load_weights(source):
    """--init-from: HF directory or .safetensors, llm.c .bin, coregpt checkpoint or run."""
    path, config = weights_files(source)
    return load_llmc(path) if path.endswith(".bin") else load_safetensors(path, config)


def weights_files(source):
    """--init-from SOURCE -> (the weights file it names, its config.json or None):
    gpt2…gpt2-xl from the hub (cached or downloaded), an HF or coregpt directory (a
    run: its latest checkpoint), a .safetensors or an llm.c .bin."""
    if source in HF_NAMES and not os.path.exists(source):
        return download_hf(source)
    if not os.path.exists(source):
        raise WeightsError(f"--init-from {source} does not exist")
    if os.path.isdir(source):
        directory = checkpoint_dir(source)
        model = os.path.join(directory, "model.safetensors")
        if not os.path.isfile(model):
            pickled = " (only pytorch_model.bin, a pickle coregpt never loads)" if os.path.isfile(
                os.path.join(directory, "pytorch_model.bin")) else ""
            raise WeightsError(f"{source} holds no model.safetensors{pickled}")
        config = os.path.join(directory, "config.json")
        return model, config if os.path.isfile(config) else None
    refuse_pickle(source)
    if source.endswith(".bin"):
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
    for name, shape in param_shapes(cfg):
        if name not in tensors:
            raise WeightsError(f"{source}: tensor {name} is missing")
        if tuple(tensors[name].shape) != shape:
            raise WeightsError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                               f"expected {shape}")


def save_model(directory, cfg, params):
    """model.safetensors (HF GPT-2 names) + config.json into an existing directory."""
    from safetensors.numpy import save_file
    path = os.path.join(directory, "model.safetensors")
    save_file(dict(params), path, metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)


def preset_config(name, overrides, vocab_size):
    if name not in PRESETS:
        raise WeightsError(f"unknown --model {name!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name], vocab_size=vocab_size)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return GPTConfig(**values).check()
    except ValueError as e:
        raise WeightsError(str(e)) from None
