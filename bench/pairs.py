"""Pair-builder throughput: image-weakened pairs/s, our pipeline vs the per-image baseline.

Model: LLaVA-1.5-shaped with random weights, built from a config (CLIP ViT-L/14-336 vision
tower, Llama-7B-shaped text model, 32000-word vocabulary, bf16). Generation is capped at a fixed
number of new tokens with ``min_new_tokens == max_new_tokens``, so both sides generate exactly
the same number of tokens per pair (checked).

- ``bpo_fast``: :func:`bpo_fast.data.pairs.build_pairs`: decode/resize/crop to uint8 on CPU
  DataLoader workers, one batched ``bpo_fast.diffusion_noise`` per batch (fused with the
  normalisation), one left-padded KV-cached ``generate`` per batch of 32 images.
- ``per_image`` (the LLaVA/VCD-style loop): ``processor(images=PIL, text=...)`` on each image,
  the VCD ``add_diffusion_noise`` helper (rebuilds the sigmoid schedule on every call, noises the
  CPU tensor), then ``.to(cuda)`` and one ``generate`` per image.

The split: decode (+ resize/crop/normalise), noising, generation, other. For our pipeline
decode runs in worker processes overlapped with generation, so what it costs the pipeline is the
time the main loop waits for it (``decode_wait``); ``decode_cpu_ms_per_image`` says what the
decoding itself costs, single-threaded. Non-generation share = 1 - generation / wall, measured
between the first and the last ``generate`` of the run (steady state: process start, model load
and worker start-up excluded; they are reported separately).

Run on a CUDA machine:   python bench/pairs.py            (writes bench/results/pairs-<gpu>.json)
CPU smoke (tiny model):  python bench/pairs.py --smoke    (writes nothing)
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import print_table, row, vcd_add_diffusion_noise, write_results  # noqa: E402

QUESTION = "<image>\nDescribe the image in detail."


# --------------------------------------------------------------------------- model and data


def build_llava15(device, dtype, *, debug=False):
    """LLaVA-1.5-7B-shaped ``LlavaForConditionalGeneration`` with random weights + processor.

    ``debug=True`` keeps the geometry (336 px, patch 14, 576 image tokens, 32000 words) but
    shrinks widths and depths, to check this code path on a CPU.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import LlavaProcessor

    from bpo_fast.models.tiny import (CHAT_TEMPLATE, IMAGE_TOKEN, SPECIAL_TOKENS, build_image_processor,
                                      build_word_tokenizer, default_vocabulary)

    words = default_vocabulary()
    # pad the word list to a 32000-entry vocabulary (Llama's size), specials included
    words += [f"w{i}" for i in range(32000 - len(SPECIAL_TOKENS) - len(set(words)))]
    tok = build_word_tokenizer(words, model_max_length=4096)
    assert len(tok) == 32000, len(tok)
    if debug:
        vis = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        txt = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4)
    else:  # CLIP ViT-L/14-336 and Llama-2-7B / Vicuna-7B
        vis = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
        txt = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", **vis)
    text = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, **txt)
    cfg = LlavaConfig(vision_config=vision, text_config=text,
                      image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                      vision_feature_select_strategy="default", vision_feature_layer=-2,
                      projector_hidden_act="gelu")
    cfg.pad_token_id = tok.pad_token_id
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    proc = LlavaProcessor(image_processor=build_image_processor(336), tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    return model, proc


def make_images(root, n, size=(480, 640), seed=0):
    """n COCO-sized JPEGs with smooth content + grain (decodes like photos, not like flat fills)."""
    from PIL import Image

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    recs = []
    for i in range(n):
        small = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
        name = f"{i:06d}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(os.path.join(root, "images", name), quality=90)
        recs.append({"id": f"{i:06d}", "image": name, "conversations": [
            {"from": "human", "value": QUESTION}, {"from": "gpt", "value": "A picture of colours."}]})
    data = os.path.join(root, "data.jsonl")
    with open(data, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return data, os.path.join(root, "images")


# --------------------------------------------------------------------------- the baseline


def run_per_image(model, proc, data, image_root, n, step, new_tokens, device, dtype, gen_kwargs):
    """Per-image loop; returns (per-pair seconds, split dict, generated tokens)."""
    from PIL import Image

    from bpo_fast.data.schema import turns_to_messages

    recs = [json.loads(x) for x in open(data)][:n]
    split = {"decode": [], "noise": [], "generate": []}
    per_pair, ntok = [], 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for r in recs:
        t0 = time.perf_counter()
        img = Image.open(os.path.join(image_root, r["image"]))
        text = proc.apply_chat_template(turns_to_messages(r["conversations"][:1]), add_generation_prompt=True)
        enc = proc(images=img, text=text, return_tensors="pt")
        t1 = time.perf_counter()
        # The helper's own code path: a fresh copy of the processor output, an int step.
        px = vcd_add_diffusion_noise(enc["pixel_values"][0].clone(), int(step)).unsqueeze(0)
        px = px.to(device=device, dtype=dtype)
        sync()
        t2 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=enc["input_ids"].to(device),
                                 attention_mask=enc["attention_mask"].to(device), pixel_values=px,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, **gen_kwargs)
        sync()
        t3 = time.perf_counter()
        ntok += out.shape[1] - enc["input_ids"].shape[1]
        split["decode"].append(t1 - t0)
        split["noise"].append(t2 - t1)
        split["generate"].append(t3 - t2)
        per_pair.append(t3 - t0)
    return per_pair, {k: sum(v) for k, v in split.items()}, ntok


# --------------------------------------------------------------------------- ours


def run_ours(model, proc, data, image_root, n, levels, batch, new_tokens, workers, greedy, out_dir):
    """build_pairs on n records; returns (summary, generate intervals [(t0, t1)], wall, the
    times each batch's write returned)."""
    from bpo_fast.data.pairs import PairBuilderConfig, build_pairs

    import bpo_fast.data.pairs as pairs_mod

    calls, writes = [], []
    orig = model.generate
    orig_write = pairs_mod.JsonlWriter.write_batch

    def timed_write(self, records):
        n = orig_write(self, records)
        writes.append(time.perf_counter())
        return n

    def timed(*a, **kw):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = orig(*a, **kw)
        sync()
        calls.append((t0, time.perf_counter()))
        return out

    model.generate = timed
    pairs_mod.JsonlWriter.write_batch = timed_write
    try:
        out = os.path.join(out_dir, f"pairs-{len(levels)}-{n}.jsonl")
        cfg = PairBuilderConfig(data=data, image_root=image_root, out=out, strategies=("image_weakened",),
                                noise_steps=tuple(levels), batch_size=batch, num_workers=workers,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=not greedy, limit=n, progress=False, overwrite=True,
                                fsync=True)
        t0 = time.perf_counter()
        s = build_pairs(cfg, model, proc)
        wall = time.perf_counter() - t0
    finally:
        del model.generate
        pairs_mod.JsonlWriter.write_batch = orig_write
    return s, calls, wall, writes


def check_pixels(proc, data, image_root, device, n=8):
    """Our no-noise pixels == the processor's; our noised pixels == the reference op on the
    same Philox noise. Returns the max errors (raises if off)."""
    from PIL import Image

    from bpo_fast.data.images import ImageGeometry, load_image
    from bpo_fast.data.pairs import pixels_for_levels
    from bpo_fast.ops.noise import NoiseSchedule, diffusion_noise_reference, philox_normal_reference

    recs = [json.loads(x) for x in open(data)][:n]
    paths = [os.path.join(image_root, r["image"]) for r in recs]
    geom = ImageGeometry.from_processor(proc)
    ref = proc.image_processor(images=[Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    u8 = torch.stack([torch.from_numpy(load_image(p, geom)) for p in paths]).to(device)
    clean = pixels_for_levels(u8, [None], geom, layout="NHWC")[:, 0].cpu()
    err_clean = (clean - ref).abs().max().item()
    if err_clean > 1e-6:
        raise AssertionError(f"clean pixels differ from the processor's by {err_clean}")
    seed, step = 1234, 500
    noised = pixels_for_levels(u8, [step], geom, seed=seed, layout="NHWC")
    B, _, C, H, W = noised.shape
    eps = philox_normal_reference(seed, 0, B, C * H * W, device=device).view(B, 1, C, H, W)
    want = diffusion_noise_reference(u8.permute(0, 3, 1, 2), torch.full((B, 1), step, device=device),
                                     NoiseSchedule("sigmoid"), mean=geom.mean, std=geom.std, noise=eps)
    err_noise = (noised - want).abs().max().item()
    if err_noise > 2e-3:  # float rounding of the kernels' transcendental functions only
        raise AssertionError(f"noised pixels differ from the reference by {err_noise}")
    # the baseline's VCD schedule is the same sigmoid schedule
    sched = NoiseSchedule("sigmoid")
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    vcd = torch.sqrt(torch.cumprod(1 - betas, 0))
    err_sched = (vcd - sched.sqrt_alphas_cumprod).abs().max().item()
    if err_sched > 1e-5:
        raise AssertionError(f"VCD schedule differs from NoiseSchedule('sigmoid') by {err_sched}")
    return {"clean_max_abs_err": err_clean, "noise_max_abs_err": err_noise, "schedule_max_abs_err": err_sched}


def decode_cost_ms(data, image_root, proc, n=32):
    from bpo_fast.data.images import ImageGeometry, load_image

    geom = ImageGeometry.from_processor(proc)
    recs = [json.loads(x) for x in open(data)][:n]
    t0 = time.perf_counter()
    for r in recs:
        load_image(os.path.join(image_root, r["image"]), geom)
    return (time.perf_counter() - t0) / len(recs) * 1e3


def steady(calls, wall_end):
    """(interval, generate time, per-batch intervals) between the first generate start and the end."""
    if not calls:
        return None, 0.0, []
    start = calls[0][0]
    gen = sum(b - a for a, b in calls)
    starts = [a for a, _ in calls] + [wall_end]
    return wall_end - start, gen, [starts[i + 1] - starts[i] for i in range(len(calls))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few images; writes nothing")
    ap.add_argument("--debug-shape", action="store_true",
                    help="LLaVA-1.5 geometry with tiny widths (checks the big-model path on CPU)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8, help="timed batches for our pipeline")
    ap.add_argument("--baseline-n", type=int, default=32, help="images for the per-image baseline")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--step", type=int, default=500)
    ap.add_argument("--levels", default="200,500,800", help="the multi-level row (K levels per image)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--sample", action="store_true", help="sample (default greedy; equal work either way)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        args.batch, args.batches, args.baseline_n, args.new_tokens = 4, 2, 4, 4
        args.workers = min(args.workers, 2)
    dtype = torch.bfloat16 if cuda else torch.float32
    levels_multi = [int(x) for x in args.levels.split(",")]
    t_build = time.perf_counter()
    if args.smoke and not args.debug_shape:
        from bpo_fast.models.tiny import build_tiny_llava

        model, proc = build_tiny_llava(seed=0)
        model = model.to(device).eval()
        shape = "tiny"
    else:
        model, proc = build_llava15(device, dtype, debug=args.debug_shape)
        shape = "llava-1.5-7b-shape" if not args.debug_shape else "llava-1.5-debug"
    build_s = time.perf_counter() - t_build
    gen_kwargs = {"do_sample": args.sample, "use_cache": True, "pad_token_id": proc.tokenizer.pad_token_id}
    if args.sample:
        gen_kwargs.update(temperature=1.0, top_p=1.0, top_k=0)

    rows = []
    n_ours = args.batch * args.batches
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data, image_root = make_images(tmp, max(n_ours, args.baseline_n))
        print(f"model built in {build_s:.1f}s; {max(n_ours, args.baseline_n)} images in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        checks = check_pixels(proc, data, image_root, device)
        dec_ms = decode_cost_ms(data, image_root, proc)
        print("checks:", checks, f"decode {dec_ms:.2f} ms/image (1 thread)", flush=True)

        # warm-up (CUDA context, kernels, allocator): one small batch each way
        run_ours(model, proc, data, image_root, args.batch, [args.step], args.batch, args.new_tokens,
                 args.workers, not args.sample, tmp)
        run_per_image(model, proc, data, image_root, 2, args.step, args.new_tokens, device, dtype, gen_kwargs)

        common = {"B": args.batch, "new_tokens": args.new_tokens, "model": shape, "dtype": str(dtype),
                  "workers": args.workers, "greedy": not args.sample}
        for levels in ([args.step], levels_multi):
            s, calls, wall, writes = run_ours(model, proc, data, image_root, n_ours, levels, args.batch,
                                      args.new_tokens, args.workers, not args.sample, tmp)
            rows_per_batch = args.batch * len(levels)
            pairs = s.total_written
            assert s.generated_tokens == n_ours * len(levels) * args.new_tokens, \
                f"unequal work: {s.generated_tokens} tokens"
            end = writes[-1]  # the last batch written: worker shutdown is not steady state
            span, gen, per_batch = steady(calls, end)
            non_gen = 1 - gen / span if span else None
            per_batch_ms = sorted(x * 1e3 for x in per_batch)
            q = lambda p: per_batch_ms[min(len(per_batch_ms) - 1, int(p * len(per_batch_ms)))]  # noqa: E731
            rows.append(row(
                f"image_weakened B={args.batch} K={len(levels)} new_tokens={args.new_tokens} {shape}",
                "bpo_fast", median_ms=statistics.median(per_batch_ms), p20_ms=q(0.2), p80_ms=q(0.8),
                params=dict(common, K=len(levels), levels=levels, rows_per_generate=rows_per_batch,
                            images=n_ours),
                pass_="fwd",
                unit="ms per batch of B images (B*K pairs)",
                pairs_per_s=pairs / wall, pairs_per_s_steady=n_ours * len(levels) / span,
                gen_tokens_per_s=s.generated_tokens / gen,
                split_s={"decode_wait": s.timings["decode_wait_s"], "noise": s.timings["noise_s"],
                         "generate": s.timings["generate_s"], "write": s.timings["write_s"],
                         "wall": wall, "steady_span": span},
                non_generation_frac=non_gen, target_non_generation_frac=0.05,
                decode_cpu_ms_per_image=dec_ms, dropped=sum(s.dropped.values()), checks=checks))
            print_table(rows[-1:], cols=("case", "impl", "median_ms", "pairs_per_s", "non_generation_frac"))

        per_pair, split, ntok = run_per_image(model, proc, data, image_root, args.baseline_n, args.step,
                                              args.new_tokens, device, dtype, gen_kwargs)
        assert ntok == args.baseline_n * args.new_tokens, f"unequal work: {ntok} tokens"
        total = sum(per_pair)
        rows.append(row(
            f"image_weakened B={args.batch} K=1 new_tokens={args.new_tokens} {shape}", "per_image",
            median_ms=statistics.median(per_pair) * 1e3 * args.batch,
            p20_ms=sorted(per_pair)[int(0.2 * len(per_pair))] * 1e3 * args.batch,
            p80_ms=sorted(per_pair)[min(len(per_pair) - 1, int(0.8 * len(per_pair)))] * 1e3 * args.batch,
            params=dict(common, K=1, levels=[args.step], images=args.baseline_n), pass_="fwd",
            unit="ms per B images (B pairs), from the per-image median",
            pairs_per_s=len(per_pair) / total, gen_tokens_per_s=ntok / split["generate"],
            split_s=dict(split, wall=total), non_generation_frac=1 - split["generate"] / total,
            baseline="processor per PIL image + VCD add_diffusion_noise (schedule per call, CPU) + "
                     "one generate per image"))
        print_table(rows[-1:], cols=("case", "impl", "median_ms", "pairs_per_s", "non_generation_frac"))

    ours = rows[0]["pairs_per_s_steady"]
    base = rows[-1]["pairs_per_s"]
    print(f"\nimage_weakened K=1: bpo_fast {ours:.2f} pairs/s (steady) vs per_image {base:.2f} pairs/s "
          f"-> {ours / base:.1f}x; non-generation share {rows[0]['non_generation_frac']:.1%} "
          f"(target < 5%)")
    if args.smoke or args.no_write or not cuda:
        return 0
    cmd = "python bench/pairs.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    path = write_results("pairs", rows, ceilings={}, command=cmd.strip())
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
