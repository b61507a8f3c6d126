import pytest
import torch

import mpq  # noqa: F401  (loads the ops library)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_intraop_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``).
    NB: on a busy 2-core machine OpenMP's spinning threads make the many small ops of calibration
    ~10x slower; results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_report_header(config):
    return f"mpq build: {mpq.build_info()}"
