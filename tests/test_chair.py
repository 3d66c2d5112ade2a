"""CHAIR on hand-made captions with known answers, its file formats, and `bpo-fast eval-chair`."""

import json

import pytest

from bpo_fast.cli import main
from bpo_fast.eval.chair import (InputError, SynonymTable, compute_chair, load_captions,
                                 load_ground_truth, pluralize)

COCO_LIKE = {
    "person": ["man", "woman", "people", "child", "boy"],
    "dog": ["puppy"],
    "hot dog": [],
    "dining table": ["table"],
    "teddy bear": [],
    "bear": [],
    "cup": ["mug"],
    "knife": [],
    "mouse": [],
}


def mentions(table, text):
    return [(m.object, m.text) for m in table.find_mentions(text)]


def test_longest_match_synonyms_plurals_case_punctuation():
    t = SynonymTable(COCO_LIKE)
    assert mentions(t, "A Hot-Dog and a dog.") == [("hot dog", "hot dog"), ("dog", "dog")]
    assert mentions(t, "two teddy bears near a bear") == [("teddy bear", "teddy bears"),
                                                         ("bear", "bear")]
    assert mentions(t, "The MEN sat at the dining tables; puppies!") == [
        ("person", "men"), ("dining table", "dining tables"), ("dog", "puppies")]
    assert mentions(t, "knives, mice and mugs") == [("knife", "knives"), ("mouse", "mice"),
                                                   ("cup", "mugs")]
    # punctuation splits phrases; substrings of words are no match
    assert mentions(t, "hot. dog") == [("dog", "dog")]
    assert mentions(t, "a hotdog on the tablecloth") == []
    assert t.canonical("Dining-Tables") == "dining table"
    assert t.canonical("sofa") is None
    assert pluralize("bus") == "buses" and pluralize("berry") == "berries"
    assert pluralize("box") == "boxes" and pluralize("toy") == "toys"


def test_shapes_objects_are_colour_plus_kind():
    from bpo_fast.demo.world import WorldConfig, world_synonyms

    t = SynonymTable(world_synonyms(WorldConfig()))
    # the right kind in the wrong colour is another object; a bare kind is no object
    assert mentions(t, "two red circles, a blue box and a circle") == [
        ("red circle", "red circles"), ("blue square", "blue box")]
    assert mentions(t, "three yellow crosses") == [("yellow cross", "yellow crosses")]


def test_scores_on_known_answers():
    caps = {
        "a": "A man and a dog at a dining table.",          # all right
        "b": "A woman holds a mug next to a puppy.",         # puppy is hallucinated
        "c": "A hot dog and a hot dog and a knife.",          # knife hallucinated; 3 mentions
        "d": "Nothing to see here.",                         # no mentions, misses the cup
    }
    gt = {
        "a": ["person", "dog", "dining table"],
        "b": ["person", "cup", "dining table"],
        "c": ["hot dog"],
        "d": ["cup"],
    }
    r = compute_chair(caps, gt, COCO_LIKE)
    assert r.n_mentions == 3 + 3 + 3 + 0
    assert r.n_hallucinated_mentions == 2
    assert r.chair_i == pytest.approx(2 / 9)
    assert r.chair_s == pytest.approx(2 / 4)
    assert r.n_gt_objects == 3 + 3 + 1 + 1 and r.n_gt_mentioned == 3 + 2 + 1 + 0
    assert r.recall == pytest.approx(6 / 8)
    per = {p["id"]: p for p in r.per_caption}
    assert per["b"]["hallucinated"] == ["dog"] and per["b"]["missing"] == ["dining table"]
    assert per["c"]["hallucinated"] == ["knife"] and per["c"]["covered"] == ["hot dog"]
    assert per["d"]["mentions"] == [] and per["d"]["missing"] == ["cup"]
    assert "CHAIR-i 22.2%" in r.summary()


def test_wrong_colour_counts_as_hallucination_and_ground_truth_is_canonicalised():
    from bpo_fast.demo.world import WorldConfig, world_synonyms

    syn = world_synonyms(WorldConfig())
    caps = {"1": "the image shows a red circle at the top left, and a blue square at the top right.",
            "2": "the image shows a green circle at the top left."}
    gt = {"1": ["red circle", "blue square"], "2": ["red circles", "red circle"]}
    r = compute_chair(caps, gt, syn)
    assert (r.n_mentions, r.n_hallucinated_mentions, r.n_hallucinated_captions) == (3, 1, 1)
    assert r.per_caption[1]["ground_truth"] == ["red circle"]     # plural and duplicate folded
    assert r.per_caption[1]["hallucinated"] == ["green circle"]
    assert r.recall == pytest.approx(2 / 3)


def test_zero_denominators_and_no_table():
    r = compute_chair({"x": "nothing here"}, {"x": []})
    assert r.chair_i is None and r.recall is None and r.chair_s == 0.0
    assert "n/a" in r.summary()
    # without a table the ground-truth names (of all images) are the vocabulary
    r = compute_chair({"x": "a cat and a dog", "y": "a cat"}, {"x": ["dog"], "y": ["cat"]})
    assert r.n_hallucinated_mentions == 1 and r.chair_i == pytest.approx(1 / 3)
    # unknown ground-truth names with a table: kept (recall only) and reported
    r = compute_chair({"x": "a dog"}, {"x": ["dog", "zebra"]}, COCO_LIKE)
    assert r.unknown_ground_truth == ["zebra"] and r.recall == pytest.approx(0.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one caption"):
        compute_chair({}, {})
    with pytest.raises(ValueError, match="no objects for 1 caption id"):
        compute_chair({"a": "x", "b": "y"}, {"a": []})
    with pytest.raises(ValueError, match="no caption for 1 ground-truth id"):
        compute_chair({"a": "x"}, {"a": [], "b": []})
    r = compute_chair({"a": "x"}, {"a": [], "b": ["dog"]}, ignore_extra_ground_truth=True)
    assert r.n_captions == 1
    with pytest.raises(TypeError, match="captions"):
        compute_chair([("a", "x")], {"a": []})
    with pytest.raises(TypeError, match=r"captions\['a'\]"):
        compute_chair({"a": 3}, {"a": []})
    with pytest.raises(TypeError, match=r"ground_truth\['a'\]"):
        compute_chair({"a": "x"}, {"a": "dog"})
    with pytest.raises(TypeError, match="synonyms"):
        compute_chair({"a": "x"}, {"a": []}, synonyms=3)
    with pytest.raises(ValueError, match="no words"):
        SynonymTable({"dog": ["..."]})
    with pytest.warns(UserWarning, match="two objects"):
        t = SynonymTable({"person": ["player"], "sports ball": ["ball", "player"]})
    assert t.canonical("player") == "person"


def test_synonym_files(tmp_path):
    txt = tmp_path / "syn.txt"
    txt.write_text("# comment\nperson, man, men ,woman\n\ndog, puppy\nhot dog\n")
    t = SynonymTable.from_file(str(txt))
    assert t.objects == ["person", "dog", "hot dog"]
    assert t.canonical("women") == "person"
    js = tmp_path / "syn.json"
    js.write_text(json.dumps({"person": ["man"], "dog": []}))
    assert SynonymTable.from_file(str(js)).canonical("men") == "person"
    bad = tmp_path / "bad.txt"
    bad.write_text("person, man\ndog, , puppy\n")
    with pytest.raises(InputError, match=r"bad.txt:2:"):
        SynonymTable.from_file(str(bad))
    bad.write_text('{"person": "man"}')
    with pytest.raises(InputError, match="list of synonyms"):
        SynonymTable.from_file(str(bad))
    bad.write_text("# only a comment\n")
    with pytest.raises(InputError, match="no objects"):
        SynonymTable.from_file(str(bad))


def test_file_formats(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"id": 1, "caption": "a dog"}\n\n{"question_id": "2", "text": "a cat"}\n')
    assert load_captions(str(jl)) == {"1": "a dog", "2": "a cat"}
    arr = tmp_path / "c.json"
    arr.write_text('[\n {"image_id": 7, "answer": "a dog"},\n {"id": "8", "caption": "x"}\n]')
    assert load_captions(str(arr)) == {"7": "a dog", "8": "x"}
    obj = tmp_path / "c2.json"
    obj.write_text(json.dumps({"7": "a dog", "8": "x"}, indent=2))
    assert load_captions(str(obj)) == {"7": "a dog", "8": "x"}
    gt = tmp_path / "g.jsonl"
    gt.write_text('{"id": 7, "objects": ["dog"], "shapes": []}\n{"id": "8", "objects": []}\n')
    assert load_ground_truth(str(gt)) == {"7": ["dog"], "8": []}
    one = tmp_path / "one.jsonl"
    one.write_text('{"id": 7, "objects": ["dog"]}\n')
    assert load_ground_truth(str(one)) == {"7": ["dog"]}


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.fixture
def files(tmp_path):
    caps = write(tmp_path / "caps.jsonl",
                 '{"id": "1", "caption": "A man walks two puppies."}\n'
                 '{"id": "2", "caption": "A hot dog on a table."}\n')
    gt = write(tmp_path / "gt.json",
               '[{"id": 1, "objects": ["person"]},\n {"id": 2, "objects": ["hot dog", "dining table"]}]\n')
    syn = write(tmp_path / "syn.txt", "".join(", ".join([k, *v]) + "\n" for k, v in COCO_LIKE.items()))
    return tmp_path, caps, gt, syn


def test_cli_end_to_end(files, capsys):
    tmp, caps, gt, syn = files
    out = tmp / "sub" / "chair.json"
    assert main(["eval-chair", "--captions", caps, "--ground-truth", gt, "--synonyms", syn,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CHAIR-i (%)" in printed and "25.00" in printed and "50.00" in printed
    res = json.loads(out.read_text())
    assert res["chair_i"] == pytest.approx(1 / 4) and res["chair_s"] == pytest.approx(1 / 2)
    assert res["recall"] == pytest.approx(1.0)
    assert res["per_caption"][0]["hallucinated"] == ["dog"]
    assert res["synonyms"].endswith("syn.txt")


def test_cli_on_a_world(tmp_path, capsys):
    from bpo_fast.demo.world import make_world

    paths = make_world(str(tmp_path / "w"), 0, 20, seed=1)
    recs = json.load(open(paths.eval))
    caps = tmp_path / "refs.jsonl"
    caps.write_text("".join(json.dumps({"id": r["id"], "caption": r["conversations"][1]["value"]}) + "\n"
                            for r in recs))
    out = tmp_path / "chair.json"
    assert main(["eval-chair", "--captions", str(caps), "--ground-truth", paths.eval_truth,
                 "--synonyms", paths.synonyms, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    # the reference captions are the truth: no hallucination, everything recalled
    assert res["chair_i"] == 0.0 and res["chair_s"] == 0.0 and res["recall"] == 1.0


@pytest.mark.parametrize("case, expect", [
    ("missing_gt", r"caption id\(s\) of .*caps.jsonl are not in .*gt.json: '3'"),
    ("missing_caption", r"id\(s\) of .*gt.json have no caption in .*caps.jsonl: '2'.*--subset"),
    ("bad_json_line", r"caps.jsonl:2: invalid JSON"),
    ("bad_json_array", r"gt.json:2: invalid JSON"),
    ("no_id", r"caps.jsonl:1: caption record has no id"),
    ("no_caption", r"caps.jsonl:2: caption record '2' has no caption"),
    ("no_objects", r"gt.json:2: ground-truth record '2' has no 'objects'"),
    ("objects_not_list", r"gt.json:1: objects of '1' must be a list of strings"),
    ("duplicate", r"caps.jsonl:2: duplicate id '1' \(first at line 1\)"),
    ("empty", r"caps.jsonl: the captions file is empty"),
    ("not_object", r"caps.jsonl:1: expected a JSON object"),
    ("no_file", r"--captions: no such file"),
    ("bad_synonyms", r"syn.txt:1: expected 'canonical, synonym"),
])
def test_cli_bad_inputs(files, capsys, case, expect):
    import re

    tmp, caps, gt, syn = files
    args = {"--captions": caps, "--ground-truth": gt, "--synonyms": syn}
    if case == "missing_gt":
        write(tmp / "caps.jsonl", open(caps).read() + '{"id": 3, "caption": "x"}\n')
    elif case == "missing_caption":
        write(tmp / "caps.jsonl", '{"id": "1", "caption": "A man."}\n')
    elif case == "bad_json_line":
        write(tmp / "caps.jsonl", '{"id": "1", "caption": "A man."}\n{"id": 2, "caption": \n')
    elif case == "bad_json_array":
        write(tmp / "gt.json", '[{"id": 1, "objects": []},\n {"id": 2, "objects": [}]\n')
    elif case == "no_id":
        write(tmp / "caps.jsonl", '{"caption": "A man."}\n')
    elif case == "no_caption":
        write(tmp / "caps.jsonl", '{"id": "1", "caption": "A man."}\n{"id": 2, "txt": "x"}\n')
    elif case == "no_objects":
        write(tmp / "gt.json", '[{"id": 1, "objects": []},\n {"id": 2, "object": []}]\n')
    elif case == "objects_not_list":
        write(tmp / "gt.json", '[{"id": 1, "objects": "person"}]\n')
    elif case == "duplicate":
        write(tmp / "caps.jsonl", '{"id": "1", "caption": "a"}\n{"id": 1, "caption": "b"}\n')
    elif case == "empty":
        write(tmp / "caps.jsonl", "\n  \n")
    elif case == "not_object":
        write(tmp / "caps.jsonl", '["1", "a man"]\n')
    elif case == "no_file":
        args["--captions"] = str(tmp / "nope.jsonl")
    elif case == "bad_synonyms":
        write(tmp / "syn.txt", "person, ,man\n")
    argv = ["eval-chair"] + [x for kv in args.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bpo-fast eval-chair: error: ")
    assert re.search(expect, err), err


def test_cli_subset(files, capsys):
    tmp, caps, gt, syn = files
    write(tmp / "caps.jsonl", '{"id": "1", "caption": "A man."}\n')
    assert main(["eval-chair", "--captions", caps, "--ground-truth", gt, "--synonyms", syn,
                 "--subset"]) == 0
    assert "1/1 ground-truth objects" in capsys.readouterr().out
