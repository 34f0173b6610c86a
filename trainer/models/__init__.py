"""The model families, each one package behind this registry, keyed by Hugging Face
`model_type`.  A family says everything that is its own: config and presets,
parameter shapes and names, initialisation, the activation spec, the model
(forward/backward over trainer/model.py's layers, the head, the weight-gradient
tasks), the KV-cached forward, the LoRA target table.  Everything else asks it
through this module (or, in trainer/ modules the families themselves import,
through `cfg.family`, the module of the config's tables)."""
from trainer.errors import WeightsError
from trainer.models import gpt2, llama
from trainer.params import Layout

FAMILIES = {family.MODEL_TYPE: family for family in (gpt2, llama)}
# each Hugging Face model_type a family trains -> the family
MODEL_TYPES = {model_type: family for family in FAMILIES.values()
               for model_type in getattr(family, "MODEL_TYPES", (family.MODEL_TYPE,))}
DEFAULT = gpt2.MODEL_TYPE  # a config.json without model_type, a --model preset name alone


def family(model_type):
    """The family package of a Hugging Face model_type; an unknown one is bad input."""
    if model_type not in MODEL_TYPES:
        raise WeightsError(f"model_type {model_type!r} is not a family coregpt trains "
                           f"(it trains {', '.join(MODEL_TYPES)})")
    return MODEL_TYPES[model_type]


def family_of(cfg):
    return MODEL_TYPES[cfg.model_type]


def config_from_fields(model_type, fields):
    """What a config's fields() gave -> the config (workers rebuild the run's from it)."""
    return family(model_type).Config(**fields)


def presets():
    """Every --model preset name -> its family."""
    return {name: fam for fam in FAMILIES.values() for name in fam.PRESETS}


def preset_config(name, overrides, vocab_size=None):
    """--model NAME with --n-layer… overrides (None: the preset's)."""
    fam = presets().get(name)
    if fam is None:
        raise WeightsError(f"unknown --model {name!r}; choose one of {', '.join(presets())}")
    return fam.preset(name, overrides) if vocab_size is None else fam.preset(name, overrides, vocab_size)


def infer_config(shapes, path):
    """A bare .safetensors: {name in the file: shape} -> the config of the family whose
    token embedding it holds (its infer_config, on its names; else GPT-2's says why not)."""
    named = {fam: {fam.tensor_name(name): shape for name, shape in shapes.items()} for fam in FAMILIES.values()}
    fam = next((fam for fam, names in named.items() if fam.EMBEDDING in names), family(DEFAULT))
    return fam.infer_config({name: shape for name, shape in named[fam].items() if name is not None}, path)


def hub_names():
    return tuple(name for fam in FAMILIES.values() for name in fam.HUB_NAMES)


def param_shapes(cfg):
    """[(name, shape)] of the model's parameters, in arena order."""
    return family_of(cfg).param_shapes(cfg)


def param_layout(cfg):
    return Layout(param_shapes(cfg))


def in_arena(cfg, tensors):
    """{name: array} of the model `cfg` as views of one arena in its layout (a family
    may read neighbouring tensors as one matrix: Llama's q, k, v); tensors already
    laid out so come back as they are, others are copied in once."""
    layout = param_layout(cfg)
    first = tensors[next(iter(layout.offsets))]
    start = first.__array_interface__["data"][0]
    if all(tensors[name].dtype == first.dtype and tensors[name].flags.c_contiguous and
           tensors[name].__array_interface__["data"][0] == start + offset * first.itemsize
           for name, offset in layout.offsets.items()):
        return tensors
    _, views = layout.allocate()
    for name, view in views.items():
        view[...] = tensors[name]
    return views
