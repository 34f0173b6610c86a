"""The optimizers, registered by the name --optim takes.  Each says, before any
process starts, the shared arenas its state needs for a parameter layout
(`arenas`: their bytes go into the memory plan), how the layout is cut into the
workers' shards (`shards`), what its state is called in a checkpoint (`tensors`),
and which registered optimizer needs less memory (`lighter`, for the memory
error's advice); built over the arenas' arrays it gives the checkpoint's views of
its state and updates one shard segment at a time, with the hyper-parameters the
coordinator sends each step (`hyper`: its settings, and the step's lr, step count
and clip factor).  The update rule is optim.py's AdamW (torch.optim.AdamW's
semantics) for both."""
import numpy as np

from trainer import adamw8bit
from trainer.optim import BLOCK, Hyper, adamw_update
from trainer.params import shard_bounds


class AdamW:
    name = "adamw"
    summary = "fp32 moments, 8 bytes a parameter"
    lighter = "adamw8bit"
    # what a step reads and writes a parameter (weight, m and v read and written, the
    # gradient read): the profile's GB/s (the bf16 copy is the convert phase's)
    bytes_moved = 28

    @staticmethod
    def arenas(layout):
        """[(what, elements, dtype)] of the state of parameters `layout`: m and v laid
        out like the parameters."""
        return [("Adam m", layout.size, "float32"), ("Adam v", layout.size, "float32")]

    @staticmethod
    def shards(layout, n_workers):
        """[(start, end)] of each worker's part of the layout."""
        return shard_bounds(layout.size, n_workers)

    @staticmethod
    def tensors(shapes):
        """{prefix: {parameter: (shape, safetensors dtype)}} of the state of the
        tensors [(name, shape)] in a checkpoint."""
        return {f"{moment}.": {name: (shape, "F32") for name, shape in shapes} for moment in "mv"}

    @staticmethod
    def hyper(settings, lr, step, clip):
        """The hyper-parameters of optimizer step `step` (1-based) of a run: what an
        Update message carries."""
        return dict(lr=lr, t=step, beta1=settings.beta1, beta2=settings.beta2, eps=settings.eps,
                    weight_decay=settings.weight_decay, grad_scale=clip)

    def step_of(self, name, hyper):
        """The Hyper of tensor `name`: weight decay on 2-D tensors only (torch's usual groups)."""
        decays = len(self.layout.shapes[name]) == 2
        return Hyper(**dict(hyper, weight_decay=hyper["weight_decay"] if decays else 0.0))

    def __init__(self, layout, arrays, engine):
        """arrays: {what: array} of the arenas `arenas` names; engine: the GEMM engine
        (its fused passes, and the bf16 copy of the weights)."""
        self.layout, self.m, self.v, self.engine = layout, arrays["Adam m"], arrays["Adam v"], engine
        self.tmp = np.empty(BLOCK, dtype=np.float32)

    def views(self):
        """{prefix: {parameter: view}} of the state, as checkpoints name it."""
        return {"m.": self.layout.views(self.m), "v.": self.layout.views(self.v)}

    def update(self, name, lo, hi, p, g, p_low, hyper):
        """AdamW on elements lo…hi of the layout, all of parameter `name` (p, g, p_low
        are those elements); hyper: as hyper() gives them."""
        adamw_update(p, g, self.m[lo:hi], self.v[lo:hi], self.tmp, self.step_of(name, hyper), engine=self.engine,
                     p_low=p_low)


class AdamW8bit(AdamW):
    """Adam's moments kept as bitsandbytes' AdamW8bit keeps them (trainer/adamw8bit.py)."""
    name = "adamw8bit"
    summary = "bitsandbytes' AdamW8bit: 8-bit blockwise moments, 2 bytes a parameter"
    lighter = None
    bytes_moved = 16  # one byte each for m and v

    @staticmethod
    def arenas(layout):
        """m and v as one byte each, and the fp32 side (absmax per block, the small
        tensors' moments)."""
        return [("Adam m", layout.size, "uint8"), ("Adam v", layout.size, "uint8"),
                ("Adam absmax", adamw8bit.side_layout(layout).size, "float32")]

    @staticmethod
    def shards(layout, n_workers):
        """No quantisation block is split between two workers."""
        return adamw8bit.block_bounds(layout, shard_bounds(layout.size, n_workers))

    @staticmethod
    def tensors(shapes):
        """uint8 codes and per-block absmax for the quantised tensors, fp32 m and v for the rest."""
        tensors = {"m.": {}, "v.": {}, "m_absmax.": {}, "v_absmax.": {}}
        for name, shape in shapes:
            for moment in ("m", "v"):
                if adamw8bit.quantized(shape):
                    tensors[f"{moment}."][name] = shape, "U8"
                    tensors[f"{moment}_absmax."][name] = (-(-int(np.prod(shape)) // adamw8bit.QBLOCK),), "F32"
                else:
                    tensors[f"{moment}."][name] = shape, "F32"
        return tensors

    def __init__(self, layout, arrays, engine):
        self.state = adamw8bit.State8(layout, arrays["Adam m"], arrays["Adam v"], arrays["Adam absmax"])
        self.layout, self.engine = layout, engine

    def views(self):
        return self.state.views()

    def update(self, name, lo, hi, p, g, p_low, hyper):
        self.state.update(name, lo, hi, p, g, p_low, self.step_of(name, hyper), engine=self.engine)


OPTIMIZERS = {optimizer.name: optimizer for optimizer in (AdamW, AdamW8bit)}
DEFAULT = AdamW.name
