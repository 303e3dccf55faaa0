"""Fixtures of the runtime tests: one torch thread, and a tiny trained run to export."""
import pytest
import torch
from click.testing import CliRunner

from leanlstm.cli import main


@pytest.fixture
def one_thread():
    """Tiny models train ~10x faster on one thread than on two when the cores are shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_trained_run(tmp_path, ptb_slice_dir, one_thread):
    """A finished ``tiny`` PTB run (3 windows on a slice) in ``tmp_path / "run"``."""
    run_dir = tmp_path / "run"
    trained = CliRunner().invoke(main, ["train", "--preset", "tiny", "--out", str(run_dir), "--data-dir",
                                        str(ptb_slice_dir), "--max-tokens", "1000", "--epochs", "1",
                                        "--max-batches", "3", "--no-verify-data", "--no-progress"])
    assert trained.exit_code == 0, trained.output
    return run_dir
