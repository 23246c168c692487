import os
import sys

# The tests import model.py, rsc15_reader.py and paddlerec from the repository root.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config):
    # `pytest -m "not slow"` runs the fast tests only (README, "Project layout and tests")
    config.addinivalue_line("markers", "slow: an end-to-end test that starts several processes or trains for "
                                       "seconds; deselect with -m \"not slow\"")
