import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the tiny models here run faster on one (and CI shares its cores), and the
    reference curves were produced with one, so their last digits match."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model, quickstart_data):
    """A finished 2-step LoRA SFT run (a checkpoint at each step), trained once for the trust tests.

    It is a template: a test that changes anything copies it first (run.json names its own folders
    relatively, so a copy is a run of its own). Its config is trained_run.parent / "config.yaml"."""
    from tests.trust._util import train_tiny_run

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("trained_run")
    train_tiny_run(folder, tiny_model, quickstart_data / "sft_train.jsonl")
    torch.set_num_threads(before)
    return folder / "run"
