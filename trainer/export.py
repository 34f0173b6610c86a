"""Export weights: a Hugging Face directory, llm.c's version-3 fp32 .bin (trainer/llmc.py),
or a GGUF file (trainer/gguf_export.py).
Values are copied exactly; every output is written under a temporary name and
renamed, and an existing output is never overwritten."""
import os
import shutil

import numpy as np

from trainer.llmc import export_llmc
from trainer.tokenizer import known_tokenizer
from trainer.weights import WeightsError, save_model


def export_hf(directory, cfg, tensors, tokenizer=None):
    """model.safetensors + config.json + the tokenizer's files (GPT-2's vocab.json and
    merges.txt, a Llama-family model's tokenizer.json; trainer/tokenizer.py)."""
    tmp = f"{directory}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_model(tmp, cfg, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()})
        for name, source in (tokenizer.files() if tokenizer else {}).items():
            shutil.copyfile(source, os.path.join(tmp, name))
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


FORMATS = ("hf", "llmc", "gguf")


def export_peft(adapted, out):
    """A LoRA adapter (trainer.base.Adapted) as peft's directory: adapter_model.safetensors
    + adapter_config.json naming its base (the path of the file it was trained on, or,
    for a base of the family's initialisation, the HF export written beside it in base/)."""
    check_out(out)
    from trainer.peft import save_peft
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        base = adapted.base.path
        if base is None:  # nothing on disk to name: write the base too
            export_hf(os.path.join(tmp, "base"), adapted.cfg, adapted.base_tensors, known_tokenizer(adapted.cfg))
            base = os.path.join(os.path.abspath(out), "base")
        elif base.endswith("model.safetensors"):
            base = os.path.dirname(base)  # the directory from_pretrained takes
        save_peft(tmp, adapted.cfg, adapted.lora, adapted.adapters, base)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export(cfg, tensors, fmt, out, tokenizer=None, kind="f32"):
    """fmt: one of FORMATS; tokenizer: what an hf or gguf export writes with the
    weights; kind: how gguf stores the matrices."""
    if fmt not in cfg.family.EXPORTS:
        raise WeightsError(f"--format {fmt} holds GPT-2 models only; a {cfg.model_type} model exports as "
                           f"{', '.join(cfg.family.EXPORTS)} (or peft, a LoRA run's adapter)")
    check_out(out)
    if fmt == "hf":
        export_hf(out, cfg, tensors, tokenizer)
    elif fmt == "gguf":
        from trainer.gguf_export import export_gguf  # needs the gguf extra
        export_gguf(out, cfg, tensors, tokenizer, kind)
    else:
        export_llmc(out, cfg, tensors)
    return out


def check_out(out):
    if os.path.exists(out):
        raise WeightsError(f"--out {out} already exists; choose a new path")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise WeightsError(f"--out {out}: directory {parent} does not exist")
