import json
import os

import pytest

from bpo_fast.data.jsonl import (JsonlWriter, atomic_write_jsonl, iter_jsonl, read_ids,
                                 repair_torn_tail)


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def test_writer_appends_whole_lines_and_reads_back(tmp_path):
    p = tmp_path / "sub" / "a.jsonl"
    with JsonlWriter(p) as w:
        assert w.write_batch([{"id": "a", "t": "x\ny"}, {"id": "b", "t": "é"}]) == 2
        assert w.write_batch([]) == 0
    with JsonlWriter(p, fsync=False) as w:  # reopening appends
        w.write({"id": "c"})
    raw = p.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 3  # newlines inside values are escaped
    assert [r["id"] for _, r in iter_jsonl(p)] == ["a", "b", "c"]
    assert read_ids(p) == {"a", "b", "c"}
    with pytest.raises(TypeError, match="path"):
        JsonlWriter(3)


@pytest.mark.parametrize("content,expect_keep,expect_dropped", [
    (b"", b"", 0),
    (b'{"id":"a"}\n', b'{"id":"a"}\n', 0),
    (b'{"id":"a"}\n{"id":"b', b'{"id":"a"}\n', 8),
    (b'{"id":"a"}\n{"id":"b"}', b'{"id":"a"}\n', 10),   # parseable but unterminated: still torn
    (b'{"id":"a', b"", 8),                              # the only line is torn
])
def test_repair_torn_tail(tmp_path, content, expect_keep, expect_dropped):
    p = tmp_path / "t.jsonl"
    _write(p, content)
    assert repair_torn_tail(p) == expect_dropped
    assert p.read_bytes() == expect_keep
    assert repair_torn_tail(p) == 0  # idempotent
    assert repair_torn_tail(tmp_path / "missing.jsonl") == 0


def test_repair_torn_tail_long_line_spanning_blocks(tmp_path):
    p = tmp_path / "t.jsonl"
    good = json.dumps({"id": "a", "v": "x" * 200_000}).encode() + b"\n"
    _write(p, good + b'{"id": "b", "v": "' + b"y" * 150_000)
    assert repair_torn_tail(p) > 150_000
    assert p.read_bytes() == good


def test_readers_skip_torn_and_invalid_lines(tmp_path):
    p = tmp_path / "t.jsonl"
    _write(p, b'{"id":"a"}\nnot json\n\n{"id":"c"}\n{"id":"d"}')
    bad = []
    got = [(n, r["id"]) for n, r in iter_jsonl(p, on_bad=lambda n, why: bad.append((n, why)))]
    assert got == [(1, "a"), (4, "c")]
    assert [n for n, _ in bad] == [2, 5] and "torn" in bad[1][1]
    assert read_ids(p) == {"a", "c"}
    assert read_ids(tmp_path / "none.jsonl") == set()


def test_atomic_write_all_or_nothing(tmp_path):
    p = tmp_path / "o.jsonl"
    assert atomic_write_jsonl(p, [{"id": "1"}, {"id": "2"}]) == 2
    before = p.read_bytes()

    def gen():
        yield {"id": "3"}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write_jsonl(p, gen())
    assert p.read_bytes() == before  # the old file is untouched
    assert os.listdir(tmp_path) == ["o.jsonl"]  # no temporary left behind
