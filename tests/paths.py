"""Where tests find the project and the optional real data (imported by conftest.py and the tests)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HAM10000 = REPO.parent / "shared" / "data" / "ham10000-200x150"
