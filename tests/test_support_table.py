"""README's supported-models table matches the adapter registry and the family tests."""

import support_table


def test_readme_table_is_generated_from_the_tests():
    _, current = support_table.readme_block()
    assert current is not None, "README.md lacks the supported-models markers"
    assert current == support_table.block(), (
        "README.md's supported-models table is stale: run python3 tests/support_table.py --write")
