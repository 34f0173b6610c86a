"""Where a LoRA run's weights come from (--lora-rank, or --init-from a peft
adapter): which base it adapts, where its adapters start, and filling the arenas.
The frozen base goes into the arenas one tensor at a time (its bf16 copy written
here, since with bf16 its matrices are held only as that copy); the adapters
start from the checkpoint on --resume, else from the peft adapter given to
--init-from, else peft's initialisation from the run's seed."""
import dataclasses
import os

from launch.start import Start, largest_tensor, resumed, scratch_config, whole_model
from trainer import gguf_file
from trainer.base import adapter_dir, open_base, read_base_record, recorded_base
from trainer.checkpoint import check_checkpoint, checkpoint_config, stream_checkpoint
from trainer.errors import ConfigError
from trainer.lora import check_adapters, init_adapters, lora_of, merged
from trainer.lora_training import LoraTraining
from trainer.peft import read_peft
from trainer.weights import read_hf_config


@dataclasses.dataclass
class LoraStart(Start):
    """A LoRA run's start: the frozen `base` (trainer.base.Base), and its adapters
    from the checkpoint, the `tensors` of a peft adapter, or peft's initialisation."""
    base: object = None

    def fill(self, pool, arrays, engine, seed):
        """The base (fp32 where it is kept, and its bf16 copy), then the adapters and,
        on --resume, their optimizer state."""
        fp32 = pool.base.views(pool.params.array)
        low = pool.layout.views(pool.low.array) if pool.low else None
        for name, tensor in self.base.tensors():
            if name in fp32:
                fp32[name][...] = tensor
            if low is not None:
                engine.to_low(low[name], tensor)
        adapters, optimizer = arrays
        if self.ckpt is not None:
            if self.base.path is None:
                self.base.check(self.state.get("base") or {}, self.ckpt)
            stream_checkpoint(self.ckpt, self.trains, adapters, optimizer)
        elif self.tensors is not None:
            for name, view in adapters.items():
                view[...] = self.tensors[name]
        else:
            init_adapters(self.cfg, self.trains.lora, adapters, seed)
        self.tensors = None

    def sampling_weights(self, pool):
        """-> a function giving the merged weights W + (alpha/r) ΔW."""
        def weights():
            base = dict(pool.base.views(pool.params.array))
            if pool.low:  # the matrices held only as their bf16 copy
                low = pool.layout.views(pool.low.array)
                base.update({name: low[name].astype("float32") for name in low if name not in base})
            return merged(self.cfg, self.trains.lora, base, pool.trained())
        return weights

    def checkpoint_state(self):
        return {"base": self.base.record}


def adopt_peft(settings, directory):
    """--init-from a peft adapter `directory` (or a LoRA run's latest checkpoint): the run
    takes the adapter's LoRA settings (a different --lora-rank is bad input) ->
    (settings, base source, adapter tensors)."""
    lora, base, tensors = read_peft(directory)
    if settings.lora_rank and settings.lora_rank != lora.rank:
        raise ConfigError(f"--lora-rank {settings.lora_rank} but the adapter {settings.init_from} has rank "
                          f"{lora.rank}")
    dropout = settings.lora_dropout if settings.lora_dropout is not None else lora.dropout
    settings = dataclasses.replace(settings, lora_rank=lora.rank, lora_alpha=lora.alpha,
                                   lora_targets=",".join(lora.targets), lora_dropout=dropout)
    return settings, base, tensors


def loading(base):
    """Floats the coordinator holds while reading the base: one tensor, or an llm.c .bin whole."""
    return whole_model(base.cfg) if (base.path or "").endswith(".bin") else largest_tensor(base.cfg)


def lora_start(settings, ckpt, state):
    """-> (settings, LoraStart): on --resume the base its checkpoint names (refused if
    it changed), else --init-from's (or the family's initialisation of --model)."""
    if ckpt is not None:
        record = state.get("base") or {}
        cfg = checkpoint_config(ckpt)
        trains = LoraTraining(cfg, lora_of(settings, cfg.family))
        check_checkpoint(ckpt, settings.optim, trains)
        base = recorded_base(record, cfg, settings.seed)
        if base.path:
            base.check(record, ckpt)  # the init's digest is checked once its tensors are made
        return settings, LoraStart(cfg, trains, ckpt, state, loading=loading(base), base=base,
                                   origin=f"{resumed(ckpt, state)}; frozen base: {described(base)}")
    source, record, tensors = settings.init_from, None, None
    adapter = adapter_dir(source) if source else None
    if adapter:
        settings, source, tensors = adopt_peft(settings, adapter)
        record = read_base_record(adapter)  # a coregpt LoRA checkpoint names its base exactly
    if record:
        base = recorded_base(record, read_hf_config(os.path.join(adapter, "config.json")))
    else:
        base = open_base(source, None if source else scratch_config(settings), settings.seed)
    trains = LoraTraining(base.cfg, lora_of(settings, base.cfg.family))
    if tensors is not None:
        check_adapters(base.cfg, trains.lora, tensors, settings.init_from)
    adapters = f"adapters from {settings.init_from}" if tensors is not None else \
        f"adapters initialised (seed {settings.seed})"
    return settings, LoraStart(base.cfg, trains, tensors=tensors, loading=loading(base), base=base,
                               origin=f"{adapters}; frozen base: {described(base)}")


def described(base):
    if base.path is None:
        return f"{base.cfg.model_type} initialised from scratch (seed {base.seed})"
    return f"{base.path} ({gguf_file.describe(base.path)})" if gguf_file.is_gguf(base.path) else base.path
