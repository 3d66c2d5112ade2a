"""The README's option tables, generated from the commands' option declarations.

``python -m bpo_fast.tools.readme_tables README.md`` rewrites every
``<!-- options:CMD -->...<!-- /options:CMD -->`` block; ``tests/test_options.py`` checks they are
current. It lives above the commands (it imports every command's options class), so
``bpo_fast.options`` stays below them.
"""

import os
import re
import sys

from bpo_fast.options import markdown_table

__all__ = ["command_options", "render_readme"]


def command_options():
    """command -> the dataclass of its options (imports the command modules' option classes, and
    with them torch)."""
    from bpo_fast.data.cli_merge import MergeOptions
    from bpo_fast.data.pairs import PairBuilderConfig
    from bpo_fast.demo.cli import DemoOptions
    from bpo_fast.eval.cli import ChairOptions
    from bpo_fast.eval.cli_pope import PopeOptions
    from bpo_fast.eval.generate import GenerateOptions
    from bpo_fast.train.cli_ref import RefLogpsOptions
    from bpo_fast.train.config import TrainConfig

    return {"build-pairs": PairBuilderConfig, "merge-pairs": MergeOptions,
            "ref-logps": RefLogpsOptions, "train": TrainConfig, "generate": GenerateOptions,
            "eval-chair": ChairOptions, "eval-pope": PopeOptions, "demo": DemoOptions}


def render_readme(text):
    """``text`` with every ``<!-- options:CMD -->...<!-- /options:CMD -->`` block regenerated."""
    table = {k: markdown_table(v) for k, v in command_options().items()}

    def sub(m):
        cmd = m.group(1)
        if cmd not in table:
            raise ValueError(f"README: no command {cmd!r} (known: {sorted(table)})")
        return f"<!-- options:{cmd} -->\n{table[cmd]}\n<!-- /options:{cmd} -->"

    return re.sub(r"<!-- options:([\w-]+) -->.*?<!-- /options:\1 -->", sub, text, flags=re.S)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else "README.md"
    with open(path, encoding="utf-8") as fh:
        old = fh.read()
    new = render_readme(old)
    if new != old:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(new)
        os.replace(tmp, path)
    print(f"{path}: option tables {'updated' if new != old else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
