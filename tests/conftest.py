import sys
from pathlib import Path

# make `tests.helpers` importable in spawned ranks as well as here
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
