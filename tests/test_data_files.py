"""Public data: an explicit folder or $HF_REPALIGN_DATA, else the Hub, else the shipped sample; same rows either way."""

import gzip
import json

import pytest
from datasets import Dataset

from hf_repalign import data_files
from hf_repalign.data_files import (
    PUBLIC_SETS,
    SAMPLE_DATA,
    DataNotFoundError,
    load_advbench,
    load_hh_rlhf,
    load_mt_bench,
    load_public,
    load_truthfulqa_mc,
)

SIZES = {"hh-rlhf/harmless-base": 48, "hh-rlhf/helpful-base": 48, "advbench": 48, "truthfulqa": 24, "mt_bench": 24}


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("HF_REPALIGN_DATA", raising=False)
    monkeypatch.setattr(data_files, "_hub_unreachable", [])


def _hub_rows(name):
    """The sample's rows in the shape the Hub serves them (a stand-in for ``datasets.load_dataset``)."""
    if name.startswith("hh-rlhf"):
        return load_public(name, SAMPLE_DATA)
    if name == "advbench":
        return [{"prompt": goal, "target": "Sure"} for goal in load_advbench(SAMPLE_DATA)]
    if name == "mt_bench":
        return [{"prompt": [question, "and then?"], "category": "x"} for question in load_mt_bench(SAMPLE_DATA)]
    return [{"question": row["question"], **{key: {"choices": list(row[key]), "labels": list(row[key].values())}
                                              for key in ("mc1_targets", "mc2_targets")}}
            for row in load_truthfulqa_mc(SAMPLE_DATA)]


def test_the_shipped_sample_has_its_rows_and_licenses():
    for name, size in SIZES.items():
        assert len(load_public(name, SAMPLE_DATA)) == size, name
        assert (SAMPLE_DATA / name.split("/")[0] / "LICENSE").is_file(), name
    pairs = load_hh_rlhf("helpful-base", SAMPLE_DATA)
    assert all(set(row) == {"chosen", "rejected"} and "\n\nAssistant:" in row["chosen"] for row in pairs)
    assert all(isinstance(goal, str) and goal for goal in load_advbench(SAMPLE_DATA) + load_mt_bench(SAMPLE_DATA))
    assert all(sum(row["mc1_targets"].values()) == 1 for row in load_truthfulqa_mc(SAMPLE_DATA))


def test_an_explicit_folder_or_the_environment_variable_is_read(tmp_path, monkeypatch, no_env):
    rows = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}]
    (tmp_path / "hh-rlhf" / "harmless-base").mkdir(parents=True)
    with gzip.open(tmp_path / "hh-rlhf" / "harmless-base" / "test.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(rows[0]) + "\n")
    assert load_hh_rlhf("harmless-base", tmp_path) == rows
    monkeypatch.setenv("HF_REPALIGN_DATA", str(tmp_path))
    assert load_hh_rlhf("harmless-base") == rows
    assert len(load_hh_rlhf("harmless-base", SAMPLE_DATA)) == 48  # the argument wins over the variable


def test_missing_folders_and_files_are_one_line_errors(tmp_path, monkeypatch, no_env):
    with pytest.raises(DataNotFoundError, match=r"^data folder .*nowhere \(from `data`\) does not exist\.$"):
        load_advbench(tmp_path / "nowhere")
    monkeypatch.setenv("HF_REPALIGN_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError, match="from `HF_REPALIGN_DATA`"):
        load_advbench()
    with pytest.raises(DataNotFoundError, match=r"^advbench/harmful_behaviors.csv not found in the data folder") as err:
        load_advbench(tmp_path)  # an explicit folder never falls back to the Hub or the sample
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown public set"):
        load_public("advbench2")


@pytest.mark.parametrize("name", SIZES)
def test_hub_rows_come_back_in_the_shape_of_the_files(name, monkeypatch, no_env):
    calls = []

    def fake_load_dataset(hub_id, **kwargs):
        calls.append((hub_id, kwargs))
        return Dataset.from_list(_hub_rows(name))

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    assert load_public(name) == load_public(name, SAMPLE_DATA)
    assert calls == [(PUBLIC_SETS[name].hub_id, PUBLIC_SETS[name].hub_kwargs)]
    if name.startswith("hh-rlhf"):
        assert calls[0][1] == {"data_dir": name.split("/")[1], "split": "test"}


def test_offline_falls_back_to_the_sample_with_one_warning_per_set(monkeypatch, no_env):
    calls, warnings = [], []

    def unreachable(hub_id, **kwargs):
        calls.append(hub_id)
        raise ConnectionError(f"Couldn't reach '{hub_id}' on the Hub (LocalEntryNotFoundError)\nsecond line")

    monkeypatch.setattr("datasets.load_dataset", unreachable)
    monkeypatch.setattr(data_files.logger, "warning", warnings.append)
    assert load_advbench() == load_advbench(SAMPLE_DATA)
    assert load_mt_bench() == load_mt_bench(SAMPLE_DATA)
    assert calls == ["walledai/AdvBench"]  # after one connection failure the Hub is not retried
    assert len(warnings) == 2 and all("\n" not in w and "-row sample shipped with hf_repalign" in w for w in warnings)
    assert "Couldn't reach 'walledai/AdvBench'" in warnings[0] and "second line" not in warnings[0]

