import pytest

from tests.unit.evaluate.tiny import cached_run, cached_tiny_model, one_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, shared_data):
    """A saved tiny random Llama with the Qwen2.5 tokenizer (built once per session)."""
    return cached_tiny_model(tmp_path_factory, shared_data)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, tiny_llama):
    """A finished run: sft LoRA, then dpo LoRA on top (with its chain file). Treat as read-only."""
    return cached_run(tmp_path_factory, tiny_llama)
