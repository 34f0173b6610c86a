"""Both parallel strategies through the real worker pool: the gradient arena after
one step (before any update) against PyTorch autograd, every tensor, and the
pool's Σ g² against the exact norm; for 1 to 4 workers.  (Through AdamW a wrong
gradient scale would hide: Adam's first step is sign(g).)  And which of them
--parallel auto takes."""
import numpy as np
import pytest
import torch

from conftest import TINY, write_token_file
from torch_gpt2 import TorchGPT2, random_state
from trainer.gemm import Engine
from trainer.models import param_layout
from trainer.models.gpt2 import GPTConfig
from workers import messages as msg
from trainer.trainable import Full
from workers.pool import Batches, WorkerPool
from workers.strategy import PoolShape
from workers import resources
from workers.strategies import STRATEGIES, choose, strategy_for

B, T = 12, 16  # 12 rows: divisible by 1, 2, 3 and 4 workers


def autograd(tokens, state, rows):
    """PyTorch's gradients of the first window of `rows` rows."""
    model = TorchGPT2(state, TINY["n_layer"], TINY["n_head"])
    window = torch.from_numpy(tokens[:rows * T + 1].astype(np.int64))
    model(window[:-1].view(rows, T), window[1:].view(rows, T)).backward()
    return model.grads()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Random tiny weights, a token file, and PyTorch's gradients of the first window."""
    path = tmp_path_factory.mktemp("strategies") / "tokens.bin"
    tokens = np.random.default_rng(7).integers(0, TINY["vocab"], 4 * B * T)
    write_token_file(path, tokens)
    state = random_state(TINY["n_layer"], TINY["n_embd"], TINY["vocab"], TINY["n_ctx"], seed=7)
    return path, state, autograd(tokens, state, B), tokens


def pool_gradients(path, state, parallel, workers, recompute=False, rows=B):
    """One step of the pool on the first window -> ({name: gradient}, Σ g² the workers report)."""
    cfg = GPTConfig(n_layer=TINY["n_layer"], n_head=TINY["n_head"], n_embd=TINY["n_embd"],
                    block_size=TINY["n_ctx"])
    shape = PoolShape(cfg, Full(cfg), rows, T, Engine("numpy"), STRATEGIES[parallel], workers, recompute)
    pool = WorkerPool(shape, Batches(str(path), None, rows), threads=1,
                      optim="adamw")
    try:
        params = param_layout(cfg).views(pool.params.array)
        for name, value in state.items():
            params[name][...] = value.numpy()
        pool.request(msg.Cast())
        reports = pool.request(msg.Step(window=0, scale=1.0 / (rows * T), accumulate=False, last=True))
        grads = {name: view.copy() for name, view in param_layout(cfg).views(pool.grads.array).items()}
        return grads, sum(r.sumsq for r in reports)
    finally:
        pool.close()


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("parallel", list(STRATEGIES))  # a new strategy is tested here too
def test_pool_gradients_match_autograd(reference, parallel, workers, recompute, monkeypatch):
    """The lm head 40 rows at a time: 192 rows are 4 chunks and a shorter last one
    (3 workers: chunks of 39)."""
    monkeypatch.setenv("COREGPT_HEAD_ROWS", "40")  # read where the arenas are sized and in the workers
    path, state, expected, _ = reference
    grads, sumsq = pool_gradients(path, state, parallel, workers, recompute)
    check(grads, sumsq, expected)


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_data_staged_gradients_match_autograd(reference, workers, monkeypatch):
    """The other workers' gradient buffers staged, with one room for the layers'
    buckets (each waits for the one before to be reduced by every worker)."""
    monkeypatch.setenv("COREGPT_HEAD_ROWS", "40")
    monkeypatch.setenv("COREGPT_GRAD_RING", "1")  # read where the arenas are sized and in the workers
    path, state, expected, _ = reference
    grads, sumsq = pool_gradients(path, state, "data", workers)
    check(grads, sumsq, expected)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("rows, workers", [(1, 2), (3, 2), (1, 4), (6, 4)])
def test_hybrid_splits_a_batch_the_workers_do_not_divide(reference, rows, workers, recompute, monkeypatch):
    """Token rows split unevenly, and attention's (row, head) pairs cut through batch
    rows: 3 rows of 4 heads over 2 workers are row 0 and heads 0-1 of row 1, then
    heads 2-3 of row 1 and row 2."""
    monkeypatch.setenv("COREGPT_HEAD_ROWS", "40")
    path, state, _, tokens = reference
    grads, sumsq = pool_gradients(path, state, "hybrid", workers, recompute, rows=rows)
    check(grads, sumsq, autograd(tokens, state, rows))


def check(grads, sumsq, expected):
    assert set(grads) == set(expected)
    rel = {name: float(np.abs(grads[name] - g).max() / np.abs(g).max()) for name, g in expected.items()}
    worst = max(rel, key=rel.get)
    assert rel[worst] <= 1e-5, (worst, rel[worst])
    exact = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in expected.values()))
    assert abs(np.sqrt(sumsq) / exact - 1) <= 2e-5


def test_auto_takes_data_parallelism_from_256_tokens_a_worker():
    """--parallel auto's rule at the shapes measured with both strategies
    (docs/performance.md): the hybrid at B=4, T=64 on 2 workers (128 tokens each:
    the two even), data parallelism at B=8, T=64 (256 each) and B=2, T=1024 (1024
    each); the hybrid wherever the rows do not divide (B=1, T=1024) and for one worker."""
    assert choose(2, 4, 64) == ("hybrid", "128 tokens a worker, under 256")
    assert choose(2, 8, 64) == ("data", "256 tokens a worker, at least 256")
    assert choose(2, 2, 1024) == ("data", "1024 tokens a worker, at least 256")
    assert choose(2, 1, 1024) == ("hybrid", "1 row(s) do not divide among 2 workers; only the hybrid splits a row")
    assert choose(1, 8, 1024)[0] == "hybrid"


def test_auto_takes_the_hybrid_where_only_its_plan_fits(monkeypatch):
    """Data parallelism's per-worker gradient buffers need more memory than the hybrid:
    with memory between the two plans, auto takes the hybrid and says why."""
    from launch.config import Settings, check
    from launch.train import STARTS, choose_engine
    settings = check(Settings(model="small", batch_size=4, seq_len=256, workers=2, threads_per_worker=1,
                              oversubscribe=True, no_checkpoint=True, parallel="auto"))
    _, start = STARTS["full"](settings, None, None)
    engine, _ = choose_engine(settings)
    data, hybrid = (resources.plan_for(settings, start, engine, STRATEGIES[name]).memory for name in ("data", "hybrid"))
    assert data > hybrid
    monkeypatch.setattr(resources, "cgroup_memory_left", lambda: None)
    monkeypatch.setattr(resources, "free_bytes", lambda path: 10 ** 12)  # whatever this machine's /dev/shm
    monkeypatch.setattr(resources, "meminfo_available", lambda: 2 * data)
    assert strategy_for(settings, start, engine, (1, 1)) == (STRATEGIES["data"], "512 tokens a worker, at least 256")
    monkeypatch.setattr(resources, "meminfo_available", lambda: (data + hybrid) / 2)
    chosen, why = strategy_for(settings, start, engine, (1, 1))
    assert chosen is STRATEGIES["hybrid"]
    assert why == f"data parallelism's {data / 1e9:.1f} GB does not fit here, the hybrid's {hybrid / 1e9:.1f} GB does"
