# The export tests use the evaluate tests' tiny model and finished run (built once, cached by
# tests/unit/evaluate/tiny.py): the fixtures are defined there and imported here so pytest sees them.
from tests.unit.evaluate.conftest import _one_thread, run_dir, tiny_llama  # noqa: F401
