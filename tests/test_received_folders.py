"""A folder someone else wrote is data: whatever its bookkeeping files say, loading and saving it never reads,
writes, moves or deletes anything outside it, never follows a link out of it and never destroys the artifact.

Each hostile case puts the artifact in ``dl/vec`` beside a file of the user's (``dl/mine.txt``) and a folder of
theirs (``dl/theirs/``), then loads and saves it. The journals are the ones older versions replayed: every case
below moved, overwrote or deleted files outside the artifact, or the artifact itself, or failed every later load and
save with a ``KeyError``/``TypeError``. A commit folder this version would write is accepted only in exactly the
shape it writes; anything else is refused in one line naming it.
"""

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from hf_repalign.legend.vector import MarginVector

LEGACY_JOURNAL = ".repalign-commit.json"
COMMIT = ".repalign-commit"


def _vector(seed: int) -> MarginVector:
    direction = torch.randn(16, generator=torch.Generator().manual_seed(seed))
    return MarginVector(direction / direction.norm(), layer=seed % 3, model_name_or_path="org/model",
                        num_hidden_layers=4, n_pairs=seed)


def _same(loaded: MarginVector, expected: MarginVector) -> bool:
    return torch.equal(loaded.direction, expected.direction) and loaded.config_dict() == expected.config_dict()


def _tree(root: Path, skip: Path | None = None) -> dict[str, object]:
    """Every path under ``root`` (links not followed) with its content, except under ``skip``."""
    found: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if skip is not None and (path == skip or skip in path.parents):
                continue
            if path.is_symlink():
                found[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                found[str(path)] = path.read_bytes()
            else:
                found[str(path)] = "dir"
    return found


@pytest.fixture
def received(tmp_path):
    """``dl/vec`` (a vector) beside ``dl/mine.txt`` and ``dl/theirs/keep.txt``, which must never change."""
    dl = tmp_path / "dl"
    (dl / "theirs").mkdir(parents=True)
    (dl / "mine.txt").write_text("mine")
    (dl / "theirs" / "keep.txt").write_text("keep")
    vec = dl / "vec"
    _vector(1).save_pretrained(vec)
    return vec


def _outside(vec: Path) -> dict[str, object]:
    return _tree(vec.parent.parent, skip=vec)


def _artifact(vec: Path) -> dict[str, bytes]:
    return {name: (vec / name).read_bytes() for name in ("README.md", "config.json", "model.safetensors")}


def _staging_with(vec: Path, name: str, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = vec / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# Older versions' journal: each was obeyed by the old loader and saver.
def _staging_up(vec):  # "..": the folder holding the artifact is the staging folder, and was deleted
    return {"staging": "..", "files": [], "remove": []}


def _staging_absolute(vec):  # an absolute folder: its files were moved in, then it was deleted
    return {"staging": str(vec.parent / "theirs"), "files": ["keep.txt"], "remove": []}


def _staging_dot(vec):  # ".": the artifact itself was deleted
    return {"staging": ".", "files": [], "remove": []}


def _remove_up(vec):
    return {"staging": ".repalign-x", "files": [], "remove": ["../mine.txt"]}


def _remove_absolute(vec):
    return {"staging": ".repalign-x", "files": [], "remove": [str(vec.parent / "mine.txt")]}


def _files_through_link(vec):  # "link/mine.txt" with link -> dl: dl/mine.txt was overwritten
    (vec / "link").symlink_to(vec.parent)
    _staging_with(vec, ".repalign-s", {"link/mine.txt": "overwritten"})
    return {"staging": ".repalign-s", "files": ["link/mine.txt"], "remove": []}


def _staging_is_link(vec):  # staging -> dl: dl/mine.txt was moved into the artifact
    (vec / ".repalign-l").symlink_to(vec.parent)
    return {"staging": ".repalign-l", "files": ["mine.txt"], "remove": []}


HOSTILE = {f.__name__[1:]: f for f in (_staging_up, _staging_absolute, _staging_dot, _remove_up, _remove_absolute,
                                       _files_through_link, _staging_is_link)}
DAMAGED = {"empty object": {}, "list": [], "wrong types": {"staging": 1, "files": "config.json", "remove": None},
           "not json": "{", "directory": None}


def _write_legacy(vec: Path, journal) -> None:
    if journal is None:
        (vec / LEGACY_JOURNAL).mkdir()
    else:
        (vec / LEGACY_JOURNAL).write_text(journal if isinstance(journal, str) else json.dumps(journal))


def _load_then_save_leave_everything_else_alone(vec: Path, caplog) -> None:
    outside, artifact = _outside(vec), _artifact(vec)
    with caplog.at_level(logging.WARNING):
        loaded = MarginVector.from_pretrained(vec)
    assert _outside(vec) == outside and _artifact(vec) == artifact and os.path.lexists(vec / LEGACY_JOURNAL)
    assert _same(loaded, _vector(1))
    assert LEGACY_JOURNAL in caplog.text and "delete the file" in caplog.text
    _vector(2).save_pretrained(vec)
    assert _outside(vec) == outside
    assert _same(MarginVector.from_pretrained(vec), _vector(2))


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_legacy_journal_is_never_obeyed(received, case, caplog):
    _write_legacy(received, HOSTILE[case](received))
    _load_then_save_leave_everything_else_alone(received, caplog)


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_legacy_journal_neither_blocks_nor_crashes(received, case, caplog):
    _write_legacy(received, DAMAGED[case])
    _load_then_save_leave_everything_else_alone(received, caplog)


# ------------------------------------------------------------------------------------------------ commit folders
def _interrupted_save(vec: Path, monkeypatch) -> None:
    """Save vector 2 into ``vec`` and kill it (ENOSPC) at the first rename after its commit point."""
    real_replace = os.replace
    calls = []

    def replace(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == 2:  # 1: staging -> commit folder (the commit point); 2: the first file into place
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        _vector(2).save_pretrained(vec)
    monkeypatch.undo()


@pytest.fixture
def read_only(monkeypatch):
    """The file system refuses every change, as read-only media do (we run as root, so chmod would not)."""
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def access(path, mode, *args, **kwargs):
        return False if mode & os.W_OK else real_access(path, mode, *args, **kwargs)

    real_access = os.access

    def start():
        for name in ("replace", "rename", "unlink", "remove", "rmdir", "mkdir", "chmod"):
            monkeypatch.setattr(os, name, refuse)
        monkeypatch.setattr(shutil, "rmtree", refuse)
        monkeypatch.setattr(os, "access", access)
    return start


def test_an_unfinished_save_loads_as_committed_without_changing_the_folder(received, monkeypatch, read_only):
    _interrupted_save(received, monkeypatch)
    before = _tree(received.parent.parent)
    read_only()
    assert _same(MarginVector.from_pretrained(received), _vector(2))
    monkeypatch.undo()
    assert _tree(received.parent.parent) == before and (received / COMMIT).is_dir()
    _vector(3).save_pretrained(received)  # the next save completes it first
    assert sorted(p.name for p in received.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert _same(MarginVector.from_pretrained(received), _vector(3))


def _commit_is_link(vec):
    (vec.parent / "theirs" / "config.json").write_text("{}")
    (vec / COMMIT).symlink_to(vec.parent / "theirs")


def _commit_is_file(vec):
    (vec / COMMIT).write_text("x")


def _commit_holds_a_link(vec):
    _staging_with(vec, COMMIT, {".stale": ""})
    (vec / COMMIT / "model.safetensors").symlink_to(vec.parent / "mine.txt")


def _commit_holds_a_folder(vec):
    _staging_with(vec, COMMIT, {".stale": "", "model.safetensors/x": "x"})


def _commit_holds_a_foreign_file(vec):
    _staging_with(vec, COMMIT, {".stale": "", "thesis.tex": "x"})


def _stale_up(vec):
    _staging_with(vec, COMMIT, {".stale": "../mine.txt\n"})


def _stale_absolute(vec):
    _staging_with(vec, COMMIT, {".stale": f"{vec.parent / 'mine.txt'}\n"})


def _stale_foreign(vec):
    (vec / "thesis.tex").write_text("mine")
    _staging_with(vec, COMMIT, {".stale": "thesis.tex\n"})


def _stale_also_written(vec):  # "remove the file you just moved in"
    _staging_with(vec, COMMIT, {".stale": "config.json\n", "config.json": "{}"})


def _stale_missing(vec):
    _staging_with(vec, COMMIT, {"config.json": "{}"})


def _stale_not_utf8(vec):
    (vec / COMMIT).mkdir()
    (vec / COMMIT / ".stale").write_bytes(b"\xff\xfe")


BAD_COMMITS = {f.__name__[1:]: f for f in (
    _commit_is_link, _commit_is_file, _commit_holds_a_link, _commit_holds_a_folder, _commit_holds_a_foreign_file,
    _stale_up, _stale_absolute, _stale_foreign, _stale_also_written, _stale_missing, _stale_not_utf8)}


@pytest.mark.parametrize("case", BAD_COMMITS)
def test_a_commit_folder_we_did_not_write_is_refused_in_one_line(received, case):
    BAD_COMMITS[case](received)
    outside, inside = _outside(received), _tree(received)
    for action in (lambda: MarginVector.from_pretrained(received), lambda: _vector(2).save_pretrained(received)):
        with pytest.raises(ValueError) as err:
            action()
        message = str(err.value)
        assert str(received / COMMIT) in message and "delete it" in message and "\n" not in message
        assert _outside(received) == outside and _tree(received) == inside
    shutil.rmtree(received / COMMIT) if (received / COMMIT).is_dir() and not (received / COMMIT).is_symlink() \
        else (received / COMMIT).unlink()
    _vector(2).save_pretrained(received)  # the fix the message names works
    assert _same(MarginVector.from_pretrained(received), _vector(2))


def test_artifact_files_that_link_out_of_the_folder_are_not_read(received):
    outside = received.parent / "theirs" / "model.safetensors"
    shutil.move(received / "model.safetensors", outside)
    (received / "model.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the folder; copy the file into the folder"):
        MarginVector.from_pretrained(received)
    inside = received / "weights.bin"
    shutil.move(outside, inside)
    (received / "model.safetensors").unlink()
    (received / "model.safetensors").symlink_to("weights.bin")  # a link inside the folder is fine
    assert _same(MarginVector.from_pretrained(received), _vector(1))


def test_saving_replaces_links_instead_of_writing_through_them(received):
    (received / "config.json").unlink()
    (received / "config.json").symlink_to(received.parent / "mine.txt")
    _vector(2).save_pretrained(received, overwrite=True)
    assert (received.parent / "mine.txt").read_text() == "mine"
    assert not (received / "config.json").is_symlink()
    assert _same(MarginVector.from_pretrained(received), _vector(2))


# ------------------------------------------------------------------------------------------------ base signatures
@pytest.mark.parametrize("content", ["", "{}", "[]", '{"num_hidden_layers": null}', '{"num_hidden_layers": "4"}',
                                     '{"num_hidden_layers": 4, "hidden_size": 3.5}', "\xff"])
def test_an_empty_or_wrong_base_signature_never_switches_the_layer_check_off(tmp_path, tokenizer, content):
    from peft import LoraConfig, get_peft_model

    from hf_repalign.rahf.validation import check_adapter_folder
    from hf_repalign.testing import tiny_model

    four = tmp_path / "four"
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(tiny_model("llama", vocab_size=len(tokenizer), num_layers=4), lora).save_pretrained(str(four))
    eight = tiny_model("llama", vocab_size=len(tokenizer), num_layers=8)
    (four / "hf_repalign_base.json").write_text(content)
    with pytest.raises(ValueError, match=r"hf_repalign_base.json is not a base signature .* delete the file"):
        check_adapter_folder(four, eight)
    (four / "hf_repalign_base.json").unlink()  # the fix the message names: the layer check then refuses
    with pytest.raises(ValueError, match="4-layer base; this base has 8 layers"):
        check_adapter_folder(four, eight)


# ------------------------------------------------------------------------------------------------ resumable parts
@pytest.mark.parametrize("manifest", ["[1]", "{", '"run"', "{}"])
def test_a_damaged_annotate_manifest_is_a_different_run_with_the_fix(tmp_path, manifest):
    from types import SimpleNamespace

    from hf_repalign.legend.checkpoints import prepare_parts

    parts = tmp_path / ".out.jsonl.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(manifest)
    state = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    with pytest.raises(ValueError, match=r"come from a different run .* rerun with resume=False"):
        prepare_parts(parts, {"run": "abc", "rows": 3}, True, state)


def test_annotate_parts_that_are_a_link_are_refused(tmp_path):
    from types import SimpleNamespace

    from hf_repalign.legend.checkpoints import prepare_parts

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    parts = tmp_path / "out" / ".out.jsonl.parts"
    parts.parent.mkdir()
    parts.symlink_to(elsewhere)
    state = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    for resume in (True, False):
        with pytest.raises(ValueError, match="is a link; delete it and rerun"):
            prepare_parts(parts, {"run": "abc"}, resume, state)
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("index", ["", "[]", '{"layers": [1], "weight_map": {"0": "../../mine.safetensors"}}',
                                   '{"layers": [1], "weight_map": {"0": "/etc/passwd"}}', '{"layers": 1}'])
def test_precomputed_targets_name_only_their_own_shards(tmp_path, index):
    from hf_repalign.rahf.store import TargetStore

    (tmp_path / "targets.json").write_text(index)
    with pytest.raises(ValueError, match=r"targets.json is not an index written by precompute_targets\(\)"):
        TargetStore(tmp_path)


def test_the_annotate_command_on_a_received_vector_leaves_the_folder_around_it_alone(received, tmp_path, tokenizer,
                                                                                     caplog):
    """The reported case: ``{"staging": ".."}`` beside a vector emptied the folder holding it at the first
    ``repalign legend annotate --vector``."""
    from hf_repalign import cli
    from hf_repalign.testing import tiny_model

    model_dir = tmp_path / "tiny"
    tiny_model("llama", vocab_size=len(tokenizer), hidden_size=16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                            for i in range(3)))
    _write_legacy(received, _staging_up(received))
    around, artifact = _tree(received.parent, skip=received), _artifact(received)
    with caplog.at_level(logging.WARNING):
        code = cli.main(["legend", "annotate", "--model", str(model_dir), "--dataset", str(data), "--vector",
                         str(received), "--output", str(tmp_path / "out.jsonl"), "--num_bins", "0"])
    assert _tree(received.parent, skip=received) == around and _artifact(received) == artifact
    assert code == 0 and (tmp_path / "out.jsonl").is_file()
