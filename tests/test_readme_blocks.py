"""Every fenced block of README.md says how it is proven (tests/readme_blocks.py), and the proof
is there: ``run`` blocks run here as written, ``test=FILE`` names a file that reads the block
through ``block("ID")``, ``skip`` says why, ``output`` is not a command."""

import os
import re
import subprocess
import sys

import pytest
from readme_blocks import README, blocks

ROOT = os.path.dirname(README)
KINDS = ("run", "test", "skip", "output")
LANGS = {"python": [sys.executable, "-c"], "bash": ["bash", "-euo", "pipefail", "-c"],
         "sh": ["bash", "-euo", "pipefail", "-c"]}


def _kind(b):
    kinds = [k for k in KINDS if k in b.marker]
    return kinds[0] if len(kinds) == 1 else None


def test_every_block_has_one_marker_with_a_unique_id():
    found = blocks()
    assert found, "README.md has no fenced blocks"
    bad = [f"README.md:{b.line}: {b.marker or 'no marker'}" for b in found
           if not b.id or _kind(b) is None]
    assert not bad, ("each fenced block needs <!-- readme-block id=NAME run|test=FILE|skip=\"why\"|"
                     "output --> right before it:\n" + "\n".join(bad))
    ids = [b.id for b in found]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_skip_markers_say_why():
    for b in blocks():
        if "skip" in b.marker:
            assert isinstance(b.marker["skip"], str) and len(b.marker["skip"].split()) >= 3, \
                f"README.md:{b.line}: skip=\"...\" must say why the block cannot run here"


def test_run_blocks_are_in_a_language_this_file_runs():
    for b in blocks():
        if "run" in b.marker:
            assert b.lang in LANGS, f"README.md:{b.line}: a run block in {b.lang!r}"


def test_each_test_file_exists_and_reads_its_block():
    for b in blocks():
        if "test" not in b.marker:
            continue
        path = os.path.join(ROOT, b.marker["test"])
        assert os.path.isfile(path), f"README.md:{b.line}: test={b.marker['test']} does not exist"
        text = open(path, encoding="utf-8").read()
        # block("ID"), or block(name) with "ID" among the names it is given (parametrised tests)
        assert re.search(r"\bblock\(", text) and re.search(r"""["']%s["']""" % re.escape(b.id), text), \
            f"README.md:{b.line}: {b.marker['test']} never reads block({b.id!r})"


def _run_blocks():
    return [pytest.param(b, id=b.id) for b in blocks() if "run" in b.marker and b.id]


@pytest.mark.parametrize("b", _run_blocks())
def test_run_block_runs_as_written(b):
    """From the repository root, as a user runs it: on the CPU without the Triton interpreter
    (the interpreter is a test device; a CPU user gets the PyTorch reference paths)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(LANGS[b.lang] + [b.code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (f"README.md:{b.line} ({b.id}) failed:\n"
                                  + proc.stdout[-2000:] + proc.stderr[-4000:])
