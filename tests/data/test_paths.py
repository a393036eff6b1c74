import os

import pytest

from lmopt.data.paths import runs_home, temporary_runs_home


@pytest.mark.parametrize("before", [None, "/somewhere/else"])
def test_temporary_runs_home_is_used_then_removed_and_the_previous_value_restored(monkeypatch, before):
    if before is None:
        monkeypatch.delenv("LMOPT_RUNS", raising=False)
    else:
        monkeypatch.setenv("LMOPT_RUNS", before)
    with pytest.raises(RuntimeError), temporary_runs_home() as runs:
        assert runs.is_dir() and runs_home() == runs.resolve()
        (runs / "a-run").mkdir()
        raise RuntimeError("a failed benchmark still restores the variable")
    assert not runs.exists()
    assert os.environ.get("LMOPT_RUNS") == before
