"""LoRA's what-trains component (the interface is trainer/trainable.py's): the
adapters in their own arena train, beside the frozen base; their layout, math and
model sites are trainer/lora.py's, their checkpoint files peft's (trainer/peft.py)."""
import json
import os

from trainer.lora import LoraSites, adapted, adapter_layout, adapter_shapes, base_layout, parameter_counts
from trainer.model import WeightTask
from trainer.peft import peft_name, save_peft


class LoraTraining:
    """The adapters in their own arena train; the base is frozen, held in fp32 where
    matmuls do not read it only as its bf16 copy (base_layout)."""
    name = "lora"
    trained_arena, low_trained_arena = "adapters", "bf16 adapters"

    def __init__(self, cfg, lora):
        self.cfg, self.lora = cfg, lora
        self.layout = adapter_layout(cfg, lora)
        # u = s·x Aᵀ and its gradient du: only matmuls read them
        self.LOW_COPIES = self.LOW_ONLY = tuple(kind + t for kind in ("u.", "du.") for t in lora.targets)
        self.GRADIENTS = tuple("du." + t for t in lora.targets)  # one layer's room

    def record(self):
        return {"kind": self.name, "lora": self.lora._asdict()}

    def base_layout(self, low):
        return base_layout(self.cfg, self.lora, low)

    def weight_arenas(self, low):
        return [("params", self.base_layout(low).size, "float32"), ("adapters", self.layout.size, "float32")]

    def low_arenas(self, engine):
        return [("bf16 adapters", self.layout.size, engine.weight_dtype)]

    def describe(self):
        lora = self.lora
        return (f"LoRA r={lora.rank}, alpha={lora.alpha:g} on {', '.join(lora.targets)}"
                + (f", dropout {lora.dropout:g}" if lora.dropout else "") + f"; {parameter_counts(self.cfg, lora)}")

    def activation_shapes(self, B, T, training):
        """Each target's u = (alpha/r) x Aᵀ (N, r) and, training, its gradient du."""
        L, N, r = self.cfg.n_layer, B * T, self.lora.rank
        return [shape for target in self.lora.targets for shape in
                [("u." + target, (L, N, r), 1)] + ([("du." + target, (L, N, r), 1)] if training else [])]

    def weight_tasks(self, vocab_parts=1, matrix_parts=1):
        """One task per layer and target, writing its A and B (they are small: never cut)."""
        cfg, lora = self.cfg, self.lora
        return [WeightTask(t, l, 0, lora.rank, sum(cfg.family.lora_fans(cfg, t)) * lora.rank,
                           tuple((f"{adapted(cfg, l, t)}.lora_{k}", 0, None) for k in "AB"))
                for l in range(cfg.n_layer) for t in lora.targets]

    def head_rows(self):
        return []  # the embedding is frozen

    def sites(self, model, weights):
        return LoraSites(model, self.lora, weights.trained if weights.trained_low is None else weights.trained_low)

    def private_bytes(self, pool_rows, seq_len):
        """A worker's dropout masks and dropped inputs (LoraSites' buffers)."""
        return 4 * 4 * pool_rows * seq_len * 4 * self.cfg.n_embd if self.lora.dropout else 0

    def checkpoint_file(self):
        return "adapter_model.safetensors", {peft_name(self.cfg, name): (shape, "F32")
                                             for name, shape in adapter_shapes(self.cfg, self.lora)}

    def file_views(self, views):
        return {peft_name(self.cfg, name): view for name, view in views.items()}

    def save(self, directory, tensors, state):
        """The adapter as peft writes it, naming its base (state["base"]), and config.json."""
        base = state["base"].get("path") or f"{self.cfg.model_type} init, seed {state['base']['seed']}"
        if base.endswith("/model.safetensors"):
            base = os.path.dirname(base)  # the directory from_pretrained takes
        save_peft(directory, self.cfg, self.lora, tensors, base)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.cfg.to_hf(), f, indent=2)
