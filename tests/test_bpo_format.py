"""The official BPO data format: pairing, strategies, and every command that reads pairs."""

import json
import os

import numpy as np
import pytest

from bpo_fast.data.bpo_format import convert, iter_pair_records, official_to_pairs
from bpo_fast.data.schema import validate_pair

REC = {"prompt": "What is on the table?\n<image>", "image": "img/0.png",
       "completions": [{"score": 1, "response": "A red cup.", "type": "gt"},
                       {"score": 0, "response": "A blue cup.", "type": "mllm-hal"},
                       {"score": 0, "response": "A red plate.", "type": "llm-hal"}]}


def write_official(root, n=4, *, bad=False, jsonl=False):
    """An official-format file (JSON array, or JSONL) with n records and their images."""
    from PIL import Image

    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
            os.path.join(root, "img", f"{i}.png"))
        recs.append({**REC, "image": f"img/{i}.png",
                     "prompt": f"What is on the table {i}?\n<image>"})
    if bad:
        recs.append({"prompt": "x\n<image>", "image": "img/0.png",
                     "completions": [{"score": 1, "response": "a", "type": "gt"},
                                     {"score": "high", "response": "b", "type": "llm-hal"}]})
        recs.append({**REC, "completions": [{"score": 1, "response": "a", "type": "gt"},
                                            {"score": 1, "response": "b", "type": "llm-hal"}]})
    path = os.path.join(root, "bpo.jsonl" if jsonl else "bpo.json")
    with open(path, "w") as f:
        if jsonl:
            f.writelines(json.dumps(r) + "\n" for r in recs)
        else:
            json.dump(recs, f, indent=1)
    return path


def test_pairs_every_two_completions_with_different_scores():
    pairs = official_to_pairs(REC, index=7)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("A red cup.", "A blue cup."), ("A red cup.", "A red plate.")]
    assert [p["id"] for p in pairs] == ["bpo7:0-1", "bpo7:0-2"]
    assert [(p["strategy"], p["injector"]) for p in pairs] == [
        ("image_weakened", None), ("error_injection", "llm")]
    for p in pairs:
        validate_pair(p)
        assert p["prompt"] == [{"from": "human", "value": "What is on the table?\n<image>"}]
    # the higher score is chosen whatever the order; equal scores make no pair
    rec = {**REC, "id": "x", "completions": [REC["completions"][1], REC["completions"][0],
                                             {"score": 0, "response": "no", "type": "llm-hal"}]}
    got = official_to_pairs(rec)
    assert [(p["id"], p["chosen"]) for p in got] == [("x:1-0", "A red cup."), ("x:1-2", "A red cup.")]
    for bad in ("high", float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=r"completions\[1\].score"):
            official_to_pairs({**REC, "completions": [REC["completions"][0],
                                                      {"score": bad, "response": "b"}]})
    with pytest.raises(ValueError, match="completions"):
        official_to_pairs({**REC, "completions": [REC["completions"][0]]})


def test_read_as_the_official_trainer_reads_it():
    """Only prompt, image, completions[].score and .response are required (the official
    make_batch_pairs reads nothing else); float scores as bootstrap_dpo.py writes them; a
    missing type gives the strategy 'untyped', an unknown one is kept as its own strategy."""
    rec = {"prompt": "What is it?", "image": "img/0.png",
           "completions": [{"score": 0.75, "response": "A cup."},
                           {"score": 0.25, "response": "A plate.", "type": "gt-rephrased"},
                           {"score": 0.5, "response": "A mug."}]}
    pairs = official_to_pairs(rec, index=3)
    got = [(p["id"], p["chosen"], p["rejected"], p["strategy"], p["injector"]) for p in pairs]
    assert got == [("bpo3:0-1", "A cup.", "A plate.", "gt-rephrased", None),
                   ("bpo3:0-2", "A cup.", "A mug.", "untyped", None),
                   ("bpo3:2-1", "A mug.", "A plate.", "gt-rephrased", None)]
    for p in pairs:
        validate_pair(p)
        assert p["prompt"][0]["value"] == "<image>\nWhat is it?"
    assert pairs[0]["source"]["scores"] == [0.75, 0.25]
    with pytest.raises(ValueError, match=r"completions\[0\].type"):
        official_to_pairs({**rec, "completions": [{"score": 1, "response": "a", "type": 3},
                                                  {"score": 0, "response": "b"}]})


def test_bom_is_accepted_by_every_reader(tmp_path):
    """A JSON array or JSONL file starting with a UTF-8 byte-order mark reads as without it."""
    from bpo_fast.data.jsonl import iter_jsonl, iter_records, load_json
    from bpo_fast.data.preference import PreferenceDataset
    from bpo_fast.eval.chair import load_ground_truth

    root = str(tmp_path)
    for jsonl in (False, True):
        path = write_official(root, n=2, jsonl=jsonl)
        plain = [r for _, r in iter_pair_records(path)]
        with open(path, "rb") as f:
            raw = f.read()
        with open(path, "wb") as f:
            f.write(b"\xef\xbb\xbf" + raw)
        assert [r for _, r in iter_pair_records(path)] == plain and len(plain) == 4
        assert len(PreferenceDataset(path, root)) == 4
        n = convert([path], str(tmp_path / "c.jsonl"))
        assert (n["records"], n["pairs"], n["invalid"]) == (2, 4, [])
        assert [i for i, _, _ in iter_records(path)] == [0, 1]
    gt = tmp_path / "gt.jsonl"
    gt.write_bytes(b'\xef\xbb\xbf{"id": "1", "objects": ["dog"]}\n')
    assert load_ground_truth(str(gt)) == {"1": ["dog"]}
    assert [r for _, r in iter_jsonl(str(gt))] == [{"id": "1", "objects": ["dog"]}]
    cfg = tmp_path / "c.json"
    cfg.write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert load_json(str(cfg)) == {"a": 1}


def test_reader_yields_pairs_and_errors_with_lines(tmp_path):
    path = write_official(str(tmp_path), n=2, bad=True)
    got = list(iter_pair_records(path))
    pairs = [r for _, r in got if isinstance(r, dict)]
    errors = [(n, r) for n, r in got if isinstance(r, Exception)]
    assert len(pairs) == 4 and len(errors) == 1 and "score" in str(errors[0][1])
    assert errors[0][0] > 1  # the line where the bad record starts


def test_dataset_and_merge_read_the_official_format(tmp_path, caplog):
    from bpo_fast.data.pairs import merge_pairs
    from bpo_fast.data.preference import PreferenceDataset

    for jsonl in (False, True):
        root = str(tmp_path / ("l" if jsonl else "a"))
        path = write_official(root, n=3, bad=True, jsonl=jsonl)
        caplog.clear()
        with pytest.warns(UserWarning, match="score"):
            ds = PreferenceDataset(path, root)
        assert len(ds) == 6 and len(ds.skipped) == 1 and ds.n_records == 5
        # records and pairs counted apart: 5 records (one bad, one without differing scores)
        assert "skipped 1 bad record(s) of 5 record(s); 6 pair(s) kept" in caplog.text
        assert ds[0]["prompt"][0]["value"].startswith("What is on the table 0?")
        s = merge_pairs([path], str(tmp_path / f"m{jsonl}.jsonl"), skip_invalid=True)
        assert s.written == 6 and len(s.invalid) == 1


def test_convert_cli_counts(tmp_path, capsys):
    from bpo_fast.cli import main

    root = str(tmp_path)
    path = write_official(root, n=3, bad=True)
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"id": "1", "image": "img/0.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]))
    out = tmp_path / "pairs.jsonl"
    assert main(["convert", "--out", str(out), path, str(llava)]) == 0
    err = capsys.readouterr().err
    assert "6 record(s) -> 6 pair(s) (error_injection: 3, image_weakened: 3)" in err
    assert "records: 1 without differing scores, 2 invalid" in err
    assert "build-pairs" in err
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 6
    for r in rows:
        validate_pair(r)
    assert main(["convert", "--strict", "--out", str(tmp_path / "s.jsonl"), path]) == 2
    assert not os.path.exists(tmp_path / "s.jsonl")
    assert main(["convert", "--out", str(out), str(tmp_path / "missing.json")]) == 2
    assert "INPUT" in capsys.readouterr().err


def test_train_and_ref_logps_on_official_data(tiny_llava_dir, tmp_path):
    import torch

    from bpo_fast.train import TrainConfig, train
    from bpo_fast.train.ref_cache import compute_reference_logps

    root = str(tmp_path / "data")
    path = write_official(root, n=2)
    cache = compute_reference_logps(tiny_llava_dir, path, root, str(tmp_path / "ref.safetensors"),
                                    batch_size=2, device="cpu", dtype=torch.float32,
                                    progress=False, max_length=64)
    assert sorted(cache.ids) == ["bpo0:0-1", "bpo0:0-2", "bpo1:0-1", "bpo1:0-2"]
    res = train(TrainConfig(model=tiny_llava_dir, data=path, image_root=root,
                            output=str(tmp_path / "out"), batch_size=2, device="cpu",
                            max_length=64, max_steps=2, warmup_steps=0, progress=False,
                            reference="cached", ref_cache=str(tmp_path / "ref.safetensors")))
    assert res["steps"] == 2
