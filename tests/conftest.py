import os
import secrets
import sys

import pytest

# The tests import model.py, rsc15_reader.py and paddlerec from the repository root.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config):
    # `pytest -m "not slow"` runs the fast tests only (README, "Project layout and tests")
    config.addinivalue_line("markers", "slow: an end-to-end test that starts several processes or trains for "
                                       "seconds; deselect with -m \"not slow\"")


@pytest.fixture
def test_seed():
    """A seed for a test's random choices: TEST_SEED from the environment (to replay a failure), else
    a fresh one. Printed, so that a failing run's captured output names it."""
    seed = int(os.environ.get("TEST_SEED") or secrets.randbits(32))
    print(f"test seed: {seed} (replay with TEST_SEED={seed})")
    return seed
