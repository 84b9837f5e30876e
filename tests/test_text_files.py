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
