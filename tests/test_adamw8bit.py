"""--optim adamw8bit against bitsandbytes' CPU AdamW8bit (the independent reference):
its dynamic maps, its quantiser, 20 optimizer steps on the same parameters and
gradients, and a 200-step training run against fp32 AdamW."""
import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from bitsandbytes import functional as F

from conftest import launch, read_metrics, write_token_file
from trainer import adamw8bit
from trainer.gemm import Engine
from trainer.optim import Hyper
from trainer.adamw8bit import QBLOCK, SIGNED, UNSIGNED, State8, block_bounds
from trainer.params import Layout, shard_bounds


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_are_bitsandbytes(signed):
    book = SIGNED if signed else UNSIGNED
    np.testing.assert_array_equal(book.code, F.create_dynamic_map(signed=signed).numpy())


def quantize(book, x):
    codes, absmax = np.empty(x.size, np.uint8), np.empty(-(-x.size // QBLOCK), np.float32)
    book.quantize(x, codes, absmax, np.empty(x.size, np.float32), np.empty(x.size, np.int32))
    return codes, absmax


@pytest.mark.parametrize("signed", [True, False])
def test_quantiser_is_bitsandbytes(signed):
    """Every bucket of the lookup table (its point and just inside both edges), values
    near zero where the codes are closer than a bucket, and random blocks of mixed
    scale with a short last block: the same codes and absmax as bitsandbytes'."""
    book = SIGNED if signed else UNSIGNED
    rng = np.random.default_rng(0)
    points = np.arange(65536) / 32767.5 - 1
    normed = np.concatenate([points, points + 0.49 / 32767.5, points - 0.49 / 32767.5,
                             rng.standard_normal(20000) * 1e-4]).clip(-1, 1).astype(np.float32)
    normed = normed if signed else np.abs(normed)
    blocks = np.concatenate([np.ones((normed.size // 255 + 1, 1), np.float32),  # absmax 1: x / absmax == x
                             np.resize(normed, (normed.size // 255 + 1, 255))], axis=1).reshape(-1)
    scaled = (rng.standard_normal(256 * 300 + 77) * np.repeat(10.0 ** rng.uniform(-9, 2, 301), 256)[:256 * 300 + 77]
              ).astype(np.float32)
    for x in (blocks, scaled if signed else scaled ** 2):
        codes, absmax = quantize(book, x)
        theirs, state = F.quantize_blockwise(torch.from_numpy(x), code=torch.from_numpy(book.code), blocksize=QBLOCK)
        np.testing.assert_array_equal(absmax, state.absmax.numpy())
        np.testing.assert_array_equal(codes, theirs.numpy())
        values = np.empty(x.size, np.float32)
        book.dequantize(codes, absmax, values)
        np.testing.assert_array_equal(values, F.dequantize_blockwise(theirs, state).numpy())


def test_an_all_zero_block_is_zero():
    codes, absmax = quantize(SIGNED, np.zeros(300, np.float32))
    assert absmax.tolist() == [0, 0] and set(codes) == {SIGNED.zero}
    values = np.ones(300, np.float32)
    SIGNED.dequantize(codes, absmax, values)
    assert not values.any()


SHAPES = [("matrix", (64, 100)), ("ragged", (130, 70)), ("long bias", (5000,)), ("small", (3000,)),
          ("tiny matrix", (40, 50))]  # above and below 4096 elements, whole and short last blocks


def test_twenty_steps_match_bitsandbytes():
    """The same parameters and gradient sequence through bitsandbytes' AdamW8bit
    (weight decay on the 2-D tensors, as coregpt does) and State8: after each of 20
    steps the dequantised m and v are within one code of bitsandbytes' (the same
    absmax) and the parameters within 1e-6 relative."""
    rng = np.random.default_rng(1)
    layout = Layout(SHAPES)
    params = rng.standard_normal(layout.size).astype(np.float32) * np.float32(0.1)
    views = layout.views(params)
    torch_params = {name: torch.nn.Parameter(torch.from_numpy(views[name].copy())) for name in views}
    lr, wd, betas, eps = 1e-3, 0.1, (0.9, 0.95), 1e-8
    groups = [{"params": [p for n, p in torch_params.items() if p.ndim == 2], "weight_decay": wd},
              {"params": [p for n, p in torch_params.items() if p.ndim == 1], "weight_decay": 0.0}]
    theirs = bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    state = State8(layout, np.zeros(layout.size, np.uint8), np.zeros(layout.size, np.uint8),
                   np.zeros(adamw8bit.side_layout(layout).size, np.float32))
    worst = {"params": 0.0, "m": 0, "v": 0}
    for t in range(1, 21):
        grads = {name: (rng.standard_normal(views[name].shape) * 10.0 ** rng.uniform(-4, 0)).astype(np.float32)
                 for name in views}
        for name, p in torch_params.items():
            p.grad = torch.from_numpy(grads[name].copy())
        theirs.step()
        for name, shape in SHAPES:
            first, size = layout.offsets[name], int(np.prod(shape))
            state.update(name, first, first + size, params[first:first + size], grads[name].reshape(-1), None,
                         Hyper(lr=lr, t=t, beta1=betas[0], beta2=betas[1], eps=eps,
                               weight_decay=wd if len(shape) == 2 else 0.0), engine=Engine("numpy"))
        mine = state.views()
        for name, shape in SHAPES:
            p = torch_params[name].detach().numpy()
            relative = np.abs(views[name] - p).max() / np.abs(p).max()
            worst["params"] = max(worst["params"], relative)
            assert relative <= 1e-6, (t, name, relative)
            ref = theirs.state[torch_params[name]]
            for moment, key in (("m", "1"), ("v", "2")):
                if size_of(shape) < adamw8bit.MIN_ELEMENTS:
                    assert ref[f"state{key}"].dtype == torch.float32  # bitsandbytes keeps these in fp32 too
                    expected = ref[f"state{key}"].numpy()  # rounding apart (bitsandbytes fuses a multiply-add)
                    np.testing.assert_allclose(mine[f"{moment}."][name], expected, rtol=1e-5,
                                               atol=1e-6 * np.abs(expected).max())
                    continue
                np.testing.assert_allclose(mine[f"{moment}_absmax."][name], ref[f"absmax{key}"].numpy(), rtol=1e-6)
                codes = mine[f"{moment}."][name].astype(int) - ref[f"state{key}"].numpy().astype(int)
                worst[moment] = max(worst[moment], int(np.abs(codes).max()))
                assert np.abs(codes).max() <= 1, (t, name, moment)
    print("20 steps vs bitsandbytes: worst", worst)


def size_of(shape):
    return int(np.prod(shape))


def test_shards_split_no_block():
    layout = Layout(SHAPES)
    for workers in (1, 2, 3, 7):
        bounds = block_bounds(layout, shard_bounds(layout.size, workers))
        assert bounds[0][0] == 0 and bounds[-1][1] == layout.size
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        for start, _ in bounds:
            for name, shape in SHAPES:
                first = layout.offsets[name]
                if first < start < first + size_of(shape) and size_of(shape) >= adamw8bit.MIN_ELEMENTS:
                    assert (start - first) % QBLOCK == 0, (workers, name, start)


@pytest.mark.e2e
def test_training_200_steps_ends_near_fp32(tmp_path):
    """The tiny model, 200 steps from GPT-2 initialisation: the 8-bit run's last loss
    (mean of the last 10 steps) is within 2 % of fp32 AdamW's."""
    rng = np.random.default_rng(3)  # a bigram chain over 300 tokens: there is something to learn
    successors = rng.integers(0, 300, (300, 3))
    tokens = [0]
    for _ in range(60000):
        tokens.append(successors[tokens[-1], rng.integers(0, 3)])
    data = tmp_path / "tokens.bin"
    write_token_file(data, tokens)
    ends = {}
    for optim in ("adamw", "adamw8bit"):
        out = tmp_path / optim
        done = launch("train", "--data", data, "--n-layer", 2, "--n-embd", 64, "--n-head", 4, "--block-size", 64,
                      "--batch-size", 8, "--seq-len", 32, "--steps", 200, "--lr", 3e-3, "--warmup", 10,
                      "--eval-every", 0, "--no-checkpoint", "--workers", 2, "--threads-per-worker", 1,
                      "--optim", optim, "--out-dir", out)
        assert done.returncode == 0, done.stderr
        ends[optim] = np.mean([r["loss"] for r in read_metrics(out) if "loss" in r][-10:])
    print("last-10 mean loss", ends)
    assert abs(ends["adamw8bit"] - ends["adamw"]) <= 0.02 * ends["adamw"]
