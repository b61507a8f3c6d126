import pytest
import torch

import mpq  # noqa: F401  (loads the ops library)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    return f"mpq build: {mpq.build_info()}"
