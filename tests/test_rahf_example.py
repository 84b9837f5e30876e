"""The RAHF example runs end to end on the embedded model (two rows, one step per stage)."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rahf_hh_pipeline.py"


@pytest.mark.embedded
@pytest.mark.slow
def test_rahf_example_pipeline(embedded, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_REPALIGN_DATA", raising=False)  # no data: the shipped sample (the tests run offline)
    spec = importlib.util.spec_from_file_location("rahf_hh_pipeline", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    answer = module.main(["--rows", "2", "--steps", "1", "--out", str(tmp_path), "--max-new-tokens", "6"])
    assert isinstance(answer, str) and answer.strip()
    assert (tmp_path / "rahf_adapter" / "adapter_model.safetensors").is_file()
    assert "RAHF-SCIT" in (tmp_path / "rahf_adapter" / "README.md").read_text()
