"""Training settings: one table of keys, read from a TOML config and then from
flags (flags win).  Every flag `--batch-size` is also the TOML key `batch_size`."""
import argparse
import dataclasses
import os
import tomllib
from importlib import resources

from trainer import models
from trainer.data import ORDERS
from trainer.optimizers import DEFAULT as DEFAULT_OPTIMIZER, OPTIMIZERS
from trainer.errors import ConfigError, knob
from workers.strategies import AUTO, DATA_TOKENS, STRATEGIES, batch_unit

LR_SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16")
GEMMS = ("auto", "numpy", "onednn")


# key: (type, default, help).  None as default means "derived" (see check).
SETTINGS = {
    "model": (str, "small", "preset when training from scratch: " + ", ".join(models.presets())),
    "n_layer": (int, None, "override the preset's layers"),
    "n_head": (int, None, "override the preset's heads"),
    "n_embd": (int, None, "override the preset's channels"),
    "block_size": (int, None, "override the preset's context length"),
    "init_from": (str, None, "start from weights: an HF directory (config.json + model.safetensors) or "
                             ".safetensors, an llm.c .bin (v3 fp32, v5 bf16), a GGUF file (dequantized to fp32), a "
                             "coregpt run or checkpoint, a peft adapter directory, or gpt2[-medium|-large|-xl] "
                             "(downloaded once; offline, a local path)"),
    "tokenizer": (str, None, "a directory holding the tokenizer.json the data was prepared with, for a "
                             "Llama-family model's samples (default: the one beside --init-from); checkpoints "
                             "carry a copy"),
    "data": (str, "shakespeare", "'shakespeare', a prepared directory (train.bin, val.bin) or a token file"),
    "val_data": (str, None, "validation token file (default: val.bin beside the training data)"),
    "batch_size": (int, 8, "global batch in rows (--parallel data gives each worker whole rows; hybrid "
                           "splits any batch)"),
    "seq_len": (int, 64, "tokens per row (T)"),
    "steps": (int, 100, "optimizer steps (--resume may raise it)"),
    "grad_accum": (int, 1, "micro-batches per optimizer step (each reads the next window of the batch order)"),
    "data_order": (str, "shuffled", "batch order: shuffled (the file's windows in a new permutation each "
                                    "epoch, seeded by --seed) or sequential (llm.c's file order)"),
    "lr": (float, 6e-4, "peak learning rate"),
    "lr_schedule": (str, "cosine", "cosine (to --min-lr) or constant, both after --warmup"),
    "warmup": (int, 0, "linear warmup steps"),
    "min_lr": (float, None, "final LR of the cosine schedule (default lr/10)"),
    "weight_decay": (float, 0.1, "AdamW decoupled weight decay on 2-D tensors"),
    "grad_clip": (float, 1.0, "clip the global gradient L2 norm (0 disables)"),
    "beta1": (float, 0.9, "AdamW beta1"),
    "beta2": (float, 0.95, "AdamW beta2"),
    "eps": (float, 1e-8, "AdamW epsilon"),
    "optim": (str, DEFAULT_OPTIMIZER, " or ".join(f"{name} ({optimizer.summary})"
                                                 for name, optimizer in OPTIMIZERS.items())),
    "lora_rank": (int, 0, "LoRA rank r: train rank-r adapters beside the frozen weights (peft's LoRA); "
                          "0 is full fine-tuning"),
    "lora_alpha": (float, None, "LoRA alpha: the adapters are scaled by alpha / r (default r)"),
    "lora_targets": (str, None, "layers that get adapters, " + "; ".join(
        f"{family.MODEL_TYPE}: from {family.LORA_CHOICES} (default {family.LORA_DEFAULT}, peft's)"
        for family in models.FAMILIES.values()) + " (comma-separated)"),
    "lora_dropout": (float, None, "dropout on the adapters' input while training (default 0; seeded)"),
    "precision": (str, "fp32", "fp32, or bf16: matmul inputs rounded to bf16, fp32 accumulation; "
                               "weights, gradients, optimizer and other layers stay fp32"),
    "gemm": (str, "auto", "GEMM engine: auto (oneDNN where it is faster, else NumPy's BLAS), numpy "
                          "or onednn"),
    "parallel": (str, AUTO, "how workers share a step: " + ", ".join(
        f"{name} ({strategy.summary})" for name, strategy in STRATEGIES.items())
        + f" or {AUTO} (data from {DATA_TOKENS} tokens a worker, else hybrid; the header says which)"),
    "backend": (str, "shm", "shm (one machine) or mpi (run under mpiexec; --workers is per rank)"),
    "workers": (int, 1, "worker processes (per rank with --backend mpi)"),
    "threads_per_worker": (int, None, "BLAS threads per worker (default: cores / workers)"),
    "oversubscribe": (bool, False, "allow workers × threads above the available cores"),
    "smt": (bool, False, "count hyperthreads (SMT siblings) as cores; default: one logical CPU per "
                         "physical core"),
    "out_dir": (str, None, "run directory (default runs/<UTC timestamp>); an existing run is never "
                           "overwritten, and one in use by a live run is refused"),
    "eval_every": (int, 100, "validation loss before step 1, every N steps and at the end (0 disables)"),
    "eval_steps": (int, 10, "batches per validation"),
    "sample_every": (int, 0, "print a sample every N steps (0 disables)"),
    "ckpt_every": (int, 0, "checkpoint every N steps (0: only at the end)"),
    "keep_last": (int, 0, "keep only the K newest checkpoints (0 keeps all; never the latest or best)"),
    "keep_best": (bool, False, "also checkpoint each evaluation that lowers the validation loss and keep "
                               "the best as RUN/checkpoints/best"),
    "no_checkpoint": (bool, False, "write no checkpoint"),
    "resume": (bool, False, "continue the run in --out-dir from its latest checkpoint, bit-exactly, with its "
                            "settings (steps, logging, checkpointing and workers may change)"),
    "seed": (int, 1337, "seed of the initialisation, the shuffled batch order, LoRA's dropout and samples"),
    "recompute": (bool, False, "keep only each block's input and recompute its forward in the backward "
                               "(activation checkpointing): less memory, about a fifth more time per step"),
    "profile": (bool, False, "log per-step phase times (forward, backward, reduce, update, waiting) "
                             "and print a per-layer-type table at the end"),
    "skip_nonfinite": (bool, False, "skip (and count) a step whose loss or gradient is NaN/inf "
                                    "instead of stopping the run"),
}


class Parser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):
        return super().parse_args(join_negative_numbers(args), namespace)

    def error(self, message):
        raise ConfigError(f"{message} (see `python -m launch {self.prog.split()[-1]} --help`)")


def exists(checkpoint):
    """--checkpoint names something on disk (or a hub model the weights loader fetches)."""
    from trainer.models import hub_names
    if not os.path.exists(checkpoint) and checkpoint not in hub_names():
        raise ConfigError(f"--checkpoint {checkpoint} does not exist")


def join_negative_numbers(argv):
    """`--lr -1e-3` -> `--lr=-1e-3`: argparse would take -1e-3 for an option."""
    out = []
    for arg in argv or []:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-"):
            try:
                float(arg)
            except ValueError:
                pass
            else:
                out[-1] += "=" + arg
                continue
        out.append(arg)
    return out


def train_parser():
    p = Parser(prog="launch train", description="Train or fine-tune a GPT-2 or Llama-family model on CPU workers.",
               argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="TOML file of settings (keys as below, with underscores)")
    for name, (kind, default, help_text) in SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        shown = f"{help_text} [default: {default}]" if default is not None else help_text
        if kind is bool:
            p.add_argument(flag, dest=name, action="store_true", help=help_text)
        else:
            p.add_argument(flag, dest=name, type=kind, metavar=kind.__name__.upper(), help=shown)
    return p


def default_config_path():
    return str(resources.files("configs") / "default.toml")


def read_toml(path):
    """-> {key: value} with keys checked and types coerced."""
    if not os.path.isfile(path):
        raise ConfigError(f"config {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        message = str(e)
        line = _line_of(message, raw)
        raise ConfigError(f"config {path} is not valid TOML: {message}{line}") from None
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in SETTINGS:
            raise ConfigError(f"config {path}: unknown key '{key}'")
        values[name] = coerce(name, value, f"config {path}: key '{key}'")
    return values


def _line_of(message, raw):
    import re
    match = re.search(r"line (\d+)", message)
    if not match:
        return ""
    lines = raw.decode("utf-8", "replace").splitlines()
    n = int(match.group(1))
    return f": {lines[n - 1].strip()!r}" if 0 < n <= len(lines) else ""


def coerce(name, value, where):
    kind = SETTINGS[name][0]
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where} must be {kind.__name__}, got {value!r}")


# every setting of a run, filled once (merge, then check) and never changed after
Settings = dataclasses.make_dataclass(
    "Settings", [(name, kind | None, dataclasses.field(default=default)) for name, (kind, default, _) in
                 SETTINGS.items()], frozen=True)


def merge(config_path, flags):
    """Defaults < TOML config < flags -> unchecked Settings."""
    values = {}
    if config_path:
        values.update(read_toml(config_path))
    values.update(flags)
    return Settings(**values)


def check_lora(settings):
    """-> settings with LoRA's derived ones filled (trainer.lora.checked_settings)."""
    from trainer.lora import checked_settings
    from trainer.weights import source_family
    # whose layers the targets name: the model of --init-from, else the --model preset's
    family = ((settings.init_from and source_family(settings.init_from))
              or models.presets().get(settings.model, models.family(models.DEFAULT)))
    try:
        return dataclasses.replace(settings, **checked_settings(
            settings.lora_rank, settings.lora_alpha, settings.lora_targets, settings.lora_dropout, family))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def need(ok, message):
    if not ok:
        raise ConfigError(message)


def check_batch(settings, ranks):
    """The batch against the workers (each strategy's unit) and the MPI ranks."""
    unit = batch_unit(settings.parallel, settings.workers)  # > 1: each worker takes whole batch rows
    per_rank = f" x {ranks} MPI ranks" if ranks > 1 else ""
    need(settings.batch_size % (ranks * unit) == 0,
         f"--batch-size {settings.batch_size} is not divisible by --workers {settings.workers}{per_rank} "
         f"(--parallel {settings.parallel} gives each worker whole rows)" if unit > 1 else
         f"--batch-size {settings.batch_size} is not divisible by the {ranks} MPI ranks")
    need(settings.seq_len >= 1, f"--seq-len must be at least 1, got {settings.seq_len}")
    tokens = settings.batch_size // ranks * settings.seq_len
    need(tokens >= settings.workers,
         f"--batch-size x --seq-len gives {tokens} tokens a step, fewer than --workers {settings.workers}")


def check_cores(settings, local_ranks):
    """-> settings with --threads-per-worker derived (the cores over every worker on
    this machine) or checked against the cores."""
    from workers.placement import read_topology
    cores = read_topology().available(settings.smt)  # physical cores (or hyperthreads), capped by a CPU quota
    local_workers = local_ranks * settings.workers  # every worker on this machine
    if settings.threads_per_worker is None:
        settings = dataclasses.replace(settings, threads_per_worker=max(1, cores // local_workers))
    need(settings.threads_per_worker >= 1,
         f"--threads-per-worker must be at least 1, got {settings.threads_per_worker}")
    need(settings.oversubscribe or local_workers * settings.threads_per_worker <= cores,
         f"--workers {settings.workers} × --threads-per-worker {settings.threads_per_worker}"
         + (f" × {local_ranks} ranks on this machine" if local_ranks > 1 else "")
         + f" exceeds the {cores} available {'logical CPUs' if settings.smt else 'cores'}; lower them or pass "
           f"--oversubscribe")
    return settings


def check(settings, group=None):
    """-> the settings checked, with the derived ones filled; `group` is the MPI
    group under --backend mpi (ranks sharing this machine change what fits on it).
    Raises ConfigError.  (The GEMM engine is chosen once, by the run's setup.)"""
    ranks, local_ranks = (group.size, group.local_size) if group else (1, 1)
    need(settings.workers >= 1, f"--workers must be at least 1, got {settings.workers}")
    need(settings.batch_size >= 1, f"--batch-size must be at least 1, got {settings.batch_size}")
    need(settings.backend in ("shm", "mpi"), f"--backend must be shm or mpi, got {settings.backend!r}")
    need(settings.precision in PRECISIONS, f"--precision must be fp32 or bf16, got {settings.precision!r}")
    need(settings.parallel in (*STRATEGIES, AUTO),
         f"--parallel must be {', '.join(STRATEGIES)} or {AUTO}, got {settings.parallel!r}")
    need(settings.gemm in GEMMS, f"--gemm must be one of {', '.join(GEMMS)}, got {settings.gemm!r}")
    need(settings.data_order in ORDERS,
         f"--data-order must be {' or '.join(ORDERS)}, got {settings.data_order!r}")
    check_batch(settings, ranks)
    need(settings.steps >= 0, f"--steps must not be negative, got {settings.steps}")
    need(settings.lr >= 0, f"--lr must not be negative, got {settings.lr}")
    need(settings.min_lr is None or settings.min_lr >= 0, f"--min-lr must not be negative, got {settings.min_lr}")
    need(settings.lr_schedule in LR_SCHEDULES,
         f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {settings.lr_schedule!r}")
    need(settings.grad_accum >= 1, f"--grad-accum must be at least 1, got {settings.grad_accum}")
    for name in ("warmup", "eval_every", "eval_steps", "sample_every", "ckpt_every", "keep_last"):
        need(getattr(settings, name) >= 0, f"--{name.replace('_', '-')} must not be negative")
    need(settings.weight_decay >= 0 and settings.grad_clip >= 0, "--weight-decay and --grad-clip must not be negative")
    need(0 <= settings.beta1 < 1 and 0 <= settings.beta2 < 1 and settings.eps > 0,
         "AdamW needs 0 <= beta < 1 and eps > 0")
    need(settings.optim in OPTIMIZERS, f"--optim must be {' or '.join(OPTIMIZERS)}, got {settings.optim!r}")
    settings = check_cores(check_lora(settings), local_ranks)
    if settings.min_lr is None:
        settings = dataclasses.replace(settings, min_lr=settings.lr / 10)
    need(not settings.keep_best or (settings.eval_every and not settings.no_checkpoint),
         "--keep-best needs evaluations (--eval-every above 0) and checkpoints (no --no-checkpoint)")
    need(not (settings.resume and settings.out_dir is None), "--resume needs --out-dir naming the run to continue")
    for name in ("COREGPT_ATTENTION_BLOCK", "COREGPT_HEAD_ROWS"):
        knob(name, 1)  # a malformed size is one line here, not a worker failing later
    return settings
