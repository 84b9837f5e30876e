"""Every data file is read as UTF-8 through one place: BOM accepted, bad bytes and surrogates named by file and line."""

import gzip

import pytest

from hf_repalign.data_files import read_advbench, read_mt_bench
from hf_repalign.text_files import TextFileError, read_csv, read_json, read_jsonl, read_lines, read_text


def test_bom_is_accepted_everywhere(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "p"}\n')
    (tmp_path / "a.csv").write_bytes(b"\xef\xbb\xbfgoal,target\nx,y\n")
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfone\n\ntwo\n")
    assert read_jsonl(tmp_path / "a.jsonl") == [{"prompt": "p"}]
    assert read_csv(tmp_path / "a.csv") == [{"goal": "x", "target": "y"}]
    assert read_advbench(tmp_path / "a.csv") == ["x"]  # the BOM would otherwise glue onto the header "goal"
    assert read_lines(tmp_path / "a.txt") == ["one", "two"]


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(TextFileError, match=r"--dataset .*bad\.jsonl, line 2: byte 0xe9 is not valid UTF-8"):
        read_jsonl(path, "--dataset")


def test_gzip_is_read_as_text(tmp_path):
    path = tmp_path / "q.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"turns": ["hi"]}\n'))
    assert read_mt_bench(path) == ["hi"]


@pytest.mark.parametrize("line, message", [
    ('["a", "b"]', "expected a JSON object"),
    ('{"a": "\\ud800"}', "holds a lone surrogate"),
    ('{"a": ', "not valid JSON"),
])
def test_jsonl_rows_are_objects_of_valid_text(tmp_path, line, message):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": "fine"}\n\n' + line + "\n")
    with pytest.raises(TextFileError, match=rf"rows\.jsonl, line 3: {message}"):
        read_jsonl(path)


def test_json_document_and_plain_text(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"q": 1}]')
    assert read_json(path) == [{"q": 1}]
    assert read_text(path) == '[{"q": 1}]'


def test_rows_of_a_json_list_or_of_json_lines(tmp_path):
    from hf_repalign.text_files import read_rows

    (tmp_path / "list.json").write_bytes(b'\xef\xbb\xbf[{"a": 1}, {"a": 2, "b": "x"}]')
    (tmp_path / "lines.json").write_text('{"a": 1}\n{"a": 2}\n')
    assert read_rows(tmp_path / "list.json") == [{"a": 1}, {"a": 2, "b": "x"}]
    assert read_rows(tmp_path / "lines.json") == [{"a": 1}, {"a": 2}]
    (tmp_path / "bad.json").write_text('[{"a": 1}, [2]]')
    with pytest.raises(TextFileError, match=r"--dataset .*bad\.json, row 1: expected a JSON object"):
        read_rows(tmp_path / "bad.json", "--dataset")


def test_the_cli_config_and_the_rahf_and_annotate_datasets_read_through_here(tmp_path, capsys):
    """Entry points that read users' files themselves: ``--config`` YAML, ``repalign rahf --dataset`` files and
    ``annotate``'s ``.json`` datasets. Each accepts a BOM and names the file and line of a bad byte."""
    from hf_repalign import cli
    from hf_repalign.legend.data import _read_file
    from hf_repalign.rahf.cli import load_rows

    config = tmp_path / "c.yaml"
    config.write_bytes(b"alpha: 1\nbeta: caf\xe9\n")
    assert cli.main(["legend", "annotate", "--config", str(config)]) == 2
    assert f"--config {config}, line 2: byte 0xe9 is not valid UTF-8" in capsys.readouterr().err

    rows = tmp_path / "prefs.jsonl"
    rows.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "q"}\n')
    dataset = load_rows(str(rows))
    assert dataset["prompt"] == ["p", "q"] and dataset["chosen"] == ["c", None]
    rows.write_bytes(b'{"prompt": "p"}\n{"prompt": "\xff"}\n')
    with pytest.raises(TextFileError, match=r"--dataset_name .*prefs\.jsonl, line 2: byte 0xff"):
        load_rows(str(rows))

    listed = tmp_path / "prefs.json"
    listed.write_bytes(b'\xef\xbb\xbf[{"prompt": "p", "chosen": "c", "rejected": "r"}]')
    assert load_rows(str(listed))["chosen"] == ["c"]
    assert _read_file(listed) == [{"prompt": "p", "chosen": "c", "rejected": "r"}]
    listed.write_bytes(b'[{"prompt": "\\ud800"}]')
    with pytest.raises(TextFileError, match="lone surrogate"):
        _read_file(listed)
