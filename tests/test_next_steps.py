"""The README's "Next steps" section, run as written.

The demo (``--quick``) leaves every path the layout block lists; each example record is read by
the command that takes it; the chain build-pairs -> merge-pairs -> train -> generate ->
eval-chair / eval-pope runs end to end on the demo's model and world; ``generate``'s captions of
the demo's held-out images are the demo's own and ``eval-chair`` scores them as the demo does;
the memory table is what ``bench/memory_estimate.py`` prints.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image
from readme_blocks import README, block

from bpo_fast.cli import main

ROOT = os.path.dirname(README)
IMAGE = "coco/train2017/000000033471.jpg"      # the image the example records name


def _bash(code, cwd):
    """A README block, run as written by bash in ``cwd`` (the ``bpo-fast`` of this Python)."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder where the section's first block (the quick demo) has run."""
    d = tmp_path_factory.mktemp("next_steps")
    _bash(block("next-demo"), d)
    return d


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# the demo folder's layout


def _layout_paths(text):
    """Every path the layout block names (two spaces separate names and the description; a
    line holding one ``dir/`` opens it for the deeper lines)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    root = lines[0].strip()
    out, stack = [root], [(0, root)]
    for ln in lines[1:]:
        depth = (len(ln) - len(ln.lstrip())) // 2
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parent = stack[-1][1] if stack else root
        names = []
        for part in re.split(r"\s{2,}", ln.strip()):
            if not re.fullmatch(r"[\w.\-/]+", part) or not ("." in part or part.endswith("/")):
                break
            names.append(part)
        assert names, f"layout line names no path: {ln!r}"
        paths = [os.path.join(parent, n) for n in names]
        out += paths
        if len(names) == 1 and names[0].endswith("/"):
            stack.append((depth, paths[0]))
    return out


def test_demo_folder_has_every_path_the_readme_lists(work):
    paths = _layout_paths(block("demo-layout"))
    assert len(paths) > 25 and "demo_out/seed0/world/eval_truth.jsonl" in paths
    missing = [p for p in paths if not os.path.exists(os.path.join(work, p))]
    assert not missing, missing


# ---------------------------------------------------------------------------------------------
# one record of each input format, read by the command that takes it


@pytest.fixture(scope="module")
def images(work):
    """An image root holding the image the example records name (a demo image as JPEG)."""
    root = work / "my_images"
    os.makedirs(root / os.path.dirname(IMAGE), exist_ok=True)
    src = work / "demo_out" / "seed0" / "world" / "images"
    with Image.open(src / sorted(os.listdir(src))[0]) as im:
        im.convert("RGB").save(root / IMAGE)
    return str(root)


def _record(block_id):
    return json.loads(block(block_id))


def test_llava_record_feeds_build_pairs_and_generate(work, images, tmp_path):
    rec = _record("format-llava")
    data = tmp_path / "llava.json"
    data.write_text(json.dumps([rec]))
    out = tmp_path / "pairs.jsonl"
    assert main(["build-pairs", "--data", str(data), "--image-root", images, "--out", str(out),
                 "--strategies", "error_injection", "--no-progress"]) == 0
    (pair,) = _lines(out)
    assert pair["chosen"] == rec["conversations"][1]["value"] and pair["image"] == IMAGE
    ans = tmp_path / "answers.jsonl"
    assert main(["generate", "--model", str(work / "demo_out" / "seed0" / "sft_model"),
                 "--data", str(data), "--image-root", images, "--out", str(ans),
                 "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]) == 0
    (a,) = _lines(ans)
    assert a["id"] == rec["id"] and a["question"] == "What are the colors of the bus?"


def test_pair_record_is_our_schema_and_merges(images, tmp_path):
    from bpo_fast.data.hf_pairs import open_pairs
    from bpo_fast.data.schema import validate_pair

    rec = _record("format-pairs")
    validate_pair(rec)
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(rec) + "\n")
    (item,) = [open_pairs(str(data), images)[0]]
    assert item["id"] == rec["id"] and item["image"] is not None
    assert main(["merge-pairs", "--out", str(tmp_path / "m.jsonl"), str(data)]) == 0
    assert _lines(tmp_path / "m.jsonl") == [rec]


@pytest.mark.parametrize("block_id", ["format-trl-standard", "format-trl-conversational"])
def test_trl_records_are_read_as_pairs(block_id, images, tmp_path):
    pytest.importorskip("datasets")
    from bpo_fast.data.hf_pairs import open_pairs

    rec = _record(block_id)
    data = tmp_path / "trl.jsonl"
    data.write_text(json.dumps(rec) + "\n")
    ds = open_pairs(str(data), images)
    assert len(ds) == 1
    item = ds[0]
    assert item["chosen"] == "The bus is white and red."
    assert item["rejected"] == "The bus is blue and yellow."
    assert "What are the colors of the bus?" in item["prompt"][-1]["value"]
    assert len(item["images"]) == 1


def test_official_bpo_record_converts_to_pairs(images, tmp_path):
    rec = _record("format-bpo")
    data = tmp_path / "bpo.json"
    data.write_text(json.dumps([rec]))
    out = tmp_path / "pairs.jsonl"
    assert main(["convert", "--out", str(out), str(data)]) == 0
    pairs = _lines(out)
    assert sorted(p["strategy"] for p in pairs) == ["error_injection", "image_weakened"]
    assert all(p["chosen"] == "The bus is white and red." for p in pairs)


# ---------------------------------------------------------------------------------------------
# the chain, and generate against the demo's own evaluation


def test_next_steps_chain_runs_end_to_end(work):
    _bash(block("next-chain"), work)
    run = work / "run"
    assert os.path.isfile(run / "bpo" / "adapter_config.json")      # LoRA, as the block trains
    n_eval = len(json.load(open(work / "demo_out" / "seed0" / "world" / "eval.json")))
    assert len(_lines(run / "captions.jsonl")) == n_eval
    chair = json.load(open(run / "chair.json"))
    assert chair["n_captions"] == n_eval and 0 <= chair["chair_i"] <= 1
    questions = _lines(run / "pope_questions.jsonl")
    assert [a["question_id"] for a in _lines(run / "pope_answers.jsonl")] == \
        [q["question_id"] for q in questions]
    pope = json.load(open(run / "pope.json"))
    assert pope["n_questions"] == len(questions) and "random" in pope["settings"]


def test_generate_gives_the_demos_captions_and_scores(work, tmp_path):
    from bpo_fast.demo.world import WorldPaths, score_captions

    demo = work / "demo_out"
    cfg = json.load(open(demo / "demo_config.json"))
    world = WorldPaths.under(str(demo / "seed0" / "world"))
    out = tmp_path / "captions.jsonl"
    assert main(["generate", "--model", str(demo / "seed0" / "bpo_model"), "--data", world.eval,
                 "--image-root", world.images, "--out", str(out), "--max-new-tokens",
                 str(cfg["max_new_tokens"]), "--device", "cpu", "--no-progress"]) == 0
    ours = {r["id"]: r["answer"] for r in _lines(out)}
    theirs = {r["id"]: r["caption"] for r in _lines(demo / "seed0" / "captions_after.jsonl")}
    assert ours == theirs
    scores = tmp_path / "chair.json"
    assert main(["eval-chair", "--captions", str(out), "--ground-truth", world.eval_truth,
                 "--synonyms", world.synonyms, "--out", str(scores)]) == 0
    got = json.load(open(scores))
    want = score_captions(theirs, world)
    assert (got["chair_i"], got["chair_s"], got["recall"]) == \
        (want.chair_i, want.chair_s, want.recall)


# ---------------------------------------------------------------------------------------------
# the hardware note


def test_memory_table_is_what_the_script_prints():
    proc = _bash(block("memory-command"), ROOT)
    text = open(README, encoding="utf-8").read()
    m = re.search(r"<!-- memory-estimate:begin[^\n]*-->\n(.*?)\n<!-- memory-estimate:end -->",
                  text, re.S)
    assert m, "README has no memory-estimate block"
    assert m.group(1).strip() == proc.stdout.strip()



def _saved_bytes_per_token(mode, h=256, i=688, batch=2, tokens=200):
    """Bytes autograd keeps for backward per token in one Llama decoder layer run as ``train``
    runs it: bf16 autocast; LoRA (train's default rank-independent settings: the seven
    projections, the default dropout) on frozen bf16 weights, or every weight trained in fp32.
    Counted from the saved tensors (each storage once), parameters and their casts excluded."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    mem = _memory_estimate()
    cfg = LlamaConfig(vocab_size=64, hidden_size=h, intermediate_size=i, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if mode == "lora":
        model = get_peft_model(model, LoraConfig(
            r=8, lora_alpha=16, lora_dropout=mem.train_lora_dropout(),
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"]))
    for p in model.parameters():
        if mode == "full" or p.requires_grad:
            p.data = p.data.float()
            p.requires_grad_(True)
    model.train()
    inner = model.get_base_model().model if mode == "lora" else model.model
    x = torch.randn(batch, tokens, h, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(tokens).expand(batch, -1)
    saved = {}

    def pack(t):
        if t.dim() >= 3 and t.shape[0] == batch:        # activations, not weights
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inner.layers[0](x, position_embeddings=inner.rotary_emb(x, pos), attention_mask=None,
                        position_ids=pos)
    return sum(saved.values()) / (batch * tokens), mem.layer_activation_bytes(h, i, mode=mode)


def _memory_estimate():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "memory_estimate", os.path.join(ROOT, "bench", "memory_estimate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_memory_estimate_activations_are_what_a_layer_saves(mode):
    """The table's activation rule within 15% of the bytes a real decoder layer keeps, as
    train runs it (LoRA with its default dropout keeps each adapted input again, in fp32)."""
    measured, estimated = _saved_bytes_per_token(mode)
    assert abs(estimated / measured - 1) < 0.15, (mode, measured, estimated)
