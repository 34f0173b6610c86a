"""Packed chat data trains as transformers does when it is given the same rows with
a block-diagonal 4-D attention mask, position ids restarting at each example and
labels of -100 on the tokens the loss does not count: 8 steps of a tiny Llama and a
tiny GPT-2, every loss and final weight within 1e-4, for 1 to 3 workers, both
strategies and gradient accumulation.  The attention blocks are 8 tokens, so examples of 3 to 14 tokens make
the kernel skip blocks and mask the ones that straddle two examples."""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import launch, read_metrics, write_token_file
from llama_reference import hf_model, write_model_dir

VOCAB, B, T, STEPS, LR, WD, CLIP = 300, 4, 32, 8, 1e-3, 0.1, 1.0
ROWS = 3 * B  # steps 4-8 wrap to the start of the file
# (strategy, workers, flags): W=3 splits a batch row's heads between workers; two
# micro-batches of 2 rows are the same step as one of 4 (the loss: over the whole step)
RUNS = [("hybrid", 1, ()), ("hybrid", 2, ()), ("data", 2, ()), ("hybrid", 3, ()),
        ("data", 2, ("--batch-size", B // 2, "--grad-accum", 2))]
SMALL_CHUNKS = {"COREGPT_ATTENTION_BLOCK": "8", "COREGPT_HEAD_ROWS": "40"}


def packed_rows(seed):
    """Rows of T tokens holding whole random examples (3 to 14 tokens, the rest of a
    row one padding example), written here independently of trainer.chat_data ->
    (tokens, mask, positions), each ROWS·T + 1 long."""
    rng = np.random.default_rng(seed)
    tokens, mask, positions = [], [], []
    for _ in range(ROWS):
        used = 0
        while True:
            n = int(rng.integers(3, 15))
            if used + n > T:
                n, counts = T - used, np.zeros(T - used, dtype=bool)  # padding, never counted
            else:  # a prompt, then a reply the loss counts
                counts = np.arange(n) >= int(rng.integers(1, n))
            tokens += list(rng.integers(0, VOCAB, n))
            mask += list(counts)
            positions += list(range(n))
            used += n
            if used == T:
                break
    return [np.array(x + [0]) for x in (tokens, mask, positions)]


def gpt2_model(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=T, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    model = GPT2LMHeadModel(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def document_mask(positions):
    """(B,T) positions -> the additive (B,1,T,T) mask: query t sees keys s ≤ t of its own example."""
    starts = torch.arange(T) - positions
    keys = torch.arange(T)[None, None, :]
    seen = (keys <= torch.arange(T)[None, :, None]) & (keys >= starts[:, :, None])
    return torch.where(seen, 0.0, torch.finfo(torch.float32).min)[:, None]


def train_reference(model, tokens, mask, positions):
    """STEPS of AdamW (decay on 2-D parameters) with clip_grad_norm_, windows of B rows
    in file order -> (losses, final state)."""
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params.values() if p.dim() == 2], "weight_decay": WD},
                             {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    losses, row = [], 0
    for _ in range(STEPS):
        window = slice(row * T, (row + B) * T)
        ids = torch.from_numpy(tokens[window].astype(np.int64)).view(B, T)
        pos = torch.from_numpy(positions[window].astype(np.int64)).view(B, T)
        labels = torch.where(torch.from_numpy(mask[window].astype(bool)).view(B, T), ids, -100)
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=document_mask(pos), position_ids=pos, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), CLIP)
        opt.step()
        losses.append(loss.item())
        row = (row + B) % ROWS
    return losses, {name: p.detach().numpy().copy() for name, p in model.state_dict().items()}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = hf_model("llama-gqa-tied-llama3") if request.param == "llama" else gpt2_model()
    write_model_dir(root / "init", model) if request.param == "llama" else model.save_pretrained(root / "init")
    tokens, mask, positions = packed_rows(seed=1)
    (root / "data").mkdir()
    for name, values in (("train", tokens), ("train.mask", mask), ("train.pos", positions)):
        write_token_file(root / "data" / f"{name}.bin", values)
        # val.bin: the first step's rows, whose loss before any update is the first step's
        write_token_file(root / "data" / f"{name.replace('train', 'val')}.bin", values[:B * T + 1])
    (root / "data" / "chat.json").write_text(json.dumps({"seq_len": T}))
    return request.param, root, train_reference(model, tokens, mask, positions)


def train(root, name, *extra):
    out = root / name
    done = launch("train", "--init-from", root / "init", "--data", root / "data", "--data-order", "sequential",
                  "--batch-size", B, "--seq-len", T, "--steps", STEPS, "--lr", LR, "--lr-schedule", "constant",
                  "--warmup", 0, "--weight-decay", WD, "--grad-clip", CLIP, "--threads-per-worker", 1,
                  "--eval-every", STEPS, "--eval-steps", 1, "--out-dir", out, *extra, env=SMALL_CHUNKS)
    assert done.returncode == 0, done.stderr
    rows = read_metrics(out)
    losses = [row["loss"] for row in rows if "loss" in row]
    if "--grad-accum" not in extra:  # val.bin holds the first step's B rows
        assert rows[0]["step"] == 0 and abs(rows[0]["val_loss"] - losses[0]) < 1e-6, rows[0]
    return losses, load_file(str(out / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))


@pytest.mark.e2e
def test_eval_of_packed_chat_data_is_the_masked_loss(case):
    _, root, (expected_losses, _) = case
    done = launch("eval", "--checkpoint", root / "init", "--data", root / "data", "--batch-size", B,
                  "--seq-len", T)
    assert done.returncode == 0, done.stderr
    assert f"val loss {expected_losses[0]:.4f}" in done.stdout, (done.stdout, expected_losses[0])


@pytest.mark.e2e
def test_packed_chat_steps_match_transformers(case):
    family, root, (expected_losses, expected) = case
    for parallel, workers, extra in RUNS:
        run = f"{parallel}{workers}{'-accum' * bool(extra)}"
        losses, weights = train(root, run, "--parallel", parallel, "--workers", workers, *extra)
        np.testing.assert_allclose(losses, expected_losses, rtol=0, atol=1e-4, err_msg=run)
        for name, value in weights.items():
            reference = expected[name if family == "llama" else "transformer." + name]
            np.testing.assert_allclose(value, reference, rtol=0, atol=1e-4, err_msg=f"{run} {name}")
