"""Bad input is rejected with one line and exit 2; killed processes and
non-finite steps lose nothing and leak nothing; nothing is ever unpickled."""
import os
import signal
import stat
import time

import numpy as np
import pytest
import torch

from conftest import (REPO, launch, lingering_segments, own, read_metrics, start_launch, tiny_state,
                      worker_processes, write_hf_dir, write_tiny_dir, write_tiny_inputs, write_token_file)

pytestmark = pytest.mark.e2e  # each test runs python -m launch

BATCH = ["--batch-size", 4, "--seq-len", 32, "--threads-per-worker", 1, "--eval-every", 0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    state, _ = write_tiny_inputs(d, seed=9)
    write_token_file(d / "short.bin", np.arange(100))
    write_token_file(d / "big_ids.bin", np.full(500, 60000))
    write_token_file(d / "zero.bin", [])
    (d / "empty.bin").write_bytes(b"")
    (d / "magic.bin").write_bytes(np.full(300, 7, dtype=np.int32).tobytes())
    (d / "truncated.bin").write_bytes((d / "tokens.bin").read_bytes()[:2000])
    (d / "fake.safetensors").write_bytes(b"this is not a safetensors file")
    broken = dict(state)
    del broken["h.1.mlp.c_fc.bias"]
    write_hf_dir(d / "missing_tensor", broken, 2, 4, 64, 64, 50257)
    write_hf_dir(d / "bad_shape", dict(state, **{"h.0.ln_2.bias": torch.zeros(65)}), 2, 4, 64, 64, 50257)
    header = np.zeros(256, dtype=np.int32)
    header[:8] = (20240326, 9, 64, 50257, 2, 4, 64, 50304)
    (d / "v9.bin").write_bytes(header.tobytes() + b"\0" * 4096)
    torch.save(state, d / "pickled.bin")
    torch.save(state, d / "pickled.pt")
    os.makedirs(d / "pickle_dir")
    torch.save(state, d / "pickle_dir" / "pytorch_model.bin")
    (d / "bad.toml").write_text("steps = 3\nlr = = 2\n")
    (d / "unknown.toml").write_text("steps = 3\nbatchsize = 4\n")
    (d / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (d / "blank.txt").write_text("  \n\n")
    (d / "a_file").write_text("keep me")
    return d


def train_args(files, *extra):
    return ["train", "--init-from", files / "init", "--data", files / "tokens.bin", *BATCH, *extra]


BAD_TRAIN = [
    (["--workers", "-1"], "--workers must be at least 1, got -1"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--workers", "x"], "argument --workers: invalid int value: 'x'"),
    (["--workers", "3", "--parallel", "data"], "--batch-size 4 is not divisible by --workers 3"),
    (["--workers", "2", "--threads-per-worker", "1"], "exceeds the 1 available cores; lower them or pass "
                                                      "--oversubscribe"),
    (["--data", "{d}/nope.bin"], "does not exist"),
    (["--data", "{d}/magic.bin"], "is not an llm.c token file: magic 7"),
    (["--data", "{d}/truncated.bin"], "is truncated: header says 4000 tokens"),
    (["--data", "{d}/empty.bin"], "shorter than the header"),
    (["--data", "{d}/zero.bin"], "holds no tokens"),
    (["--data", "{d}/short.bin"], "holds 100 tokens, fewer than one batch needs (129)"),
    (["--data", "{d}/big_ids.bin"], "holds token id 60000, outside the model's vocabulary of 50257"),
    (["--init-from", "{d}/nope"], "--init-from {d}/nope does not exist"),
    (["--init-from", "{d}/fake.safetensors"], "is not a readable .safetensors file"),
    (["--init-from", "{d}/missing_tensor"], "tensor h.1.mlp.c_fc.bias is missing"),
    (["--init-from", "{d}/bad_shape"], "tensor h.0.ln_2.bias has shape (65,), expected (64,)"),
    (["--init-from", "{d}/v9.bin"], "unknown llm.c checkpoint version 9"),
    (["--init-from", "{d}/pickled.bin"], "is a pickle (PyTorch) file; coregpt never unpickles"),
    (["--init-from", "{d}/pickled.pt"], "is a pickle (PyTorch) file; coregpt never unpickles"),
    (["--init-from", "{d}/pickle_dir"], "only pytorch_model.bin, a pickle coregpt never loads"),
    (["--config", "{d}/nope.toml"], "config {d}/nope.toml does not exist"),
    (["--config", "{d}/bad.toml"], "(at line 2, column 6): 'lr = = 2'"),
    (["--config", "{d}/unknown.toml"], "unknown key 'batchsize'"),
    (["--seq-len", "65"], "--seq-len 65 is above the model's context of 64"),
    (["--lr", "-1e-3"], "--lr must not be negative"),
    (["--steps", "-2"], "--steps must not be negative"),
    (["--out-dir", "{d}/a_file"], "is a file, not a directory"),
    (["--resume", "--out-dir", "{d}/no_run"], "has no checkpoint to resume from"),
]


def check_rejected(done, message):
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coregpt: error: "), done.stderr
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("flags, message", BAD_TRAIN, ids=[m[:40] for _, m in BAD_TRAIN])
def test_bad_train_input(tmp_path, files, flags, message):
    flags = [f.format(d=files) for f in flags]
    out = tmp_path / "run"
    extra = [] if "--out-dir" in flags else ["--out-dir", out]
    # on one pinned CPU, so the core check means the same on any machine
    check_rejected(launch(*train_args(files, *flags, *extra), cpus=1, strict_cores=True),
                   message.format(d=files))
    assert not out.exists()  # nothing half-written
    assert (files / "a_file").read_text() == "keep me"


def test_named_gpt2_offline_says_to_pass_a_local_path(tmp_path, files):
    done = launch(*train_args(files, "--init-from", "gpt2", "--out-dir", tmp_path / "run"),
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, timeout=60)
    check_rejected(done, "cannot download 'gpt2': no network")
    assert "pass a local path" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["sample", "--checkpoint", "{d}/nope"], "--checkpoint {d}/nope does not exist"),
    (["prepare", "--text", "{d}/nope.txt", "--out", "{d}/p1"], "text file {d}/nope.txt does not exist"),
    (["prepare", "--text", "{d}/blank.txt", "--out", "{d}/p2"], "is empty"),
    (["prepare", "--text", "{d}/latin1.txt", "--out", "{d}/p3"], "is not UTF-8 text"),
    (["export", "--checkpoint", "{d}/init", "--format", "onnx", "--out", "{d}/e"], "unknown --format 'onnx'"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_bad_input_other_commands(files, args, message):
    check_rejected(launch(*[a.format(d=files) for a in args]), message.format(d=files))
    for name in ("p1", "p2", "p3", "e"):
        assert not (files / name).exists()


def children(pid):
    """Worker pids whose parent is `pid`."""
    found = []
    for p in worker_processes():
        with open(f"/proc/{p}/stat") as f:
            if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(p)
    return sorted(found)


def start_run(files, run, *extra):
    return start_launch(*train_args(files, "--workers", 2, "--steps", 100000, "--ckpt-every", 2, "--out-dir",
                                    run, *extra))


def wait_for_steps(proc, run, n):
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or len(read_metrics(run)) < n:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def two_workers_running(files, run, *extra):
    """A 2-worker run past its fifth step -> (coordinator process, worker pids)."""
    proc = start_run(files, run, *extra)
    wait_for_steps(proc, run, 5)
    workers = children(proc.pid)
    assert len(workers) == 2
    return proc, workers


def resume_works(run):
    k = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    done = launch("train", "--resume", "--out-dir", run, "--steps", k + 1)
    assert done.returncode == 0, done.stderr
    assert read_metrics(run)[-1]["step"] == k + 1
    return k


@pytest.mark.parametrize("parallel", ["hybrid", "data"])
def test_killed_worker_is_reported_and_run_resumes(tmp_path, files, parallel):
    run = tmp_path / "run"
    proc, workers = two_workers_running(files, run, "--parallel", parallel)
    os.kill(workers[1], signal.SIGKILL)
    t0 = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 1
    assert "worker 1" in stderr and "SIGKILL" in stderr and "Traceback" not in stderr
    assert worker_processes() == [] and lingering_segments() == []
    assert resume_works(run) >= 2


def test_killed_coordinator_leaves_nothing_behind(tmp_path, files):
    run = tmp_path / "run"
    proc, workers = two_workers_running(files, run)
    with open(f"/proc/{workers[0]}/cmdline", "rb") as f:
        endpoint = f.read().split(b"\0")[3].decode()
    socket_dir = os.path.dirname(endpoint.removeprefix("ipc://"))
    # by design nothing is left to leak: the socket dir went once the workers connected,
    # the segments lost their names once mapped; only the mappings keep them alive
    assert not os.path.exists(socket_dir) and lingering_segments() == []
    assert mapped_segments(workers[0]), "the workers map no coregpt segment?"
    proc.kill()
    proc.communicate()
    t0 = time.monotonic()
    while worker_processes() and time.monotonic() - t0 < 15:
        time.sleep(0.1)
    assert worker_processes() == [], "workers outlived the coordinator by 15 s"
    holders = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
               if mapped_segments(pid) and own(pid)]
    assert holders == [], "processes still map coregpt shared memory after the kill"
    assert resume_works(run) >= 2


def test_one_run_per_directory(tmp_path, files):
    """A second train, or a resume, into a run directory in use: one line, exit 2,
    naming the pid that holds it, before it writes anything; the first run goes on
    to its end unharmed.  (A SIGKILLed run's lock goes with it: see the resume
    after the kill above.)"""
    run, steps = tmp_path / "run", 100
    first = start_launch(*train_args(files, "--steps", steps, "--out-dir", run))
    try:
        wait_for_steps(first, run, 1)
        # both at once, while the first has most of its steps to go
        seconds = [start_launch(*train_args(files, "--steps", steps + 10, "--out-dir", run), *extra)
                   for extra in ([], ["--resume"])]
        for second in seconds:
            stderr = second.communicate(timeout=120)[1]
            errors = [line for line in stderr.splitlines() if line.startswith("coregpt: error:")]
            assert second.returncode == 2, stderr
            assert len(errors) == 1 and "Traceback" not in stderr, stderr
            assert f"in use by another coregpt run (pid {first.pid})" in errors[0]
        _, stderr = first.communicate(timeout=600)
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == 0, stderr
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, steps + 1))


def mapped_segments(pid):
    """coregpt shared-memory segments process pid maps (their names are unlinked)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return {line.split()[-2] for line in f if "/dev/shm/coregpt-" in line}
    except OSError:
        return set()


@pytest.mark.parametrize("skip", [False, True])
def test_nonfinite_loss(tmp_path, files, skip):
    state = tiny_state(seed=9)
    state["h.0.ln_1.weight"][3] = float("nan")
    write_tiny_dir(tmp_path / "nan", state)
    run = tmp_path / "run"
    done = launch("train", "--init-from", tmp_path / "nan", "--data", files / "tokens.bin", *BATCH,
                  "--steps", 3, "--workers", 2, "--out-dir", run, *(["--skip-nonfinite"] if skip else []))
    if skip:
        assert done.returncode == 0, done.stderr
        rows = read_metrics(run)
        assert [r["skipped_nonfinite"] for r in rows] == [1, 2, 3]
        assert all(r["loss"] is None for r in rows)
    else:
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert "step 1: loss nan" in done.stderr and "not applied" in done.stderr
        assert not (run / "checkpoints").exists()


def test_no_pickle_in_the_code():
    for package in ("trainer", "workers", "launch"):
        for name in os.listdir(os.path.join(REPO, package)):
            if name.endswith(".py"):
                with open(os.path.join(REPO, package, name)) as f:
                    text = f.read()
                for word in ("import pickle", "torch.load", "allow_pickle=True", "np.load("):
                    assert word not in text, f"{package}/{name} uses {word}"


def test_shared_memory_and_socket_permissions(files):
    from trainer.gemm import Engine
    from trainer.models.gpt2 import GPTConfig
    from workers import messages as msg
    from workers.hybrid import Hybrid
    from trainer.trainable import Full
    from workers.pool import Batches, WorkerPool
    from workers.strategy import PoolShape
    from workers.shm import SharedArena
    arena = SharedArena.create(1000)
    try:
        mode = stat.S_IMODE(os.stat(f"/dev/shm/{arena.name}").st_mode)
        assert mode == 0o600
        assert arena.name.startswith("coregpt-") and len(arena.name) == len("coregpt-") + 20
    finally:
        arena.unlink()
        arena.close()
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)
    shape = PoolShape(cfg, Full(cfg), 4, 32, Engine("numpy"), Hybrid, 1)
    pool = WorkerPool(shape, Batches(str(files / "tokens.bin"), None, 4), threads=1,
                      optim="adamw")
    try:
        assert pool.socket_dir_mode == 0o700
        assert os.path.basename(pool.socket_dir).startswith("coregpt-")
        # both removed as soon as every worker had mapped / connected
        assert lingering_segments() == []
        assert not os.path.exists(pool.socket_dir)
        assert pool.request(msg.SumSq())[0].sumsq == 0.0  # still talking
    finally:
        pool.close()
