"""The README's fenced code blocks and how each one is proven.

Every fenced block in README.md is preceded (blank lines allowed between) by one marker comment:

    <!-- readme-block id=NAME run -->                      executed as written by tests/test_readme_blocks.py
    <!-- readme-block id=NAME test=tests/test_x.py -->    executed by that test file, which reads the
                                                           block through ``block("NAME")`` (never a copy)
    <!-- readme-block id=NAME skip="why it cannot run here" -->   e.g. needs a 7B checkpoint or a GPU
    <!-- readme-block id=NAME output -->                   not a command: printed output, a table, a record

Tests import this module (``from readme_blocks import block``; tests/ is on sys.path under pytest).
"""

import os
import re
import shlex
from dataclasses import dataclass, field

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

_MARKER = re.compile(r"^<!--\s*readme-block\s+(.*?)\s*-->\s*$")
_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    marker: dict = field(default_factory=dict)  # parsed marker (empty: none)

    @property
    def id(self):
        return self.marker.get("id")


def _parse_marker(text):
    out = {}
    for tok in shlex.split(text):
        key, sep, value = tok.partition("=")
        out[key] = value if sep else True
    return out


def blocks(path=README):
    """Every fenced block of ``path`` in order, each with the marker that precedes it."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    found, pending, i = [], None, 0
    while i < len(lines):
        m = _MARKER.match(lines[i].strip())
        if m:
            pending = _parse_marker(m.group(1))
            i += 1
            continue
        f = _FENCE.match(lines[i])
        if f:
            indent, fence, lang = f.groups()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence):
                j += 1
            body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:j]]
            found.append(Block(lang, "\n".join(body) + "\n", i + 1, pending or {}))
            pending, i = None, j + 1
            continue
        if lines[i].strip():
            pending = None  # a marker applies only to the block right after it
        i += 1
    return found


def block(block_id, path=README):
    """The code of the block marked ``id=block_id`` (KeyError naming it when absent)."""
    hits = [b for b in blocks(path) if b.id == block_id]
    if len(hits) != 1:
        raise KeyError(f"README.md has {len(hits)} blocks marked id={block_id!r}, expected 1")
    return hits[0].code
