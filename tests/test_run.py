"""`launch train` end to end on a tiny model: outputs on disk, config handling,
seeds, and clean failures."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import launch, read_metrics, write_corpus

pytestmark = pytest.mark.e2e  # each test runs python -m launch

TINY_FLAGS = ["--model", "small", "--n-layer", 2, "--n-head", 4, "--n-embd", 64, "--block-size", 64,
              "--batch-size", 4, "--seq-len", 32, "--threads-per-worker", 1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"), 5, 3000, 1000)


def train(out, data_dir, *extra):
    return launch("train", *TINY_FLAGS, "--data", data_dir, "--out-dir", out, *extra)


def test_outputs_of_a_run(tmp_path, data_dir):
    out = tmp_path / "run"
    done = train(out, data_dir, "--steps", 4, "--workers", 2, "--eval-every", 2, "--eval-steps", 2)
    assert done.returncode == 0, done.stderr
    rows = read_metrics(out)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [0, 2, 4]  # before step 1 too
    for r in steps:
        assert set(r) == {"step", "loss", "lr", "grad_norm", "step_ms", "tokens_per_s"}
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    assert 10.0 < steps[0]["loss"] < 11.5  # ln(50257) = 10.82 at initialisation
    assert "step      4/4" in done.stderr and "val loss" in done.stderr
    ckpt = out / "checkpoints" / "step_000004"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert sorted(os.listdir(ckpt)) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                       "state.json"]
    hf = json.loads((ckpt / "config.json").read_text())
    assert (hf["n_layer"], hf["n_head"], hf["n_embd"], hf["n_positions"]) == (2, 4, 64, 64)
    weights = load_file(ckpt / "model.safetensors")
    assert weights["wte.weight"].shape == (50257, 64) and weights["wte.weight"].dtype == np.float32
    assert len(weights) == 2 + 12 * 2 + 2
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 4 and state["config"]["batch_size"] == 4


def test_cosine_schedule_logged(tmp_path, data_dir):
    out = tmp_path / "run"
    done = train(out, data_dir, "--steps", 5, "--lr", 1e-3, "--warmup", 2, "--min-lr", 1e-4,
                 "--eval-every", 0, "--no-checkpoint")
    assert done.returncode == 0, done.stderr
    lrs = [r["lr"] for r in read_metrics(out)]
    # warmup 1/2, 2/2, then cosine from lr down to min_lr at the last step
    np.testing.assert_allclose(lrs, [5e-4, 1e-3, 1e-3, 5.5e-4, 1e-4], rtol=1e-12)
    assert not (out / "checkpoints").exists()


def test_same_seed_same_losses_other_seed_differs(tmp_path, data_dir):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        done = train(tmp_path / name, data_dir, "--steps", 3, "--seed", seed, "--workers", 2,
                     "--eval-every", 0, "--no-checkpoint")
        assert done.returncode == 0, done.stderr
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name)]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_toml_config_and_flags_win(tmp_path, data_dir):
    config = tmp_path / "run.toml"
    config.write_text(f'steps = 2\nlr = 0.5\n"eval-every" = 0\nno_checkpoint = true\n'
                      f'data = "{data_dir}"\n')
    out = tmp_path / "run"
    done = launch("train", "--config", config, *TINY_FLAGS, "--lr", 1e-3, "--lr-schedule", "constant",
                  "--out-dir", out)
    assert done.returncode == 0, done.stderr
    rows = read_metrics(out)
    assert [r["lr"] for r in rows] == [1e-3, 1e-3]


@pytest.mark.parametrize("content, message", [
    ("stepz = 3\n", "unknown key 'stepz'"),
    ("steps = 3\nlr = \n", "is not valid TOML"),
    ('steps = "many"\n', "key 'steps' must be int"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, content, message):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    done = launch("train", "--config", config, "--out-dir", tmp_path / "run")
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--workers", 0], "--workers must be at least 1"),
    (["--workers", "two"], "invalid int value: 'two'"),
    (["--workers", 3, "--parallel", "data"], "--batch-size 4 is not divisible by --workers 3 (--parallel data "
                                             "gives each worker whole rows)"),
    (["--workers", 2, "--threads-per-worker", 2], "exceeds the"),
    (["--seq-len", 128], "--seq-len 128 is above the model's context of 64"),
    (["--steps", -1], "--steps must not be negative"),
    (["--lr", -0.1], "--lr must not be negative"),
    (["--init-from", "/nonexistent/model"], "--init-from /nonexistent/model does not exist"),
    (["--data", "/nonexistent/tokens.bin"], "data /nonexistent/tokens.bin does not exist"),
    (["--resume"], "has no checkpoint to resume from"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, data_dir, flags, message):
    # on one pinned CPU, so "--workers 2 --threads-per-worker 2" exceeds the cores on any machine
    done = launch("train", *TINY_FLAGS, "--data", data_dir, "--out-dir", tmp_path / "run", *flags, cpus=1,
                  strict_cores=True)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_out_dir_holding_a_run_is_not_overwritten(tmp_path, data_dir):
    out = tmp_path / "run"
    assert train(out, data_dir, "--steps", 1, "--eval-every", 0).returncode == 0
    before = (out / "metrics.jsonl").read_text()
    done = train(out, data_dir, "--steps", 1, "--eval-every", 0)
    assert done.returncode == 2 and "already holds a run" in done.stderr
    assert (out / "metrics.jsonl").read_text() == before
