"""The registry of parallel strategies, by the name --parallel takes, and the rule
--parallel auto picks one by."""
from workers.data_parallel import DataParallel
from workers.hybrid import Hybrid

STRATEGIES = {cls.name: cls for cls in (Hybrid, DataParallel)}
AUTO = "auto"

# Tokens a step per worker from which data parallelism is the faster strategy: its
# per-step cost (reducing a whole gradient buffer) is fixed and its GEMMs are as tall as
# its own rows, while the hybrid's costs grow with the rows (every worker reads every
# row's activations; barriers between each layer's phases).  Measured with GPT-2 124M on
# 2 workers (docs/performance.md): the hybrid faster at 64 tokens a worker, the two
# within noise of each other at 128 (B=4, T=64: either was ahead by 7-8 % in different
# runs), data parallelism faster from 256 on, by 23 % at 1024 (B=2, T=1024).
DATA_TOKENS = 256


def choose(workers, rows, seq_len):
    """--parallel auto for a pool of `workers` taking `rows` batch rows of `seq_len`
    tokens -> (strategy name, why, in a few words)."""
    if workers == 1:
        return Hybrid.name, "one worker: both strategies run the same step"
    if rows % workers:
        return Hybrid.name, f"{rows} row(s) do not divide among {workers} workers; only the hybrid splits a row"
    tokens = rows // workers * seq_len
    if tokens >= DATA_TOKENS:
        return DataParallel.name, f"{tokens} tokens a worker, at least {DATA_TOKENS}"
    return Hybrid.name, f"{tokens} tokens a worker, under {DATA_TOKENS}"


def batch_unit(parallel, workers):
    """What a pool's batch rows must divide by under --parallel `parallel` (auto:
    nothing; it takes data parallelism only where the rows divide)."""
    return 1 if parallel == AUTO else STRATEGIES[parallel].batch_unit(workers)


def strategy_for(settings, start, engine, ranks):
    """-> (the run's strategy class, why --parallel auto chose it, or None where
    --parallel named it).  Auto takes `choose`'s pick, or the hybrid where only the
    hybrid's plan fits this machine (data parallelism's gradient buffers)."""
    from workers.resources import fits, plan_for
    if settings.parallel != AUTO:
        return STRATEGIES[settings.parallel], None
    name, why = choose(settings.workers, settings.batch_size // ranks[1], settings.seq_len)
    if name != Hybrid.name:
        plans = [plan_for(settings, start, engine, STRATEGIES[n], ranks) for n in (name, Hybrid.name)]
        if not fits(plans[0]) and fits(plans[1]):
            return Hybrid, (f"data parallelism's {plans[0].memory / 1e9:.1f} GB does not fit here, "
                            f"the hybrid's {plans[1].memory / 1e9:.1f} GB does")
    return STRATEGIES[name], why
