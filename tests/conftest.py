import os
import sys

# The tests import model.py, rsc15_reader.py and paddlerec from the repository root.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("OMP_NUM_THREADS", "2")
