"""The profiler and the throughput sweep produce what they promise (timings
themselves are measured in bench/, never asserted here)."""
import csv
import json
import os
import re
import signal

import numpy as np
import pytest

from conftest import launch, read_metrics, start_launch, write_token_file

pytestmark = pytest.mark.e2e  # each test runs python -m launch

SHAPE = ["--model", "small", "--n-layer", 2, "--n-head", 4, "--n-embd", 64, "--block-size", 64, "--seq-len", 32]
TINY = SHAPE + ["--batch-size", 4]


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
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:] if line[:1].isalpha()}
    assert float(rows["matmul_forward"][2]) > 0 and float(rows["attention_backward"][2]) > 0  # GFLOP/s
    assert len(rows["layernorm_backward"]) == 2  # ms and share: it multiplies nothing
    assert re.search(r"\ncoregpt: phases, median ms a step: forward \d+, backward \d+, convert \d+, reduce \d+, "
                     r"update \d+ \([\d.]+ GB/s a worker\), waiting -?\d+\n", done.stderr), done.stderr
    assert re.search(r"\ncoregpt: this machine's peaks with one worker's 1 thread\(s\), measured now: \d+ GFLOP/s "
                     r"for the engine's GEMM \(1024x768 @ 768x3072\), [\d.]+ GB/s adding arrays\n", done.stderr)


@pytest.mark.parametrize("steps, which", [(2, "step 2"), (4, "steps 2-4")])
def test_profile_table_leaves_out_the_first_step(tmp_path, tokens, steps, which):
    """The layer table is of the steps after the first (which pays one-time costs).
    Every layer runs inside its worker's forward and backward phases, so the table's
    time per step is within those phases' over the same steps (data strategy in fp32:
    no barrier waits or bf16 conversions are taken out of the phases)."""
    run = tmp_path / "run"
    done = launch("train", *TINY, "--data", tokens, "--steps", steps, "--workers", 2, "--parallel", "data",
                  "--threads-per-worker", 1, "--eval-every", 0, "--profile", "--out-dir", run)
    assert done.returncode == 0, done.stderr
    assert f"by layer type (mean over workers, {which})" in done.stderr
    table_ms = float(done.stderr.split("all layers")[1].split()[0])
    timed = read_metrics(run)[1:]
    phases_ms = sum(r["profile_ms"]["forward"] + r["profile_ms"]["backward"] for r in timed) / len(timed)
    assert table_ms <= phases_ms + 0.1  # the table prints 0.1 ms


def test_no_profile_no_phase_fields(tmp_path, tokens):
    run = tmp_path / "run"
    assert launch("train", *TINY, "--data", tokens, "--steps", 1, "--eval-every", 0,
                  "--out-dir", run).returncode == 0
    assert "profile_ms" not in read_metrics(run)[0]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_sweep_axes_outputs_and_best_config(tmp_path, tokens):
    """On one pinned CPU: the 1-worker points run, 2-worker ones are skipped as
    oversubscribed unless --oversubscribe (then they run, and say so).  CSV, JSON
    with the machine's fingerprint, PNG, and a best-point TOML that trains."""
    out = tmp_path / "sweep"
    sweep = ["sweep", "--workers", "1,2", "--threads", "1", "--parallel", "hybrid,data", "--batch-size", "4,8",
             "--steps", 3, "--warmup-steps", 1, *SHAPE, "--data", tokens]
    done = launch(*sweep, "--out-dir", out, cpus=1)
    assert done.returncode == 0, done.stderr
    rows = read_csv(out / "sweep.csv")
    assert [(r["parallel"], r["batch_size"], r["workers"]) for r in rows] == [
        (p, b, w) for p in ("hybrid", "data") for b in ("4", "8") for w in ("1", "2")]
    assert all(r["status"] == "ok" for r in rows if r["workers"] == "1")
    assert all(r["status"].startswith("skipped: oversubscribed") for r in rows if r["workers"] == "2")
    assert "[4/4]" in done.stderr and "ETA" in done.stderr  # progress counts only points that run
    report = json.loads((out / "sweep.json").read_text())
    assert {"cpu", "physical_cores", "logical_cpus", "smt", "numa_nodes", "caches", "blas", "numpy",
            "python", "kernel", "coregpt"} <= set(report["machine"]) and len(report["points"]) == 8
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = max((r for r in rows if r["tokens_per_s"]), key=lambda r: float(r["tokens_per_s"]))
    assert f"batch {best['batch_size']}: {best['tokens_per_s']} tokens/s" in done.stdout
    trained = launch("train", "--config", out / "sweep-best.toml", "--steps", 1, "--eval-every", 0,
                     "--out-dir", tmp_path / "best", cpus=1)
    assert trained.returncode == 0, trained.stderr
    assert json.loads((tmp_path / "best" / "run.json").read_text())["parallel"] == best["parallel"]

    one_batch = [arg if arg != "4,8" else "4" for arg in sweep]
    done = launch(*one_batch, "--out-dir", tmp_path / "all", "--oversubscribe", cpus=1)
    assert done.returncode == 0, done.stderr
    rows = read_csv(tmp_path / "all" / "sweep.csv")
    assert [r["status"] for r in rows] == ["ok", "oversubscribed"] * 2
    for r in rows:
        assert float(r["tokens_per_s"]) > 0 and float(r["compute_ms"]) > 0
        assert float(r["efficiency"]) == pytest.approx(float(r["speedup"]) / int(r["cores_used"]), abs=1e-3)
        assert f"{float(r['tokens_per_s'])}" in done.stdout


def test_sweep_ctrl_c_keeps_the_points_measured(tmp_path, tokens):
    out = tmp_path / "sweep"
    args = ["sweep", "--workers", "1", "--threads", "1", "--batch-size", "4,8,12,16,20,24", "--steps", 40,
            "--warmup-steps", 1, *SHAPE, "--data", tokens, "--out-dir", out]
    proc = start_launch(*args, start_new_session=True)
    for line in proc.stderr:  # the first point is measured
        if line.startswith("[1/6]"):
            break
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: the sweep and the run in flight
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    rows = read_csv(out / "sweep.csv")
    assert 1 <= len(rows) < 6 and rows[0]["status"] == "ok"
    assert "keeping the points measured so far" in stderr and (out / "sweep-best.toml").exists()


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
