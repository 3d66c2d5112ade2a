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


def test_dpo_step_cpu_table_puts_each_variant_in_its_column(tmp_path):
    """Each column's numbers are its own variant's (a table that rotated the variants printed
    bpo_fast's time under TRL's name)."""
    import json
    mod = _load("bench/readme_table.py")
    with open(mod.RESULTS, encoding="utf-8") as f:
        doc = json.load(f)
    secs = {"trl": 8.0, "trl+bpo_fast": 4.0, "bpo_fast": 2.0, "bpo_fast_composed": 3.0}
    rss = {"trl": 8e9, "trl+bpo_fast": 4e9, "bpo_fast": 2e9, "bpo_fast_composed": 3e9}
    for r in doc["rows"]:
        r["median_ms"] = r["p20_ms"] = r["p80_ms"] = secs[r["impl"]] * 1e3
        r["cpu_s_median"] = secs[r["impl"]]
        r["peak_rss_bytes"] = rss[r["impl"]]
    p = tmp_path / "r.json"
    p.write_text(json.dumps(doc))
    rows = [line for line in mod.block(str(p)).splitlines() if line.startswith("| LLaVA")]
    assert rows
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2].startswith("8.0 s") and cells[3].startswith("4.0 s") \
            and cells[4].startswith("2.0 s"), cells
        assert cells[5] == "2.00x, 2.00x" and cells[6] == "4.00x, 4.00x", cells
        assert cells[7] == "8.00 / 4.00 / 2.00 GB", cells
