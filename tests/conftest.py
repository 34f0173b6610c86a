import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests"), REPO]  # REPO: bench/, which some tests share code with

# the tiny parity model of the core issue
TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab=50257, n_ctx=64)


def write_token_file(path, tokens):
    """llm.c token file, written here independently of trainer.data."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def write_corpus(directory, seed, train_tokens, val_tokens):
    """A prepared-corpus directory: train.bin and val.bin of random token ids."""
    rng = np.random.default_rng(seed)
    write_token_file(directory / "train.bin", rng.integers(0, TINY["vocab"], train_tokens))
    write_token_file(directory / "val.bin", rng.integers(0, TINY["vocab"], val_tokens))
    return directory


def write_hf_dir(directory, state, n_layer, n_head, n_embd, n_ctx, vocab):
    """A Hugging Face GPT-2 directory: model.safetensors + config.json."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
                   "n_positions": n_ctx, "vocab_size": vocab}, f)


def tiny_state(seed, n_ctx=TINY["n_ctx"]):
    """Random weights of the tiny parity model (torch tensors by HF name)."""
    from torch_gpt2 import random_state
    return random_state(TINY["n_layer"], TINY["n_embd"], TINY["vocab"], n_ctx, seed)


def write_tiny_dir(directory, state, n_ctx=TINY["n_ctx"]):
    write_hf_dir(directory, state, TINY["n_layer"], TINY["n_head"], TINY["n_embd"], n_ctx, TINY["vocab"])


def write_tiny_inputs(directory, seed, n_tokens=4000, n_ctx=TINY["n_ctx"]):
    """directory/init (random tiny GPT-2 with a context of n_ctx) and
    directory/tokens.bin (random ids) -> (state, tokens)."""
    state = tiny_state(seed, n_ctx)
    write_tiny_dir(directory / "init", state, n_ctx)
    tokens = np.random.default_rng(seed).integers(0, TINY["vocab"], n_tokens).astype(np.uint16)
    write_token_file(directory / "tokens.bin", tokens)
    return state, tokens


def available_cores(cpus=None):
    """The cores a run may use here (or on the first `cpus` CPUs of this process)."""
    from workers.placement import read_topology
    cores = read_topology().available()
    return cores if cpus is None else min(cpus, cores)


def flag_value(args, flag, default):
    """The last value given to flag (as argparse reads it), default if none or not a number."""
    if flag not in args:
        return default
    value = args[len(args) - 1 - args[::-1].index(flag) + 1] if args[-1] != flag else ""
    return int(value) if value.isdigit() else default


def fit_cores(args, ranks=1, cpus=None):
    """["--oversubscribe"] when this machine has fewer cores than a training run's
    workers × threads (× MPI ranks), so every test runs on 1 core or 64; the core
    check itself is tested with a pinned CPU count (launch(strict_cores=True))."""
    args = [str(a) for a in args]
    if not args or "--oversubscribe" in args or not (args[0] == "train" or args[0].startswith("-")):
        return []
    need = ranks * flag_value(args, "--workers", 1) * flag_value(args, "--threads-per-worker", 1)
    return ["--oversubscribe"] if need > available_cores(cpus) else []


def pin_to(cpus):
    """preexec_fn running the child on the first `cpus` CPUs of this process's set."""
    if cpus is None:
        return None
    chosen = sorted(os.sched_getaffinity(0))[:cpus]
    return lambda: os.sched_setaffinity(0, chosen)


def launch(*args, cwd=None, env=None, timeout=600, cpus=None, strict_cores=False, input=None):
    """Run `python -m launch ARGS` -> CompletedProcess (text); cpus: pin it to that
    many CPUs; strict_cores: no --oversubscribe added on small machines; input: its stdin."""
    full_env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    extra = [] if strict_cores else fit_cores(args, cpus=cpus)
    return subprocess.run([sys.executable, "-m", "launch", *map(str, args), *extra], cwd=cwd or REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout, input=input,
                          preexec_fn=pin_to(cpus))


def start_launch(*args, **popen):
    """Start `python -m launch ARGS` (with --oversubscribe where the machine is too
    small, as launch() adds) -> Popen with text stdout and stderr pipes."""
    args = [str(a) for a in args]
    return subprocess.Popen([sys.executable, "-m", "launch", *args, *fit_cores(args)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# Every process this session starts (its runs, their workers) inherits this mark: the
# leak checks count only the suite's own, so it passes beside another coregpt run.
SESSION = f"COREGPT_TEST_SESSION={os.getpid()}"
os.environ["COREGPT_TEST_SESSION"] = str(os.getpid())


def coregpt_segments():
    if not os.path.isdir("/dev/shm"):  # macOS: POSIX shared memory has no directory to list
        return []
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("coregpt-"))


def lingering(listing, ignore=(), wait=10.0):
    """The names listing() still gives after up to `wait` seconds, less those in
    `ignore`: what a run leaked.  A pool unlinks its segments (and removes its socket
    directory) as soon as its workers have mapped them (connected); another run
    starting beside the suite holds its own only a moment."""
    deadline = time.monotonic() + wait
    while True:
        left = [name for name in listing() if name not in ignore]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def lingering_segments(ignore=(), wait=10.0):
    """coregpt segments still linked after up to `wait` seconds (see lingering)."""
    return lingering(coregpt_segments, ignore, wait)


def own(pid):
    """Process pid was started by this test session (it carries SESSION)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return SESSION.encode() in f.read().split(b"\0")
    except OSError:
        return False


def worker_processes():
    """This session's worker processes."""
    if not os.path.isdir("/proc"):  # macOS: ask ps, which shows a process's environment with -E
        out = subprocess.run(["ps", "-wwEAo", "pid=,command="], capture_output=True, text=True).stdout
        return [int(line.split()[0]) for line in out.splitlines()
                if " -m workers " in line + " " and SESSION in line.split()]
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"-m" in argv and b"workers" in argv and own(pid):
            found.append(int(pid))
    return found


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test must leave no coregpt segment in /dev/shm and no worker process."""
    before = coregpt_segments()
    yield
    assert lingering_segments(ignore=before) == [], "a test left coregpt- segments in /dev/shm"
    assert worker_processes() == [], "a test left worker processes running"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """The Shakespeare corpus is prepared once per session in a private cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture
def engine(request):
    """The GEMM engine named by an indirect parameter (a test passes it where it multiplies)."""
    from trainer import gemm
    return gemm.Engine(request.param)
