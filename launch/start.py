"""Where a run's weights come from, resolved once by setup into a start record
(`Start`): the model's config, what trains, and its source (a checkpoint to resume,
weights read from a file, or the family's initialisation).  The memory plan reads
what loading them holds; the run fills the pool's arenas from it (`fill`), samples
from it and writes what its checkpoints need to find it again.  A LoRA run's is
launch/adapters.py's `LoraStart`; launch/train.py's STARTS picks by what trains."""
import dataclasses
import os

import numpy as np

from trainer import gguf_file
from trainer.checkpoint import check_checkpoint, checkpoint_config, stream_checkpoint
from trainer.errors import DataError
from trainer.models import family_of, param_layout, param_shapes, preset_config
from trainer.trainable import Full
from trainer.weights import load_checked


def largest_tensor(cfg):
    """Floats of the model's largest parameter: the room to read a file one tensor at a time."""
    return max(int(np.prod(shape)) for _, shape in param_shapes(cfg))


def whole_model(cfg):
    """Floats of every parameter as the arena lays them out: the room to read a file whole."""
    return param_layout(cfg).size


def scratch_config(settings):
    """--model with the --n-layer … overrides."""
    return preset_config(settings.model, dict(n_layer=settings.n_layer, n_head=settings.n_head,
                                              n_embd=settings.n_embd, block_size=settings.block_size))


@dataclasses.dataclass
class Start:
    """Every parameter trains, from: the checkpoint `ckpt` (run state `state`) on
    --resume, streamed into the arenas; `tensors` read whole by --init-from; or the
    family's initialisation.  loading: the floats the coordinator holds while it
    fills the arenas."""
    cfg: object
    trains: object
    ckpt: str | None = None
    state: dict | None = None
    tensors: dict | None = None
    loading: int = 0
    origin: str = ""  # for the header: where the weights come from
    tokenizer: object = None  # what samples are decoded with and checkpoints carry (run_tokenizer)

    @property
    def step(self):
        """The step it starts after."""
        return self.state["step"] if self.state else 0

    def fill(self, pool, arrays, engine, seed):
        """The pool's arenas from the source; arrays: (trained views, optimizer views).
        The tensors read whole are let go of once in the arenas."""
        params, optimizer = arrays
        if self.ckpt is not None:
            stream_checkpoint(self.ckpt, self.trains, params, optimizer)
        elif self.tensors is None:
            family_of(self.cfg).init_params(self.cfg, params, seed)
        else:
            for name, view in params.items():
                view[...] = self.tensors[name]
        self.tensors = None

    def sampling_weights(self, pool):
        """-> a function giving the model's weights to sample from."""
        views = pool.trained()
        return lambda: views

    def checkpoint_state(self):
        """What a checkpoint's run state keeps of where the weights came from."""
        return {}


def full_start(settings, ckpt, state):
    """-> (settings, Start) of a run that trains every parameter."""
    if ckpt is not None:
        cfg = checkpoint_config(ckpt)
        check_checkpoint(ckpt, settings.optim, Full(cfg))
        return settings, Start(cfg, Full(cfg), ckpt, state, loading=largest_tensor(cfg),
                               origin=resumed(ckpt, state))
    if not settings.init_from:
        cfg = scratch_config(settings)
        return settings, Start(cfg, Full(cfg), origin=f"initialised from scratch ({settings.model}, seed "
                                                      f"{settings.seed})")
    cfg, tensors = load_checked(settings.init_from)
    dequantized = f" ({gguf_file.describe(settings.init_from)})" if gguf_file.is_gguf(settings.init_from) else ""
    return settings, Start(cfg, Full(cfg), tensors=tensors, loading=whole_model(cfg),
                           origin=f"initialised from {settings.init_from}{dequantized}")


def run_tokenizer(settings, ckpt, cfg):
    """The run's tokenizer (trainer/tokenizer.py): GPT-2's, --tokenizer DIR's, else the
    one beside the checkpoint resumed or --init-from; None for a Llama-family model
    with none (its samples are off)."""
    from trainer.tokenizer import known_tokenizer, tokenizer_of
    directory, source = settings.tokenizer, ckpt or settings.init_from
    if not directory:
        return known_tokenizer(cfg, source)
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise DataError(f"--tokenizer {directory} holds no tokenizer.json")
    return tokenizer_of(cfg, source, directory)


def resumed(ckpt, state):
    return f"resumed from step {state['step']} of {ckpt}"


