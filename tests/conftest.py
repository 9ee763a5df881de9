import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def weight_file(tmp_path_factory):
    """Writes each real-format weight file once per test run, for every test that needs it:
    weight_file(writer, name, *args) -> (path, what the writer returned: the upstream model).
    The paper-size files are hundreds of MB each; writing them once keeps a run's disk and time
    down (tests/test_upstream.py and tests/test_paper_configs.py share them)."""
    root = tmp_path_factory.mktemp("weights")
    made: dict = {}

    def get(writer, name: str, *args):
        key = (writer.__name__, name, args)
        if key not in made:
            made[key] = (str(root / name), writer(str(root / name), *args))
        return made[key]

    return get
