"""llm.c's GPT-2 checkpoint format (train_gpt2.c's gpt2_124M.bin): a 256-int32 header
(magic 20240326, version 3 fp32 or 5 bf16, then maxT, V, L, NH, C, padded V), then
every tensor in llm.c's order, the per-layer ones stacked over layers and the
linear weights stored (out, in).  The format is GPT-2's by definition."""
import numpy as np

from trainer.errors import WeightsError
from trainer.files import atomic_write
from trainer.models.gpt2 import GPTConfig

LLMC_MAGIC = 20240326


def llmc_order(cfg, padded_vocab):
    """llm.c's tensors in file order: (HF name, or per-layer suffix if layered;
    llm.c shape; stored (out, in), i.e. transposed from HF's Conv1D; layered)."""
    C, L = cfg.n_embd, cfg.n_layer
    per_layer = [("ln_1.weight", (C,), False), ("ln_1.bias", (C,), False),
                 ("attn.c_attn.weight", (3 * C, C), True), ("attn.c_attn.bias", (3 * C,), False),
                 ("attn.c_proj.weight", (C, C), True), ("attn.c_proj.bias", (C,), False),
                 ("ln_2.weight", (C,), False), ("ln_2.bias", (C,), False),
                 ("mlp.c_fc.weight", (4 * C, C), True), ("mlp.c_fc.bias", (4 * C,), False),
                 ("mlp.c_proj.weight", (C, 4 * C), True), ("mlp.c_proj.bias", (C,), False)]
    return ([("wte.weight", (padded_vocab, C), False, False),
             ("wpe.weight", (cfg.block_size, C), False, False)]
            + [(name, (L,) + shape, t, True) for name, shape, t in per_layer]
            + [("ln_f.weight", (C,), False, False), ("ln_f.bias", (C,), False, False)])


def load_llmc(path):
    """llm.c checkpoint: version 3 (fp32) or 5 (bf16), header magic 20240326."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    if header.size < 256 or header[0] != LLMC_MAGIC:
        raise WeightsError(f"{path} is not an llm.c checkpoint (bad magic)")
    version = int(header[1])
    if version not in (3, 5):
        raise WeightsError(f"{path}: unknown llm.c checkpoint version {version} (coregpt reads 3 and 5)")
    maxT, V, L, NH, C, Vp = (int(x) for x in header[2:8])
    try:
        cfg = GPTConfig(n_layer=L, n_head=NH, n_embd=C, block_size=maxT, vocab_size=V).check()
    except ValueError as e:
        raise WeightsError(f"{path}: bad header ({e})") from None
    order = llmc_order(cfg, Vp)
    need = sum(int(np.prod(shape)) for _, shape, _, _ in order)
    raw = np.fromfile(path, dtype=np.float32 if version == 3 else np.uint16, offset=1024)
    if raw.size < need:
        raise WeightsError(f"{path} is truncated: {raw.size} values, the header implies {need}")
    if version == 5:  # bf16 is the top half of a float32
        raw = (raw[:need].astype(np.uint32) << 16).view(np.float32)
    tensors, offset = {}, 0
    for name, shape, transposed, layered in order:
        block = raw[offset:offset + int(np.prod(shape))].reshape(shape)
        offset += block.size
        for i, tensor in (enumerate(block) if layered else [(None, block)]):
            key = name if i is None else f"h.{i}.{name}"
            tensors[key] = np.ascontiguousarray(tensor.T if transposed else tensor)
    tensors["wte.weight"] = tensors["wte.weight"][:V]
    return cfg, tensors


def padded_vocab(vocab_size, multiple=128):
    return -(-vocab_size // multiple) * multiple  # llm.c: 50257 -> 50304


def export_llmc(path, cfg, tensors):
    Vp = padded_vocab(cfg.vocab_size)
    header = np.zeros(256, dtype=np.int32)
    header[:8] = (LLMC_MAGIC, 3, cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head,
                  cfg.n_embd, Vp)
    with atomic_write(path) as f:
        f.write(header.tobytes())
        for name, shape, transposed, layered in llmc_order(cfg, Vp):
            if name == "wte.weight":
                f.write(tensors[name].tobytes())
                f.write(np.zeros((Vp - cfg.vocab_size, cfg.n_embd), dtype=np.float32).tobytes())
                continue
            for i in range(cfg.n_layer) if layered else [None]:
                tensor = tensors[name if i is None else f"h.{i}.{name}"]
                f.write(np.ascontiguousarray(tensor.T if transposed else tensor,
                                             dtype=np.float32).tobytes())
