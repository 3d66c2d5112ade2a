"""Issue 21 (part 2): nothing silent. The bad-sample policy of every command, the errors side file
that never deletes a foreign file, the reference cache bound to its model and pairs, ref-logps
refusing non-finite values, 0-pair builds, the one image loader (HF's RGB rule), processor
arguments, Parquet faults."""

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

from bpo_fast.cli import main
from bpo_fast.data.jsonl import iter_jsonl
from bpo_fast.train.synthetic import make_pairs


def _run(argv, capsys):
    """(exit status, last line of stderr, or of stdout on success) of ``bpo-fast ARGV``."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert "Traceback" not in err
    text = err if rc else cap.out.strip()
    return rc, (text.splitlines() or [""])[-1]


def _truncated_jpeg(path, seed=0):
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    with open(path, "wb") as f:
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])  # opens and verifies, never decodes


def _pairs(root, n=8, *, bad=(), seed=5, name="pairs.jsonl", edit=None):
    """make_pairs, with the images of records ``bad`` replaced by truncated JPEGs (they pass
    the up-front check and fail to decode in the run); ``edit(i, rec)`` changes records."""
    path = make_pairs(root, n=n, seed=seed, name=name)
    recs = [json.loads(line) for line in open(path)]
    for i in bad:
        recs[i]["image"] = f"img/bad{i}.jpg"
        _truncated_jpeg(os.path.join(root, recs[i]["image"]), seed=i)
    if edit is not None:
        for i, r in enumerate(recs):
            edit(i, r)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return path


def _errors(path):
    head, *entries = [e for _, e in iter_jsonl(path)]
    assert head.get("bpo_fast") == "errors"   # the header that makes the file ours
    return entries


def _train_argv(model, data, root, out, *extra):
    return ["train", "--model", model, "--data", data, "--image-root", root, "--output",
            str(out), "--batch-size", "2", "--max-length", "64", "--lr", "2e-3",
            "--warmup-steps", "0", "--no-progress", "--device", "cpu", *extra]


# --------------------------------------------------------------------------------------------
# a bad sample never ends a running job


def test_train_names_skips_and_counts_a_bad_sample_mid_run(tiny_llava_dir, tmp_path, capsys):
    root = str(tmp_path / "d")
    data = _pairs(root, bad=(3,))
    val = _pairs(root, n=4, bad=(1,), seed=9, name="val.jsonl")
    out = tmp_path / "run"
    rc, last = _run(_train_argv(tiny_llava_dir, data, root, out, "--max-steps", "4",
                                "--eval-data", f"val={val}", "--eval-every", "2",
                                "--max-bad-fraction", "0.3"), capsys)
    assert rc == 0, last
    errs = _errors(out / "errors.jsonl")
    by_file = {e["file"]: e for e in errs}
    assert set(by_file) == {data, val}
    e = by_file[data]
    assert (e["id"], e["line"], e["kind"]) == ("pair-0003", 4, "image")
    assert "truncated" in e["reason"] and "bad3.jpg" in e["reason"]
    assert by_file[val]["id"] == "pair-0001"
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 4 and steps[-1]["bad_samples"] == 2
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert [r["step"] for r in rows if "eval_val/loss" in r] == [2, 4]

    # more than --max-bad-fraction: exit 2, one line, the reasons counted
    data2 = _pairs(str(tmp_path / "d2"), bad=(2, 5))
    rc, last = _run(_train_argv(tiny_llava_dir, data2, str(tmp_path / "d2"), tmp_path / "r2",
                                "--max-steps", "4", "--max-bad-fraction", "0.2"), capsys)
    assert rc == 2 and "2 of the 8 samples" in last and "image: 2" in last, last
    assert "--max-bad-fraction" in last and "errors.jsonl" in last


def test_guarded_pairs_keep_the_batch_size_and_name_the_sample():
    from bpo_fast.data.bad_samples import GuardedPairs, SampleError
    from bpo_fast.data.images import ImageError

    class Data(torch.utils.data.Dataset):
        records = [{"id": f"r{i}", "line": i + 1} for i in range(6)]

        def __len__(self):
            return 6

        def __getitem__(self, i):
            if i == 1:
                raise ImageError("image 'x.jpg' does not decode")
            return {"id": f"r{i}", "index": i}

    def encode(item):
        if item["index"] == 4:
            raise SampleError("prompt: 2 <image> placeholder(s) for 1 image(s)")
        return dict(item)

    g = GuardedPairs(Data(), encode, file="d.jsonl")
    batches = list(torch.utils.data.DataLoader(g, batch_size=2, collate_fn=list))
    assert [len(b) for b in batches] == [2, 2, 2]
    ids = [it["id"] for b in batches for it in b]
    assert ids == ["r0", "r2", "r2", "r3", "r5", "r5"]   # a bad one's place: the next good one
    notes = [n for b in batches for it in b for n in it["bad"]]
    assert [(n["id"], n["line"], n["kind"]) for n in notes] == [("r1", 2, "image"),
                                                                 ("r4", 5, "prompt")]
    skip = GuardedPairs(Data(), encode, file="d.jsonl", substitute=False)[1]
    assert skip["skip"] and skip["bad"][0]["id"] == "r1"


def test_prompt_and_images_disagree_and_the_processor_rejects(tiny_llava_dir, tmp_path):
    """Two <image> tags for one image: skipped when the data is read; a Qwen2-VL image with
    an aspect ratio over 200: rejected by the processor, noted, and the next pair stands in."""
    from PIL import Image

    from bpo_fast.data.bad_samples import BadSamples, GuardedPairs
    from bpo_fast.data.preference import PreferenceCollator, PreferenceDataset
    from bpo_fast.models.tiny_vlm import build_tiny_vlm

    root = str(tmp_path)

    def two_tags(i, r):
        if i == 2:
            r["prompt"][0]["value"] = "<image>\n<image>\nwhat color is the square?"

    data = _pairs(root, n=4, edit=two_tags)
    with pytest.warns(UserWarning, match="2 <image> placeholder"):
        ds = PreferenceDataset(data, root)
    bad = BadSamples(str(tmp_path / "e.jsonl"), "test", max_fraction=0.5)
    bad.add_skipped(data, ds)
    assert len(ds) == 3 and bad.count(data) == 1 and bad.reasons(data) == "record: 1"

    _, proc = build_tiny_vlm("qwen2_vl")
    Image.new("RGB", (600, 2), (10, 200, 30)).save(os.path.join(root, "img", "0001.png"))
    collate = PreferenceCollator(proc)
    g = GuardedPairs(ds, collate.encode, file=data)
    item = g[1]
    assert item["stand_in"] and item["id"] == "pair-0003"
    (note,) = item["bad"]
    assert (note["id"], note["kind"]) == ("pair-0001", "processor")
    assert "aspect ratio" in note["reason"]


def test_ref_logps_leaves_bad_samples_out_and_train_uses_the_cache(tiny_llava_dir, tmp_path,
                                                                    capsys):
    root = str(tmp_path)
    data = _pairs(root, bad=(6,))
    cache = str(tmp_path / "ref.safetensors")
    rc, last = _run(["ref-logps", "--model", tiny_llava_dir, "--data", data, "--image-root",
                     root, "--out", cache, "--max-length", "64", "--no-progress", "--device",
                     "cpu", "--max-bad-fraction", "0.2"], capsys)
    assert rc == 0 and "1 bad sample(s) left out" in last, last
    (e,) = _errors(tmp_path / "ref.errors.jsonl")
    assert e["id"] == "pair-0006" and e["kind"] == "image"
    from bpo_fast.train.ref_cache import RefLogpsCache

    c = RefLogpsCache.load(cache)
    assert len(c) == 7 and "pair-0006" not in c and c.bad_ids == {"pair-0006"}
    rc, last = _run(_train_argv(tiny_llava_dir, data, root, tmp_path / "run", "--max-steps", "2",
                                "--reference", "cached", "--ref-cache", cache,
                                "--max-bad-fraction", "0.2"), capsys)
    assert rc == 0, last


# --------------------------------------------------------------------------------------------
# the reference cache is bound to its model and pairs; non-finite values are never written


def _nan_model(src, dst):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for name in os.listdir(dst):
        if name.endswith(".safetensors"):
            sd = load_file(os.path.join(dst, name))
            k = next(k for k in sd if "lm_head" in k)
            sd[k] = torch.full_like(sd[k], float("nan"))
            save_file(sd, os.path.join(dst, name), metadata={"format": "pt"})
    return dst


def test_ref_logps_refuses_non_finite_log_probs(tiny_llava_dir, tmp_path, capsys):
    root = str(tmp_path)
    data = _pairs(root, n=4)
    model = _nan_model(tiny_llava_dir, str(tmp_path / "nan_model"))
    out = str(tmp_path / "ref.safetensors")
    rc, last = _run(["ref-logps", "--model", model, "--data", data, "--image-root", root,
                     "--out", out, "--max-length", "64", "--no-progress", "--device", "cpu",
                     "--batch-size", "2"], capsys)
    assert rc == 2 and "non-finite" in last and "'pair-0000'" in last, last
    assert not os.path.exists(out)


def test_the_cache_is_bound_to_its_model_and_its_pairs(tiny_llava_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from bpo_fast.data.preference import PreferenceCollator, PreferenceDataset
    from bpo_fast.models.vlm import load_processor
    from bpo_fast.train.ref_cache import (RefLogpsCache, check_compatible,
                                          compute_reference_logps, model_fingerprint)

    root = str(tmp_path / "d")
    data = _pairs(root, n=4)
    cache_path = str(tmp_path / "ref.safetensors")
    compute_reference_logps(tiny_llava_dir, data, root, cache_path, max_length=64,
                            progress=False, device="cpu")
    cache = RefLogpsCache.load(cache_path)
    ds = PreferenceDataset(data, root)
    kw = dict(path=cache_path, max_length=64, ids=ds.ids, data=data)
    check_compatible(cache, reference_model=tiny_llava_dir, records=ds.records, **kw)
    # a copy of the same model elsewhere is the same reference
    copy = shutil.copytree(tiny_llava_dir, str(tmp_path / "copy"))
    assert model_fingerprint(copy) == model_fingerprint(tiny_llava_dir)
    check_compatible(cache, reference_model=copy, records=ds.records, **kw)
    # other weights (one tensor changed) are not: before any model loads
    other = shutil.copytree(tiny_llava_dir, str(tmp_path / "other"))
    st = next(n for n in os.listdir(other) if n.endswith(".safetensors"))
    sd = load_file(os.path.join(other, st))
    k = sorted(sd)[len(sd) // 2]
    sd[k] = sd[k] + 1e-3
    save_file(sd, os.path.join(other, st), metadata={"format": "pt"})
    assert model_fingerprint(other) != model_fingerprint(tiny_llava_dir)
    out = tmp_path / "run"
    rc, last = _run(_train_argv(other, data, root, out, "--max-steps", "1", "--reference",
                                "cached", "--ref-cache", cache_path), capsys)
    assert rc == 2 and "differs in its weights or config" in last, last
    # processor arguments change the pixels, which the pair digests do not see
    rc, last = _run(_train_argv(tiny_llava_dir, data, root, out, "--max-steps", "1", "--reference",
                                "cached", "--ref-cache", cache_path, "--processor-kwargs",
                                '{"do_normalize": false}'), capsys)
    assert rc == 2 and "processor_kwargs=None" in last and "do_normalize" in last, last

    # the same ids with other answer texts: the first pair that differs, named up front
    data2 = _pairs(root, n=4, name="other_texts.jsonl",
                   edit=lambda i, r: r.update(chosen=r["chosen"] + " indeed") if i >= 2 else None)
    rc, last = _run(_train_argv(tiny_llava_dir, data2, root, out, "--max-steps", "1",
                                "--reference", "cached", "--ref-cache", cache_path), capsys)
    assert rc == 2 and "pair 'pair-0002'" in last and "(line 3)" in last, last

    # the same texts, another image (its bytes): named when the pair is looked up
    from PIL import Image

    Image.new("RGB", (40, 40), (1, 2, 3)).save(os.path.join(root, "img", "0001.png"))
    collate = PreferenceCollator(load_processor(tiny_llava_dir), max_length=64)
    batch = collate([ds[0], ds[1]])
    with pytest.raises(ValueError, match="pair 'pair-0001' differs"):
        cache.lookup(batch["ids"], digests=batch["digests"])
    c, _ = cache.lookup(["pair-0000"], digests=batch["digests"][:1])
    assert torch.isfinite(c).all()


# --------------------------------------------------------------------------------------------
# build-pairs: foreign side files are never deleted; 0 pairs or too many bad records exit 2


def _llava(root, n=3, *, malformed=0, image="img.png", name="llava.jsonl"):
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(os.path.join(root, "img.png"))
    conv = [{"from": "human", "value": "<image>\nwhat is it ?"},
            {"from": "gpt", "value": "a red square ."}]
    lines = [json.dumps({"id": f"r{i}", "image": image, "conversations": conv})
             for i in range(n - malformed)]
    lines += [json.dumps({"id": f"x{i}", "image": image}) for i in range(malformed)]  # no turns
    path = os.path.join(root, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _bp(data, root, out, *extra):
    return ["build-pairs", "--data", data, "--image-root", root, "--out", out, "--strategies",
            "error_injection", "--no-progress", *extra]


def test_build_pairs_never_deletes_a_foreign_errors_file(tmp_path, capsys):
    root = str(tmp_path)
    data = _llava(root, n=4, malformed=1)
    before = open(data, "rb").read()
    for target in (data, str(tmp_path / "notes.txt")):
        if not os.path.exists(target):
            with open(target, "w") as f:
                f.write("my own notes\n")
        keep = open(target, "rb").read()
        rc, last = _run(_bp(data, root, str(tmp_path / "p.jsonl"), "--errors", target,
                            "--max-bad-fraction", "0.5"), capsys)
        # the data itself is refused first as an input (errors.CommandGuard)
        why = "is the same file as the input data" if target == data else "not written by bpo-fast"
        assert rc == 2 and "errors" in last and why in last, last
        assert open(target, "rb").read() == keep
    assert open(data, "rb").read() == before
    # its own errors file: replaced by a fresh run (--overwrite), appended to by --resume
    errs = str(tmp_path / "e.jsonl")
    args = _bp(data, root, str(tmp_path / "p.jsonl"), "--errors", errs, "--max-bad-fraction",
               "0.5")
    assert _run(args, capsys)[0] == 0
    assert len(_errors(errs)) == 1
    assert _run(args + ["--overwrite"], capsys)[0] == 0
    assert len(_errors(errs)) == 1


def test_build_pairs_exits_2_with_the_reasons_counted(tiny_llava_dir, tmp_path, capsys):
    root = str(tmp_path)
    # more than --max-bad-fraction of the records are bad (1 of 3 > 10%)
    data = _llava(root, n=3, malformed=1)
    rc, last = _run(_bp(data, root, str(tmp_path / "a.jsonl")), capsys)
    assert rc == 2 and "1 of the 3 records" in last and "record: 1" in last, last
    # every record bad, and no share limit: 0 pairs from 3 records
    data = _llava(root, n=3, malformed=3, name="bad.jsonl")
    rc, last = _run(_bp(data, root, str(tmp_path / "b.jsonl"), "--max-bad-fraction", "1"),
                    capsys)
    assert rc == 2 and "wrote 0 pairs from 3 records" in last and "record: 3" in last, last
    # every image missing (image-weakened prompting, the tiny model)
    data = _llava(root, n=3, image="missing.png", name="noimg.jsonl")
    rc, last = _run(["build-pairs", "--model", tiny_llava_dir, "--data", data, "--image-root",
                     root, "--out", str(tmp_path / "c.jsonl"), "--strategies", "image_weakened",
                     "--no-progress", "--device", "cpu", "--max-new-tokens", "2",
                     "--num-workers", "0"], capsys)
    assert rc == 2 and "3 of the 3 records" in last and "image: 3" in last, last
    # every image missing, error injection only (no image is decoded): still named, not paired
    rc, last = _run(_bp(data, root, str(tmp_path / "d.jsonl")), capsys)
    assert rc == 2 and "3 of the 3 records" in last and "image: 3" in last, last
    errs = _errors(str(tmp_path / "d.errors.jsonl"))
    assert [e["source_id"] for e in errs] == ["r0", "r1", "r2"]
    assert all("no such image file" in e["reason"] for e in errs)


def test_merge_pairs_reads_a_json_array_with_a_bom(tmp_path, capsys):
    from bpo_fast.train.synthetic import make_pairs

    recs = [json.loads(line) for line in open(make_pairs(str(tmp_path / "d"), n=3))]
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(recs).encode())
    out = tmp_path / "m.jsonl"
    rc, last = _run(["merge-pairs", "--out", str(out), str(path)], capsys)
    assert rc == 0, last
    assert [r["id"] for _, r in iter_jsonl(out)] == [r["id"] for r in recs]


def test_build_pairs_reads_a_json_array_with_a_bom(tmp_path, capsys):
    root = str(tmp_path)
    recs = [json.loads(line) for line in open(_llava(root, n=3))]
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(recs).encode())
    out = tmp_path / "p.jsonl"
    rc, last = _run(_bp(str(path), root, str(out)), capsys)
    assert rc == 0, last
    assert len(list(iter_jsonl(out))) == 3


# --------------------------------------------------------------------------------------------
# one image loader: the HF processors' RGB rule


def _odd_images():
    from PIL import Image

    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 255, (20, 24, 4), dtype=np.uint8), "RGBA")
    la = Image.fromarray(rng.integers(0, 255, (20, 24, 2), dtype=np.uint8), "LA")
    p = Image.fromarray(rng.integers(0, 16, (20, 24), dtype=np.uint8), "P")
    p.putpalette(list(rng.integers(0, 255, 48, dtype=np.uint8)))
    cmyk = Image.fromarray(rng.integers(0, 255, (20, 24, 4), dtype=np.uint8), "CMYK")
    i16 = Image.fromarray((rng.integers(0, 300, (20, 24))).astype(np.uint16))
    # a palette image whose colour 3 is transparent (a PNG tRNS chunk)
    return {"rgba": (rgba, "png"), "la": (la, "png"), "p_transparency": (p, "png", {"transparency": 3}),
            "cmyk": (cmyk, "jpeg"), "i16": (i16, "png"), "l": (la.convert("L"), "png")}


@pytest.mark.parametrize("kind", ["rgba", "la", "p_transparency", "cmyk", "i16", "l"])
def test_our_pixels_equal_the_hf_processors(tiny_llava_dir, tmp_path, kind):
    from PIL import Image

    from bpo_fast.data.hf_pairs import _item
    from bpo_fast.data.images import open_image
    from bpo_fast.models.vlm import load_processor

    img, fmt, *save = _odd_images()[kind]
    path = str(tmp_path / f"x.{fmt}")
    img.save(path, format=fmt.upper(), **(save[0] if save else {}))
    ip = load_processor(tiny_llava_dir).image_processor

    def pixels(im):
        return ip(images=[im], return_tensors="pt")["pixel_values"]

    with Image.open(path) as raw:
        want = pixels(raw)                       # what the HF processor makes of the file
    ours, _ = open_image(path)
    assert ours.mode == "RGB"
    assert torch.equal(pixels(ours), want)
    with open(path, "rb") as f:                  # Parquet image bytes: the same loader
        item = _item({"id": "x", "images": [{"bytes": f.read(), "path": None}], "prompt": [],
                      "chosen": "a", "rejected": "b"}, 0, None, 0)
    assert torch.equal(pixels(item["images"][0]), want)
    if kind in ("rgba", "la"):  # what train and ref-logps did before dropped the alpha
        with Image.open(path) as raw:
            assert not torch.equal(pixels(raw.convert("RGB")), want)


# --------------------------------------------------------------------------------------------
# processor arguments; Parquet faults


def test_gemma3_pan_and_scan_through_processor_kwargs_equals_hf_forward(tmp_path):
    from PIL import Image

    from bpo_fast.data.preference import PreferenceCollator
    from bpo_fast.models.preference import PreferenceModel, load_vlm
    from bpo_fast.models.tiny_vlm import build_tiny_vlm
    from bpo_fast.models.vlm import load_processor
    from test_vlm_families import hf_row_logps

    path = str(tmp_path / "gemma3")
    build_tiny_vlm("gemma3", path, seed=1)
    model, processor = load_vlm(path), load_processor(path)
    kw = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8,
          "pan_and_scan_max_num_crops": 4, "pan_and_scan_min_ratio_to_activate": 1.2}
    rng = np.random.default_rng(0)
    items = [{"index": i, "id": f"p{i}", "line": i + 1,
              "image": Image.fromarray(rng.integers(0, 255, (16, w, 3), dtype=np.uint8)),
              "prompt": [{"from": "human", "value": "<image>\nwhat is on the table ?"}],
              "chosen": "a red cup" + " and a book" * i, "rejected": "a blue ball ."}
             for i, w in enumerate((64, 40))]
    plain = PreferenceCollator(processor)([items[0]])
    collator = PreferenceCollator(processor, processor_kwargs=kw)
    batch = collator(items)
    assert plain["pixel_values"].shape[0] == 1 and batch["pixel_values"].shape[0] > 2  # crops

    class WithKwargs:   # the HF processor called with the same arguments, the plain HF way
        def __getattr__(self, name):
            return getattr(processor, name)

        def __call__(self, *a, **k):
            return processor(*a, **k, **kw)

    pm = PreferenceModel(model, reference_mode="cached")
    extra = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)
             and k not in ("input_ids", "attention_mask", "labels", "pixel_values", "index")}
    lp, _ = pm.sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                              batch["labels"], batch["pixel_values"], **extra)
    for i, it in enumerate(items):
        for row, key in ((i, "chosen"), (len(items) + i, "rejected")):
            want, ids = hf_row_logps(model, WithKwargs(), collator, it, it[key])
            n = int(batch["attention_mask"][row].sum())
            assert batch["input_ids"][row, :n].tolist() == ids.tolist()
            torch.testing.assert_close(lp[row], want, rtol=1e-5, atol=1e-6)


def test_processor_kwargs_option(tmp_path, capsys, tiny_llava_dir):
    from bpo_fast.options import from_args
    from bpo_fast.train.cli import add_arguments
    from bpo_fast.train.config import TrainConfig

    rc, last = _run(["train", "--model", tiny_llava_dir, "--data", "x", "--image-root", ".",
                     "--output", "o", "--processor-kwargs", "{bad"], capsys)
    assert rc == 2 and "--processor-kwargs" in last and "JSON object" in last, last
    import argparse

    cfg = tmp_path / "run.yaml"
    cfg.write_text("processor_kwargs:\n  do_pan_and_scan: true\nmax_bad_fraction: 0.25\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    c = from_args(TrainConfig, p.parse_args(["--model", "m", "--data", "d", "--image-root", ".",
                                             "--output", "o", "--config", str(cfg)]))
    assert c.processor_kwargs == {"do_pan_and_scan": True} and c.max_bad_fraction == 0.25


def test_parquet_faults_are_one_line_naming_the_file(tiny_llava_dir, tmp_path, capsys):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"prompt": pa.array([], pa.string()), "chosen": pa.array([], pa.string()),
            "rejected": pa.array([], pa.string())}
    pq.write_table(pa.table(cols), tmp_path / "empty.parquet")
    pq.write_table(pa.table({k: ["x"] * 40 for k in cols}), tmp_path / "good.parquet")
    raw = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "trunc.parquet").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1" + b"\x00garbage" * 20 + b"PAR1")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({k: ["x"] for k in cols})}) \
        .save_to_disk(str(tmp_path / "dd"))
    expect = {"empty.parquet": "no rows", "trunc.parquet": "corrupt or truncated",
              "corrupt.parquet": "corrupt or truncated", "dd": "without a 'train' split"}
    for name, what in expect.items():
        data = str(tmp_path / name)
        for argv in (_train_argv(tiny_llava_dir, data, str(tmp_path), tmp_path / "o"),
                     ["ref-logps", "--model", tiny_llava_dir, "--data", data, "--image-root",
                      str(tmp_path), "--out", str(tmp_path / "r.safetensors"), "--no-progress",
                      "--device", "cpu"]):
            rc, last = _run(argv, capsys)
            assert rc == 2 and name in last and what in last, (name, last)


def test_eval_chair_and_pope_skip_malformed_records_under_the_policy(tmp_path, capsys):
    caps = tmp_path / "caps.jsonl"
    gt = tmp_path / "gt.jsonl"
    good = [{"id": str(i), "caption": "A man with a dog."} for i in range(12)]
    caps.write_text("\n".join(json.dumps(r) for r in good[:6] + [{"id": "6", "caption": 3}]
                              + good[7:]) + "\n")
    gt.write_text("".join(json.dumps({"id": str(i), "objects": ["person", "dog"]}) + "\n"
                          for i in range(12)))
    rc, last = _run(["eval-chair", "--captions", str(caps), "--ground-truth", str(gt),
                     "--subset"], capsys)
    assert rc == 0, last
    (e,) = _errors(tmp_path / "caps.errors.jsonl")
    assert e["line"] == 7 and "must be a string" in e["reason"] and e["file"] == str(caps)
    rc, last = _run(["eval-chair", "--captions", str(caps), "--ground-truth", str(gt),
                     "--subset", "--max-bad-fraction", "0.05"], capsys)
    assert rc == 2 and "1 of the 12 samples" in last and "record: 1" in last, last
    # eval-pope: the same rule for the answers
    q = tmp_path / "q.jsonl"
    assert _run(["eval-pope", "--ground-truth", str(gt), "--write-questions", str(q)],
                capsys)[0] == 0
    qs = [r for _, r in iter_jsonl(q)]
    ans = tmp_path / "ans.jsonl"
    ans.write_text("".join(json.dumps({"question_id": x["question_id"], "answer": "yes"}) + "\n"
                           for x in qs) + '{"answer": "no"}\n')
    rc, last = _run(["eval-pope", "--ground-truth", str(gt), "--questions", str(q),
                     "--answers", str(ans)], capsys)
    assert rc == 0, last
    (e,) = _errors(tmp_path / "ans.errors.jsonl")
    assert "question_id" in e["reason"] and e["line"] == len(qs) + 1


def test_build_pairs_names_a_sample_the_processor_rejects(tmp_path):
    """Qwen2-VL's processor rejects an image with an aspect ratio over 200: in build-pairs (the
    family's processor per row) that record is named and skipped, the others make their pairs."""
    from pathlib import Path

    from PIL import Image

    from bpo_fast.data.pairs import PairBuilderConfig, build_pairs
    from bpo_fast.models.tiny_vlm import build_tiny_vlm
    from test_pairs import make_data

    data, root = make_data(tmp_path, n=3, turns=1)
    Image.new("RGB", (600, 2), (10, 200, 30)).save(Path(root) / "img1.png")
    model_dir = str(tmp_path / "model")
    build_tiny_vlm("qwen2_vl", model_dir, seed=3)
    out = tmp_path / "pairs.jsonl"
    s = build_pairs(PairBuilderConfig(
        model=model_dir, data=data, image_root=root, out=str(out), batch_size=2,
        strategies=("image_weakened",), noise_steps=(500,), max_new_tokens=3, min_new_tokens=3,
        num_workers=0, progress=False, device="cpu", dtype="fp32", max_bad_fraction=0.5))
    (e,) = _errors(tmp_path / "pairs.errors.jsonl")
    assert (e["stage"], e["source_id"]) == ("sample", "r1") and "aspect ratio" in e["reason"]
    assert s.errors == {"sample": 1} and s.bad_samples == 1
    assert {r["source_id"] for _, r in iter_jsonl(out)} <= {"r0", "r2"}


def test_ref_logps_never_takes_a_foreign_partial_file(tiny_llava_dir, tmp_path, capsys):
    root = str(tmp_path)
    data = _pairs(root, n=2)
    out = str(tmp_path / "ref.safetensors")
    with open(out + ".partial.jsonl", "w") as f:
        f.write("my notes, not a partial file\n")
    rc, last = _run(["ref-logps", "--model", tiny_llava_dir, "--data", data, "--image-root",
                     root, "--out", out, "--no-progress", "--device", "cpu"], capsys)
    assert rc == 2 and "not written by bpo-fast" in last, last
    assert open(out + ".partial.jsonl").read() == "my notes, not a partial file\n"


def test_generation_from_a_nan_model_stops_instead_of_writing_garbage(tiny_llava_dir, tmp_path,
                                                                      capsys):
    """A model whose scores are NaN decodes token 0 at every step: generate wrote empty answers
    and build-pairs (image-weakened rejected answers) repeated words, both exit 0. Both now stop
    with the one line naming the non-finite scores, and write no answer."""
    root = str(tmp_path)
    data = _llava(root, n=3)
    model = _nan_model(tiny_llava_dir, str(tmp_path / "nan_model"))
    out = tmp_path / "answers.jsonl"
    rc, last = _run(["generate", "--model", model, "--data", data, "--image-root", root,
                     "--out", str(out), "--device", "cpu", "--max-new-tokens", "3",
                     "--no-progress"], capsys)
    assert rc == 2 and "non-finite next-token scores" in last, last
    assert not out.exists() or not [r for r in iter_jsonl(str(out))]
    pairs = tmp_path / "pairs.jsonl"
    for extra in ([], ["--greedy"]):
        rc, last = _run(["build-pairs", "--model", model, "--data", data, "--image-root", root,
                         "--out", str(pairs), "--strategies", "image_weakened", "--no-progress",
                         "--device", "cpu", "--max-new-tokens", "3", "--num-workers", "0",
                         "--overwrite", *extra], capsys)
        assert rc == 2 and "non-finite next-token scores" in last, (extra, last)
        assert not pairs.exists() or not [r for r in iter_jsonl(str(pairs))]
