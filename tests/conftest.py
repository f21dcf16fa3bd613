import sys
from pathlib import Path

import pytest
import torch

# make `tests.helpers` importable in spawned ranks as well as here
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture
def float64_default():
    """float64 as the default dtype for the test (for modules that use it everywhere:
    ``pytestmark = pytest.mark.usefixtures("float64_default")``)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
