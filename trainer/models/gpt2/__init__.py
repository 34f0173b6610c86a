"""The GPT-2 family (Hugging Face model_type "gpt2"): everything that is GPT-2's.
config.py: presets, parameter shapes and names, initialisation, the names in HF and
peft files, the LoRA target table, the activation spec, the tokenizer; model.py: the blocks'
forward and backward (one forward for training, evaluation and KV-cached sampling),
the tied head, the ordered weight-gradient tasks."""
from trainer.models.gpt2.config import (  # noqa: F401
    BUILTIN_TOKENIZER, EMBEDDING, EOT, EXPORTS, FAN_IN_FAN_OUT, HUB_NAMES, LORA_ALIASES, LORA_CHOICES, LORA_DEFAULT,
    LORA_TARGETS, MODEL_TYPE,
    PEFT_PREFIX, PRESETS, VOCAB, GPTConfig, block_matrix, block_tensor, infer_config, init_params, init_tensors,
    lora_delta, lora_fans, param_shapes, preset, target_weight, tensor_name, tokenizer,
    tokenizer_files)
from trainer.models.gpt2.model import GPT as Model, weight_tasks  # noqa: F401

Config = GPTConfig
