"""The profiler and the throughput sweep produce what they promise (timings
themselves are measured in bench/, never asserted here)."""
import csv

import numpy as np
import pytest

from conftest import launch, read_metrics, write_token_file

TINY = ["--model", "small", "--n-layer", 2, "--n-head", 4, "--n-embd", 64, "--block-size", 64,
        "--batch-size", 4, "--seq-len", 32]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("perf") / "tokens.bin"
    write_token_file(path, np.random.default_rng(3).integers(0, 50257, 3000))
    return path


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_profile_logs_phases_and_layer_table(tmp_path, tokens, precision):
    run = tmp_path / "run"
    done = launch("train", *TINY, "--data", tokens, "--steps", 3, "--workers", 2, "--precision", precision,
                  "--threads-per-worker", 1, "--eval-every", 0, "--profile", "--out-dir", run)
    assert done.returncode == 0, done.stderr
    for row in read_metrics(run):
        phases = row["profile_ms"]
        assert set(phases) == {"forward", "backward", "convert", "reduce", "update", "waiting"}
        work = [phases[k] for k in ("forward", "backward", "convert", "reduce", "update")]
        assert all(ms > 0 for ms in work[:2] + work[3:])
        assert (phases["convert"] > 0) == (precision == "bf16")  # bf16 copies of weights and activations
        # measured inside the workers, so it fits in the coordinator's wall time for the step
        assert sum(work) <= row["step_ms"] and phases["waiting"] >= 0
    table = done.stderr.split("by layer type")[1]
    for layer in ("matmul_forward", "matmul_backward", "matmul_weights_backward",
                  "attention_forward", "layernorm_backward", "lmhead_backward",
                  "lmhead_weights_backward", "crossentropy_forward", "all layers"):
        assert layer in table


def test_no_profile_no_phase_fields(tmp_path, tokens):
    run = tmp_path / "run"
    assert launch("train", *TINY, "--data", tokens, "--steps", 1, "--eval-every", 0,
                  "--out-dir", run).returncode == 0
    assert "profile_ms" not in read_metrics(run)[0]


def test_sweep_writes_table_csv_and_png(tmp_path, tokens):
    """On one pinned CPU: 1x1 runs, the rest are skipped as oversubscribed, unless
    --oversubscribe, which runs them all (and says so)."""
    out = tmp_path / "sweep"
    sweep = ["sweep", "--workers", "1,2", "--threads", "1,2", "--steps", 3, "--warmup-steps", 1,
             *TINY, "--data", tokens]
    done = launch(*sweep, "--out-dir", out, cpus=1)
    assert done.returncode == 0, done.stderr
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["workers"], r["threads"]) for r in rows] == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    assert rows[0]["status"] == "ok" and float(rows[0]["speedup"]) == 1.0
    assert all(r["status"].startswith("skipped: oversubscribed") for r in rows[1:])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = launch(*sweep, "--out-dir", tmp_path / "all", "--oversubscribe", cpus=1)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "all" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok"] + ["oversubscribed"] * 3
    for r in rows:
        assert float(r["tokens_per_s"]) > 0
        assert float(r["efficiency"]) == pytest.approx(float(r["speedup"]) / int(r["cores_used"]), abs=1e-3)
        assert f"{float(r['tokens_per_s'])}" in done.stdout


def test_sweep_rejects_bad_lists(tmp_path):
    done = launch("sweep", "--workers", "1,x", "--out-dir", tmp_path / "s")
    assert done.returncode == 2 and "--workers takes comma-separated integers" in done.stderr
    assert not (tmp_path / "s").exists()


def test_workers_report_their_blas_and_honour_openblas_coretype(tmp_path, tokens):
    """The run header names the BLAS the workers use; OPENBLAS_CORETYPE, when set, is
    passed through unchanged (coregpt only picks a kernel family when it is not)."""
    done = launch("train", *TINY, "--data", tokens, "--steps", 1, "--workers", 2,
                  "--threads-per-worker", 1, "--eval-every", 0, "--no-checkpoint",
                  "--out-dir", tmp_path / "run", env={"OPENBLAS_CORETYPE": "Sandybridge"})
    assert done.returncode == 0, done.stderr
    assert "workers' BLAS: openblas" in done.stderr
    assert "Sandybridge" in done.stderr
