"""Gradients of every parameter against PyTorch autograd, and GPT-2 initialisation."""
import numpy as np
import pytest
import torch

from references import compare_gradients
from torch_gpt2 import TorchGPT2, random_state
from trainer import gemm
from trainer.gemm import Engine
from trainer.model import Layers
from trainer.models.gpt2 import Model as GPT
from trainer.trainable import Full, Weights
from workers.hybrid import assign
from trainer.models import param_layout
from trainer.models.gpt2 import PRESETS, GPTConfig, init_params as init_gpt2


def test_tiny_gradients_match_pytorch():
    loss, torch_loss, rel = compare_gradients(2, 4, 64, 64, B=4, T=32)
    assert abs(loss - torch_loss) < 1e-5
    assert len(rel) == 2 + 12 * 2 + 2
    worst = max(rel, key=rel.get)
    assert rel[worst] <= 1e-5, (worst, rel[worst])


@pytest.mark.system
def test_gpt2_124m_gradients_match_pytorch():
    p = PRESETS["gpt2"]
    loss, torch_loss, rel = compare_gradients(p["n_layer"], p["n_head"], p["n_embd"],
                                              p["block_size"], B=2, T=64)
    assert abs(loss - torch_loss) < 1e-4
    worst = max(rel, key=rel.get)
    assert rel[worst] <= 1e-3, (worst, rel[worst])


@pytest.mark.parametrize("n_layer", [1, 3])
def test_recompute_changes_no_number(n_layer):
    """Alone, --recompute runs the same operations on the same inputs: the loss and
    every gradient are bit-identical to keeping every activation (and match PyTorch
    through the test above); one layer: only the forward's last layer, none recomputed."""
    cfg = GPTConfig(n_layer=n_layer, n_head=4, n_embd=64, block_size=64)
    state = random_state(n_layer, 64, cfg.vocab_size, 64, seed=3)
    layout = param_layout(cfg)
    _, params = layout.allocate()
    for name, value in state.items():
        params[name][...] = value.numpy()
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, 4 * 32 + 1)
    results = []
    for recompute in (False, True):
        _, grads = layout.allocate()
        model = GPT(cfg, 4, 32, Weights(params, Full(cfg)), grads, recompute=recompute, layers=Layers(Engine("numpy")))
        model.load_batch(tokens)
        results.append((model.forward(1.0 / 128), grads))
        model.backward()
    (loss, grads), (loss_again, grads_again) = results
    assert loss == loss_again
    for name in grads:
        assert np.array_equal(grads[name], grads_again[name]), name


def test_forward_is_causal():
    """Changing a later token never changes the loss terms of earlier positions."""
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)
    _, params = param_layout(cfg).allocate()
    init_gpt2(cfg, params, seed=1)
    model = GPT(cfg, 1, 16, Weights(params, Full(cfg)), layers=Layers(Engine("numpy")))
    tokens = np.arange(17) * 101
    model.load_batch(tokens)
    model.forward()
    first = model.acts.mine.logits[:8].copy()
    tokens[12] = 7
    model.load_batch(tokens)
    model.forward()
    np.testing.assert_array_equal(model.acts.mine.logits[:8], first)


def test_gpt2_init_statistics_and_seed():
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64)
    _, a = param_layout(cfg).allocate()
    _, b = param_layout(cfg).allocate()
    init_gpt2(cfg, a, seed=3)
    init_gpt2(cfg, b, seed=3)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert abs(a["wte.weight"].std() - 0.02) < 1e-3
    assert abs(a["h.0.mlp.c_proj.weight"].std() - 0.02 / np.sqrt(2 * 4)) < 1e-3
    assert np.all(a["h.1.ln_2.weight"] == 1) and np.all(a["h.1.attn.c_attn.bias"] == 0)
    init_gpt2(cfg, b, seed=4)
    assert not np.array_equal(a["wte.weight"], b["wte.weight"])


@pytest.mark.parametrize("n_parts", [1, 2, 3, 4, 16])
def test_weight_gradient_tasks_cover_every_parameter_once(n_parts):
    """The hybrid's workers split the weight gradients by task, layer by layer:
    together they must write every gradient element exactly once, and in every
    layer (every barrier) no worker may get more than its share plus a few rows."""
    cfg = GPTConfig(**PRESETS["gpt2"], vocab_size=50257)
    layout = param_layout(cfg)
    written = np.zeros(layout.size, dtype=np.int64)
    loads = {}  # (layer, part) -> weight-gradient elements
    for part, groups in enumerate(assign(Full(cfg), n_parts)):
        for layer, tasks in groups.items():
            for task in tasks:
                for name, lo, hi in task.params:
                    start, rows = layout.offsets[name], layout.shapes[name]
                    width = int(np.prod(rows[1:]))
                    hi = rows[0] if hi is None else hi
                    written[start + lo * width:start + hi * width] += 1
                    loads[layer, part] = loads.get((layer, part), 0) + (hi - lo) * width
    covered = np.concatenate([written[o:o + int(np.prod(layout.shapes[n]))]
                              for n, o in layout.offsets.items()])
    assert covered.min() == covered.max() == 1
    C = cfg.n_embd
    for layer in [None] + list(range(cfg.n_layer)):
        per_part = [loads.get((layer, part), 0) for part in range(n_parts)]
        # one row more of each of 4 matrices, the first slices' biases and layernorms;
        # for the embedding one vocabulary row and wpe, ln_f
        slack = 4 * 4 * C + 12 * C if layer is not None else C + cfg.block_size * C + 2 * C
        assert max(per_part) - min(per_part) <= slack, (layer, per_part)


@pytest.fixture(params=["numpy", "onednn"])
def fp32_engine(request):
    """Attention's batched matmuls by NumPy, or by oneDNN's matmul primitive."""
    return gemm.Engine(request.param)


ATTENTION_SHAPES = [
    (2, 32, 4, 16, 8),  # 4 x 4 blocks, the 6 above the diagonal skipped
    (1, 37, 2, 8, 8),  # T not a multiple of the block: a short last block
    (2, 24, 3, 8, 128),  # one block (the default size)
    (1, 50, 3, 8, 16),
]


def check_attention(engine, qkv, n_head, block):
    """trainer.attention on `engine`, qkv against PyTorch's causal SDPA in float64 and its
    autograd: the output, the gradient of every q, k and v, and the sampler's cached
    queries (half the positions, every key)."""
    from trainer.attention import Workspace, attention_backward, attention_forward
    work = Workspace(engine)
    B, T, C3 = qkv.shape
    C = C3 // 3
    dout = np.random.default_rng((T, 1)).normal(0, 1, (B, T, C)).astype(np.float32)  # apart from random_qkv's
    out, lse = np.zeros((B, T, C), np.float32), np.zeros((B, n_head, T), np.float32)
    attention_forward(work, out, lse, qkv, n_head, block=block)
    dqkv = np.zeros_like(qkv)
    attention_backward(work, dqkv, dout, qkv, out, lse, n_head, block=block)
    reference = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
    q, k, v = (x.view(B, T, n_head, C // n_head).transpose(1, 2) for x in reference.split(C, dim=2))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    y.backward(torch.from_numpy(dout.astype(np.float64)))
    np.testing.assert_allclose(out, y.detach().numpy(), rtol=0, atol=2e-6)
    expected = reference.grad.numpy()
    assert np.abs(dqkv - expected).max() / np.abs(expected).max() <= 2e-6
    start = T // 2  # the sampler's KV cache: queries from `start` on, every key
    cached, cached_lse = np.zeros((B, T - start, C), np.float32), np.zeros((B, n_head, T - start), np.float32)
    attention_forward(work, cached, cached_lse, qkv, n_head, start=start, block=block)
    np.testing.assert_allclose(cached, out[:, start:], rtol=0, atol=1e-6)


def random_qkv(B, T, n_head, head_size):
    return np.random.default_rng(T).normal(0, 1, (B, T, 3 * n_head * head_size)).astype(np.float32)


@pytest.mark.parametrize("B, T, n_head, head_size, block", ATTENTION_SHAPES)
def test_blocked_attention_matches_autograd(fp32_engine, B, T, n_head, head_size, block):
    """The forward's fast path (each query block shifted by its diagonal block's max)."""
    check_attention(fp32_engine, random_qkv(B, T, n_head, head_size), n_head, block)


def count_online_blocks(monkeypatch):
    """-> a list that grows by one per query block the online softmax runs."""
    from trainer import attention
    ran, online = [], attention.online_rows
    monkeypatch.setattr(attention, "online_rows", lambda *args: ran.append(1) or online(*args))
    return ran


@pytest.mark.parametrize("B, T, n_head, head_size, block", ATTENTION_SHAPES)
def test_attention_online_fallback_matches_autograd(fp32_engine, monkeypatch, B, T, n_head, head_size, block):
    """The forward's exact fallback, forced on every query block (no sum is below 0)."""
    from trainer import attention
    monkeypatch.setattr(attention, "SUM_LIMIT", np.float32(0))
    ran = count_online_blocks(monkeypatch)
    check_attention(fp32_engine, random_qkv(B, T, n_head, head_size), n_head, block)
    assert len(ran) >= -(-T // block)


def test_attention_with_a_key_far_above_the_diagonal(fp32_engine, monkeypatch):
    """Key 0 scores ~200 above every later query's other keys: exp(score − the diagonal
    block's max) overflows fp32, so those query blocks must fall back to the online
    softmax (the fast path alone returns NaN)."""
    B, T, n_head, head_size, block = 1, 32, 2, 8, 8
    qkv = random_qkv(B, T, n_head, head_size)
    C = n_head * head_size
    direction = np.zeros(C, np.float32)
    direction[::head_size] = 1  # the first channel of every head
    qkv[:, :, :C] += 25 * direction  # every query
    qkv[:, 0, C:2 * C] += 25 * direction  # key 0: q·k/√8 ≈ 625/2.8 ≈ 220
    ran = count_online_blocks(monkeypatch)
    check_attention(fp32_engine, qkv, n_head, block)
    assert len(ran) >= T // block - 1  # every query block past the first, at least once


@pytest.mark.parametrize("fallback", [False, True])
def test_document_masked_attention_matches_autograd(fp32_engine, monkeypatch, fallback):
    """Packed examples of 1 to 19 tokens (block 8): each query sees only the keys of its
    own example, against SDPA with the block-diagonal causal mask, on the fast path
    and on the online fallback forced on every block."""
    from trainer import attention
    B, T, n_head, head_size, block = 1, 64, 2, 8, 8
    lengths = np.random.default_rng(3).integers(1, 20, T)
    positions = np.concatenate([np.arange(n) for n in lengths])[:T]
    starts = np.arange(T) - positions
    if fallback:
        monkeypatch.setattr(attention, "SUM_LIMIT", np.float32(0))
    work, qkv, C = attention.Workspace(fp32_engine), random_qkv(B, T, n_head, head_size), n_head * head_size
    dout = np.random.default_rng(5).normal(0, 1, (B, T, C)).astype(np.float32)
    out, lse, dqkv = np.zeros((B, T, C), np.float32), np.zeros((B, n_head, T), np.float32), np.zeros_like(qkv)
    attention.attention_forward(work, out, lse, qkv, n_head, block=block, starts=starts)
    attention.attention_backward(work, dqkv, dout, qkv, out, lse, n_head, block=block, starts=starts)
    reference = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
    q, k, v = (x.view(B, T, n_head, head_size).transpose(1, 2) for x in reference.split(C, dim=2))
    keys, queries = np.arange(T)[None, :], np.arange(T)[:, None]
    seen = torch.from_numpy((keys <= queries) & (keys >= starts[:, None]))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=seen).transpose(1, 2).reshape(B, T, C)
    y.backward(torch.from_numpy(dout.astype(np.float64)))
    np.testing.assert_allclose(out, y.detach().numpy(), rtol=0, atol=2e-6)
    expected = reference.grad.numpy()
    assert np.abs(dqkv - expected).max() / np.abs(expected).max() <= 2e-6


def test_kv_cached_sampling_matches_pytorch_through_cache_restarts():
    """Sampling runs the model's own forward over a KV cache: a few positions at a
    time, earlier keys and values read from the cache, and when the context is full
    the cache restarts from the last half.  Every step's logits and the greedy
    tokens equal PyTorch's full forward over the same context."""
    from trainer.sample import Sampler
    n_layer, n_head, n_embd, T, vocab = 2, 2, 32, 8, 97
    cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=T, vocab_size=vocab)
    state = random_state(n_layer, n_embd, vocab, T, seed=4)
    state["wte.weight"] *= 50  # logits far apart: a greedy pick is no coin toss between near-ties
    _, params = param_layout(cfg).allocate()
    for name, value in state.items():
        params[name][...] = value.numpy()
    reference = TorchGPT2(state, n_layer, n_head)
    def expected(context):
        with torch.no_grad():
            return reference.logits(torch.tensor([context]))[0, -1].numpy()
    sampler = Sampler(cfg, params)
    context = [3, 14, 15, 92, 65, 35]
    np.testing.assert_allclose(sampler.forward(context, 0), expected(context), rtol=0, atol=1e-4)
    for position, token in ((6, 89), (7, 79)):  # one position at a time, up to the full context
        context.append(token)
        np.testing.assert_allclose(sampler.forward([token], position), expected(context), rtol=0, atol=1e-4)
    tokens, context, want = [5, 9, 2], [5, 9, 2], []
    for _ in range(20):  # 3 + 20 tokens in a context of 8: the cache restarts several times
        want.append(int(expected(context).argmax()))
        tokens.append(want[-1])
        context = tokens[-(T // 2):] if len(context) == T else context + [want[-1]]
    assert Sampler(cfg, params).generate([5, 9, 2], 20, temperature=0, top_k=0, seed=0) == want


GQA_SHAPES = [  # B, T, query heads, K/V heads, head size, block
    (2, 40, 4, 2, 8, 16),
    (1, 37, 6, 2, 8, 8),  # a short last block, groups of 3
    (2, 24, 4, 1, 8, 128),  # one K/V head for all
]


@pytest.mark.parametrize("B, T, n_head, n_kv_head, head_size, block", GQA_SHAPES)
def test_grouped_query_attention_matches_autograd(fp32_engine, B, T, n_head, n_kv_head, head_size, block):
    """Grouped-query attention (Llama's): each K/V head read by its group of query heads,
    its gradients the sum over the group; against SDPA with the K/V heads repeated, in
    float64, and split between two callers by whole groups (as workers share heads)."""
    from trainer.attention import Workspace, attention_backward, attention_forward
    work, group, C = Workspace(fp32_engine), n_head // n_kv_head, n_head * head_size
    rng = np.random.default_rng(T)
    qkv = rng.normal(0, 1, (B, T, (n_head + 2 * n_kv_head) * head_size)).astype(np.float32)
    dout = rng.normal(0, 1, (B, T, C)).astype(np.float32)
    out, lse, dqkv = np.zeros((B, T, C), np.float32), np.zeros((B, n_head, T), np.float32), np.zeros_like(qkv)
    attention_forward(work, out, lse, qkv, n_head, block=block, n_kv_head=n_kv_head)
    attention_backward(work, dqkv, dout, qkv, out, lse, n_head, block=block, n_kv_head=n_kv_head)
    reference = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
    q, k, v = reference.split([C, n_kv_head * head_size, n_kv_head * head_size], dim=2)
    q = q.view(B, T, n_head, head_size).transpose(1, 2)
    k, v = (x.view(B, T, n_kv_head, head_size).transpose(1, 2).repeat_interleave(group, dim=1) for x in (k, v))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    y.backward(torch.from_numpy(dout.astype(np.float64)))
    np.testing.assert_allclose(out, y.detach().numpy(), rtol=0, atol=2e-6)
    expected = reference.grad.numpy()
    assert np.abs(dqkv - expected).max() / np.abs(expected).max() <= 2e-6
    if n_kv_head > 1:  # two callers, each a whole number of groups, write the same dqkv
        halves, split = np.zeros_like(qkv), n_head // n_kv_head * (n_kv_head // 2)
        for heads in ((0, split), (split, n_head)):
            part = np.zeros((B, heads[1] - heads[0], T), np.float32)
            attention_forward(work, out, part, qkv, n_head, block=block, heads_of=heads, n_kv_head=n_kv_head)
            attention_backward(work, halves, dout, qkv, out, part, n_head, block=block, heads_of=heads,
                               n_kv_head=n_kv_head)
        # (the same sums; oneDNN may round a smaller batch of heads differently)
        np.testing.assert_allclose(halves, dqkv, rtol=0, atol=1e-6 * np.abs(dqkv).max())
    with pytest.raises(ValueError, match="split a group"):
        attention_forward(work, out, lse, qkv, n_head, heads_of=(0, group + 1), n_kv_head=n_kv_head)


@pytest.mark.parametrize("name", ["numpy", "emulated-bf16"])
def test_profiler_counts_each_layers_flops(name):
    """--profile's GFLOP/s: the FLOPs the engine counts inside each layer function over
    one forward and backward equal GPT-2's from its shapes (per block 12·C² weights,
    the tied head V·C, all three products of each); attention counts what it computes,
    at most the full T x T products.  The emulated bf16 engine multiplies a weight in
    widened blocks: counted once."""
    from trainer.profile import TimedLayers
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)
    B, T, C, L = 2, 32, cfg.n_embd, cfg.n_layer
    layout = param_layout(cfg)
    _, params = layout.allocate()
    _, grads = layout.allocate()
    for key, value in random_state(L, C, cfg.vocab_size, 64, 0).items():
        params[key][...] = value.numpy()
    engine = Engine(name)
    low = None
    if engine.low:  # the bf16 copies the matmuls read
        low = layout.views(np.empty(layout.size, engine.weight_dtype))
        for key in params:
            engine.to_low(low[key], params[key])
    layers = TimedLayers(Layers(engine))
    model = GPT(cfg, B, T, Weights(params, Full(cfg), low), grads, layers=layers)
    model.load_batch(np.random.default_rng(0).integers(0, cfg.vocab_size, B * T + 1))
    model.forward(1.0 / (B * T))
    model.backward()
    N, V = B * T, params["wte.weight"].shape[0]
    for kind in ("matmul_forward", "matmul_backward", "matmul_weights_backward"):
        assert layers.flops[kind] == L * 2 * N * 12 * C * C, kind
    for kind in ("lmhead_forward", "lmhead_backward", "lmhead_weights_backward"):
        assert layers.flops[kind] == 2 * N * V * C, kind
    full = L * 2 * (2 * B * T * T * C)  # QK^T and PV over every (query, key)
    assert 0 < layers.flops["attention_forward"] <= full
    assert layers.flops["layernorm_forward"] == layers.flops["gelu_backward"] == 0
