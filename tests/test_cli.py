"""What a user sees on screen: the commands' help, the version, where a run's weights
came from and where its files went, and one clear line for a mistyped path."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, launch, worker_processes, write_corpus, write_tiny_inputs

pytestmark = pytest.mark.e2e  # each test runs python -m launch

TINY_FLAGS = ["--model", "small", "--n-layer", 2, "--n-head", 4, "--n-embd", 64, "--block-size", 64,
              "--batch-size", 4, "--seq-len", 32, "--threads-per-worker", 1, "--eval-every", 0,
              "--sample-every", 0]


def test_help_lists_every_command_and_version_prints():
    from launch.cli import COMMANDS
    done = launch("--help")
    assert done.returncode == 0, done.stderr
    for name, text in COMMANDS.items():
        assert f"  {name}" in done.stdout and text in done.stdout, name
    version = launch("--version")
    assert version.returncode == 0 and version.stdout.strip() == "coregpt 0.1.0", version.stdout


def test_command_help_texts():
    prepare = launch("prepare", "--help")
    assert "the last 10% of tokens" in " ".join(prepare.stdout.split()), prepare.stdout
    sample = launch("sample", "--help").stdout
    for flag in ("--max-new-tokens", "--seed"):
        line = sample[sample.index(flag):].split("\n--")[0]
        assert len(" ".join(line.split()).split()) > 3, (flag, line)  # the flag, its metavar and some words
    assert "peft" in launch("export", "--help").stdout.split("options:")[0]


@pytest.mark.parametrize("command", [["sample"], ["export", "--format", "hf", "--out", "x"]])
def test_a_missing_checkpoint_is_named_as_given(command):
    done = launch(*command, "--checkpoint", "runs/nope")
    assert done.returncode == 2
    assert done.stderr.strip() == "coregpt: error: --checkpoint runs/nope does not exist", done.stderr


def test_no_command_says_which_config_runs():
    done = launch(env={"COREGPT_HEAD_ROWS": "many"})  # a malformed knob: refused before anything runs
    assert done.returncode == 2 and "COREGPT_HEAD_ROWS" in done.stderr
    assert done.stderr.startswith(f"coregpt: no command given: training {os.path.join(REPO, 'configs')}"), \
        done.stderr


def test_a_text_file_as_data_suggests_prepare(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("Some words of my own.\n" * 200)
    done = launch("train", *TINY_FLAGS, "--data", text, "--steps", 1, "--out-dir", tmp_path / "run")
    assert done.returncode == 2
    assert f"python -m launch prepare --text {text}" in done.stderr, done.stderr


def test_header_says_where_weights_came_from_and_the_end_where_files_are(tmp_path):
    write_tiny_inputs(tmp_path, seed=0)
    run = tmp_path / "run"
    first = launch("train", *TINY_FLAGS, "--init-from", tmp_path / "init", "--data", tmp_path / "tokens.bin",
                   "--steps", 2, "--out-dir", run)
    assert first.returncode == 0, first.stderr
    assert f"coregpt: weights initialised from {tmp_path / 'init'}\n" in first.stderr
    assert (f"coregpt: run dir {run}: metrics.jsonl, loss.png, checkpoint checkpoints/step_000002 "
            f"(go on with --resume --out-dir {run})") in first.stderr, first.stderr
    again = launch("train", "--resume", "--out-dir", run, "--steps", 3)
    assert again.returncode == 0, again.stderr
    assert f"coregpt: weights resumed from step 2 of {run / 'checkpoints' / 'step_000002'}\n" in again.stderr
    scratch = launch("train", *TINY_FLAGS, "--data", write_corpus(tmp_path, 1, 3000, 1000), "--steps", 1,
                     "--seed", 5, "--no-checkpoint", "--out-dir", tmp_path / "scratch")
    assert scratch.returncode == 0, scratch.stderr
    assert "coregpt: weights initialised from scratch (small, seed 5)\n" in scratch.stderr
    assert f"coregpt: run dir {tmp_path / 'scratch'}: metrics.jsonl, loss.png\n" in scratch.stderr


def test_parallel_auto_says_what_it_chose_and_a_resume_chooses_again(tmp_path):
    """The header names the strategy --parallel auto took and why; run.json keeps
    `auto`, so a resume with other workers chooses again; a named one is just named."""
    data, run = write_corpus(tmp_path, 1, 3000, 1000), tmp_path / "run"
    shape = ["--block-size", 128, "--seq-len", 128, "--data", data]  # 4 rows x 128: 256 tokens a worker of 2
    first = launch("train", *TINY_FLAGS, *shape, "--workers", 2, "--steps", 1, "--out-dir", run)
    assert first.returncode == 0, first.stderr
    assert "2 worker(s) x 1 thread(s), data parallel (auto: 256 tokens a worker, at least 256);" in first.stderr
    assert json.loads((run / "run.json").read_text())["parallel"] == "auto"
    again = launch("train", "--resume", "--out-dir", run, "--steps", 2, "--workers", 1)
    assert again.returncode == 0, again.stderr
    assert "hybrid parallel (auto: one worker: both strategies run the same step);" in again.stderr
    named = launch("train", *TINY_FLAGS, *shape, "--workers", 2, "--steps", 1, "--parallel", "hybrid",
                   "--no-checkpoint", "--out-dir", tmp_path / "named")
    assert named.returncode == 0, named.stderr
    assert "2 worker(s) x 1 thread(s), hybrid parallel; run dir" in named.stderr


def test_exported_files_have_the_umask_mode(tmp_path):
    write_tiny_inputs(tmp_path, seed=0)
    done = launch("export", "--checkpoint", tmp_path / "init", "--format", "hf", "--out", tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "config.json", "vocab.json"):
        assert os.stat(tmp_path / "hf" / name).st_mode & 0o777 == 0o666 & ~mask, name


def any_workers():
    """Worker processes of any coregpt run on this machine."""
    if not os.path.isdir("/proc"):  # macOS
        out = subprocess.run(["ps", "-Ao", "pid=,command="], capture_output=True, text=True).stdout
        return [int(line.split()[0]) for line in out.splitlines() if " -m workers " in line + " "]
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"-m" in argv and b"workers" in argv:
            found.append(int(pid))
    return found


def test_leak_checks_count_only_this_sessions_processes(tmp_path):
    """Another coregpt run training beside the suite (started without the session's
    mark) is not a leak of the test that sees its workers."""
    write_tiny_inputs(tmp_path, seed=0)
    env = {k: v for k, v in os.environ.items() if k != "COREGPT_TEST_SESSION"}
    other = subprocess.Popen([sys.executable, "-m", "launch", "train", *map(str, TINY_FLAGS), "--init-from",
                              str(tmp_path / "init"), "--data", str(tmp_path / "tokens.bin"), "--steps", "1000",
                              "--no-checkpoint", "--oversubscribe", "--out-dir", str(tmp_path / "run")],
                             cwd=REPO, env=dict(env, PYTHONPATH=REPO), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 60
        while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)  # until its first step is done: its workers are up
        assert metrics.exists() and metrics.read_text(), "the other run never trained a step"
        assert any_workers() and worker_processes() == []
    finally:
        other.send_signal(signal.SIGTERM)
        other.wait(timeout=60)


def test_a_run_stopped_before_its_first_checkpoint_is_not_a_loop_of_advice(tmp_path):
    """After Ctrl-C twice before the first checkpoint the run directory holds metrics
    but no checkpoint: neither a fresh run nor --resume sends the user to the other."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 10.9}\n')
    data = write_corpus(tmp_path, 1, 3000, 1000)
    fresh = launch("train", *TINY_FLAGS, "--data", data, "--steps", 1, "--out-dir", run)
    assert fresh.returncode == 2 and "stopped before its first checkpoint" in fresh.stderr, fresh.stderr
    assert "--resume" not in fresh.stderr
    resume = launch("train", "--resume", "--out-dir", run)
    assert resume.returncode == 2 and "stopped before its first checkpoint" in resume.stderr, resume.stderr
    assert "another --out-dir" in resume.stderr
