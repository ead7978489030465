import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own result cache, never the user's."""
    monkeypatch.setenv("RLSUB_TUI_CACHE_DIR", str(tmp_path / "user-cache"))
