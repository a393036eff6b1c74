import pytest


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    """Runs go to a temporary directory; data stay in the shared ./data cache (prepared once)."""
    path = tmp_path / "runs"
    monkeypatch.setenv("LMOPT_RUNS", str(path))
    return path
