import json
import os

import pytest
import torch

from bpo_fast.data.preference import (BadRecordError, PreferenceCollator, PreferenceDataset)
from bpo_fast.models.tiny import TinyLlavaConfig
from bpo_fast.train.synthetic import make_pairs

N_IMG = TinyLlavaConfig().num_image_tokens


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_llava_dir)


@pytest.fixture
def pairs(tmp_path):
    return make_pairs(str(tmp_path), n=4, seed=1), str(tmp_path)


def test_batch_layout_labels_and_images(pairs, processor):
    path, root = pairs
    ds = PreferenceDataset(path, root)
    items = [ds[0], ds[1], ds[2]]
    b = PreferenceCollator(processor)(items)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert b["input_ids"].shape[0] == 6 and b["pixel_values"].shape == (3, 3, 32, 32)
    assert b["ids"] == [it["id"] for it in items] and b["index"].tolist() == [0, 1, 2]
    for row in range(6):
        ids, lab, am = b["input_ids"][row], b["labels"][row], b["attention_mask"][row]
        n = int(am.sum())
        assert am[:n].all() and not am[n:].any()            # right padding
        assert (ids[n:] == tok.pad_token_id).all() and (lab[n:] == -100).all()
        assert int((ids == image_id).sum()) == N_IMG        # every row carries its image tokens
        assert (lab[ids == image_id] == -100).all()
        scored = lab != -100
        first = int(scored.nonzero()[0])
        assert not scored[:first].any() and scored[first:n].all()   # prompt masked, response scored
        assert torch.equal(lab[scored], ids[scored])
        pair = items[row % 3]
        text = tok.decode(ids[scored])
        want = pair["chosen"] if row < 3 else pair["rejected"]
        assert text.replace(" ", "") == (want + "</s>").replace(" ", "")
    # chosen and rejected rows of a pair share the prompt exactly
    for i in range(3):
        fc = int((b["labels"][i] != -100).nonzero()[0])
        fr = int((b["labels"][i + 3] != -100).nonzero()[0])
        assert fc == fr and torch.equal(b["input_ids"][i, :fc], b["input_ids"][i + 3, :fr])


def test_truncation_keeps_image_and_prompt_and_cuts_responses(pairs, processor):
    path, root = pairs
    ds = PreferenceDataset(path, root)
    full = PreferenceCollator(processor)([ds[0]])
    prompt_len = int((full["labels"][0] != -100).nonzero()[0])
    b = PreferenceCollator(processor, max_length=prompt_len + 2)([ds[0]])
    assert b["input_ids"].shape[1] == prompt_len + 2
    assert torch.equal(b["input_ids"][:, :prompt_len], full["input_ids"][:, :prompt_len])
    assert ((b["labels"] != -100).sum(1) == 2).all()
    assert ((b["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum(1) == N_IMG).all()
    # a prompt longer than max_length keeps one response token and warns
    with pytest.warns(UserWarning, match="max_length"):
        short = PreferenceCollator(processor, max_length=4)([ds[0]])
    assert ((short["labels"] != -100).sum(1) == 1).all()
    assert short["input_ids"].shape[1] == prompt_len + 1


def test_pad_to_multiple_and_bad_arguments(pairs, processor):
    path, root = pairs
    ds = PreferenceDataset(path, root)
    b = PreferenceCollator(processor, pad_to_multiple_of=16)([ds[0], ds[1]])
    assert b["input_ids"].shape[1] % 16 == 0
    with pytest.raises(TypeError, match="processor"):
        PreferenceCollator(processor.tokenizer)
    with pytest.raises(ValueError, match="max_length"):
        PreferenceCollator(processor, max_length=1)
    with pytest.raises(ValueError, match="items"):
        PreferenceCollator(processor)([])
    with pytest.raises(FileNotFoundError, match="image_root"):
        PreferenceDataset(path, os.path.join(root, "nope"))


def _good(i, image="img/0000.png"):
    return {"id": f"x{i}", "image": image,
            "prompt": [{"from": "human", "value": "<image>\nwhat color?"}],
            "chosen": "red .", "rejected": "blue .", "strategy": "error_injection",
            "noise_step": None, "injector": "rules"}


def _bad_cases(root):
    with open(os.path.join(root, "img", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    return {
        "malformed": "{this is not json",
        "missing_image": json.dumps(_good(1, image="img/missing.png")),
        "unreadable_image": json.dumps(_good(2, image="img/broken.png")),
        "empty_response": json.dumps({**_good(3), "chosen": "   "}),
        "schema_missing_field": json.dumps({k: v for k, v in _good(4).items() if k != "strategy"}),
        "schema_bad_strategy": json.dumps({**_good(5), "strategy": 3}),
        "duplicate_id": json.dumps(_good(0)),
        "not_an_object": "[1, 2, 3]",
    }


@pytest.mark.parametrize("case", ["malformed", "missing_image", "unreadable_image",
                                  "empty_response", "schema_missing_field", "schema_bad_strategy",
                                  "duplicate_id", "not_an_object"])
def test_bad_records_are_skipped_or_raise_in_strict_mode(tmp_path, case):
    root = str(tmp_path)
    make_pairs(root, n=1)
    bad = _bad_cases(root)[case]
    path = os.path.join(root, "mixed.jsonl")
    with open(path, "w") as f:  # line 1 good, line 2 blank, line 3 bad, line 4 good
        f.write(json.dumps(_good(0)) + "\n\n" + bad + "\n" + json.dumps(_good(9)) + "\n")
    with pytest.warns(UserWarning, match=r"mixed\.jsonl:3:"):
        ds = PreferenceDataset(path, root)
    assert len(ds) == 2 and [s.line for s in ds.skipped] == [3]
    assert [r["line"] for r in ds.records] == [1, 4]
    with pytest.raises(BadRecordError, match=r"mixed\.jsonl:3:"):
        PreferenceDataset(path, root, strict=True)


def test_text_only_record_is_a_pair(tmp_path):
    """``"image": null`` is a text-only pair (issue 16): kept, no image, no image tokens."""
    root = str(tmp_path)
    make_pairs(root, n=1)
    path = os.path.join(root, "text.jsonl")
    rec = {**_good(6), "image": None,
           "prompt": [{"from": "human", "value": "what color is the sky?"}]}
    with open(path, "w") as f:
        f.write(json.dumps(_good(0)) + "\n" + json.dumps(rec) + "\n")
    ds = PreferenceDataset(path, root)
    assert len(ds) == 2 and not ds.skipped
    assert ds[1]["image"] is None and ds[1]["images"] == []


def test_all_bad_is_an_error(tmp_path):
    root = str(tmp_path)
    make_pairs(root, n=1)
    path = os.path.join(root, "bad.jsonl")
    with open(path, "w") as f:
        f.write("nope\n")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no usable record"):
        PreferenceDataset(path, root)
