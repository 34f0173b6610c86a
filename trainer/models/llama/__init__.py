"""The Llama family (Hugging Face model_type "llama" and "qwen2"): everything that is
Llama's.  config.py: presets, parameter shapes and names, refusals of what is not
built, initialisation, the names in HF and peft files, the LoRA target table, the
activation spec; model.py: the blocks' forward and backward, the head (tied or its
own), the ordered weight-gradient tasks."""
from trainer.models.llama.config import (  # noqa: F401
    BUILTIN_TOKENIZER, EMBEDDING, EXPORTS, FAN_IN_FAN_OUT, HUB_NAMES, LORA_ALIASES, LORA_CHOICES, LORA_DEFAULT,
    LORA_TARGETS, MODEL_TYPE,
    MODEL_TYPES, PEFT_PREFIX, PRESETS, LlamaConfig, block_matrix, block_tensor, infer_config, init_params,
    init_tensors, lora_delta, lora_fans, param_shapes, preset, target_weight, tensor_name)
from trainer.models.llama.model import Llama as Model, weight_tasks  # noqa: F401

Config = LlamaConfig
