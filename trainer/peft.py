"""peft's LoRA adapter files: adapter_model.safetensors (tensors named as peft names
them in the base model's family: its PEFT_PREFIX + name + .weight) and
adapter_config.json."""
import json
import os

import numpy as np

from trainer.errors import WeightsError
from trainer.files import plain_mode
from trainer.lora import Lora, parse_targets
from trainer.models import FAMILIES


def peft_name(cfg, name):
    """h.0.attn.c_attn.lora_A -> base_model.model.transformer.h.0.attn.c_attn.lora_A.weight (GPT-2's)"""
    return cfg.family.PEFT_PREFIX + name + ".weight"


def peft_config(cfg, lora, base):
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": list(lora.targets),
            "fan_in_fan_out": cfg.family.FAN_IN_FAN_OUT, "bias": "none", "base_model_name_or_path": base,
            "inference_mode": True, "init_lora_weights": True, "modules_to_save": None}


def save_peft(directory, cfg, lora, adapters, base):
    """adapter_model.safetensors + adapter_config.json into an existing directory."""
    from safetensors.numpy import save_file
    path = os.path.join(directory, "adapter_model.safetensors")
    save_file({peft_name(cfg, k): np.ascontiguousarray(v, dtype=np.float32) for k, v in adapters.items()},
              path, metadata={"format": "pt"})
    plain_mode(path)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(peft_config(cfg, lora, base), f, indent=2)


def is_peft_dir(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter_config.json"))


def family_of_names(names, path):
    """The family whose peft prefix every tensor name of an adapter file carries."""
    def odd(family):
        return next((name for name in names if not (name.startswith(family.PEFT_PREFIX) and name.endswith(".weight"))),
                    None)
    for family in FAMILIES.values():
        if odd(family) is None:
            return family
    raise WeightsError(f"{path}: unexpected tensor {odd(next(iter(FAMILIES.values())))}")


def read_peft(directory):
    """A peft LoRA adapter directory -> (Lora, base path or name, {name: array})."""
    from trainer.weights import read_safetensors
    where = os.path.join(directory, "adapter_config.json")
    try:
        with open(where) as f:
            config = json.load(f)
        if config.get("peft_type") != "LORA":
            raise WeightsError(f"{where}: peft_type {config.get('peft_type')!r}, coregpt reads LORA adapters")
        targets = config["target_modules"]
        targets = ",".join(targets if isinstance(targets, list) else [targets])
        rank, alpha, dropout = int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0))
        base = config["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{where}: not a peft LoRA config ({e})") from None
    if config.get("bias", "none") != "none" or config.get("use_dora") or config.get("modules_to_save"):
        raise WeightsError(f"{where}: coregpt reads plain LoRA adapters (bias none, no DoRA, no modules_to_save)")
    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise WeightsError(f"{directory} holds no adapter_model.safetensors")
    found = read_safetensors(path)
    family = family_of_names(found, path)
    try:
        lora = Lora(rank, alpha, parse_targets(targets, family), dropout)
    except ValueError as e:
        raise WeightsError(f"{where}: not a peft LoRA config ({e})") from None
    tensors = {name[len(family.PEFT_PREFIX):-len(".weight")]: value for name, value in found.items()}
    return lora, base, tensors
