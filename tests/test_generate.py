"""`bpo-fast generate`: a model's answers for eval-chair / eval-pope, from every input format, on
every VLM family; batched answers equal HF's one-at-a-time generate; sampled answers do not
depend on the batch size or the number of ranks; resume writes the bytes of an uninterrupted
run; bad input ends in one line (exit 2), bad records and images are logged and skipped."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bpo_fast.cli import main
from bpo_fast.eval.generate import GenerateOptions, generate, merge_shards
from bpo_fast.models.tiny_vlm import FAMILIES, build_tiny_vlm, model_type


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _data(tmp_path, n=5, turns=2, **kw):
    from test_pairs import make_data

    return make_data(tmp_path, n=n, turns=turns, **kw)


def _gen(model, data, root, out, *extra):
    return main(["generate", "--model", model, "--data", data, "--image-root", root, "--out",
                 str(out), "--device", "cpu", "--max-new-tokens", "6", "--no-progress", *extra])


# ---------------------------------------------------------------------------------------------
# every family: our batched, left-padded answers are HF's own one-at-a-time generate


def _hf_answer(model, processor, question, image, max_new_tokens, min_new=True):
    """The plain HF way: the family's chat template, the processor on one question and image,
    ``model.generate`` greedy, the new tokens decoded."""
    from bpo_fast.models.vlm import processor_prompt, resolve_chat_template

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    template = resolve_chat_template(processor, model.config.model_type)
    text = (processor_prompt(processor, msgs) if template is None else
            processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False,
                                          chat_template=template))
    enc = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens if min_new else 0, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_answers_as_hf_generate(family, tmp_path):
    from bpo_fast.models.vlm import load_processor

    model_dir = str(tmp_path / "model")
    build_tiny_vlm(family, model_dir, seed=2)
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(1)
    recs = []
    for i, (w, h) in enumerate([(20, 12), (12, 28), (36, 36)]):     # different tile counts
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"i{i}.png")
        recs.append({"id": f"q{i}", "image": f"i{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is on the table ?"},
            {"from": "gpt", "value": "a cup ."}]})
    data = tmp_path / "q.json"
    data.write_text(json.dumps(recs))
    out = tmp_path / "a.jsonl"
    s = generate(GenerateOptions(model=model_dir, data=str(data), image_root=str(root),
                                 out=str(out), max_new_tokens=4, min_new_tokens=4, batch_size=3,
                                 device="cpu", dtype="fp32", progress=False))
    got = _lines(out)
    assert s.written == 3 and [r["id"] for r in got] == ["q0", "q1", "q2"]
    from bpo_fast.models.preference import load_vlm

    model, proc = load_vlm(model_dir, device="cpu").eval(), load_processor(model_dir)
    assert model.config.model_type == model_type(family)
    images = []
    for i in range(3):
        with Image.open(root / f"i{i}.png") as im:
            images.append(im.convert("RGB"))
    want = [_hf_answer(model, proc, "what is on the table ?", im, 4) for im in images]
    assert [r["answer"] for r in got] == want
    assert any(want)
    # sampled: each answer from its own seed, the same alone as in a left-padded batch
    from bpo_fast.data.generation import Sampling
    from bpo_fast.data.vlm_generation import Answerer

    answer = Answerer(model, proc, Sampling(max_new_tokens=4, min_new_tokens=4, do_sample=True,
                                            top_p=0.9))
    items = [([{"from": "human", "value": "<image>\nwhat is on the table ?"}], [im])
             for im in images]
    alone = [answer([it], [seed])[0][0] for it, seed in zip(items, (5, 6, 7))]
    assert answer(items, [5, 6, 7])[0] == alone


# ---------------------------------------------------------------------------------------------
# outputs eval-chair and eval-pope read as they are


def test_llava_records_to_eval_chair_and_turns(tiny_llava_dir, tmp_path, capsys):
    data, root = _data(tmp_path, n=4)
    out = tmp_path / "caps.jsonl"
    assert _gen(tiny_llava_dir, data, root, out) == 0
    recs = _lines(out)
    assert [r["id"] for r in recs] == ["r0", "r1", "r2", "r3"]
    assert recs[0]["question"] == "what color is the circle ?" and recs[0]["image"] == "sub/img0.jpg"
    assert all(r["question_id"] == r["id"] for r in recs)
    truth = tmp_path / "truth.jsonl"
    truth.write_text("".join(json.dumps({"id": r["id"], "objects": ["circle"]}) + "\n"
                             for r in recs))
    capsys.readouterr()
    assert main(["eval-chair", "--captions", str(out), "--ground-truth", str(truth)]) == 0
    assert "CHAIR-i" in capsys.readouterr().out
    # --turns all: every question, the earlier turns as its history
    both = tmp_path / "all.jsonl"
    assert _gen(tiny_llava_dir, data, root, both, "--turns", "all") == 0
    recs2 = _lines(both)
    assert [r["id"] for r in recs2] == ["r0", "r0:t1", "r1", "r1:t1", "r2", "r2:t1", "r3", "r3:t1"]
    assert recs2[1]["question"].startswith("how many stars")
    assert [r["answer"] for r in recs2[::2]] == [r["answer"] for r in recs]


def test_pope_questions_by_image_id_to_eval_pope(tiny_llava_dir, tmp_path, capsys):
    _, root = _data(tmp_path, n=4)
    os.rename(os.path.join(root, "sub", "img0.jpg"), os.path.join(root, "img0.jpg"))
    os.rename(os.path.join(root, "sub", "img2.jpg"), os.path.join(root, "img2.jpg"))
    truth = tmp_path / "truth.jsonl"
    truth.write_text("".join(json.dumps({"id": f"img{i}", "objects": ["circle", "star"][:1 + i % 2]})
                             + "\n" for i in range(4)))
    q = tmp_path / "q.jsonl"
    assert main(["eval-pope", "--ground-truth", str(truth), "--write-questions", str(q)]) == 0
    out = tmp_path / "a.jsonl"
    assert _gen(tiny_llava_dir, str(q), root, out, "--max-new-tokens", "2") == 0
    recs = _lines(out)
    qs = _lines(q)
    assert [r["question_id"] for r in recs] == [x["question_id"] for x in qs]
    assert recs[0]["image"] == f"{qs[0]['image_id']}.{'jpg' if qs[0]['image_id'] in ('img0', 'img2') else 'png'}"
    assert recs[0]["question"] == qs[0]["question"]
    capsys.readouterr()
    assert main(["eval-pope", "--ground-truth", str(truth), "--questions", str(q), "--answers",
                 str(out)]) == 0
    assert "accuracy" in capsys.readouterr().out.lower()


def test_image_folder_pairs_and_trl_records(tiny_llava_dir, tmp_path):
    data, root = _data(tmp_path, n=3, turns=1)
    out = tmp_path / "folder.jsonl"
    assert main(["generate", "--model", tiny_llava_dir, "--image-root", root, "--out", str(out),
                 "--prompt", "what color is the circle ?", "--device", "cpu",
                 "--max-new-tokens", "6", "--no-progress"]) == 0
    folder = _lines(out)
    assert [r["id"] for r in folder] == ["img1", "sub/img0", "sub/img2"]
    # the same question about the same image: the same answer, whatever the input format
    llava = {r["image"]: r["answer"] for r in _lines_of(tiny_llava_dir, data, root, tmp_path)}
    assert {r["image"]: r["answer"] for r in folder} == llava
    # pairs (ours) and TRL's standard format: one answer per pair, id the pair's
    pairs = tmp_path / "pairs.jsonl"
    recs = [json.loads(line) for line in open(data)]
    pairs.write_text("".join(json.dumps({"id": f"p{i}", "image": r["image"],
                                         "prompt": r["conversations"][:1], "chosen": "a",
                                         "rejected": "b", "strategy": "error_injection",
                                         "noise_step": None, "injector": "rules"}) + "\n"
                             for i, r in enumerate(recs)))
    pout = tmp_path / "p.jsonl"
    assert _gen(tiny_llava_dir, str(pairs), root, pout) == 0
    got = _lines(pout)
    assert [r["id"] for r in got] == ["p0", "p1", "p2"]
    assert {r["image"]: r["answer"] for r in got} == llava
    trl = tmp_path / "trl.jsonl"
    trl.write_text("".join(json.dumps({"prompt": "what color is the circle ?", "chosen": "a",
                                       "rejected": "b", "images": [r["image"]]}) + "\n"
                           for r in recs))
    tout = tmp_path / "t.jsonl"
    assert _gen(tiny_llava_dir, str(trl), root, tout) == 0
    assert [r["answer"] for r in _lines(tout)] == [llava[r["image"]] for r in recs]


def _lines_of(model, data, root, tmp_path):
    out = tmp_path / "llava.jsonl"
    assert _gen(model, data, root, out) == 0
    return _lines(out)


# ---------------------------------------------------------------------------------------------
# determinism, resume, shards


def test_sampled_answers_do_not_depend_on_batch_size_or_ranks(tiny_llava_dir, tmp_path):
    data, root = _data(tmp_path, n=5)
    outs = {}
    for bs in (1, 4):
        outs[bs] = tmp_path / f"s{bs}.jsonl"
        assert _gen(tiny_llava_dir, data, root, outs[bs], "--sample", "--seed", "3",
                    "--turns", "all", "--batch-size", str(bs)) == 0
    ref = open(outs[1], "rb").read()
    assert open(outs[4], "rb").read() == ref
    assert len({r["answer"] for r in _lines(outs[1])}) > 1
    other = tmp_path / "seed4.jsonl"
    assert _gen(tiny_llava_dir, data, root, other, "--sample", "--seed", "4", "--turns", "all") == 0
    assert open(other, "rb").read() != ref          # the seed matters
    # two ranks (the API's rank/world_size, as torchrun sets them), then rank 0's merge
    sharded = tmp_path / "sharded.jsonl"
    base = dict(model=tiny_llava_dir, data=data, image_root=root, out=str(sharded),
                max_new_tokens=6, do_sample=True, seed=3, turns="all", device="cpu",
                progress=False, world_size=2)
    for r in (1, 0):
        generate(GenerateOptions(rank=r, **base))
    assert os.path.exists(tmp_path / "sharded.rank0.jsonl")
    assert merge_shards(GenerateOptions(**base), world_size=2) == 10
    assert open(sharded, "rb").read() == ref
    assert not os.path.exists(tmp_path / "sharded.rank0.jsonl")


def test_ranks_errors_files_are_merged_by_rank_0_and_judged_together(tiny_llava_dir, tmp_path):
    """Each rank names its bad samples in <errors stem>.rank{r}.jsonl; rank 0 merges them (as
    the answers) into the errors file a single run writes, and judges --max-bad-fraction over
    all ranks: 3 of 9 bad on each rank pass 0.4, the 4 of 9 of the whole run do not."""
    from bpo_fast.data.bad_samples import TooManyBadSamples

    data, root = _data(tmp_path, n=5, turns=1, bad_image=True, malformed=True)
    single = tmp_path / "single.jsonl"
    base = dict(model=tiny_llava_dir, data=data, image_root=root, max_new_tokens=4,
                device="cpu", progress=False)
    generate(GenerateOptions(out=str(single), max_bad_fraction=0.5, **base))
    for frac in (0.5, 0.4):
        out = tmp_path / f"two{frac}.jsonl"
        opts = dict(out=str(out), max_bad_fraction=frac, world_size=2, **base)
        for r in (1, 0):
            s = generate(GenerateOptions(rank=r, **opts))
            assert s.bad_samples == 3
            assert os.path.exists(tmp_path / f"two{frac}.errors.rank{r}.jsonl")
        if frac == 0.4:
            with pytest.raises(TooManyBadSamples, match="4 of the 9 samples"):
                merge_shards(GenerateOptions(**opts))
        else:
            assert merge_shards(GenerateOptions(**opts)) == 5
        assert open(out, "rb").read() == open(single, "rb").read()
        assert open(tmp_path / f"two{frac}.errors.jsonl", "rb").read() == \
            open(tmp_path / "single.errors.jsonl", "rb").read()
        assert not [f for f in os.listdir(tmp_path) if ".rank" in f]


def test_resume_after_a_kill_writes_the_uninterrupted_bytes(tiny_llava_dir, tmp_path):
    data, root = _data(tmp_path, n=5)
    full = tmp_path / "full.jsonl"
    assert _gen(tiny_llava_dir, data, root, full, "--turns", "all", "--batch-size", "2") == 0
    ref = open(full, "rb").read()
    lines = ref.splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(lines[:4]) + lines[4][:17])     # 2 batches and a torn line
    assert _gen(tiny_llava_dir, data, root, cut, "--turns", "all", "--batch-size", "2") == 2
    assert _gen(tiny_llava_dir, data, root, cut, "--turns", "all", "--batch-size", "2",
                "--resume") == 0
    assert open(cut, "rb").read() == ref
    # resuming a finished run writes nothing
    assert _gen(tiny_llava_dir, data, root, cut, "--turns", "all", "--resume") == 0
    assert open(cut, "rb").read() == ref


def test_resume_and_overwrite_touch_only_files_generate_wrote(tiny_llava_dir, tmp_path, capsys):
    data, root = _data(tmp_path, n=3, turns=1)
    # files given as --out / --errors by mistake: a JSON file without its last newline (a
    # model's config.json), an image, someone's notes; each refused before anything changes
    config = tmp_path / "config.json"
    config.write_bytes(b'{\n  "model_type": "llava"\n}')
    image = os.path.join(root, "img1.png")
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"my": "notes"}\n')
    # (--out by its records, --errors by the bpo-fast header of every errors file)
    by_header = "not written by bpo-fast (no bpo-fast errors header"
    cases = [(["--out", str(config)], "--resume", "not written by generate"),
             (["--out", image], "--resume", "not written by generate"),
             (["--out", image], "--overwrite", "not written by generate"),
             (["--out", str(tmp_path / "a.jsonl"), "--errors", str(config)], "--resume",
              by_header),
             (["--out", str(tmp_path / "b.jsonl"), "--errors", str(notes)], None, by_header)]
    for args, mode, needle in cases:
        before = {p: open(p, "rb").read() for p in (config, image, notes)}
        assert main(["generate", "--model", tiny_llava_dir, "--data", data, "--image-root", root,
                     "--device", "cpu", "--no-progress", *args] + ([mode] if mode else [])) == 2
        assert needle in capsys.readouterr().err, args
        assert {p: open(p, "rb").read() for p in before} == before, args
    # a run killed in its first write leaves the torn start of a line: --resume continues it
    full = tmp_path / "full.jsonl"
    assert _gen(tiny_llava_dir, data, root, full) == 0
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(open(full, "rb").read()[:9])
    assert _gen(tiny_llava_dir, data, root, torn, "--resume") == 0
    assert open(torn, "rb").read() == open(full, "rb").read()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_torchrun_two_ranks_merge_into_out(tiny_llava_dir, tmp_path):
    data, root = _data(tmp_path, n=5, bad_image=True)
    single = tmp_path / "single.jsonl"
    assert _gen(tiny_llava_dir, data, root, single, "--sample", "--turns", "all",
                "--max-bad-fraction", "0.5") == 0
    out = tmp_path / "two.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bpo_fast.cli", "generate", "--model", tiny_llava_dir, "--data", data,
           "--image-root", root, "--out", str(out), "--device", "cpu", "--max-new-tokens", "6",
           "--no-progress", "--sample", "--turns", "all", "--threads", "1",
           "--max-bad-fraction", "0.5"]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert open(out, "rb").read() == open(single, "rb").read()
    # the ranks' errors merged by rank 0 into the file a single run writes; no shard left
    assert open(tmp_path / "two.errors.jsonl", "rb").read() == \
        open(tmp_path / "single.errors.jsonl", "rb").read()
    assert not [f for f in os.listdir(tmp_path) if ".rank" in f]


# ---------------------------------------------------------------------------------------------
# models: a LoRA adapter on its base


def test_lora_adapter_is_merged_into_its_base(tiny_llava_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from bpo_fast.models.preference import load_vlm
    from bpo_fast.models.vlm import load_processor

    base = load_vlm(tiny_llava_dir, device="cpu")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    adapter = str(tmp_path / "adapter")
    model.save_pretrained(adapter)
    merged = str(tmp_path / "merged")
    model.merge_and_unload().save_pretrained(merged)
    load_processor(tiny_llava_dir).save_pretrained(merged)
    data, root = _data(tmp_path, n=3)
    a, m, b = (tmp_path / f"{n}.jsonl" for n in "amb")
    assert _gen(adapter, data, root, a) == 0             # the base named in the adapter
    assert _gen(merged, data, root, m) == 0
    assert _gen(tiny_llava_dir, data, root, b) == 0
    assert [r["answer"] for r in _lines(a)] == [r["answer"] for r in _lines(m)]
    assert [r["answer"] for r in _lines(a)] != [r["answer"] for r in _lines(b)]
    assert _gen(adapter, data, root, tmp_path / "a2.jsonl", "--base-model", tiny_llava_dir) == 0
    capsys.readouterr()
    assert _gen(adapter, data, root, tmp_path / "a3.jsonl", "--base-model", str(tmp_path)) == 2
    assert _gen(merged, data, root, tmp_path / "a4.jsonl", "--base-model", tiny_llava_dir) == 2
    assert "--base-model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# bad input


def test_a_folder_that_is_not_a_model_ends_in_one_line(tiny_llava_dir, tmp_path, capsys):
    import shutil

    data, root = _data(tmp_path, n=2, turns=1)
    broken = tmp_path / "broken"                      # config.json that is not JSON
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    weightless = tmp_path / "weightless"              # a model's files but its weights
    shutil.copytree(tiny_llava_dir, weightless,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    adapter = tmp_path / "adapter"                    # an adapter folder without its weights
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": tiny_llava_dir, "peft_type": "LORA"}))
    bad_adapter = tmp_path / "bad_adapter"
    bad_adapter.mkdir()
    (bad_adapter / "adapter_config.json").write_text("[1, 2")
    cases = [(broken, "not valid JSON"), (weightless, "no weights"), (adapter, "no weights"),
             (bad_adapter, "not valid JSON")]
    for model, needle in cases:
        assert _gen(str(model), data, root, tmp_path / "a.jsonl") == 2, model
        err = capsys.readouterr().err.strip()
        assert needle in err and "--model" in err and len(err.splitlines()) == 1, err




def test_bad_samples_follow_the_policy_of_every_command(tiny_llava_dir, tmp_path, capsys):
    """The bad-sample policy of bpo_fast.data.bad_samples: each bad record or image named in the
    errors file (its bpo-fast header first: file, id, line, reason, kind), skipped and counted;
    more than --max-bad-fraction of the file stops the run (exit 2) with the answers kept."""
    data, root = _data(tmp_path, n=3, bad_image=True, malformed=True)
    out = tmp_path / "a.jsonl"
    # 7 records: 3 good, 2 malformed, 2 images that do not load (4 of 7 bad)
    assert _gen(tiny_llava_dir, data, root, out, "--max-bad-fraction", "0.6") == 0
    assert "bad samples: 4 (image: 2, record: 2)" in capsys.readouterr().err
    ids = [r["id"] for r in _lines(out)]
    assert ids == ["r0", "r1", "r2"]
    head, *errs = _lines(tmp_path / "a.errors.jsonl")
    assert head == {"bpo_fast": "errors", "command": "generate"}
    assert [(e["kind"], e["id"], e["line"]) for e in errs] == [
        ("record", None, 2), ("record", "wrongroles", 7), ("image", "badimg", 4),
        ("image", "noimg", 5)]
    assert all(e["file"] == data and e["reason"] for e in errs)
    # resume: the errors are not logged twice
    assert _gen(tiny_llava_dir, data, root, out, "--resume", "--max-bad-fraction", "0.6") == 0
    assert _lines(tmp_path / "a.errors.jsonl") == [head] + errs
    # records that cannot be read count before the model loads: over the default share (0.1)
    capsys.readouterr()
    assert _gen(tiny_llava_dir, data, root, tmp_path / "d.jsonl") == 2
    err = capsys.readouterr().err.strip()
    assert "--max-bad-fraction 0.1" in err and "d.errors.jsonl" in err, err
    assert len(err.splitlines()) == 1, err
    # images: the run stops after the batch that passed the share, the answers so far kept;
    # --resume with a wider share ends as one run would
    (tmp_path / "b").mkdir()
    data, root = _data(tmp_path / "b", n=3, bad_image=True)     # r0 r1 badimg noimg r2
    whole = tmp_path / "whole.jsonl"
    assert _gen(tiny_llava_dir, data, root, whole, "--max-bad-fraction", "0.5") == 0
    stop = tmp_path / "s.jsonl"
    assert _gen(tiny_llava_dir, data, root, stop, "--batch-size", "1",
                "--max-bad-fraction", "0.25") == 2
    err = capsys.readouterr().err.strip()
    assert "2 of the 5 samples" in err and "'badimg'" in err, err
    assert [r["id"] for r in _lines(stop)] == ["r0", "r1"]
    assert _gen(tiny_llava_dir, data, root, stop, "--resume", "--max-bad-fraction", "0.5") == 0
    assert open(stop, "rb").read() == open(whole, "rb").read()
    assert _lines(tmp_path / "s.errors.jsonl") == _lines(tmp_path / "whole.errors.jsonl")
    with pytest.raises(SystemExit):      # the policy replaced generate's own --strict
        main(["generate", "--help"])
    assert "--max-bad-fraction" in capsys.readouterr().out


def test_questions_the_family_cannot_take_are_logged_and_skipped(tmp_path, capsys):
    """PaliGemma takes exactly one image per prompt: a text-only or a two-image question is
    logged and skipped like an unreadable image; the run answers the others."""
    model = str(tmp_path / "paligemma")
    build_tiny_vlm("paligemma", model, seed=0)
    data, root = _data(tmp_path, n=2, turns=1, text_only=True)
    recs = [json.loads(line) for line in open(data)]
    recs.insert(1, {"id": "two", "image": ["img1.png", "img1.png"], "conversations": [
        {"from": "human", "value": "<image><image>\nsame ?"}, {"from": "gpt", "value": "yes"}]})
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "a.jsonl"
    assert _gen(model, str(data), root, out, "--batch-size", "4", "--max-bad-fraction", "0.5") == 0
    assert [r["id"] for r in _lines(out)] == ["r0", "r1"]
    _, *errs = _lines(tmp_path / "a.errors.jsonl")
    assert [(e["id"], e["line"], e["kind"]) for e in errs] == [("two", 2, "prompt"),
                                                               ("txt", 4, "prompt")]
    capsys.readouterr()
    assert _gen(model, str(data), root, tmp_path / "s.jsonl", "--max-bad-fraction", "0") == 2
    err = capsys.readouterr().err.strip()
    assert "'two'" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("encoding,newline,array", [("utf-8-sig", "\n", True),
                                                    ("utf-8-sig", "\n", False),
                                                    ("utf-8", "\r\n", True),
                                                    ("utf-8-sig", "\r\n", False)])
def test_questions_files_with_a_byte_order_mark_or_crlf(tmp_path, encoding, newline, array):
    """What Windows editors save (a UTF-8 BOM, CRLF line ends), as JSON arrays and JSONL: the
    same questions as the plain file."""
    from bpo_fast.data.questions import read_questions

    data, root = _data(tmp_path, n=3, turns=1)
    recs = [json.loads(line) for line in open(data)]
    qs = [{"question_id": i, "image": r["image"], "text": "is there a circle ?"}
          for i, r in enumerate(recs)]
    for name, rows in (("llava", recs), ("questions", qs)):
        path = tmp_path / f"{name}.{'json' if array else 'jsonl'}"
        text = (json.dumps(rows, indent=1) if array else
                "".join(json.dumps(r) + "\n" for r in rows))
        with open(path, "w", encoding=encoding, newline=newline) as f:
            f.write(text)
        opts = GenerateOptions(model=".", data=str(path), image_root=root, out="o.jsonl")
        got, _ = read_questions(opts, lambda e: pytest.fail(str(e)))
        assert [q.id for q in got] == ([r["id"] for r in recs] if name == "llava" else
                                       ["0", "1", "2"]), name
        assert [q.images for q in got] == [[r["image"]] for r in recs]


def test_a_file_of_bad_records_says_why_in_its_one_line(tmp_path, capsys):
    data, root = _data(tmp_path, n=1, turns=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "image": "img0.png", "conversations": []}) + "\n"
                   + '{"id": "b", "conv\n')
    out = tmp_path / "a.jsonl"
    model = tmp_path / "model"     # never loaded: the records are read first
    model.mkdir()
    assert main(["generate", "--model", str(model), "--data", str(bad), "--image-root", root,
                 "--out", str(out), "--data-format", "llava"]) == 2
    err = capsys.readouterr().err.strip()
    assert "2 record(s) skipped, the first at line 1: 'conversations'" in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "a.errors.jsonl").exists()


def test_repeated_ids_are_renamed(tiny_llava_dir, tmp_path):
    data, root = _data(tmp_path, n=3, turns=1)
    recs = [json.loads(line) for line in open(data)]
    recs[2]["id"] = recs[0]["id"]
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "a.jsonl"
    assert _gen(tiny_llava_dir, str(dup), root, out) == 0
    assert [r["id"] for r in _lines(out)] == ["r0", "r1", "r0#2"]
    # a renamed id never collides with one the input has: every answer keeps its own id
    from bpo_fast.data.questions import read_questions

    recs[1]["id"] = "r0#2"
    dup.write_text("".join(json.dumps(r) + "\n" for r in recs))
    got, renamed = read_questions(GenerateOptions(model=".", data=str(dup), image_root=root,
                                                  out="o.jsonl"))
    assert [q.id for q in got] == ["r0", "r0#2", "r0#3"] and renamed == 1


def test_cli_errors_are_one_line(tiny_llava_dir, tmp_path, capsys):
    data, root = _data(tmp_path, n=2, turns=1)
    out = tmp_path / "a.jsonl"
    cases = [
        (["--data", data, "--image-root", root, "--out", data], "--out"),       # the input
        (["--data", data, "--image-root", root, "--out", str(out), "--errors", data],
         "--errors: "),
        (["--out", str(out)], "--data or --image-root"),
        (["--data", data, "--image-root", root, "--out", str(out), "--batch-size", "0"],
         "batch_size"),
        (["--data", str(tmp_path / "nope.json"), "--image-root", root, "--out", str(out)],
         "--data"),
        (["--data", data, "--image-root", root, "--out", str(out), "--resume", "--overwrite"],
         "resume and overwrite"),
    ]
    for args, needle in cases:
        assert main(["generate", "--model", tiny_llava_dir, "--device", "cpu", "--no-progress",
                     *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, (args, err)
    assert _gen(tiny_llava_dir, data, root, out) == 0
    before = open(out, "rb").read()
    assert _gen(tiny_llava_dir, data, root, out) == 2         # exists: --resume or --overwrite
    assert "--resume" in capsys.readouterr().err
    assert _gen(tiny_llava_dir, data, root, out, "--overwrite") == 0
    assert open(out, "rb").read() == before
    # --overwrite never replaces a file generate did not write
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"my": "notes"}\n')
    assert _gen(tiny_llava_dir, data, root, foreign, "--overwrite") == 2
    assert foreign.read_text() == '{"my": "notes"}\n'
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"x": 1}\n')
    capsys.readouterr()
    assert _gen(tiny_llava_dir, str(unknown), root, tmp_path / "u.jsonl") == 2
    assert "cannot tell the format" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# processor arguments, LLaVA turns, the sampler's memory, the caller's tokenizer


def test_processor_kwargs_reach_every_processor_call(tmp_path):
    """--processor-kwargs (Gemma 3 pan-and-scan, off by the processor's default): our answers
    are HF's own generate with the processor called with the same arguments (more image
    crops: another prompt than without them)."""
    from bpo_fast.models.preference import load_vlm
    from bpo_fast.models.vlm import load_processor

    model_dir = str(tmp_path / "gemma3")
    build_tiny_vlm("gemma3", model_dir, seed=1)
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    images = []
    for i, w in enumerate((64, 40)):         # wide: pan-and-scan crops them
        images.append(Image.fromarray(rng.integers(0, 255, (16, w, 3), dtype=np.uint8)))
        images[-1].save(root / f"i{i}.png")
    kw = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8,
          "pan_and_scan_max_num_crops": 4, "pan_and_scan_min_ratio_to_activate": 1.2}
    out = tmp_path / "a.jsonl"
    assert main(["generate", "--model", model_dir, "--image-root", str(root), "--out", str(out),
                 "--prompt", "what is on the table ?", "--device", "cpu", "--no-progress",
                 "--max-new-tokens", "4", "--processor-kwargs", json.dumps(kw)]) == 0
    model, proc = load_vlm(model_dir, device="cpu").eval(), load_processor(model_dir)

    class WithKwargs:      # the HF processor called with the same arguments, the plain HF way
        def __getattr__(self, name):
            return getattr(proc, name)

        def __call__(self, *a, **k):
            enc = proc(*a, **k, **kw)
            assert enc["pixel_values"].shape[0] > 1          # the crops are there
            return enc

    got = [r["answer"] for r in _lines(out)]
    # greedy until the cap: HF's own generate stops at EOS as ours does
    want = [_hf_answer(model, WithKwargs(), "what is on the table ?", im, 4, min_new=False)
            for im in images]
    assert got == want
    plain = tmp_path / "plain.jsonl"
    assert main(["generate", "--model", model_dir, "--image-root", str(root), "--out",
                 str(plain), "--prompt", "what is on the table ?", "--device", "cpu",
                 "--no-progress", "--max-new-tokens", "4"]) == 0
    assert [r["answer"] for r in _lines(plain)] == [
        _hf_answer(model, proc, "what is on the table ?", im, 4, min_new=False) for im in images]


def test_turns_all_an_empty_question_is_one_bad_sample(tiny_llava_dir, tmp_path):
    """--turns all: a turn whose question is empty is a bad sample of its own (named, kind
    prompt); the record's other questions are answered. The record is read as build-pairs reads
    it (llava_format.record_turns)."""
    from bpo_fast.data.llava_format import MalformedRecord, record_to_samples
    from bpo_fast.data.questions import read_questions

    data, root = _data(tmp_path, n=2, turns=3)
    recs = [json.loads(line) for line in open(data)]
    recs[0]["conversations"][2]["value"] = "  "          # r0's second question
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    bad = []
    opts = GenerateOptions(model=".", data=str(path), image_root=root, out="o.jsonl",
                           turns="all")
    got, _ = read_questions(opts, bad.append)
    assert [q.id for q in got] == ["r0", "r0:t2", "r1", "r1:t1", "r1:t2"]
    assert [len(q.turns) for q in got] == [1, 5, 1, 3, 5]       # the earlier turns as history
    assert [(e["id"], e["line"], e["kind"]) for e in bad] == [("r0:t1", 1, "prompt")]
    assert "conversations[2]: empty question" in bad[0]["reason"]
    out = tmp_path / "a.jsonl"
    assert _gen(tiny_llava_dir, str(path), root, out, "--turns", "all",
                "--max-bad-fraction", "0.2") == 0
    assert [r["id"] for r in _lines(out)] == ["r0", "r0:t2", "r1", "r1:t1", "r1:t2"]
    _, err = _lines(tmp_path / "a.errors.jsonl")
    assert (err["id"], err["kind"]) == ("r0:t1", "prompt")
    # one reading of a record: what build-pairs refuses, generate refuses with the same words
    wrong = {"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image> <image> two tags ?"}, {"from": "gpt", "value": "no"}]}
    path.write_text(json.dumps(wrong) + "\n" + json.dumps(recs[1]) + "\n")
    with pytest.raises(MalformedRecord) as pairs_err:
        record_to_samples(wrong)
    bad.clear()
    read_questions(opts, bad.append)
    assert [(e["id"], e["kind"]) for e in bad] == [("x", "record")]
    assert bad[0]["reason"] == str(pairs_err.value)


def test_the_sampler_draws_its_uniforms_as_tokens_are_generated():
    """Memory follows the tokens generated, not --max-new-tokens: a row's uniforms come in
    chunks as positions are reached, the very numbers of one draw of max_new_tokens."""
    from bpo_fast.data.generation import _RowSampler

    seeds, cap = [3, 11], 10 ** 6        # drawn up front: 16 MB; 256 positions: 4 KB
    s = _RowSampler(seeds, cap, 2, 1.0, 1.0, "cpu")
    vocab = 5
    for t in range(_RowSampler.CHUNK + 3):             # into the second chunk
        s(torch.zeros(2, 2 + t, dtype=torch.long), torch.zeros(2, vocab))
    held = sum(c.numel() for c in s.chunks)
    assert held == 2 * 2 * _RowSampler.CHUNK
    for i, sd in enumerate(seeds):
        one = torch.rand(_RowSampler.CHUNK + 3, generator=torch.Generator().manual_seed(sd),
                         dtype=torch.float64)
        assert torch.equal(torch.cat([c[i] for c in s.chunks])[:one.numel()], one)
    # the last position of a short cap: the chunk holds only what is left
    short = _RowSampler(seeds, 3, 2, 1.0, 1.0, "cpu")
    for t in range(5):       # generate may ask past the cap (clamped to its last position)
        short(torch.zeros(2, 2 + t, dtype=torch.long), torch.zeros(2, vocab))
    assert [c.shape for c in short.chunks] == [(2, 3)]


def test_the_callers_tokenizer_is_never_changed(tiny_llava_dir):
    """A tokenizer without a pad token (Llama-style) stays without one: left padding takes its
    EOS id, given to generate (train saves its processor after --eval-generate)."""
    from bpo_fast.data.generation import Sampling
    from bpo_fast.data.vlm_generation import Answerer
    from bpo_fast.models.preference import load_vlm
    from bpo_fast.models.vlm import load_processor

    model, proc = load_vlm(tiny_llava_dir, device="cpu").eval(), load_processor(tiny_llava_dir)
    proc.tokenizer.pad_token = None
    assert proc.tokenizer.pad_token_id is None
    answer = Answerer(model, proc, Sampling(max_new_tokens=4, min_new_tokens=4))
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    items = [([{"from": "human", "value": "<image>\nwhat ?"}], [im]),
             ([{"from": "human", "value": "<image>\nwhat is on the left of the table ?"}], [im])]
    batched, _ = answer(items)
    assert proc.tokenizer.pad_token is None and proc.tokenizer.pad_token_id is None
    assert batched == [answer([it])[0][0] for it in items]       # left padding by EOS id
    texts, _ = answer.gen.generate(["a short one", "a longer prompt than the other"])
    assert proc.tokenizer.pad_token is None
    assert texts == [answer.gen.generate([t])[0][0] for t in ("a short one",
                                                              "a longer prompt than the other")]
