import sys
from pathlib import Path

# helpers.py lives beside the tests; the repo root makes `appliance` and `kernels` importable
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
