"""README tables that are generated from committed results must match them."""

import importlib.util
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def _load(rel):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_")[:-3], os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dpo_step_cpu_table_is_current():
    mod = _load("bench/readme_table.py")
    _, current = mod.readme_block()
    assert current == mod.block(), "README's CPU step table is stale: run python3 bench/readme_table.py --write"


def test_dpo_step_cpu_table_refuses_incomplete_results(tmp_path):
    import json
    mod = _load("bench/readme_table.py")
    with open(mod.RESULTS, encoding="utf-8") as f:
        doc = json.load(f)
    doc["rows"] = [r for r in doc["rows"] if r["impl"] != "trl"]
    p = tmp_path / "r.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(SystemExit, match="lacks rows"):
        mod.block(str(p))
