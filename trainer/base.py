"""The frozen base of a LoRA run: where its weights come from, their sha256, and
reading them tensor by tensor into the arenas.

A LoRA checkpoint does not copy the base (GPT-2 XL is 6.2 GB; its adapter a few
MB): it names it, as {"path": file, "sha256": of the file} for weights read from
a file, or {"seed": s, "sha256": of the tensors} for the model family's initialisation, and
--resume, sample and export read it again and refuse a base that changed.
A .safetensors base is read one tensor at a time into a buffer of the largest
tensor, so the coordinator never holds the whole model (the memory plan says so).
"""
import hashlib
import json
import os

import numpy as np

from trainer import gguf_file, models
from trainer.errors import WeightsError
from trainer.weights import (checkpoint_dir, load_checked, pointed, read_entry, read_hf_config, tensor_entries,
                             weights_files)

HASH_CHUNK = 1 << 24


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Base:
    """The frozen weights: `tensors()` yields (name, float32 array) in layout order,
    each array valid until the next is asked for; `record` is what a checkpoint
    keeps of it."""

    def __init__(self, cfg, path=None, seed=None):
        self.cfg, self.path, self.seed = cfg, path, seed
        self.sha256 = file_sha256(path) if path else None  # of the init: once its tensors are made

    @property
    def record(self):
        return {"path": self.path, "sha256": self.sha256} if self.path else {"seed": self.seed, "sha256": self.sha256}

    def tensors(self):
        if self.path is None:
            digest = hashlib.sha256()
            for name, tensor in models.family_of(self.cfg).init_tensors(self.cfg, self.seed):
                digest.update(tensor.data)
                yield name, tensor
            self.sha256 = digest.hexdigest()
        elif self.path.endswith(".safetensors"):
            yield from stream_safetensors(self.path, self.cfg)
        elif gguf_file.is_gguf(self.path):  # dequantized one tensor at a time
            yield from gguf_file.tensors(self.path, self.cfg)
        else:  # an llm.c .bin: read whole (converting its layout needs every layer's block)
            _, tensors = load_checked(self.path)
            yield from ((name, np.ascontiguousarray(tensors[name], dtype=np.float32))
                        for name, _ in models.param_shapes(self.cfg))

    def check(self, record, where):
        """Refuse a base whose digest differs from the checkpoint's `record`."""
        if self.sha256 is None:  # an init whose tensors were not made yet
            for _ in self.tensors():
                pass
        if self.sha256 != record.get("sha256"):
            raise WeightsError(f"{where}: the base weights changed since it was written (sha256 "
                               f"{self.sha256[:12]}… here, {str(record.get('sha256'))[:12]}… recorded); "
                               f"restore the base it was trained on")


def open_base(source, cfg=None, seed=None):
    """--init-from SOURCE as a LoRA base (a HF directory or .safetensors, an llm.c
    .bin, a GGUF file, a coregpt run or checkpoint, or gpt2…gpt2-xl from the hub);
    None: the family's initialisation of `cfg` from `seed`.  -> Base."""
    if source is None:
        return Base(cfg, seed=seed)
    path, config = weights_files(source)
    path = os.path.abspath(path)
    if path.endswith(".bin"):
        cfg = load_checked(path)[0]
    else:
        cfg = gguf_file.read_config(path) if gguf_file.is_gguf(path) else read_config(path, config)
    return Base(cfg, path=path)


def read_config(path, config):
    """The config of a .safetensors base: its config.json, else its tensors' shapes."""
    if config is not None:
        return read_hf_config(config)
    return models.infer_config({name: entry[4] for name, entry in tensor_entries(path).items()}, path)


def stream_safetensors(path, cfg):
    """Every parameter of cfg from a .safetensors file (or a sharded model's index),
    one tensor at a time, as float32."""
    raw = tensor_entries(path)
    named = ((cfg.family.tensor_name(name), entry) for name, entry in raw.items())
    header = {name: entry for name, entry in named if name is not None}
    shapes = models.param_shapes(cfg)
    for name, shape in shapes:
        entry = header.get(name)
        if entry is None:
            raise WeightsError(f"{path}: tensor {name} is missing")
        if entry[4] != shape:
            raise WeightsError(f"{path}: tensor {name} has shape {entry[4]}, expected {shape}")
    buffer = np.empty(max(int(np.prod(shape)) for _, shape in shapes), dtype=np.float32)
    for name, shape in shapes:
        yield name, read_entry(name, header[name], buffer[:int(np.prod(shape))])


class Adapted:
    """A LoRA adapter directory (a coregpt LoRA checkpoint or run, or a peft adapter)
    with its base: `merged()` -> {name: array} of W + (alpha/r) A^T B^T."""

    def __init__(self, directory):
        from trainer.lora import check_adapters
        from trainer.peft import read_peft
        self.directory = directory
        self.lora, source, self.adapters = read_peft(directory)
        record = read_base_record(directory)
        if record is not None:  # a coregpt checkpoint: its base by path or seed, checked
            self.base = recorded_base(record, read_hf_config(os.path.join(directory, "config.json")))
            self.base_tensors = {name: tensor.copy() for name, tensor in self.base.tensors()}
            self.base.check(record, directory)
        else:
            self.base = open_base(source)
            self.base_tensors = {name: tensor.copy() for name, tensor in self.base.tensors()}
        self.cfg = self.base.cfg
        check_adapters(self.cfg, self.lora, self.adapters, directory)

    def merged(self):
        from trainer.lora import merged
        return merged(self.cfg, self.lora, self.base_tensors, self.adapters)


def recorded_base(record, cfg, seed=None):
    """The base a LoRA checkpoint's run state `record` names: its weights file, or
    the model family's initialisation of `cfg` from the recorded seed (else `seed`)."""
    return open_base(record["path"]) if record.get("path") else Base(cfg, seed=record.get("seed", seed))


def read_base_record(directory):
    path = os.path.join(directory, "state.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f).get("base")
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable ({e})") from None


def adapter_dir(source):
    """The LoRA adapter directory `source` names (a run, a checkpoint, a peft dir), or None."""
    from trainer.peft import is_peft_dir
    source = pointed(source)
    if not os.path.isdir(source):
        return None
    directory = checkpoint_dir(source)
    return directory if is_peft_dir(directory) else None


def load_model(source):
    """What `sample` and `export` read: anything --init-from takes, or a LoRA adapter
    with its base (merged) -> (config, {name: array})."""
    directory = adapter_dir(source)
    if directory is None:
        return load_checked(source)
    adapted = Adapted(directory)
    return adapted.cfg, adapted.merged()
