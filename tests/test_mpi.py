"""The MPI backend under `mpiexec -n 2` on this machine: same numerics as the
shared-memory backend and PyTorch, hierarchical workers, a dying rank.
CI installs the [mpi] extra (mpi4py + the mpich wheel), so these always run."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO, fit_cores, launch, lingering, read_metrics, worker_processes
from references import B, CLIP, LR, STEPS, T, WD
from test_parity import case  # noqa: F401  (the parity fixture)

pytestmark = pytest.mark.system  # MPI jobs


def mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.path.exists(beside) else shutil.which("mpiexec")
    assert found, "mpiexec not found: install the [mpi] extra (pip install '.[mpi]')"
    return found


def mpi_launch(n, *args, timeout=600):
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "launch", *map(str, args), *fit_cores(args, ranks=n)]
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                          text=True, timeout=timeout)


def parity_flags(root, out, *extra):
    return ["train", "--init-from", root / "init", "--data", root / "tokens.bin", "--data-order", "sequential",
            "--batch-size", B,
            "--seq-len", T, "--steps", STEPS, "--lr", LR, "--lr-schedule", "constant", "--warmup", 0,
            "--weight-decay", WD, "--grad-clip", CLIP, "--threads-per-worker", 1, "--eval-every", 0,
            "--out-dir", out, *extra]


def losses(run):
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


@pytest.mark.parametrize("parallel", ["hybrid", "data"])
def test_mpi_two_ranks_match_pytorch(case, parallel):  # noqa: F811
    """...and every rank ends with the same weights to the bit (each rank checks a
    digest of its parameters against the others' at the end of the run)."""
    root, expected_losses, expected_weights, _ = case
    out = root / f"mpi2-{parallel}"
    done = mpi_launch(2, *parity_flags(root, out, "--backend", "mpi", "--parallel", parallel))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("step      8/8") == 1  # only rank 0 reports
    assert "all 2 ranks hold bit-identical weights" in done.stderr
    np.testing.assert_allclose(losses(out), expected_losses, rtol=0, atol=1e-4)
    weights = load_file(out / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors")
    for name, value in expected_weights.items():
        np.testing.assert_allclose(weights[name], value, rtol=0, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("parallel", ["hybrid", "data"])
def test_hierarchical_matches_shared_memory(case, parallel):  # noqa: F811
    root = case[0]
    mpi, shm = root / f"mpi2x2-{parallel}", root / f"shm4-{parallel}"
    done = mpi_launch(2, *parity_flags(root, mpi, "--backend", "mpi", "--workers", 2, "--oversubscribe",
                                       "--parallel", parallel))
    assert done.returncode == 0, done.stderr
    assert "2 MPI ranks x 2 worker(s)" in done.stderr
    done = launch(*parity_flags(root, shm, "--workers", 4, "--oversubscribe", "--parallel", parallel))
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(losses(mpi), losses(shm), rtol=0, atol=1e-5)


def test_bad_input_under_mpi_is_one_line(case, tmp_path):  # noqa: F811
    root = case[0]
    done = mpi_launch(2, *parity_flags(root, tmp_path / "run", "--backend", "mpi",
                                       "--data", tmp_path / "missing.bin"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.bin does not exist" in lines[0], done.stderr
    done = mpi_launch(2, *parity_flags(root, tmp_path / "run", "--backend", "mpi", "--workers", 4, "--parallel", "data"))
    assert done.returncode == 2 and "not divisible by --workers 4 x 2 MPI ranks" in done.stderr
    # without --backend mpi, two ranks would train two copies into one directory
    done = mpi_launch(2, *parity_flags(root, tmp_path / "run"))
    assert done.returncode == 2 and done.stderr.count("pass --backend mpi") == 1
    assert not (tmp_path / "run").exists()


def rank_pids(mpiexec_pid):
    """-> {rank: pid} of the python ranks started under this mpiexec."""
    ranks = {}
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"launch" in argv and b"--backend" in argv and b"PMI_RANK" in env:
            ranks[int(env[b"PMI_RANK"])] = int(pid)
    return ranks


def test_killed_rank_ends_the_job_and_resume_works(case, tmp_path):  # noqa: F811
    root = case[0]
    run = tmp_path / "run"
    tmp_before = [d for d in os.listdir("/tmp") if d.startswith("coregpt-")]
    shm_before = [n for n in os.listdir("/dev/shm") if n.startswith("mpich_shm_")]
    args = parity_flags(root, run, "--backend", "mpi", "--ckpt-every", 2)
    args[args.index("--steps") + 1] = 100000
    proc = subprocess.Popen([mpiexec(), "-n", "2", sys.executable, "-m", "launch", *map(str, args),
                             *fit_cores(args, ranks=2)],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or len(read_metrics(run)) < 5:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    ranks = rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGKILL)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 15
    assert proc.returncode != 0
    assert "BAD TERMINATION" in out and "signal 9" in out, out  # mpiexec names the signal
    while worker_processes() and time.monotonic() - t0 < 15:
        time.sleep(0.1)
    assert worker_processes() == []
    assert lingering(lambda: [d for d in os.listdir("/tmp") if d.startswith("coregpt-")], tmp_before) == []
    assert lingering(lambda: [n for n in os.listdir("/dev/shm") if n.startswith("mpich_shm_")], shm_before) == []
    k = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert k >= 2
    done = mpi_launch(2, "train", "--resume", "--out-dir", run, "--steps", k + 2)
    assert done.returncode == 0, done.stderr
    assert "on 2 MPI ranks" in done.stderr  # the run's own backend, without --backend mpi
    assert [r["step"] for r in read_metrics(run)] == list(range(1, k + 3))


@pytest.mark.parametrize("steps", [4])
def test_mpi_runs_repeat_bitwise(case, tmp_path, steps):  # noqa: F811
    root = case[0]
    runs = []
    for name in ("a", "b"):
        args = parity_flags(root, tmp_path / name, "--backend", "mpi")
        args[args.index("--steps") + 1] = steps
        done = mpi_launch(2, *args)
        assert done.returncode == 0, done.stderr
        runs.append(losses(tmp_path / name))
    assert runs[0] == runs[1]
