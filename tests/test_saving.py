"""The save contract (write into the folder, keep other files, one atomic artifact).

The kill test SIGKILLs real ``MarginVector.save_pretrained`` calls at many moments; the full-disk tests make a
write fail with ENOSPC at each step of a save; the concurrency test runs two savers on one folder.
"""

import errno
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hf_repalign import artifacts
from hf_repalign.legend.vector import MarginVector


def _vector(seed: int, size: int = 16) -> MarginVector:
    direction = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return MarginVector(direction / direction.norm(), layer=seed % 3, model_name_or_path="org/model",
                        num_hidden_layers=4, n_pairs=seed)


def _same(loaded: MarginVector, expected: MarginVector) -> bool:
    return torch.equal(loaded.direction, expected.direction) and loaded.config_dict() == expected.config_dict()


def _version_on_disk(folder: Path, versions: dict[int, MarginVector]) -> int:
    """Which version the folder holds, checking that weights, config and card all belong to it."""
    loaded = MarginVector.from_pretrained(folder)  # reads an interrupted commit's files where they are
    (seed,) = [s for s, v in versions.items() if _same(loaded, v)]
    assert f"| contrast data | {seed} (prompt, positive, negative) triplets |" in artifacts.artifact_file(
        folder, "README.md").read_text()
    return seed


# ------------------------------------------------------------------------------------------------ the contract
def test_saving_keeps_other_files_and_replaces_only_ours(tmp_path):
    folder = tmp_path / "my_project"
    folder.mkdir()
    (folder / "thesis.tex").write_text("my thesis")
    (folder / "checkpoint-5").mkdir()
    (folder / ".repalign-old.old").write_text("not ours to delete")  # an unrelated sibling-looking file
    _vector(1).save_pretrained(folder)
    _vector(2).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == [".repalign-old.old", "README.md", "checkpoint-5",
                                                        "config.json", "model.safetensors", "thesis.tex"]
    assert (folder / "thesis.tex").read_text() == "my thesis"
    assert _same(MarginVector.from_pretrained(folder), _vector(2))


def test_a_folder_holding_another_artifact_is_refused_unless_overwrite(tmp_path, llama, tokenizer):
    model_dir = tmp_path / "model"
    llama.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    with pytest.raises(artifacts.ArtifactConflictError, match="not a LEGEND margin vector folder .*config.json"):
        _vector(1).save_pretrained(model_dir)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    _vector(1).save_pretrained(model_dir, overwrite=True)  # replaces the clashing files only
    assert (model_dir / "tokenizer.json").read_bytes() == before["tokenizer.json"]
    assert _same(MarginVector.from_pretrained(model_dir), _vector(1))

    readme = tmp_path / "docs"
    readme.mkdir()
    (readme / "README.md").write_text("# my own notes\n")
    with pytest.raises(artifacts.ArtifactConflictError, match="README.md"):
        _vector(1).save_pretrained(readme)
    (tmp_path / "file").write_text("x")
    with pytest.raises(artifacts.ArtifactConflictError, match="is a file"):
        _vector(1).save_pretrained(tmp_path / "file")


def test_stale_files_of_the_same_kind_are_removed(tmp_path):
    kind = artifacts.ArtifactKind("toy", ("part-*.bin", "index.json"), lambda f: (f / "index.json").is_file())
    for parts in (3, 1):
        with artifacts.atomic_folder(tmp_path / "t", kind) as tmp:
            (tmp / "index.json").write_text(str(parts))
            for i in range(parts):
                (tmp / f"part-{i}.bin").write_text("x")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["index.json", "part-0.bin"]


def test_files_and_folders_respect_the_umask(tmp_path):
    previous = os.umask(0o002)
    try:
        folder = _vector(1).save_pretrained(tmp_path / "shared" / "vec")
        artifacts.atomic_write_text(tmp_path / "shared" / "notes.txt", "x")
    finally:
        os.umask(previous)
    for path in [tmp_path / "shared", folder]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o775, path
    for path in [*folder.iterdir(), tmp_path / "shared" / "notes.txt"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path


# ------------------------------------------------------------------------------------------------ full disk
@pytest.mark.parametrize("failing_call", range(8))
def test_a_full_disk_at_any_write_leaves_the_old_or_the_new_artifact(tmp_path, monkeypatch, failing_call):
    """Each write and rename of a save fails with ENOSPC in turn: the 3 files, the list of stale files, the rename of
    the staging folder (the commit point), then the 3 renames into place (which the next save completes)."""
    folder = tmp_path / "vec"
    _vector(1).save_pretrained(folder)
    (folder / "keep.txt").write_text("mine")
    calls = {"n": 0}

    def maybe_fail(original):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == failing_call + 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(*args, **kwargs)
        return wrapped

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", maybe_fail(safetensors.torch.save_file))
    monkeypatch.setattr(Path, "write_text", maybe_fail(Path.write_text))
    monkeypatch.setattr(os, "replace", maybe_fail(os.replace))
    with pytest.raises(OSError) as err:
        _vector(2).save_pretrained(folder)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    committed = failing_call >= 5
    assert (folder / ".repalign-commit").exists() == committed
    assert _version_on_disk(folder, {1: _vector(1), 2: _vector(2)}) == (2 if committed else 1)
    assert (folder / "keep.txt").read_text() == "mine"
    _vector(3).save_pretrained(folder)  # the next save completes/cleans whatever was left
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "keep.txt", "model.safetensors"]


# ------------------------------------------------------------------------------------------------ kills
_SAVER = textwrap.dedent("""
    import sys, torch
    from hf_repalign.legend.vector import MarginVector
    folder, size = sys.argv[1], int(sys.argv[2])
    vectors = []
    for seed in (1, 2):
        d = torch.randn(size, generator=torch.Generator().manual_seed(seed))
        vectors.append(MarginVector(d / d.norm(), layer=seed % 3, model_name_or_path="org/model",
                                    num_hidden_layers=4, n_pairs=seed))
    print("ready", flush=True)
    i = 0
    while True:
        vectors[i % 2].save_pretrained(folder)
        i += 1
""")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_kill_at_any_moment_leaves_a_complete_artifact(tmp_path):
    size = 1 << 18  # 1 MiB of float32, so a save takes long enough for kills to land inside it
    folder = tmp_path / "vec"
    folder.mkdir()
    (folder / "thesis.tex").write_text("mine")
    versions = {s: _vector(s, size) for s in (1, 2)}
    rng = random.Random(0)
    for _ in range(12):
        child = subprocess.Popen([sys.executable, "-c", _SAVER, str(folder), str(size)], stdout=subprocess.PIPE,
                                 text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        if (folder / "config.json").exists():
            _version_on_disk(folder, versions)
        assert (folder / "thesis.tex").read_text() == "mine"
    _vector(3, size).save_pretrained(folder)  # cleans the killed writers' temp folders
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "thesis.tex"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_concurrent_saves_to_one_folder_end_with_one_complete_artifact(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        from hf_repalign.legend.vector import MarginVector
        seed = int(sys.argv[2])
        d = torch.randn(4096, generator=torch.Generator().manual_seed(seed))
        v = MarginVector(d / d.norm(), layer=seed % 3, model_name_or_path="org/model", num_hidden_layers=4,
                         n_pairs=seed)
        for _ in range(15):
            v.save_pretrained(sys.argv[1])
    """)
    folder = tmp_path / "vec"
    children = [subprocess.Popen([sys.executable, "-c", script, str(folder), str(seed)],
                                 env=dict(os.environ, OMP_NUM_THREADS="1")) for seed in (1, 2)]
    assert [child.wait(timeout=300) for child in children] == [0, 0]
    _version_on_disk(folder, {s: _vector(s, 4096) for s in (1, 2)})
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_an_output_under_a_file_is_refused_naming_the_file(tmp_path):
    from hf_repalign.outputs import check_output_file

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for output in (notes / "out", notes / "deeper" / "out"):
        with pytest.raises(NotADirectoryError, match=f"{notes} is a file, so .* cannot be created under it"):
            _vector(1).save_pretrained(output)
        with pytest.raises(NotADirectoryError, match=f"--output: {notes} is a file"):
            check_output_file(output.with_suffix(".jsonl"), (".jsonl",), "--output")
    assert notes.read_text() == "mine"
