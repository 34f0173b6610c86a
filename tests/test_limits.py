"""Resource limits caught before they bite, and the platforms we cannot run here.

Docker's 64 MB /dev/shm and a full --out-dir are real tmpfs mounts in a private
mount namespace (`unshare`, as CI runs as root; --map-root-user elsewhere).
macOS is simulated: a sitecustomize removes the Linux-only calls (CPU affinity,
posix_fallocate), hides /proc, /sys and /dev/shm, and limits POSIX shared-memory
names to macOS's 31 bytes."""
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import (REPO, fit_cores, launch, lingering_segments, read_metrics, start_launch, write_corpus,
                      write_tiny_inputs)
from bench.harness import tree_pss_kb  # the sampler behind the benchmarks' peak figures
from workers import resources
from workers.shm import SharedArena

pytestmark = pytest.mark.system  # limits in mount namespaces, measured memory, a simulated macOS

UNSHARE = ["unshare", "--mount", "--propagation", "private"] + ([] if os.geteuid() == 0 else ["--map-root-user"])


def in_mount_namespace(script, timeout=600):
    """Run a bash script in a private mount namespace (its mounts vanish with it)."""
    env = dict(os.environ, PYTHONPATH=REPO, PY=sys.executable)
    return subprocess.run(UNSHARE + ["bash", "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A prepared-corpus directory (train.bin + val.bin) for the default job's shape."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), 0, 40_000, 10_000)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("coregpt: error:")]


@pytest.mark.parametrize("model", ["default job", "gpt2"])
def test_small_dev_shm_is_one_line_then_a_big_enough_one_trains(tmp_path, corpus, model):
    """Docker's default: a 64 MB /dev/shm.  Exit 2 at once naming /dev/shm, the MB
    needed and free, and --shm-size; nothing in /dev/shm, no run directory.  Then a
    tmpfs just big enough (the MB the message asked for, +5 %) trains 2 steps."""
    flags = f"--data {corpus} --workers 2 --steps 2 --eval-every 0 " + " ".join(fit_cores(["--workers", 2]))
    if model == "gpt2":
        flags += " --model gpt2 --batch-size 4"
    out = tmp_path / "run"
    script = f"""
    mount -t tmpfs -o size=64m tmpfs /dev/shm
    start=$(date +%s%N)
    $PY -m launch {flags} --out-dir {out}; echo "rc=$? ms=$(( ($(date +%s%N) - start) / 1000000 ))"
    echo "left: $(ls /dev/shm | wc -l)"
    """
    done = in_mount_namespace(script)
    lines = error_lines(done.stderr)
    assert "rc=2" in done.stdout, done.stdout + done.stderr
    assert int(re.search(r"ms=(\d+)", done.stdout).group(1)) < 10_000
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    need, free = map(lambda v: int(v.replace(",", "")), re.search(
        r"needs ([\d,]+) MiB in /dev/shm but ([\d,]+) MiB are free", lines[0]).groups())
    assert free <= 64 < need and "--shm-size=" in lines[0] and "--ipc=host" in lines[0]
    assert "left: 0" in done.stdout and not out.exists()
    if model == "gpt2":
        return  # 2.5 GB of tmpfs for 2 steps of GPT-2 124M: the small model shows the same
    script = f"""
    mount -t tmpfs -o size={int(need * 1.05) + 1}m tmpfs /dev/shm
    $PY -m launch {flags} --out-dir {out} --no-checkpoint; echo "rc=$?"
    echo "left: $(ls /dev/shm | wc -l)"
    """
    done = in_mount_namespace(script)
    assert "rc=0" in done.stdout and "left: 0" in done.stdout, done.stdout + done.stderr
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]


def test_a_full_dev_shm_later_is_an_error_not_sigbus():
    """Segments are reserved when made (posix_fallocate): a tmpfs that fills up
    is a ResourceError at creation, never a SIGBUS on first touch."""
    script = """
    mount -t tmpfs -o size=8m tmpfs /dev/shm
    $PY -c "
from workers.shm import SharedArena
from workers.resources import ResourceError
try:
    SharedArena.create(4_000_000)
except ResourceError as e:
    print('refused:', e)
"
    echo "rc=$? left: $(ls /dev/shm | wc -l)"
    """
    done = in_mount_namespace(script)
    assert "refused: shared memory: cannot reserve 16 MB in /dev/shm" in done.stdout, done.stdout + done.stderr
    assert "rc=0 left: 0" in done.stdout


@pytest.mark.parametrize("name", ["COREGPT_ATTENTION_BLOCK", "COREGPT_HEAD_ROWS"])
@pytest.mark.parametrize("value", ["abc", "-3", "0"])
def test_malformed_size_variables_are_one_line(tmp_path, corpus, name, value):
    """The block sizes tests shrink through the environment: a bad one never reaches
    a worker (a negative attention block once skipped every block silently)."""
    done = launch("train", "--data", corpus, "--steps", 1, "--workers", 1, "--out-dir", tmp_path / "run",
                  env={name: value})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"coregpt: error: {name} must be a positive integer, got {value!r}"]
    assert not (tmp_path / "run").exists()


def test_model_bigger_than_memory_is_one_line(tmp_path, corpus):
    """Bigger than any machine (GPT-2 XL on this 24 GB one is measured in the README)."""
    out = tmp_path / "run"
    t0 = time.monotonic()
    done = launch("train", "--n-layer", 100, "--n-embd", 12800, "--n-head", 100, "--data", corpus,
                  "--workers", 2, "--out-dir", out)
    assert done.returncode == 2 and time.monotonic() - t0 < 10
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(r"memory: this run needs [\d.]+ GB .* but [\d.]+ GB are available",
                                         lines[0]), done.stderr
    assert not out.exists()


def test_memory_refusal_names_the_cheapest_settings_that_fit(tmp_path, corpus, monkeypatch, capsys):
    """Too big for the memory there is: the one line names the first lighter settings
    that fit (--recompute, 8-bit Adam moments, then the batch split into accumulated
    micro-batches)."""
    from launch import cli
    from launch.config import Settings
    from workers.strategies import STRATEGIES
    data, hybrid = STRATEGIES["data"], STRATEGIES["hybrid"]
    s = Settings(batch_size=8, workers=2, parallel="data")  # each worker whole rows: down to 1 row each
    assert [flags for flags, _ in resources.lighter_settings(s, 1, data)] == [
        "--recompute", "--optim adamw8bit", "--recompute --optim adamw8bit",
        "--batch-size 4 --grad-accum 2", "--batch-size 4 --grad-accum 2 --optim adamw8bit",
        "--batch-size 4 --grad-accum 2 --recompute", "--batch-size 4 --grad-accum 2 --recompute --optim adamw8bit",
        "--batch-size 2 --grad-accum 4", "--batch-size 2 --grad-accum 4 --optim adamw8bit",
        "--batch-size 2 --grad-accum 4 --recompute", "--batch-size 2 --grad-accum 4 --recompute --optim adamw8bit"]
    splits = resources.lighter_settings(Settings(batch_size=8, workers=2, recompute=True), 1, hybrid)
    assert [flags for flags, _ in splits][-2:] == ["--batch-size 1 --grad-accum 8",  # it splits a row too
                                                   "--batch-size 1 --grad-accum 8 --optim adamw8bit"]
    lightest = Settings(batch_size=2, workers=2, recompute=True, parallel="data", optim="adamw8bit")
    assert resources.lighter_settings(lightest, 1, data) == []
    plan = lambda gb: resources.Plan([("x", gb * 1e9)], params=1, workers=1, local_ranks=1,  # noqa: E731
                                     private_per_worker=0, checkpoints=0)
    lighter = [("--recompute", plan(12)), ("--batch-size 4 --grad-accum 2", plan(8))]
    with pytest.raises(resources.ResourceError, match=r"; --batch-size 4 --grad-accum 2 fits \(8\.[0-9] GB\); or "):
        resources.check(plan(20), tmp_path, memory=10e9, cgroup=None, shm_free=None, lighter=lambda: lighter)
    # through `launch train`: between what the run needs and what it needs with --recompute
    args = ["train", "--model", "gpt2", "--batch-size", 2, "--seq-len", 1024, "--workers", 1, "--data", corpus,
            "--out-dir", tmp_path / "run"]
    needs = {}
    for extra in ([], ["--recompute"]):
        monkeypatch.setattr(resources, "meminfo_available", lambda: 10 ** 6)
        monkeypatch.setattr(resources, "cgroup_memory_left", lambda: None)
        assert cli.main(list(map(str, args + extra))) == 2
        needs[bool(extra)] = float(re.search(r"this run needs ([\d.]+) GB", capsys.readouterr().err).group(1))
    assert needs[True] < needs[False]
    monkeypatch.setattr(resources, "meminfo_available", lambda: int((needs[True] + needs[False]) / 2 * 1e9))
    assert cli.main(list(map(str, args))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "; --recompute fits (" in err, err
    assert not (tmp_path / "run").exists()


def test_disk_full_while_checkpointing_then_resume(tmp_path):
    """--out-dir on a 70 MB tmpfs: the step-2 checkpoint (40 MB) fits, step 4's does
    not.  One line, exit 1, no partial directory, `latest` still step 2, which loads;
    after the tmpfs grows, --resume finishes the run with one metrics row per step."""
    write_tiny_inputs(tmp_path, seed=0)
    mnt, host = tmp_path / "mnt", tmp_path / "host"
    mnt.mkdir()
    host.mkdir()
    train = (f"$PY -m launch train --init-from {tmp_path / 'init'} --data {tmp_path / 'tokens.bin'} "
             f"--batch-size 4 --seq-len 32 --workers 2 --eval-every 0 --out-dir {mnt / 'run'} "
             + " ".join(fit_cores(["train", "--workers", 2])))
    script = f"""
    mount -t tmpfs -o size=70m tmpfs {mnt}
    {train} --steps 6 --ckpt-every 2 2> {host / 'full.err'}; echo "rc=$?"
    ls -a {mnt / 'run' / 'checkpoints'} > {host / 'after_full.txt'}
    cp -r {mnt / 'run' / 'checkpoints' / 'step_000002'} {host / 'kept'}
    $PY -m launch sample --checkpoint {mnt / 'run'} --max-new-tokens 2 > /dev/null; echo "sample_rc=$?"
    mount -o remount,size=300m {mnt}
    {train} --resume --steps 6 2> {host / 'resume.err'}; echo "resume_rc=$?"
    cp {mnt / 'run' / 'metrics.jsonl'} {host}
    """
    done = in_mount_namespace(script)
    assert "rc=1" in done.stdout, done.stdout + done.stderr
    full = (host / "full.err").read_text()
    lines = error_lines(full)
    assert len(lines) == 1 and "Traceback" not in full, full
    assert "step 4 checkpoint" in lines[0] and "No space left on device" in lines[0]
    assert "step_000002" in lines[0] and "--resume" in lines[0]
    assert (host / "after_full.txt").read_text().split() == [".", "..", "latest", "step_000002"]
    assert (host / "kept" / "model.safetensors").is_file()
    assert "sample_rc=0" in done.stdout and "resume_rc=0" in done.stdout, (host / "resume.err").read_text()
    assert [r["step"] for r in read_metrics(host) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_read_only_out_dir_is_one_line(tmp_path):
    """An --out-dir on a read-only filesystem: one line naming it, exit 2, before any
    worker starts (nothing in /dev/shm)."""
    write_tiny_inputs(tmp_path, seed=0)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"""
    mount -t tmpfs -o ro,size=100m tmpfs {mnt}
    $PY -m launch train --init-from {tmp_path / 'init'} --data {tmp_path / 'tokens.bin'} --batch-size 4 \
        --seq-len 32 --steps 1 --eval-every 0 --out-dir {mnt / 'run'} 2> {tmp_path / 'err'}; echo "rc=$?"
    """
    done = in_mount_namespace(script)
    stderr = (tmp_path / "err").read_text()
    assert "rc=2" in done.stdout, done.stdout + done.stderr + stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert f"--out-dir {mnt / 'run'} cannot be created or written (Read-only file system)" in lines[0]
    assert lingering_segments() == []


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="PSS is read from Linux's /proc")
@pytest.mark.parametrize("extra", [[], ["--recompute"], ["--parallel", "hybrid"], ["--profile"]])
def test_memory_plan_holds_the_measured_peak(tmp_path, corpus, extra):
    """The header's plan against what a run uses: the default job's shape with 2
    workers, sampling (the coordinator then holds GPT-2's BPE), PSS of the coordinator
    and its workers sampled every 20 ms.  The plan must not be exceeded (the checks
    rely on it) and not be far above (GPT-2 124M at B=2, T=1024: 4.05 GB planned, 3.94
    measured; here the coordinator's and each worker's allowance for libraries weighs
    more).  The default job's shape runs data parallel, so --parallel hybrid is
    checked too; --profile measures the machine's peaks at the end, in large arrays."""
    args = ["train", "--config", os.path.join(REPO, "configs", "default.toml"), "--data", corpus, "--workers", 2,
            "--threads-per-worker", 1, "--steps", 4, "--eval-every", 0, "--sample-every", 2, "--out-dir",
            tmp_path / "run", *extra]
    proc = start_launch(*args)
    peak = 0  # bytes
    while proc.poll() is None:
        peak = max(peak, 1024 * (tree_pss_kb(proc.pid) or 0))
        time.sleep(0.02)
    stderr = proc.communicate()[1]
    assert proc.returncode == 0, stderr
    shared, private = map(float, re.search(r"memory plan: shared ([\d.]+) GB .*private ~([\d.]+) GB",
                                           stderr).groups())
    plan = (shared + private) * 1e9
    assert peak <= 1.05 * plan, (peak, plan)  # 1.05: the plan's figures are rounded to 10 MB
    # PSS splits library pages among every process mapping them: with another coregpt run
    # on the machine this run's peak reads ~10 MB a process lower (310 against 320 MB)
    assert plan <= 1.3 * peak, (peak, plan)


def test_disk_check_before_anything_is_written(tmp_path):
    plan = resources.Plan([("params", 100)], params=10 ** 8, workers=1, local_ranks=1,
                          private_per_worker=0, checkpoints=5)
    with pytest.raises(resources.ResourceError, match=r"a checkpoint of this model takes 1,201 MB"):
        resources.check(plan, tmp_path, memory=None, cgroup=None, shm_free=None, disk_free=10 ** 9)
    warning = resources.check(plan, tmp_path, memory=None, cgroup=None, shm_free=None, disk_free=3 * 10 ** 9)
    assert warning.startswith("warning: keeping 5 checkpoints takes 6.0 GB")


def test_cgroup_memory_limit(tmp_path):
    (tmp_path / "docker" / "abc").mkdir(parents=True)
    (tmp_path / "docker" / "abc" / "memory.max").write_text(f"{4 * 2 ** 30}\n")
    (tmp_path / "docker" / "abc" / "memory.current").write_text(f"{2 ** 30}\n")
    (tmp_path / "self").write_text("0::/docker/abc\n")
    left = resources.cgroup_memory_left(str(tmp_path), str(tmp_path / "self"))
    assert left == 3 * 2 ** 30
    plan = resources.Plan([("params", 4 * 10 ** 9)], params=10 ** 9, workers=1, local_ranks=1,
                          private_per_worker=0, checkpoints=0)
    with pytest.raises(resources.ResourceError, match="left under the cgroup limit"):
        resources.check(plan, tmp_path, memory=10 ** 11, cgroup=left, shm_free=None)


def test_shared_memory_names_fit_macos():
    arena = SharedArena.create(16)
    try:
        assert len("/" + arena.name) <= 30
    finally:
        arena.unlink()
        arena.close()


MACOS = '''
import builtins, errno, os, os.path, _posixshmem
for name in ("sched_getaffinity", "sched_setaffinity", "posix_fallocate"):
    if hasattr(os, name):
        delattr(os, name)
HIDDEN = ("/proc", "/sys", "/dev/shm")
def hidden(path):
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(HIDDEN)
def missing(path):
    raise FileNotFoundError(errno.ENOENT, "No such file or directory (simulated macOS)", path)
def guard(fn, absent):
    return lambda path, *a, **k: absent(path) if hidden(path) else fn(path, *a, **k)
builtins.open = guard(builtins.open, missing)
os.listdir = guard(os.listdir, missing)
os.statvfs = guard(os.statvfs, missing)
os.path.isdir = guard(os.path.isdir, lambda p: False)
os.path.exists = guard(os.path.exists, lambda p: False)
os.path.isfile = guard(os.path.isfile, lambda p: False)
shm_open = _posixshmem.shm_open
def short_shm_open(path, *args, **kwargs):
    if len(path) > 31:
        raise OSError(errno.ENAMETOOLONG, "File name too long", path)
    return shm_open(path, *args, **kwargs)
_posixshmem.shm_open = short_shm_open
'''


def test_simulated_macos_trains_unpinned_with_the_same_losses(tmp_path):
    write_tiny_inputs(tmp_path, seed=1)
    site = tmp_path / "macos"
    site.mkdir()
    (site / "sitecustomize.py").write_text(MACOS)
    flags = ["train", "--init-from", tmp_path / "init", "--data", tmp_path / "tokens.bin", "--batch-size", 4,
             "--seq-len", 32, "--steps", 4, "--workers", 2, "--threads-per-worker", 1, "--eval-every", 0,
             "--oversubscribe"]
    # both runs on the same OpenBLAS kernels: without /proc/cpuinfo the workers cannot
    # tell an AMD CPU with AVX-512, where Linux runs get the Zen kernels (pool.blas_coretype),
    # and other kernels round attention's matmuls differently
    blas = {"OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE") or "Haswell"}
    mac = launch(*flags, "--out-dir", tmp_path / "mac", env={"PYTHONPATH": f"{site}:{REPO}", **blas})
    assert mac.returncode == 0, mac.stderr
    assert "no CPU pinning on this OS" in mac.stderr and "workers not pinned" in mac.stderr
    linux = launch(*flags, "--out-dir", tmp_path / "linux", env=blas)
    assert linux.returncode == 0 and "worker 0: cpus" in linux.stderr
    losses = [[r["loss"] for r in read_metrics(tmp_path / run) if "loss" in r] for run in ("mac", "linux")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_windows_points_to_wsl(monkeypatch, capsys):
    from launch import cli
    monkeypatch.setattr(sys, "platform", "win32")
    assert cli.main(["--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "WSL" in err[0]
