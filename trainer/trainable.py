"""What trains: every parameter (`Full`, here), or LoRA adapters beside frozen
weights (trainer.lora_training.LoraTraining).  Chosen once, at setup (`chosen`, or `of_record`
in a worker); the pool, the workers, the strategies, the model, the activation
arena, checkpoints and the memory plan ask the one chosen and never branch on
which it is.

A what-trains component says
  - its arenas: the fp32 weights (`weight_arenas`), the bf16 copies of what it adds
    (`low_arenas`), which of them trains and is updated by the optimizer
    (`trained_arena`, `low_trained_arena`), and the layouts: `base_layout` (of the
    fp32 weights arena), `layout` (what gradients and the optimizer cover);
  - what it adds to the model: activations (`activation_shapes`; of them LOW_COPIES,
    LOW_ONLY and GRADIENTS as the family's activation spec says its own),
    the weight-gradient tasks (`weight_tasks`) and the hooks the model calls at each
    matrix site (`sites`), the embedding rows the lm head's gradient covers
    (`head_rows`);
  - checkpoint files (`checkpoint_file`, `file_views`, `save`), the header line
    (`describe`), the memory a worker needs beside its activations (`private_bytes`).
"""
from typing import NamedTuple

from trainer import models


class Weights(NamedTuple):
    """A model's views of its weights: `params` fp32; `trains` the what-trains
    component; `low` their bf16 copies (what matmuls read in bf16, else None); and
    what trains adds (LoRA's adapters) fp32 and bf16."""
    params: dict
    trains: object
    low: dict | None = None
    trained: dict | None = None
    trained_low: dict | None = None


class NoSites:
    """The model's matrix sites when every parameter trains: nothing beside them;
    each weight-gradient task is one of the model's own."""

    def __init__(self, model):
        self.model = model

    def start(self, training):
        pass

    def forward(self, l, target, out):
        pass

    def backward(self, l, target, dx, dout):
        return False  # wrote nothing

    def weights_backward(self, task, grads):
        self.model.matrix_weights_backward(task, grads)


class Full:
    """Every parameter trains: one fp32 arena of them, the optimizer over all of it."""
    name = "full"
    trained_arena, low_trained_arena = "params", "bf16 weights"

    def __init__(self, cfg):
        self.cfg = cfg
        self.base = self.layout = models.param_layout(cfg)

    def record(self):
        """What a worker rebuilds it from (of_record)."""
        return {"kind": self.name}

    def base_layout(self, low):
        return self.base

    def weight_arenas(self, low):
        return [("params", self.base.size, "float32")]

    def low_arenas(self, engine):
        return []

    def describe(self):
        """The header's line on what trains (None: nothing to add)."""
        return None

    def activation_shapes(self, B, T, training):
        return []

    LOW_COPIES = LOW_ONLY = GRADIENTS = ()

    def weight_tasks(self, vocab_parts=1, matrix_parts=1):
        return models.family_of(self.cfg).weight_tasks(self.cfg, vocab_parts, matrix_parts)

    def head_rows(self):
        """The embedding rows whose gradient the lm head writes (all: it is tied)."""
        return [(0, self.cfg.vocab_size)]

    def sites(self, model, weights):
        return NoSites(model)

    def private_bytes(self, pool_rows, seq_len):
        return 0

    def checkpoint_file(self):
        """(file, {tensor name in the file: (shape, dtype)}) of a checkpoint's weights."""
        return "model.safetensors", {name: (shape, "F32") for name, shape in models.param_shapes(self.cfg)}

    def file_views(self, views):
        """{name in the checkpoint file: view} of the trained views."""
        return views

    def save(self, directory, tensors, state):
        from trainer.weights import save_model
        save_model(directory, self.cfg, tensors)


def chosen(cfg, lora=None):
    """The what-trains of a run: LoRA's adapters when `lora` (trainer.lora.Lora), else every parameter."""
    from trainer.lora_training import LoraTraining
    return Full(cfg) if lora is None else LoraTraining(cfg, lora)


def of_record(cfg, record):
    """A worker's copy of the coordinator's choice (record())."""
    from trainer.lora import Lora
    return chosen(cfg, Lora(**record["lora"]) if "lora" in record else None)


def kind_of(settings):
    """Which what-trains the run's settings ask for: "lora" with --lora-rank (a
    resumed LoRA run's settings hold it) or --init-from a peft adapter, else "full"."""
    from trainer.base import adapter_dir
    adapter = settings.init_from and not settings.resume and adapter_dir(settings.init_from)
    return "lora" if settings.lora_rank or adapter else "full"
