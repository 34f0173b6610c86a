"""The batch order: the training windows in a new seeded permutation each epoch by
default, llm.c's file order with --data-order sequential."""
import numpy as np
import pytest

from conftest import launch, read_metrics, tiny_state, write_tiny_dir, write_token_file
from trainer.data import WindowOrder

pytestmark = pytest.mark.e2e  # each test runs python -m launch

B, T, WINDOWS = 2, 16, 6
FLAGS = ["--batch-size", B, "--seq-len", T, "--eval-every", 0, "--sample-every", 0, "--threads-per-worker", 1,
         "--lr-schedule", "constant", "--warmup", 0]


def test_every_window_once_per_epoch_in_a_new_order():
    order = WindowOrder(WINDOWS * B * T + 1, B * T, seed=7)
    epochs = [[order.start(w) // (B * T) for w in range(e * WINDOWS, (e + 1) * WINDOWS)] for e in range(3)]
    assert all(sorted(epoch) == list(range(WINDOWS)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3  # 6! orders: three equal ones would be a bug
    again = WindowOrder(WINDOWS * B * T + 1, B * T, seed=7)
    assert [again.start(w) for w in reversed(range(3 * WINDOWS))] == [order.start(w) for w in
                                                                      reversed(range(3 * WINDOWS))]
    assert [WindowOrder(WINDOWS * B * T + 1, B * T).start(w) // (B * T) for w in range(8)] == [0, 1, 2, 3, 4, 5,
                                                                                              0, 1]


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    """A model and a token file whose window i holds only token id 100 + i: with lr 0
    a step's loss says which window it read."""
    root = tmp_path_factory.mktemp("order")
    write_tiny_dir(root / "init", tiny_state(seed=3))
    tokens = np.repeat(100 + np.arange(WINDOWS), B * T)
    write_token_file(root / "tokens.bin", np.append(tokens, 100).astype(np.uint16))
    return root


def losses(root, out, *flags):
    done = launch("train", "--init-from", root / "init", "--data", root / "tokens.bin", *FLAGS, "--out-dir",
                  root / out, *flags)
    assert done.returncode == 0, done.stderr
    return [r["loss"] for r in read_metrics(root / out) if "loss" in r], done.stderr


@pytest.mark.parametrize("parallel, workers", [("hybrid", 1), ("data", 2)])
def test_a_run_reads_every_window_once_per_epoch(windows, parallel, workers):
    """Read back from the losses: with lr 0 the weights never change, so each step's
    loss is its window's (file order gives the table)."""
    flags = ["--lr", 0, "--parallel", parallel, "--workers", workers, "--no-checkpoint"]
    table, _ = losses(windows, f"seq-{parallel}", "--data-order", "sequential", "--steps", WINDOWS, *flags)
    assert len(set(table)) == WINDOWS, table  # each window's loss is its own
    read, stderr = losses(windows, f"shuffled-{parallel}", "--steps", 3 * WINDOWS, "--seed", 11, *flags)
    order = [table.index(loss) for loss in read]
    epochs = [order[e * WINDOWS:(e + 1) * WINDOWS] for e in range(3)]
    assert all(sorted(epoch) == list(range(WINDOWS)) for epoch in epochs), epochs
    assert epochs[0] != list(range(WINDOWS)) and len({tuple(e) for e in epochs}) == 3, epochs
    assert "epoch 2 begins at step 7" in stderr and "epoch 3 begins at step 13" in stderr
    expected = WindowOrder(WINDOWS * B * T + 1, B * T, seed=11)
    assert order == [expected.start(w) // (B * T) for w in range(3 * WINDOWS)]


def test_resume_mid_epoch_is_bit_exact(windows):
    flags = ["--lr", 1e-3, "--seed", 5]
    whole, _ = losses(windows, "whole", "--steps", 10, *flags)
    losses(windows, "halves", "--steps", 4, *flags)
    done = launch("train", "--resume", "--out-dir", windows / "halves", "--steps", 10)
    assert done.returncode == 0, done.stderr
    assert [r["loss"] for r in read_metrics(windows / "halves") if "loss" in r] == whole


def test_bad_data_order_is_one_line(windows):
    done = launch("train", "--init-from", windows / "init", "--data", windows / "tokens.bin",
                  "--data-order", "random", "--out-dir", windows / "bad")
    assert done.returncode == 2
    assert done.stderr.strip() == "coregpt: error: --data-order must be shuffled or sequential, got 'random'"
