"""The pair builder end to end on a tiny random LLaVA and images drawn here (CPU, seconds)."""

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from bpo_fast.data.jsonl import iter_jsonl
from bpo_fast.data.llava_format import MalformedRecord, iter_records, record_to_samples
from bpo_fast.data.pairs import (PairBuilderConfig, build_pairs, find_shards, merge_pairs,
                                 parse_noise_steps, pixels_for_levels)
from bpo_fast.data.images import ImageGeometry, load_image
from bpo_fast.data.schema import validate_pair

GEN = dict(max_new_tokens=4, min_new_tokens=4, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def tiny(tiny_llava_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    return model, proc


def _conv(i, turns=2):
    conv = []
    for t in range(turns):
        q = "what color is the circle ?" if t == 0 else f"how many stars are on the left ? {t}"
        conv.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + q})
        conv.append({"from": "gpt", "value": f"there are {i + t + 2} red circles on the left ."})
    return conv


def make_data(root, n=5, *, fmt="jsonl", bad_image=False, malformed=False, text_only=False, turns=2):
    """n good records with drawn images (+ optional faults); returns (data path, image root)."""
    img_dir = root / "images"
    img_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        h, w = 24 + 5 * i, 40 - 3 * i   # odd sizes, both orientations
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        name = f"img{i}.png" if i % 2 else f"sub/img{i}.jpg"
        os.makedirs(img_dir / os.path.dirname(name), exist_ok=True)
        Image.fromarray(arr).save(img_dir / name)
        recs.append({"id": f"r{i}", "image": name, "conversations": _conv(i, turns)})
    lines = [json.dumps(r) for r in recs]
    if bad_image:
        (img_dir / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
        lines.insert(2, json.dumps({"id": "badimg", "image": "broken.jpg", "conversations": _conv(9)}))
        lines.insert(3, json.dumps({"id": "noimg", "image": "missing.png", "conversations": _conv(8)}))
    if malformed:
        lines.insert(1, '{"id": "trunc", "conversations": [')
        lines.append(json.dumps({"id": "wrongroles", "image": "img1.png",
                                 "conversations": [{"from": "gpt", "value": "hi"},
                                                   {"from": "human", "value": "?"}]}))
    if text_only:
        lines.append(json.dumps({"id": "txt", "conversations": [
            {"from": "human", "value": "name two colors"}, {"from": "gpt", "value": "red and blue"}]}))
    path = root / ("data.jsonl" if fmt == "jsonl" else "data.json")
    if fmt == "jsonl":
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text("[\n" + ",\n".join(lines) + "\n]\n")
    return str(path), str(img_dir)


def read_out(path):
    recs = [r for _, r in iter_jsonl(path)]
    for r in recs:
        validate_pair(r)
    return recs


def cfg(data, root, out, **kw):
    # the fixtures mix bad records in on purpose (2 of 7): more than the default share
    base = dict(data=data, image_root=root, out=str(out), batch_size=2, max_bad_fraction=0.5,
                **GEN)
    base.update(kw)
    return PairBuilderConfig(**base)


# ---------------------------------------------------------------------------------------------


def test_both_strategies_several_levels_schema_of_every_line(tiny, tmp_path):
    model, proc = tiny
    data, root = make_data(tmp_path, n=4)
    out = tmp_path / "pairs.jsonl"
    s = build_pairs(cfg(data, root, out, noise_steps=(200, 500, 800), seed=1), model, proc)
    recs = read_out(out)
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids))
    # every attempted pair is either written or counted as dropped (rules never drop)
    assert s.written["image_weakened"] + sum(s.dropped.values()) == 4 * 3
    assert s.written.get("error_injection") == 4  # rules always change the text: never dropped
    by = Counter((r["strategy"], r["noise_step"], r["injector"]) for r in recs)
    for lvl in (200, 500, 800):
        assert by[("image_weakened", lvl, None)] >= 3
    assert by[("error_injection", None, "rules")] == 4
    for r in recs:
        assert r["prompt"][-1]["from"] == "human" and r["prompt"][0]["value"].startswith("<image>")
        assert r["seed"] == 1 and isinstance(r["generation"], dict)
        if r["strategy"] == "image_weakened":
            assert r["id"] == f"{r['source_id']}:t0:image_weakened:{r['noise_step']}"
            assert r["generation"]["max_new_tokens"] == 4
            assert r["generation"]["noise_schedule"] == "sigmoid"
        else:
            assert r["id"] == f"{r['source_id']}:t0:error_injection:rules"
    assert s.generated_tokens == 4 * 3 * 4  # min_new_tokens == max_new_tokens
    assert "pairs written" in s.format()
    assert not (tmp_path / "pairs.errors.jsonl").exists()  # a clean run leaves no errors file


def test_noise_free_pixels_equal_the_processor(tiny, tmp_path):
    model, proc = tiny
    data, root = make_data(tmp_path, n=3)
    geom = ImageGeometry.from_processor(proc)
    recs = [r for _, _, r in iter_records(data)]
    pil = [Image.open(os.path.join(root, r["image"])) for r in recs]
    ref = proc.image_processor(images=pil, return_tensors="pt")["pixel_values"]
    # the op level: decode/resize/crop in uint8, normalise on the device
    u8 = torch.stack([torch.from_numpy(load_image(os.path.join(root, r["image"]), geom))
                      for r in recs]).permute(0, 3, 1, 2)
    px = pixels_for_levels(u8, [None], geom)
    assert px.shape == (3, 1) + tuple(ref.shape[1:])
    assert torch.equal(px[:, 0], ref)
    # the pipeline level: what generate() receives, through a decoding worker process
    seen = []
    orig = model.generate

    def spy(*a, **kw):
        seen.append(kw["pixel_values"].clone())
        return orig(*a, **kw)

    model.generate = spy
    try:
        build_pairs(cfg(data, root, tmp_path / "p.jsonl", noise_steps="none",
                        strategies=("image_weakened",), batch_size=3, num_workers=1), model, proc)
    finally:
        del model.generate
    assert len(seen) == 1 and torch.equal(seen[0], ref)
    # noised levels differ from the clean pixels, and each level differs from the others
    pn = pixels_for_levels(u8, [None, 100, 900], geom, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pn[:, 0], ref)
    assert not torch.allclose(pn[:, 1], ref) and not torch.allclose(pn[:, 2], pn[:, 1])
    # channels-last input (what the decoding workers produce) gives the same pixels
    nhwc = u8.permute(0, 2, 3, 1).contiguous()
    a = pixels_for_levels(u8, [None, 300], geom, seed=5)
    b = pixels_for_levels(nhwc, [None, 300], geom, seed=5, layout="NHWC")
    assert torch.equal(a, b) and torch.equal(b[:, 0], ref)
    # more noise, further from the image
    assert (pn[:, 2] - ref).abs().mean() > (pn[:, 1] - ref).abs().mean()


def test_resume_after_interruption_gives_same_ids_without_duplicates(tiny, tmp_path):
    model, proc = tiny
    data, root = make_data(tmp_path, n=5)
    full = tmp_path / "full.jsonl"
    sf = build_pairs(cfg(data, root, full, noise_steps=(300, 700)), model, proc)
    part = tmp_path / "part.jsonl"
    s1 = build_pairs(cfg(data, root, part, noise_steps=(300, 700), max_batches=1), model, proc)
    assert s1.stopped_early and 0 < s1.total_written < sf.total_written
    # a kill during the next write leaves half a line
    with open(part, "ab") as f:
        f.write(b'{"id": "r4:t0:image_weakened:300", "image": "img')
    with pytest.raises(FileExistsError, match="resume"):
        build_pairs(cfg(data, root, part, noise_steps=(300, 700)), model, proc)
    s2 = build_pairs(cfg(data, root, part, noise_steps=(300, 700), resume=True), model, proc)
    assert s2.torn_bytes_dropped > 0 and s2.already_done == s1.total_written
    ids_full = [r["id"] for r in read_out(full)]
    ids_part = [r["id"] for r in read_out(part)]
    assert len(ids_part) == len(set(ids_part)), "duplicates after resume"
    # drops (empty answers of a random model) are counted, not assumed away; they are rare
    n_drop = sum(sf.dropped.values()) + sum(s1.dropped.values()) + sum(s2.dropped.values())
    assert n_drop <= 2
    if n_drop == 0:
        assert set(ids_part) == set(ids_full)
    else:
        assert len(set(ids_part) ^ set(ids_full)) <= n_drop
    # resuming a complete run does nothing
    s3 = build_pairs(cfg(data, root, part, noise_steps=(300, 700), resume=True), model, proc)
    assert s3.already_done == len(ids_part) and s3.total_written <= n_drop


def test_two_shards_plus_merge_equal_single_run(tiny, tmp_path, monkeypatch):
    model, proc = tiny
    data, root = make_data(tmp_path, n=5, malformed=True)
    single = tmp_path / "single.jsonl"
    ss = build_pairs(cfg(data, root, single, noise_steps=(500,)), model, proc)
    out = tmp_path / "sharded.jsonl"
    shards = []
    for r in (0, 1):
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", "2")
        s = build_pairs(cfg(data, root, out, noise_steps=(500,)), model, proc)
        assert s.out.endswith(f"sharded.rank{r}.jsonl") and s.rank == r and s.world_size == 2
        shards.append(s)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert not out.exists()
    assert find_shards(str(out)) == [str(tmp_path / "sharded.rank0.jsonl"),
                                     str(tmp_path / "sharded.rank1.jsonl")]
    # rank r takes every world-size-th record: disjoint source ids
    src = [{r["source_id"] for r in read_out(p)} for p in find_shards(str(out))]
    assert src[0] and src[1] and not src[0] & src[1]
    assert sum(sum(s.errors.values()) for s in shards) == sum(ss.errors.values()) == 2
    merged = tmp_path / "merged.jsonl"
    m = merge_pairs(str(out), str(merged))
    ids_single = {r["id"] for r in read_out(single)}
    ids_merged = [r["id"] for r in read_out(merged)]
    assert len(ids_merged) == len(set(ids_merged)) == m.written
    n_drop = sum(ss.dropped.values()) + sum(sum(s.dropped.values()) for s in shards)
    assert len(set(ids_merged) ^ ids_single) <= n_drop
    # merging again with a shard listed twice deduplicates; a bad record aborts atomically
    m2 = merge_pairs([str(tmp_path / "sharded.rank0.jsonl"), str(tmp_path / "sharded.rank0.jsonl"),
                      str(tmp_path / "sharded.rank1.jsonl")], str(merged))
    assert m2.written == m.written and m2.duplicates == shards[0].total_written
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "chosen": "a"}) + "\n")
    before = merged.read_bytes()
    with pytest.raises(ValueError, match="schema"):
        merge_pairs([str(bad), str(single)], str(merged))
    assert merged.read_bytes() == before
    m3 = merge_pairs([str(bad), str(single)], str(merged), skip_invalid=True)
    assert m3.written == len(ids_single) and len(m3.invalid) == 1


def test_bad_images_and_malformed_records_go_to_errors_file(tiny, tmp_path):
    model, proc = tiny
    data, root = make_data(tmp_path, n=3, bad_image=True, malformed=True)
    out = tmp_path / "p.jsonl"
    s = build_pairs(cfg(data, root, out, noise_steps=(500,), max_bad_fraction=0.6), model, proc)
    head, *logged = [e for _, e in iter_jsonl(tmp_path / "p.errors.jsonl")]
    assert head == {"bpo_fast": "errors", "command": "build-pairs"}   # the file is ours
    errs = [e for e in logged if e["stage"] != "dropped"]   # drops are logged, counted apart
    by_stage = Counter(e["stage"] for e in errs)
    assert by_stage == {"image": 2, "record": 2} and s.errors == dict(by_stage)
    assert f"{data}:2: invalid JSON" in s.format()          # the first bad line, with file:line
    lines = open(data).read().splitlines()
    for e in errs:
        assert e["reason"] and e["line"] >= 1
        if e["stage"] == "image":
            assert e["source_id"] in ("badimg", "noimg") and e["source_id"] in lines[e["line"] - 1]
        else:
            assert e["line"] in (2, len(lines))  # the truncated and the wrong-roles record
    assert any("not found" in e["reason"] for e in errs)
    assert any("invalid JSON" in e["reason"] for e in errs)
    assert any("alternate" in e["reason"] for e in errs)
    # the good records still made their pairs; the bad images made none (not even injected ones)
    recs = read_out(out)
    assert {r["source_id"] for r in recs if r["strategy"] == "error_injection"} == {"r0", "r1", "r2"}
    assert not any(r["source_id"] in ("badimg", "noimg") for r in recs)
    # a resumed run does not log the same errors again
    build_pairs(cfg(data, root, out, noise_steps=(500,), resume=True, max_bad_fraction=0.6),
                model, proc)
    assert len(list(iter_jsonl(tmp_path / "p.errors.jsonl"))) == len(logged) + 1


def test_all_turns_json_array_and_text_only(tiny, tmp_path):
    model, proc = tiny
    data, root = make_data(tmp_path, n=2, fmt="json", text_only=True, turns=3)
    out = tmp_path / "p.jsonl"
    s = build_pairs(cfg(data, root, out, turns="all", noise_steps=(400,)), model, proc)
    recs = read_out(out)
    iw = [r for r in recs if r["strategy"] == "image_weakened"]
    ei = [r for r in recs if r["strategy"] == "error_injection"]
    assert s.samples == 2 * 3 + 1 and s.skipped_no_image == 1
    assert len(ei) == 7 and {r["turn"] for r in ei} == {0, 1, 2}
    assert len(iw) + sum(s.dropped.values()) == 6
    for r in iw:
        assert len(r["prompt"]) == 2 * r["turn"] + 1  # earlier turns are the history
        assert r["id"].endswith(f":t{r['turn']}:image_weakened:400")
    txt = [r for r in ei if r["source_id"] == "txt"]
    assert txt and txt[0]["image"] is None


def test_llm_injector_end_to_end_with_template_override(tiny, tmp_path):
    model, proc = tiny
    data, root = make_data(tmp_path, n=3)
    tpl = tmp_path / "tpl.txt"
    tpl.write_text("make mistakes in : {answer}")
    out = tmp_path / "p.jsonl"
    s = build_pairs(cfg(data, root, out, strategies=("error_injection",), injector="llm",
                        inject_template=str(tpl), inject_max_new_tokens=3), model, proc)
    recs = read_out(out)
    assert len(recs) + sum(s.dropped.values()) == 3
    assert all(r["injector"] == "llm" and r["noise_step"] is None for r in recs)
    assert all(r["generation"]["max_new_tokens"] == 3 for r in recs)
    assert s.generated_tokens == 3 * 3


def test_rules_only_needs_no_model_and_config_errors(tmp_path):
    data, root = make_data(tmp_path, n=3)
    out = tmp_path / "p.jsonl"
    s = build_pairs(PairBuilderConfig(data=data, out=str(out), strategies=("error_injection",),
                                      progress=True))
    assert s.written == {"error_injection": 3}
    with pytest.raises(ValueError, match="model"):
        build_pairs(PairBuilderConfig(data=data, out=str(tmp_path / "q.jsonl"), progress=False))
    with pytest.raises(ValueError, match="strategies"):
        build_pairs(PairBuilderConfig(data=data, out=str(out), strategies=("nope",)))
    with pytest.raises(ValueError, match="noise_steps"):
        build_pairs(PairBuilderConfig(data=data, out=str(out), noise_steps=(1000,)))
    with pytest.raises(ValueError, match="kind"):
        build_pairs(PairBuilderConfig(data=data, out=str(out), noise_schedule="wobbly"))
    with pytest.raises(ValueError, match="top_p"):
        build_pairs(PairBuilderConfig(data=data, out=str(out), top_p=0))
    with pytest.raises(TypeError, match="config"):
        build_pairs({"data": data})
    with pytest.raises(ValueError, match="image_root"):
        build_pairs(PairBuilderConfig(data=data, out=str(out), image_root=str(tmp_path / "nope"),
                                      strategies=("error_injection",)))
    with pytest.raises(ValueError, match="limit"):
        build_pairs(PairBuilderConfig(data=data, out=str(out), limit=0,
                                      strategies=("error_injection",)))
    assert parse_noise_steps("200, 500,none") == (200, 500, None)
    with pytest.raises(ValueError, match="twice"):
        parse_noise_steps("5,5")
    with pytest.raises(ValueError, match="integer"):
        parse_noise_steps("5,x")


def test_record_reader_reports_problems():
    good = {"id": 7, "image": "a.png", "conversations": _conv(0, 2)}
    smp = record_to_samples(good, turns="all", index=3, line=9)
    assert [s.turn for s in smp] == [0, 1] and smp[0].source_id == "7" and smp[1].line == 9
    assert smp[0].question == "what color is the circle ?"
    # no <image> placeholder: LLaVA's convention puts the image first
    rec = {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "q"},
                                                         {"from": "gpt", "value": "a"}]}
    assert record_to_samples(rec)[0].prompt[0]["value"] == "<image>\nq"
    for bad, why in [([1], "object"), ({"image": "x"}, "id"),
                     ({"id": "a", "conversations": []}, "conversations"),
                     ({"id": "a", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                    {"from": "gpt", "value": "a"}]}, "placeholder"),
                     ({"id": "a", "conversations": [{"from": "human", "value": "q"},
                                                    {"from": "gpt", "value": "  "}]}, "empty")]:
        with pytest.raises(MalformedRecord, match=why):
            record_to_samples(bad)


def test_cli_end_to_end(tiny_llava_dir, tmp_path, capsys):
    from bpo_fast.cli import main

    data, root = make_data(tmp_path, n=2, malformed=True)
    out = tmp_path / "cli.jsonl"
    args = ["build-pairs", "--model", tiny_llava_dir, "--data", data, "--image-root", root,
            "--out", str(out), "--noise-steps", "100,900", "--max-new-tokens", "3",
            "--min-new-tokens", "3", "--num-workers", "0", "--no-progress", "--device", "cpu",
            "--summary-json", str(tmp_path / "sum.json"), "--max-bad-fraction", "0.6"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "pairs written" in err and "errors: 2" in err
    summ = json.loads((tmp_path / "sum.json").read_text())
    recs = read_out(out)
    assert summ["total_written"] == len(recs) and summ["written"]["error_injection"] == 2
    assert main(args) == 2  # exists: refuses without --resume/--overwrite
    assert "resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert len(read_out(out)) == len(recs)
    assert main(["merge-pairs", "--out", str(tmp_path / "m.jsonl"), str(out)]) == 0
    assert main(["merge-pairs", "--out", str(tmp_path / "m.jsonl"), str(tmp_path / "nothing.jsonl")]) == 2


def test_sigkill_mid_run_then_resume_matches_full_run(tmp_path):
    """A real kill (SIGKILL, no clean-up) of the CLI, then --resume: same ids, no duplicates."""
    import signal
    import subprocess
    import sys
    import time

    n = 4000
    data = tmp_path / "big.jsonl"
    with open(data, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "conversations": [
                {"from": "human", "value": f"how many cats are there {i} ?"},
                {"from": "gpt", "value": f"there are {i % 7 + 2} black cats on the left ."}]}) + "\n")
    base = [sys.executable, "-m", "bpo_fast.cli", "build-pairs", "--data", str(data),
            "--strategies", "error_injection", "--batch-size", "4", "--no-progress"]
    killed = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(base + ["--out", str(killed)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and (not killed.exists() or killed.stat().st_size < 20_000):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list(iter_jsonl(killed)))
    assert 0 < n_before < n, "the run should have been killed part-way"
    subprocess.run(base + ["--out", str(killed), "--resume", "--no-fsync"], check=True,
                   stderr=subprocess.DEVNULL)
    full = tmp_path / "full.jsonl"
    subprocess.run(base + ["--out", str(full), "--no-fsync"], check=True, stderr=subprocess.DEVNULL)
    ids_k = [r["id"] for r in read_out(killed)]
    ids_f = [r["id"] for r in read_out(full)]
    assert len(ids_k) == len(set(ids_k)) == n
    assert set(ids_k) == set(ids_f)
    # the rule injector is deterministic per id: the resumed file has the same pairs
    assert {r["id"]: r["rejected"] for r in read_out(killed)} == {r["id"]: r["rejected"] for r in read_out(full)}
    assert killed.read_bytes() == full.read_bytes()


def test_generated_token_count():
    from bpo_fast.data.pairs import _count_generated

    eos, pad = 3, 0
    new = torch.tensor([[5, 0, 7, 9],      # the model generated the pad id: still 4 tokens
                        [5, 3, 0, 0],      # EOS at 1, then padding: 2 tokens
                        [3, 0, 0, 0],      # EOS first: 1 token
                        [6, 6, 6, 3]])     # EOS last: 4
    assert _count_generated(new, eos) == 4 + 2 + 1 + 4
    assert _count_generated(new[:, :0], eos) == 0
    assert _count_generated(new, None) == 16


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_pipeline_pixels_and_pairs(tiny_llava_dir, tmp_path, dtype):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, dtype=dtype).cuda().eval()
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    data, root = make_data(tmp_path, n=6, bad_image=True)
    recs = [r for _, _, r in iter_records(data) if r["id"].startswith("r")]
    ref = proc.image_processor(images=[Image.open(os.path.join(root, r["image"])) for r in recs],
                               return_tensors="pt")["pixel_values"]
    seen = []
    orig = model.generate

    def spy(*a, **kw):
        seen.append(kw["pixel_values"].float().cpu())
        return orig(*a, **kw)

    model.generate = spy
    s = build_pairs(cfg(data, root, tmp_path / "p.jsonl", noise_steps="none,500", batch_size=8,
                        num_workers=2), model, proc)
    got = torch.cat(seen).view(-1, 2, *ref.shape[1:])
    tol = 0 if dtype == torch.float32 else 2e-2
    assert (got[:, 0] - ref).abs().max() <= tol * ref.abs().max()
    assert not torch.allclose(got[:, 1], ref, atol=0.1)
    recs_out = read_out(tmp_path / "p.jsonl")
    assert s.errors == {"image": 2}
    assert s.written["image_weakened"] + sum(s.dropped.values()) == 6 * 2
    assert {r["noise_step"] for r in recs_out if r["strategy"] == "image_weakened"} <= {None, 500}


@pytest.mark.parametrize("kwargs", [
    {},                                                                   # LLaVA-1.5 style
    {"size": {"height": 24, "width": 40}, "do_center_crop": False},       # exact resize
    {"do_resize": False, "crop_size": {"height": 32, "width": 32}},       # crop pads small images
    {"resample": 2, "do_normalize": False},                                # bilinear, no normalise
])
def test_image_geometry_matches_processor_variants(kwargs):
    from bpo_fast.data.images import normalize_uint8
    from bpo_fast.models.tiny import build_image_processor

    ip = build_image_processor(32)
    for k, v in kwargs.items():
        setattr(ip, k, v)
    geom = ImageGeometry.from_processor(ip)
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 256, (20, 13, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (41, 57, 4), dtype=np.uint8), "RGBA"),
            Image.fromarray(rng.integers(0, 256, (33, 30), dtype=np.uint8), "L")]
    pal = Image.fromarray(rng.integers(0, 4, (36, 36), dtype=np.uint8), "P")
    pal.info["transparency"] = 0
    imgs.append(pal)
    for img in imgs:
        ref = ip(images=[img], return_tensors="pt")["pixel_values"]
        u8 = torch.from_numpy(load_image(img, geom)).permute(2, 0, 1)[None]
        assert torch.equal(normalize_uint8(u8, geom), ref), (kwargs, img.mode)


def test_generation_halves_the_batch_on_out_of_memory(tiny, tmp_path):
    model, proc = tiny
    data, root = make_data(tmp_path, n=4)
    orig = model.generate
    sizes = []

    def flaky(*a, **kw):
        n = kw["input_ids"].shape[0]
        sizes.append(n)
        if n > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return orig(*a, **kw)

    model.generate = flaky
    try:
        s = build_pairs(cfg(data, root, tmp_path / "p.jsonl", noise_steps=(100, 900), batch_size=4,
                            strategies=("image_weakened",)), model, proc)
    finally:
        del model.generate
    assert sizes == [8, 4, 2, 2, 4, 2, 2] and s.oom_splits == 3  # 8 -> 4+4 -> 2+2+2+2
    assert s.written["image_weakened"] + sum(s.dropped.values()) == 8
    assert "out-of-memory" in s.format()


def test_repeated_source_ids_are_renamed_consistently_across_shards(tmp_path, monkeypatch):
    rec = lambda i, ans: json.dumps({"id": i, "conversations": [  # noqa: E731
        {"from": "human", "value": "what is it ?"}, {"from": "gpt", "value": ans}]})
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join([rec("a", "a red cup"), rec("b", "two dogs"), rec("a", "a blue car"),
                               rec("a", "three cats")]) + "\n")
    base = dict(data=str(data), strategies=("error_injection",), progress=False)
    s = build_pairs(PairBuilderConfig(out=str(tmp_path / "one.jsonl"), **base))
    assert s.renamed_duplicate_ids == 2
    one = {r["id"]: r["chosen"] for r in read_out(tmp_path / "one.jsonl")}
    assert one == {"a:t0:error_injection:rules": "a red cup", "b:t0:error_injection:rules": "two dogs",
                   "a#2:t0:error_injection:rules": "a blue car", "a#3:t0:error_injection:rules": "three cats"}
    for r in (0, 1):
        build_pairs(PairBuilderConfig(out=str(tmp_path / "sh.jsonl"), rank=r, world_size=2, **base))
    m = merge_pairs(str(tmp_path / "sh.jsonl"), str(tmp_path / "m.jsonl"))
    assert m.conflicts == 0 and {r["id"]: r["chosen"] for r in read_out(tmp_path / "m.jsonl")} == one


def test_resumed_run_is_byte_identical_and_resume_is_idempotent(tiny, tmp_path):
    """Each record's noise and sampling derive from (seed, record id, strategy): an interrupted
    and resumed run writes the bytes of an uninterrupted one, whatever the batch size."""
    model, proc = tiny
    data, root = make_data(tmp_path, n=5)
    kw = dict(noise_steps=(300, None), strategies=("image_weakened", "error_injection"),
              injector="llm", max_new_tokens=6, min_new_tokens=0)
    full = tmp_path / "full.jsonl"
    build_pairs(cfg(data, root, full, **kw), model, proc)
    want = full.read_bytes()
    assert want.count(b"\n") >= 10
    # stopped after one batch, a torn line from the kill, then resumed
    part = tmp_path / "part.jsonl"
    s1 = build_pairs(cfg(data, root, part, max_batches=1, **kw), model, proc)
    assert s1.stopped_early
    with open(part, "ab") as f:
        f.write(b'{"id": "r3:t0:image_weakened:300", "rejec')
    build_pairs(cfg(data, root, part, resume=True, **kw), model, proc)
    assert part.read_bytes() == want
    # another batch size (other batch neighbours, other generate calls): the same pairs
    other = tmp_path / "other.jsonl"
    build_pairs(cfg(data, root, other, **{**kw, "batch_size": 3, "gen_batch_size": 1}), model, proc)
    assert other.read_bytes() == want
    # resuming a finished run changes nothing
    errs = tmp_path / "part.errors.jsonl"
    errs_before = errs.read_bytes() if errs.exists() else None
    s3 = build_pairs(cfg(data, root, part, resume=True, **kw), model, proc)
    assert s3.total_written == 0 and part.read_bytes() == want
    assert (errs.read_bytes() if errs.exists() else None) == errs_before
    # and the seed matters: another seed samples other answers
    seeded = tmp_path / "seed1.jsonl"
    build_pairs(cfg(data, root, seeded, seed=1, **kw), model, proc)
    a = {r["id"]: r["rejected"] for r in read_out(full)}
    b = {r["id"]: r["rejected"] for r in read_out(seeded)}
    assert sum(a[k] != b[k] for k in a.keys() & b.keys()) >= len(a) // 2


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_row_sampler_draws_from_the_distribution_one_stream_per_row(top_p):
    from bpo_fast.data.generation import _RowSampler

    scores = torch.tensor([[float("-inf"), 2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(scores, -1)[0]
    if top_p < 1:   # 0.64 + 0.24 reaches 0.7: the two most likely tokens, renormalised
        probs = torch.tensor([0.0, probs[1], probs[2], 0.0, 0.0])
        probs /= probs.sum()
    n = 4000
    s = _RowSampler(list(range(n)), 1, 3, 1.0, top_p, "cpu")
    out = s(torch.zeros(n, 3, dtype=torch.long), scores.expand(n, -1))
    picked = out.argmax(-1)
    assert torch.isfinite(out).sum() == n and (out.max(-1).values == 0).all()
    freq = torch.bincount(picked, minlength=5).float() / n
    assert freq[0] == 0 and (freq - probs).abs().max() < 0.03, (freq, probs)
    # a row's draw depends on its seed only, not on its neighbours
    one = _RowSampler([7], 1, 3, 1.0, top_p, "cpu")(torch.zeros(1, 3, dtype=torch.long), scores)
    assert one.argmax(-1).item() == picked[7].item()
    # a temperature so small that score / temperature overflows: the most likely token
    for t in (1e-30, 1e-45):
        tiny = _RowSampler([1, 2], 1, 3, t, top_p, "cpu")(torch.zeros(2, 3, dtype=torch.long),
                                                           scores.expand(2, -1) * 30)
        assert tiny.argmax(-1).tolist() == [1, 1], t


def test_resume_and_overwrite_touch_only_files_build_pairs_wrote(tmp_path, capsys):
    """A file given as --out / --errors by mistake (a model's config.json without its last
    newline, an image) is refused before anything is cut, appended to or removed."""
    from bpo_fast.cli import main

    data, root = make_data(tmp_path, n=2, turns=1)
    config = tmp_path / "config.json"
    config.write_bytes(b'{\n  "model_type": "llava"\n}')
    image = os.path.join(root, "img1.png")
    base = ["build-pairs", "--data", data, "--image-root", root, "--strategies",
            "error_injection", "--no-progress"]
    for args in (["--out", str(config), "--resume"], ["--out", image, "--overwrite"],
                 ["--out", str(tmp_path / "p.jsonl"), "--errors", str(config)]):
        before = {p: open(p, "rb").read() for p in (config, image)}
        assert main(base + args) == 2, args
        assert "not written by" in capsys.readouterr().err, args  # build-pairs / bpo-fast
        assert {p: open(p, "rb").read() for p in before} == before, args
    # its own files still resume, also from the torn start of a first line
    out = tmp_path / "own.jsonl"
    assert main(base + ["--out", str(out)]) == 0
    full = open(out, "rb").read()
    out.write_bytes(full[:7])
    assert main(base + ["--out", str(out), "--resume"]) == 0
    assert open(out, "rb").read() == full
