"""Paths vs Hub ids, the Hub ids of base models, pushing at the ``HfApi`` boundary."""

import json
import time
from pathlib import Path

import pytest
import torch

from hf_repalign import hub
from hf_repalign.legend.vector import MarginVector


def _vector(seed: int, size: int = 16) -> MarginVector:
    direction = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return MarginVector(direction / direction.norm(), layer=seed % 3, model_name_or_path="org/model",
                        num_hidden_layers=4, n_pairs=seed)


# ------------------------------------------------------------------------------------------------ paths vs Hub ids
def test_paths_and_hub_ids(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    assert hub.local_or_repo_id(tmp_path / "here") == tmp_path / "here"
    assert hub.local_or_repo_id("someone/vector") == "someone/vector"
    for missing in ["./out/vec", "/abs/missing", "out/vec/", "a/b/c", "prefs.jsonl", "bad name!"]:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            hub.local_or_repo_id(missing, "--vector")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(hub.HubAccessError, match="HF_HUB_OFFLINE=1"):
        MarginVector.from_pretrained("someone-unknown/vector")
    assert time.perf_counter() - start < 5


def test_base_model_ids(tmp_path, monkeypatch, llama):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    hub.embedded_model_cache_dir().mkdir(parents=True)
    assert hub.base_model_id(str(hub.embedded_model_cache_dir())) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub.base_model_id("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"
    local = tmp_path / "m"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    assert hub.base_model_id(str(local)) == "meta-llama/Llama-2-7b-hf"
    (local / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/models/x"}))
    assert hub.base_model_id(str(local)) is None
    with pytest.raises(ValueError, match="pass base_model="):
        hub.require_base_model(None, str(local), "margin vector")
    assert hub.require_base_model("me/base", str(local), "margin vector") == "me/base"

    vec = _vector(1)
    vec.model_name_or_path = str(hub.embedded_model_cache_dir())
    card = vec.model_card("me/vec")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "de-quantised from the Q4_1 GGUF" in card


# ------------------------------------------------------------------------------------------------ pushing
class _FakeApi:
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns=()):
        import fnmatch

        files = sorted(p.name for p in Path(folder_path).iterdir()
                       if not any(fnmatch.fnmatch(p.name, pattern) for pattern in ignore_patterns))
        readme = (Path(folder_path) / "README.md").read_text()
        self.calls.append(("upload_folder", repo_id, commit_message, files, readme))
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.fixture
def fake_hub(monkeypatch):
    _FakeApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", _FakeApi)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    return _FakeApi.calls


def test_vector_push_to_hub_at_the_hub_boundary(fake_hub, tmp_path):
    vec = _vector(1)
    vec.model_name_or_path = str(tmp_path)  # a local model without a Hub id
    with pytest.raises(ValueError, match="base_model="):
        vec.push_to_hub("me/vec")
    assert vec.push_to_hub("me/vec", private=True, base_model="org/base") == "https://huggingface.co/me/vec/commit/0"
    (create, upload) = fake_hub
    assert create == ("create_repo", "me/vec", True, True)
    assert upload[:4] == ("upload_folder", "me/vec", "Upload LEGEND margin vector",
                          ["README.md", "config.json", "model.safetensors"])
    assert "base_model: org/base" in upload[4] and 'MarginVector.from_pretrained("me/vec")' in upload[4]


def test_push_offline_fails_at_once_in_one_line(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubAccessError) as err:
        _vector(1).push_to_hub("me/vec")
    assert "HF_HUB_OFFLINE" in str(err.value) and "\n" not in str(err.value)
