"""The one text-file reader (pipeline/textfile.py): formats, labels required or not, errors naming file and line."""

from __future__ import annotations

import gzip

import pytest

from pipeline.errors import UsageError
from pipeline.model.data import Example, read_labelled
from pipeline.textfile import TextRow, read_rows
from producers.replay import records


def test_jsonl_csv_plain_and_gzip_read_alike(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "Shares fell", "label": "negative", "entity": "ACME", "id": 7}\n\n{"text": "Up"}\n')
    assert read_rows(jl) == [TextRow("Shares fell", "negative", id="7", entity="ACME", line=1), TextRow("Up", line=3)]
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(jl.read_bytes()))
    assert read_rows(gz) == read_rows(jl)
    csv = tmp_path / "b.csv"
    csv.write_text('text,label,source\n"Shares fell, sharply",negative,news\n"two\nlines",,\n')
    assert read_rows(csv) == [TextRow("Shares fell, sharply", "negative", source="news", line=2),
                              TextRow("two\nlines", line=3)]
    txt = tmp_path / "c.txt"
    txt.write_text("one\r\n\n  \ntwo\n")
    assert [(r.text, r.line) for r in read_rows(txt)] == [("one", 1), ("two", 4)]
    sniffed = tmp_path / "d.log"
    sniffed.write_text('\n{"text": "a json line in a .log file", "label": "neutral"}\n')
    assert read_labelled(sniffed) == [Example("a json line in a .log file", "neutral")]


def test_labels_required_for_training_not_for_replay(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "fine", "label": "positive"}\n{"text": "no label here"}\n')
    assert [r.label for r in read_rows(f)] == ["positive", None]
    with pytest.raises(UsageError) as e:
        read_labelled(f)
    assert str(e.value) == f"{f}:2: missing 'label' (every row needs a label name)"
    txt = tmp_path / "x.txt"
    txt.write_text("plain\n")
    with pytest.raises(UsageError, match="plain text has no labels"):
        read_labelled(txt)
    c = tmp_path / "x.csv"
    c.write_text("text\nhello\n")
    assert read_rows(c) == [TextRow("hello", line=2)]
    with pytest.raises(UsageError, match=r"CSV header is \['text'\]; it needs 'text' and 'label' columns"):
        read_labelled(c)


@pytest.mark.parametrize("name, content, message", [
    ("e.jsonl", "", "file holds no texts"),
    ("e.jsonl", '{"text": "ok"}\n{oops\n', ":2: line is not valid JSON"),
    ("e.jsonl", '{"text": "ok"}\n[1, 2]\n', ":2: line is not a JSON object"),
    ("e.jsonl", '{"text": "ok"}\n{"text": "  "}\n', ":2: missing or empty 'text'"),
    ("e.csv", "body\nx\n", "CSV header is ['body']; it needs a 'text' column"),
    ("e.csv", "text,label\nfine,positive\n,negative\n", ":3: missing or empty 'text'"),
])
def test_errors_name_file_and_line(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(UsageError) as e:
        read_rows(f)
    assert str(f) in str(e.value) and message in str(e.value)


def test_not_utf8_missing_and_directory(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(UsageError, match="file is not UTF-8 text"):
        read_rows(f)
    with pytest.raises(UsageError, match="file not found"):
        read_rows(tmp_path / "missing.jsonl")
    with pytest.raises(UsageError, match="not a file"):
        read_rows(tmp_path)


def test_replay_records_ids_keys_and_passes(tmp_path):
    f = tmp_path / "news.jsonl"
    f.write_text('{"text": "a", "entity": "ACME", "source": "wire"}\n{"text": "b", "label": "neutral"}\n')
    got = list(records(f, loop=False))
    assert got == [(b"ACME", b'{"text":"a","id":"news-0","source":"wire","entity":"ACME"}'),
                   (None, b'{"text":"b","id":"news-1","source":"replay","label":"neutral"}')]
    looped = records(read_rows(f), loop=True, stem="news")
    assert [next(looped)[1].split(b'"id":"')[1].split(b'"')[0] for _ in range(5)] == \
        [b"news-0", b"news-1", b"news-0-p1", b"news-1-p1", b"news-0-p2"]
