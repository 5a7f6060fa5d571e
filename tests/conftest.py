import pytest


@pytest.fixture
def lab_root(tmp_path, monkeypatch):
    "A throw-away project root: results/, figures and .cache/ go under tmp_path."
    monkeypatch.setenv('VLM_LAB_ROOT', str(tmp_path))
    monkeypatch.delenv('VLM_LAB_FIGURES', raising=False)
    return tmp_path
