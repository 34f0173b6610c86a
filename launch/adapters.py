"""The coordinator's side of a LoRA run (--lora-rank, or --init-from a peft
adapter): which base it adapts, where its adapters start, and filling the arenas.
The frozen base goes into the arenas one tensor at a time (its bf16 copy written
here, since with bf16 its matrices are held only as that copy); the adapters
start from the checkpoint on --resume, else from the peft adapter given to
--init-from, else peft's initialisation from the run's seed."""
import dataclasses
import os

import numpy as np

from trainer.base import adapter_dir, open_base, read_base_record, recorded_base
from trainer.checkpoint import check_checkpoint, checkpoint_config, stream_checkpoint
from trainer.errors import ConfigError
from trainer.lora import check_adapters, init_adapters, lora_of, merged, trainable_count
from trainer.models import param_shapes, preset_config
from trainer.peft import read_peft
from trainer.weights import read_hf_config


def adopt_peft(s, directory):
    """--init-from a peft adapter `directory` (or a LoRA run's latest checkpoint): the run
    takes the adapter's LoRA settings (a different --lora-rank is bad input) ->
    (settings, base source, adapter tensors)."""
    lora, base, tensors = read_peft(directory)
    if s.lora_rank and s.lora_rank != lora.rank:
        raise ConfigError(f"--lora-rank {s.lora_rank} but the adapter {s.init_from} has rank {lora.rank}")
    s = dataclasses.replace(s, lora_rank=lora.rank, lora_alpha=lora.alpha, lora_targets=",".join(lora.targets),
                            lora_dropout=s.lora_dropout if s.lora_dropout is not None else lora.dropout)
    return s, base, tensors


def lora_model(s, ckpt, state):
    """-> (settings, GPTConfig, Base, adapter tensors or None) of a LoRA run: on
    --resume the base its checkpoint names (refused if it changed), else
    --init-from's (or the family's initialisation of --model)."""
    tensors = None
    if ckpt is not None:
        record = state.get("base") or {}
        cfg = check_checkpoint(ckpt, s.optim, lora_of(s, checkpoint_config(ckpt).family))
        base = recorded_base(record, cfg, s.seed)
        if base.path:
            base.check(record, ckpt)  # the init's digest is checked once its tensors are made
        return s, cfg, base, None
    source, record = s.init_from, None
    adapter = adapter_dir(source) if source else None
    if adapter:
        s, source, tensors = adopt_peft(s, adapter)
        record = read_base_record(adapter)  # a coregpt LoRA checkpoint names its base exactly
    if record:
        base = recorded_base(record, read_hf_config(os.path.join(adapter, "config.json")))
    elif source:
        base = open_base(source)
    else:
        overrides = dict(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd, block_size=s.block_size)
        base = open_base(None, preset_config(s.model, overrides), s.seed)
    if tensors is not None:
        check_adapters(base.cfg, lora_of(s, base.cfg.family), tensors, s.init_from)
    return s, base.cfg, base, tensors


def load_lora(run, pool):
    """Fill the arenas of a LoRA run: base (fp32 where it is kept, and its bf16 copy),
    then the adapters and, on --resume, their optimizer state."""
    s, lora = run.settings, lora_of(run.settings, run.cfg.family)
    fp32 = pool.base.views(pool.params.array)
    low = pool.layout.views(pool.low.array) if pool.low else None
    for name, tensor in run.base.tensors():
        if name in fp32:
            fp32[name][...] = tensor
        if low is not None:
            run.engine.to_low(low[name], tensor)
    adapters = pool.trained()
    if run.ckpt is not None:
        if run.base.path is None:
            run.base.check(run.state.get("base") or {}, run.ckpt)
        stream_checkpoint(run.ckpt, run.cfg, adapters, pool.optimizer_views(), lora)
    elif run.tensors is not None:
        for name, view in adapters.items():
            view[...] = run.tensors[name]
    else:
        init_adapters(run.cfg, lora, adapters, s.seed)


def sampling_weights(run, pool):
    """-> a function giving the merged weights of a LoRA run, to sample from."""
    lora = lora_of(run.settings, run.cfg.family)
    def weights():
        base = dict(pool.base.views(pool.params.array))
        if pool.low:  # the matrices held only as their bf16 copy
            low = pool.layout.views(pool.low.array)
            base.update({name: low[name].astype("float32") for name in low if name not in base})
        return merged(run.cfg, lora, base, pool.trained())
    return weights


def parameter_counts(cfg, lora):
    """peft's print_trainable_parameters line (all params: the base's and the adapters')."""
    trainable = trainable_count(cfg, lora)
    everything = trainable + sum(int(np.prod(shape)) for _, shape in param_shapes(cfg))
    return (f"trainable params: {trainable:,} || all params: {everything:,} || "
            f"trainable%: {100 * trainable / everything:.4f}")
