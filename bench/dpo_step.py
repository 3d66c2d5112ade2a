"""Benchmark: one whole DPO optimisation step on a LLaVA-1.5-shaped model.

    python bench/dpo_step.py --all      # GPU: both models, writes bench/results/dpo_step-<gpu>.json
    python bench/dpo_step.py --smoke    # CPU: the tiny LLaVA, 2 pairs x 96 tokens, writes nothing
    python bench/dpo_step.py --cpu-grid # CPU: small models of real shapes (CPU_SHAPES: LLaVA V 32000
                                        # with 512- / 2000-token rows, Qwen2-VL V 151936 with
                                        # 490-token rows; H 512, 4 layers, 2 pairs), full fine-tune
                                        # and LoRA r 16 -> bench/results/dpo_step-cpu.json

The real TRL rows need ``trl`` importable: ``pip install --no-deps -r bench/requirements-trl.txt``
(TRL 1.16 and its data libraries; torch is not touched). The Liger row needs ``liger_kernel``
importable: ``pip install --no-deps liger-kernel`` (measured with 0.8.5; its loss is plain PyTorch
+ ``torch.compile``, so it also runs on CPU).

Models (random weights from configs, bf16, nothing downloaded):
- ``llava-7b-lora``: CLIP ViT-L/14-336 vision tower (576 image tokens) + 2-layer GELU projector +
  a 7B-shaped Llama (H 4096, 32 layers, 32 heads, MLP 11008, V 32064), LoRA r=64 (alpha 128) on
  the LLM's q/k/v/o/gate/up/down projections; the reference is the same model with the adapters
  disabled (no second copy) for both implementations.
- ``llava-1b-full``: the same vision tower + a ~1.1B Llama (H 2048, 22 layers, 32 heads, 4 KV
  heads, MLP 5632, V 32064), the LLM fully fine-tuned (vision tower and projector frozen),
  fp32 master weights + bf16 autocast, AdamW; the reference is a separate frozen bf16 copy (and,
  for ours, also the cached-reference mode that holds no reference model at all).

Batch: 8 pairs x 1024 tokens (chosen rows 1024 tokens, rejected rows 832..1024, right-padded;
prompt = BOS + 576 image tokens + 40 text tokens, the rest is the response). Gradient
checkpointing is on for every implementation (a 7B step on 16 x 1024 tokens does not fit
without it); ``--no-gc`` turns it off.

One step = forward (policy and reference) + backward + AdamW step + zero_grad.

Rows:
- ``bpo_fast``: :class:`bpo_fast.PreferenceModel` (what ``bpo-fast train`` runs): each image
  encoded once per pair and shared with the reference, ``[chosen; rejected]`` through each model
  once, the LM head fused into the loss (:func:`bpo_fast.ops.preference.preference_loss`: no
  logits, 3 LM-head GEMMs per scored token). params.reference says which reference mode;
  params.attention says SDPA (padded) or flash-attention varlen (packed, when ``flash-attn`` is
  installed: the row that measures what packing saves).
- ``bpo_fast_composed`` (CPU grid): the same with the loss op on its composed path (forward,
  then a recomputing backward: 4 LM-head GEMMs per scored token): what the 3-GEMM path saves.
- ``trl``: TRL's own ``DPOTrainer`` (when ``trl`` is importable): its ``training_step`` (its
  ``_compute_loss``, fused LM head, reference handling, ``accelerator.backward``) and its AdamW,
  on the same model, batch and hyper-parameters; its step-1 loss and log-probs are checked
  against ours (params.check).
- ``trl+bpo_fast``: the same TRL ``training_step`` and AdamW of
  :class:`bpo_fast.integrations.trl.DPOTrainer` (TRL's loop, our step; its batches hold each
  pair's image inputs once, as its collator makes them): what a TRL user gets by changing one
  import.
- ``liger`` (when ``liger_kernel`` imports): Liger-Kernel's ``LigerFusedLinearDPOLoss`` (chunked
  fused LM head + DPO loss) in place of our loss op on our model path (images encoded once per
  pair, the same reference handling): the loss heads compared on the same hidden states; its
  step-1 loss is checked against the naive step's (params.check).
- ``naive_full_logits``: a hand-written naive full-logits step, labelled as such (the fallback
  when ``trl`` is not importable; on GPU also run beside it): ``[chosen; rejected]`` with the
  image duplicated per row (every image through the vision tower twice per model), full
  ``[2B, T, V]`` logits from ``model(...)``, ``selective_log_softmax`` (TRL's when importable,
  else the same per-row ``log_softmax`` + ``gather`` loop it uses for bf16), a separate reference
  forward. This is how TRL < 1.x computed DPO; TRL 1.16 itself has a fused LM head.

Each timed row first checks its policy/reference log-probs and loss against another
implementation on the same batch. tokens_per_s counts the non-pad tokens of the rows.
peak_mem_bytes: peak allocated during a step above what was allocated before it (weights,
optimiser state, batch); peak_total_bytes: the absolute peak (what must fit on the GPU). On CPU
(``--cpu-grid``) peak_rss_bytes is the peak RSS of a fresh process that builds the model and that
one implementation and runs two steps; the variants' steps are interleaved round-robin (the
machine is shared) and the medians and their ratios (``speedup_vs``) are what to compare.
"""

import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

BETA = 0.1


# ----------------------------------------------------------------------------------------------
# models and batch
# ----------------------------------------------------------------------------------------------

def llava_config(kind):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14,
                              projection_dim=768, hidden_act="quick_gelu")
    if kind == "7b":
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                           max_position_embeddings=4096, pad_token_id=0)
    elif kind == "1b":
        text = LlamaConfig(vocab_size=32064, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           max_position_embeddings=4096, pad_token_id=0)
    else:
        raise ValueError(kind)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000,
                      vision_feature_select_strategy="default", vision_feature_layer=-2,
                      projector_hidden_act="gelu")
    cfg.pad_token_id = 0
    return cfg


def build_model(cfg, device, dtype, seed, attn):
    from transformers import LlavaForConditionalGeneration

    cfg = copy.deepcopy(cfg)
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    cfg.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model


def make_batch(cfg, n_pairs, seq, n_img, prompt_text, device, seed, image_size, pixel_dtype):
    g = torch.Generator().manual_seed(seed)
    V = cfg.text_config.vocab_size
    img_id = cfg.image_token_id
    rows = 2 * n_pairs
    prompt = 1 + n_img + prompt_text
    lo, hi = (img_id + 1, V) if img_id < V // 2 else (10, img_id)  # never the image token
    ids = torch.randint(lo, hi, (rows, seq), generator=g)
    lengths = [seq] * n_pairs + torch.randint(int(seq * 0.8), seq + 1, (n_pairs,),
                                              generator=g).tolist()
    am = torch.zeros(rows, seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        am[i, :n] = 1
    # the same prompt (BOS, image tokens, text) in the chosen and rejected row of a pair
    for i in range(n_pairs):
        ids[n_pairs + i, :prompt] = ids[i, :prompt]
    ids[:, 0] = 1
    ids[:, 1:1 + n_img] = img_id
    ids[am == 0] = 0
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[am == 0] = -100
    pv = torch.randn(n_pairs, 3, image_size, image_size, generator=g).to(pixel_dtype)
    return {"input_ids": ids.to(device), "attention_mask": am.to(device),
            "labels": labels.to(device), "pixel_values": pv.to(device)}


def lora_config(r, model):
    from peft import LoraConfig

    from bpo_fast.models.preference import default_lora_targets

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none",
                      target_modules=default_lora_targets(model))


# ----------------------------------------------------------------------------------------------
# the TRL-style baseline
# ----------------------------------------------------------------------------------------------

def _selective_log_softmax():
    try:
        from trl.trainer.utils import selective_log_softmax

        return selective_log_softmax, "trl.selective_log_softmax"
    except Exception:
        pass

    def selective_log_softmax(logits, index):
        # TRL's implementation: logsumexp trick for fp32/fp64, a per-row loop for half types
        if logits.dtype in (torch.float32, torch.float64):
            sel = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
            lse = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])
            return sel - lse
        out = []
        for row_logits, row_labels in zip(logits, index):
            row_logps = torch.nn.functional.log_softmax(row_logits, dim=-1)
            out.append(row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
        return torch.stack(out)

    return selective_log_softmax, "trl-style PyTorch (trl not importable)"


def trl_style_logps(model, batch, sls):
    """DPOTrainer.concatenated_forward: the image repeated for both rows, full logits."""
    pv = torch.cat([batch["pixel_values"], batch["pixel_values"]])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=pv, use_cache=False).logits
    labels = batch["labels"][:, 1:].clone()
    logits = logits[:, :-1]
    mask = labels != -100
    labels[~mask] = 0
    per_token = sls(logits, labels)
    per_token = per_token.masked_fill(~mask, 0)
    return per_token.sum(-1).float()


def trl_style_loss(policy, reference, batch, sls, lora):
    from bpo_fast.ops.dpo import dpo_loss

    b = batch["input_ids"].shape[0] // 2
    lp = trl_style_logps(policy, batch, sls)
    with torch.no_grad():
        if lora:
            with policy.disable_adapter():
                ref = trl_style_logps(policy, batch, sls)
        else:
            ref = trl_style_logps(reference, batch, sls)
    out = dpo_loss(lp[:b], lp[b:], ref[:b], ref[b:], beta=BETA, loss_type="sigmoid")
    return out.loss, lp.detach(), ref


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------

def time_steps(step, warmup, reps):
    """(median, p20, p80) ms of ``step()`` and peak memory (above / total)."""
    for _ in range(warmup):
        step()
    common.sync()
    times = []
    cuda = torch.cuda.is_available()
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            import time

            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return statistics.median(times), q(0.2), q(0.8), (peak - base if cuda else None), peak


def _optimizer(params, device):
    params = [p for p in params if p.requires_grad]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=1e-7, **kw)


def _master_fp32(model):
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def run_case(name, cfg, *, lora_r, device, dtype, n_pairs, seq, warmup, reps, gc, smoke):
    from bpo_fast.models.preference import PreferenceModel, flash_attn_available, prepare_policy

    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    batch = make_batch(cfg, n_pairs, seq, n_img, min(40, seq // 8), device, seed=1,
                       image_size=cfg.vision_config.image_size, pixel_dtype=dtype)
    tokens = int(batch["attention_mask"].sum())
    sls, baseline_name = _selective_log_softmax()
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else None
    lora = lora_r > 0
    case = f"{name} pairs={n_pairs} T={seq} {str(dtype).replace('torch.', '')}"
    base_params = {"model": name, "pairs": n_pairs, "T": seq, "tokens": tokens,
                   "padded_tokens": 2 * n_pairs * seq,
                   "lora_r": lora_r, "gradient_checkpointing": gc}
    rows = []

    def make_policy(attn):
        m = build_model(cfg, device, dtype, seed=0, attn=attn)
        m = prepare_policy(m, lora=lora_config(lora_r, m) if lora else None,
                           gradient_checkpointing=gc)
        if not lora:
            _master_fp32(m)
        return m

    def ctx():
        import contextlib

        return autocast if autocast is not None else contextlib.nullcontext()

    # --- the baseline (and the reference numbers for the checks) ---------------------------
    policy = make_policy("sdpa")
    reference = None if lora else build_model(cfg, device, dtype, seed=0, attn="sdpa").eval()
    if reference is not None:
        reference.requires_grad_(False)
    _perturb(policy)
    with ctx():
        b_loss, b_lp, b_ref = trl_style_loss(policy, reference, batch, sls, lora)
    b_loss = b_loss.item()
    opt = _optimizer(policy.parameters(), device)

    def trl_step():
        with ctx():
            loss = trl_style_loss(policy, reference, batch, sls, lora)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    naive = {**base_params, "baseline": f"naive full-logits step ({baseline_name})",
             "reference": "lora-disabled" if lora else "model"}
    try:
        med, p20, p80, peak, total = time_steps(trl_step, warmup, reps)
        rows.append(common.row(case, "naive_full_logits", med, p20, p80, params=naive,
                               pass_="fwd+bwd", peak_mem_bytes=peak, peak_total_bytes=total,
                               tokens_per_s=tokens / (med * 1e-3)))
    except torch.cuda.OutOfMemoryError as exc:
        rows.append(common.row(case, "naive_full_logits", params=naive, pass_="fwd+bwd",
                               error=f"OOM: {exc}"[:300]))
    del opt
    # restore the policy to the state the checks were taken in: rebuild (timing changed weights)
    del policy
    _empty()

    # --- the real TRL DPOTrainer step (when trl is importable) ------------------------------
    if trl_available():
        from bpo_fast.integrations.trl import DPOTrainer as ours_in_trl

        for impl, cls in (("trl", None), ("trl+bpo_fast", ours_in_trl)):
            rows.append(_trl_row(case, base_params, cfg, make_policy, reference, batch, b_lp,
                                 b_loss, device, warmup, reps, tokens, gc, dtype, impl=impl,
                                 trainer_cls=cls))

    # --- Liger's fused-linear DPO loss on the same model path (when liger_kernel imports) ----
    if liger_available():
        rows.append(_liger_row(case, base_params, make_policy, reference, batch, b_lp, b_loss,
                               device, warmup, reps, tokens, ctx, lora))

    # --- ours ------------------------------------------------------------------------------
    variants = [("sdpa", False, "model" if not lora else "lora")]
    if flash_attn_available() and device.type == "cuda":
        variants.append(("flash_attention_2", True, "lora" if lora else "model"))
    if not lora:
        variants.append(("sdpa", False, "cached"))  # last: the reference model is freed first
    if not (flash_attn_available() and device.type == "cuda") and not smoke:
        rows.append(common.row(case, "bpo_fast", params={**base_params, "attention":
                               "flash_attention_2 (packed)"}, pass_="fwd+bwd",
                               error="flash-attn not installed (pip install bpo-fast[flash])"))
    for attn, packed, ref_mode in variants:
        if ref_mode == "cached" and reference is not None:
            reference = None  # the point of the cache: no reference model in memory
            _empty()
        policy = make_policy(attn)
        _perturb(policy)  # the same seeded perturbation as the baseline's policy
        pm = PreferenceModel(policy, reference if ref_mode == "model" else None,
                             reference_mode=ref_mode, beta=BETA, packing=packed)
        ref_kw = {}
        if ref_mode == "cached":
            b = n_pairs
            ref_kw = {"ref_chosen_logps": b_ref[:b].clone(), "ref_rejected_logps": b_ref[b:].clone()}
        opt = _optimizer(pm.parameters(), device)
        params = {**base_params, "reference": ref_mode, "attention":
                  f"{attn} ({'packed' if packed else 'padded'})",
                  "image_features_shared": pm.share_image_features}
        try:
            with ctx():
                out = pm(**batch, **ref_kw)
            check = _check(out, b_lp, b_ref, b_loss)
            params["check"] = check

            def our_step():
                with ctx():
                    loss = pm(**batch, **ref_kw).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            med, p20, p80, peak, total = time_steps(our_step, warmup, reps)
            rows.append(common.row(case, "bpo_fast", med, p20, p80, params=params,
                                   pass_="fwd+bwd", peak_mem_bytes=peak, peak_total_bytes=total,
                                   tokens_per_s=tokens / (med * 1e-3)))
        except torch.cuda.OutOfMemoryError as exc:
            rows.append(common.row(case, "bpo_fast", params=params, pass_="fwd+bwd",
                                   error=f"OOM: {exc}"[:300]))
        del pm, opt, policy
        _empty()
    return rows


def _trl_row(case, base_params, cfg, make_policy, reference, batch, b_lp, b_loss, device,
             warmup, reps, tokens, gc, dtype, impl="trl", trainer_cls=None):
    """TRL's DPOTrainer on the same (perturbed) policy, reference and batch; its step-1 loss and
    log-probs are checked against the naive step's (which ours are checked against too).
    ``trainer_cls``: bpo_fast.integrations.trl.DPOTrainer for the ``trl+bpo_fast`` row (TRL's
    loop, our step)."""
    from bpo_fast.models.tiny import TinyLlavaConfig, build_tiny_llava

    import trl

    image_size = cfg.vision_config.image_size
    processor = build_tiny_llava(config=TinyLlavaConfig(
        image_size=image_size, patch_size=cfg.vision_config.patch_size))[1]
    policy = make_policy("sdpa")
    _perturb(policy)
    lora = reference is None
    tb = dict(batch, completion_mask=(batch["labels"] != -100).long(),
              n_pairs=batch["input_ids"].shape[0] // 2)
    params = {**base_params, "baseline": f"trl {trl.__version__} DPOTrainer.training_step"
              + (" of bpo_fast.integrations.trl.DPOTrainer" if trainer_cls else ""),
              "reference": "lora-disabled" if lora else "model"}
    try:
        kw = dict(beta=BETA, lr=1e-7, image_size=image_size, device=device,
                  gradient_checkpointing=gc, bf16=dtype == torch.bfloat16,
                  trainer_cls=trainer_cls)
        if lora:
            # TRL's reference is "adapters disabled" only for an adapter it adds itself (given
            # a PeftModel it copies the adapter as the reference): hand it the base model and
            # the LoRA config, then load our (perturbed) adapter weights into its adapter
            src = {n: p for n, p in policy.named_parameters() if "lora_" in n}
            base = build_model(cfg, device, dtype, seed=0, attn="sdpa")
            t = TRLStep(base, None, processor, tb, peft_config=lora_config(
                base_params["lora_r"], base), **kw)
            with torch.no_grad():
                dst = {n: p for n, p in t.model.named_parameters() if n in src}
                if len(dst) != len(src):
                    raise RuntimeError(f"TRL's adapter has {len(dst)} of our {len(src)} LoRA "
                                       f"tensors")
                for n, p in dst.items():
                    p.copy_(src[n])
            del policy
        else:
            t = TRLStep(policy, reference, processor, tb, **kw)
        with torch.no_grad():
            loss = float(t.trainer.compute_loss(t.model, t.inputs))
        lp = t.logps()
        params["check"] = {"loss": loss, "naive_loss": b_loss,
                           "policy_logps_max_rel_err": float(
                               ((lp - b_lp).abs() / b_lp.abs().clamp_min(1.0)).max())}
        med, p20, p80, peak, total = time_steps(t.step, warmup, reps)
        row = common.row(case, impl, med, p20, p80, params=params, pass_="fwd+bwd",
                         peak_mem_bytes=peak, peak_total_bytes=total,
                         tokens_per_s=tokens / (med * 1e-3))
    except Exception as exc:  # a baseline that cannot run is a row with its error
        row = common.row(case, impl, params=params, pass_="fwd+bwd",
                         error=f"{type(exc).__name__}: {exc}"[:300])
    _empty()
    return row


def liger_available():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: F401
    except Exception:  # not installed, or its import needs what this machine lacks
        return False
    return True


def _liger_row(case, base_params, make_policy, reference, batch, b_lp, b_loss, device, warmup,
               reps, tokens, ctx, lora):
    """Liger-Kernel's ``LigerFusedLinearDPOLoss`` (``liger_kernel.chunked_loss``: chunked LM head
    + DPO loss, its own backward) in place of our loss op, on our model path (each image encoded
    once per pair, ``[chosen; rejected]`` through the policy once, the reference's hidden states
    under ``no_grad``): what Liger's loss head costs against ours on the same hidden states. The
    caller shifts (hidden ``[:, :-1]``, labels ``[:, 1:]``), as TRL's Liger path does. Liger
    compiles its chunk function with ``torch.compile`` on CUDA; on CPU it runs eagerly
    (``compiled=False``). Its step-1 loss is checked against the naive step's."""
    import liger_kernel
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    from bpo_fast.models.preference import PreferenceModel

    version = getattr(liger_kernel, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v

        version = _v("liger-kernel")
    params = {**base_params, "baseline": f"liger-kernel {version} LigerFusedLinearDPOLoss "
                                         "on bpo_fast's model path",
              "reference": "lora-disabled" if lora else "model"}
    try:
        policy = make_policy("sdpa")
        _perturb(policy)
        pm = PreferenceModel(policy, None if lora else reference,
                             reference_mode="lora" if lora else "model", beta=BETA, packing=False)
        loss_fn = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=True,
                                          compiled=device.type == "cuda")
        opt = _optimizer(pm.parameters(), device)
        image_kw = {k: v for k, v in batch.items()
                    if k not in ("input_ids", "attention_mask", "labels")}
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

        def hidden(model, features, grad):
            with torch.set_grad_enabled(grad):
                h = pm.hidden_states(model, ids, mask, features, labels, **image_kw)
                return pm._head(model, h)

        def liger_loss():
            feats = pm.encode(pm.policy, **image_kw)
            h, w, bias = hidden(pm.policy, feats, True)
            with torch.no_grad():
                if lora:
                    with pm.policy.disable_adapter():
                        rh, rw, rb = hidden(pm.policy, feats, False)
                else:
                    rh, rw, rb = hidden(pm.reference, feats, False)
            out = loss_fn(w, h[:, :-1], labels[:, 1:], bias, rh[:, :-1], rw, rb)
            return out[0] if isinstance(out, tuple) else out

        with ctx():
            loss = float(liger_loss().detach())
        params["check"] = {"loss": loss, "naive_loss": b_loss}
        if abs(loss - b_loss) > 2e-2:
            raise AssertionError(f"liger disagrees with the baseline: {params['check']}")

        def step():
            with ctx():
                out = liger_loss()
            out.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        med, p20, p80, peak, total = time_steps(step, warmup, reps)
        row = common.row(case, "liger", med, p20, p80, params=params, pass_="fwd+bwd",
                         peak_mem_bytes=peak, peak_total_bytes=total,
                         tokens_per_s=tokens / (med * 1e-3))
    except Exception as exc:  # a baseline that cannot run is a row with its error
        row = common.row(case, "liger", params=params, pass_="fwd+bwd",
                         error=f"{type(exc).__name__}: {exc}"[:300])
    _empty()
    return row


def _perturb(model, scale=1e-3):
    """A seeded perturbation of the trained weights (the LLM, or the LoRA B matrices, which start
    at zero), so that policy != reference (else every DPO loss is log 2 and the check proves
    little); the same draw for every implementation."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(1234)
    named = list(model.named_parameters())
    lora_b = [p for n, p in named if "lora_B" in n]
    params = lora_b or [p for n, p in named if "language_model" in n]
    scale = 1e-2 if lora_b else scale
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
                   .to(p.dtype) * scale)


def _check(out, b_lp, b_ref, b_loss):
    """Our log-probs / loss vs the baseline's on the same batch and weights.

    The baseline rounds logits to bf16 before its float32 log-softmax, we accumulate the LM head
    in float32: sums over ~400 tokens then differ by up to ~1e-2 relative in bf16."""
    ours = torch.cat([out.policy_chosen_logps, out.policy_rejected_logps]).detach().float()
    ref = torch.cat([out.ref_chosen_logps, out.ref_rejected_logps]).detach().float()
    pol_err = float(((ours - b_lp).abs() / b_lp.abs().clamp_min(1.0)).max())
    ref_err = float(((ref - b_ref).abs() / b_ref.abs().clamp_min(1.0)).max())
    res = {"policy_logps_max_rel_err": pol_err, "ref_logps_max_rel_err": ref_err,
           "loss": float(out.loss.detach()), "baseline_loss": b_loss}
    bad = ref_err > 2e-2 or pol_err > 2e-2 or abs(float(out.loss.detach()) - b_loss) > 2e-2
    if bad or not torch.isfinite(out.loss):
        raise AssertionError(f"bpo_fast disagrees with the baseline: {res}")
    return res


# ----------------------------------------------------------------------------------------------
# the real TRL DPOTrainer (when `trl` is importable: pip install --no-deps -r
# bench/requirements-trl.txt)
# ----------------------------------------------------------------------------------------------

def trl_available():
    try:
        import trl  # noqa: F401
        from trl import DPOConfig, DPOTrainer  # noqa: F401

        return True
    except Exception:
        return False


def _trl_dataset(image_size):
    """A one-record vision dataset: DPOTrainer needs one to be built (and to know it is a vision
    run); the step itself is fed our batch tensors, so both implementations see the same data."""
    import numpy as np
    from datasets import Dataset
    from PIL import Image

    rec = [{"images": [Image.fromarray(np.zeros((image_size, image_size, 3), np.uint8))],
            "prompt": "<image>\nx", "chosen": "x", "rejected": "x"}]
    try:
        return Dataset.from_list(rec)
    except Exception as exc:  # datasets 5.2 + dill cannot fingerprint this in-memory table here
        if "pickle" not in type(exc).__name__.lower() and "pickle" not in str(exc).lower():
            raise
        import uuid

        import datasets.arrow_dataset as ad

        ad.generate_fingerprint = lambda *a, **k: uuid.uuid4().hex  # caching only; not the step
        return Dataset.from_list(rec)


class TRLStep:
    """One optimiser step of TRL's own ``DPOTrainer`` (``training_step``: its ``_compute_loss``
    with its fused LM head and its reference handling, ``accelerator.backward``; then the
    trainer's AdamW ``step`` and ``zero_grad``), on a batch in TRL's layout: ``[chosen;
    rejected]`` rows, the image repeated per row, ``completion_mask``. The reference is
    ``ref_model`` (full fine-tune) or, with ``peft_config`` (TRL adds the adapter), the policy
    with its LoRA adapters disabled.

    ``trainer_cls``: another trainer class taking TRL's arguments, e.g.
    :class:`bpo_fast.integrations.trl.DPOTrainer` (TRL's loop with bpo-fast's step: its batches
    hold each pair's images once, ``images_once``)."""

    def __init__(self, policy, ref_model, processor, batch, *, beta, lr, image_size, device,
                 gradient_checkpointing=False, bf16=False, peft_config=None, trainer_cls=None):
        import tempfile

        from trl import DPOConfig, DPOTrainer

        trainer_cls = trainer_cls or DPOTrainer
        self.ours = trainer_cls is not DPOTrainer
        self.out_dir = tempfile.mkdtemp(prefix="trl-dpo-")
        args = DPOConfig(output_dir=self.out_dir, per_device_train_batch_size=batch["n_pairs"],
                         learning_rate=lr, weight_decay=0.0, beta=beta, loss_type=["sigmoid"],
                         report_to="none", use_cpu=device.type == "cpu", max_length=None,
                         save_strategy="no", logging_strategy="no", bf16=bf16, fp16=False,
                         gradient_checkpointing=gradient_checkpointing,
                         remove_unused_columns=False, seed=0)
        self.trainer = trainer_cls(model=policy, ref_model=ref_model, args=args,
                                   train_dataset=_trl_dataset(image_size),
                                   processing_class=processor, peft_config=peft_config)
        self.trainer.create_optimizer()
        # what Trainer's training loop sets before calling training_step (one micro-step)
        self.trainer.current_gradient_accumulation_steps = 1
        self.model = self.trainer.model
        self.model.train()
        twice = {} if self.ours else {k: torch.cat([v, v]) for k, v in _image_inputs(batch).items()}
        self.inputs = self.trainer._prepare_inputs(
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
             "completion_mask": batch["completion_mask"], **batch.get("row_kwargs", {}),
             **(_image_inputs(batch) if self.ours else twice)})

    def _model_kwargs(self):
        i = self.inputs
        labels = i["input_ids"].masked_fill(i["completion_mask"] == 0, -100)
        return {**{k: v for k, v in i.items() if k != "completion_mask"}, "labels": labels,
                "use_cache": False}

    def logps(self):
        """Policy log-probs ``[2B]`` from TRL's own fused LM head (or from our step)."""
        with torch.no_grad():
            if self.ours:
                out = self.model(**self._model_kwargs(), bpo_fast_step=True)
                return torch.cat([out["chosen_logps"], out["rejected_logps"]]).float()
            out = self.model(**self._model_kwargs(), fused_lm_head=True)
        return out.log_probs.sum(1).float()

    def step(self):
        loss = self.trainer.training_step(self.model, self.inputs)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss)


def _image_inputs(batch):
    """The pairs' image inputs of a grid batch (one per pair): ``pixel_values`` and the
    family's extras (Qwen2-VL: ``image_grid_thw``)."""
    return {"pixel_values": batch["pixel_values"], **batch.get("image_kwargs", {})}


# ----------------------------------------------------------------------------------------------
# the CPU grid: small models of the real shapes, every variant on the same data, interleaved
# ----------------------------------------------------------------------------------------------

# LLaVA-shaped (CLIP-style tower, Llama), 2 pairs of 512-token rows
CPU_GRID = dict(family="llava", image_size=112, patch_size=14, vision_hidden=256,
                vision_layers=2, vision_heads=4, hidden_size=512, intermediate_size=1376,
                num_layers=4, num_heads=8, num_kv_heads=8, vocab=32000, n_pairs=2, seq=512,
                lora_r=16, lr=1e-5)
CPU_SHAPES = {
    "llava-512": CPU_GRID,
    # Qwen2-VL's vocabulary (151,936) and tied embeddings (as Qwen2-VL-2B), GQA, a 224 px image
    # (256 patches of 14 px, 64 tokens after the 2 x 2 merge), 490-token rows
    "qwen2vl-490": dict(CPU_GRID, family="qwen2_vl", image_size=224, num_kv_heads=2,
                        vocab=151936, seq=490),
    # LLaVA with 2,000-token rows
    "llava-2000": dict(CPU_GRID, seq=2000),
}


def _shape(shape):
    return shape if isinstance(shape, dict) else CPU_SHAPES[shape]


def cpu_grid_model(g=CPU_GRID):
    g = _shape(g)
    if g["family"] == "qwen2_vl":
        return _qwen2vl_grid_model(g)
    from bpo_fast.models.tiny import TinyLlavaConfig, build_tiny_llava

    cfg = TinyLlavaConfig(image_size=g["image_size"], patch_size=g["patch_size"],
                          vision_hidden=g["vision_hidden"], vision_layers=g["vision_layers"],
                          vision_heads=g["vision_heads"], hidden_size=g["hidden_size"],
                          intermediate_size=g["intermediate_size"], num_layers=g["num_layers"],
                          num_heads=g["num_heads"], num_kv_heads=g["num_kv_heads"],
                          max_position_embeddings=2 * g["seq"])
    model, processor = build_tiny_llava(config=cfg, seed=0)
    model.resize_token_embeddings(g["vocab"], mean_resizing=False)  # a LLaVA-sized vocabulary
    return model, processor


def _qwen2vl_grid_model(g):
    """A Qwen2-VL of the grid's sizes (random weights), with the tiny Qwen2-VL build's
    processor (its token ids; the vocabulary is the grid's)."""
    import transformers as tr

    from bpo_fast.models.tiny_vlm import build_tiny_vlm

    _, processor = build_tiny_vlm("qwen2_vl")
    tok = processor.tokenizer
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    head = g["hidden_size"] // g["num_heads"]
    text = dict(vocab_size=g["vocab"], hidden_size=g["hidden_size"],
                intermediate_size=g["intermediate_size"], num_hidden_layers=g["num_layers"],
                num_attention_heads=g["num_heads"], num_key_value_heads=g["num_kv_heads"],
                max_position_embeddings=2 * g["seq"], tie_word_embeddings=True,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [head // 8, 3 * head // 16, 3 * head // 16]})
    vision = dict(depth=g["vision_layers"], embed_dim=g["vision_hidden"],
                  hidden_size=g["hidden_size"], num_heads=g["vision_heads"], mlp_ratio=2,
                  patch_size=g["patch_size"], spatial_merge_size=2, temporal_patch_size=2)
    cfg = tr.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                           **ids)
    torch.manual_seed(0)
    return tr.Qwen2VLForConditionalGeneration(cfg).float().eval(), processor


def cpu_grid_batch(model, processor, g=CPU_GRID, seed=1):
    """``n_pairs`` pairs of ``seq``-token rows in TRL's layout (prompt = BOS + image tokens +
    text, then the answer; rejected answers 80-100% as long, right-padded); ``labels`` =
    ``input_ids`` with everything outside ``completion_mask`` set to -100 (what TRL scores).
    Qwen2-VL: the image tokens sit between ``<|vision_start|>`` / ``<|vision_end|>``, the pixels
    are the flattened patches with ``image_grid_thw`` (``image_kwargs``), the rows carry the
    processor's ``mm_token_type_ids`` (``row_kwargs``)."""
    g = _shape(g)
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    qwen = g["family"] == "qwen2_vl"
    grid = g["image_size"] // g["patch_size"]
    n_img = grid * grid // 4 if qwen else grid * grid
    n_words = len(processor.tokenizer)
    img_id = cfg.image_token_id
    B, T = g["n_pairs"], g["seq"]
    start = 2 if qwen else 1  # BOS (+ <|vision_start|>)
    prompt = start + n_img + (1 if qwen else 0) + 24
    ids = torch.randint(5, n_words, (2 * B, T), generator=gen)
    ids[ids == img_id] = 5
    lengths = [T] * B + torch.randint(int(T * 0.8), T + 1, (B,), generator=gen).tolist()
    am = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        am[i, :n] = 1
    for i in range(B):
        ids[B + i, :prompt] = ids[i, :prompt]
    tok = processor.tokenizer
    ids[:, 0] = tok.bos_token_id if tok.bos_token_id is not None else tok.pad_token_id
    if qwen:
        ids[:, 1] = cfg.vision_start_token_id
        ids[:, start + n_img] = cfg.vision_end_token_id
    ids[:, start:start + n_img] = img_id
    ids[am == 0] = processor.tokenizer.pad_token_id
    completion = am.clone()
    completion[:, :prompt] = 0
    labels = ids.masked_fill(completion == 0, -100)
    out = {"input_ids": ids, "attention_mask": am, "labels": labels,
           "completion_mask": completion, "n_pairs": B}
    if qwen:
        t = 2  # temporal_patch_size: an image is its frame twice
        out["pixel_values"] = torch.randn(B * grid * grid, 3 * t * g["patch_size"] ** 2,
                                          generator=gen)
        out["image_kwargs"] = {"image_grid_thw": torch.tensor([[1, grid, grid]] * B)}
        out["row_kwargs"] = {"mm_token_type_ids": (ids == img_id).int()}
    else:
        out["pixel_values"] = torch.randn(B, 3, g["image_size"], g["image_size"], generator=gen)
    return out


def _composed(fn):
    """Run ``fn`` with PreferenceModel's loss op forced onto the composed path (forward, then a
    recomputing backward: 4 LM-head GEMMs per scored token instead of 3)."""
    import bpo_fast.ops.preference as P

    def wrapped(*a, **k):
        orig = P.preference_loss
        P.preference_loss = lambda *x, **y: orig(*x, **{**y, "grad_in_forward": False})
        try:
            return fn(*a, **k)
        finally:
            P.preference_loss = orig
    return wrapped


def cpu_grid_variant(name, mode, base, processor, batch, g=CPU_GRID):
    """(step() -> loss, first() -> (loss, policy logps [2B], ref logps [2B] or None)) of one
    implementation on its own copy of ``base``."""
    from bpo_fast.models.preference import PreferenceModel, prepare_policy

    g = _shape(g)
    lora = mode == "lora"
    policy = copy.deepcopy(base)
    lcfg = lora_config(g["lora_r"], policy) if lora else None
    ref = None if lora else copy.deepcopy(base).eval().requires_grad_(False)
    # the same adapter initialisation in every variant (TRL seeds 0 before get_peft_model); a
    # fresh adapter (lora_B = 0) starts at the reference, so only full fine-tuning is perturbed
    torch.manual_seed(0)
    if name in ("trl", "trl+bpo_fast"):
        if not lora:
            policy = prepare_policy(policy)  # vision tower frozen, as ours
            _perturb(policy)
        cls = None
        if name == "trl+bpo_fast":
            from bpo_fast.integrations.trl import DPOTrainer as cls
        t = TRLStep(policy, ref, processor, batch, beta=BETA, lr=g["lr"],
                    image_size=g["image_size"], device=torch.device("cpu"), peft_config=lcfg,
                    trainer_cls=cls)

        def first():
            with torch.no_grad():
                loss = float(t.trainer.compute_loss(t.model, t.inputs))
            return loss, t.logps(), None
        return t.step, first
    policy = prepare_policy(policy, lora=lcfg)
    if not lora:
        _perturb(policy)
    if name.startswith("bpo_fast"):
        pm = PreferenceModel(policy, ref, reference_mode="lora" if lora else "model",
                             beta=BETA, packing=False)
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=g["lr"],
                                weight_decay=0.0)
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        kw.update(_image_inputs(batch))

        def step():
            out = pm(**kw)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(out.loss.detach())

        def first():
            with torch.no_grad():
                out = pm(**kw)
            return (float(out.loss), torch.cat([out.policy_chosen_logps,
                                                out.policy_rejected_logps]).float(),
                    torch.cat([out.ref_chosen_logps, out.ref_rejected_logps]).float())

        if name == "bpo_fast_composed":
            step = _composed(step)
        return step, first
    if name == "naive_full_logits":
        if g["family"] != "llava":
            raise ValueError(f"naive_full_logits: written for LLaVA batches, not {g['family']}")
        sls, _ = _selective_log_softmax()
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=g["lr"],
                                weight_decay=0.0)

        def step():
            loss = trl_style_loss(policy, ref, batch, sls, lora)[0]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        def first():
            with torch.no_grad():
                loss, lp, r = trl_style_loss(policy, ref, batch, sls, lora)
            return float(loss), lp.float(), r.float()
        return step, first
    raise ValueError(name)


def _vm_hwm():
    """This process's peak RSS in bytes (VmHWM: per address space, so unlike ru_maxrss it does
    not carry the forking parent's peak across exec); ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_probe(name, mode, shape="llava-512", steps=2):
    """Peak RSS (bytes) of a fresh process that builds the model, one implementation, and runs
    ``steps`` steps: weights, optimiser state, reference and activations included."""
    import json
    import subprocess

    code = ("import sys, json; sys.path.insert(0, %r); import bench.dpo_step as D; "
            "import torch; torch.manual_seed(0); "
            "m, p = D.cpu_grid_model(%r); b = D.cpu_grid_batch(m, p, %r); "
            "s, f = D.cpu_grid_variant(%r, %r, m, p, b, %r); del m; "
            "[s() for _ in range(%d)]; "
            "print(json.dumps(D._vm_hwm()))"
            % (common.ROOT, shape, shape, name, mode, shape, steps))
    env = dict(os.environ)
    env["PYTHONPATH"] = common.ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=3600)
    if res.returncode != 0:
        return None, res.stderr[-500:]
    return json.loads(res.stdout.strip().splitlines()[-1]), None


def _grid_names(shape):
    """The variants of a grid shape: ours, ours on the composed loss path (the LLaVA 512 shape:
    what the 3-GEMM path saves), TRL's own step and TRL's loop with ours (when ``trl`` imports;
    else the naive full-logits step)."""
    names = ["bpo_fast"] + (["bpo_fast_composed"] if shape == "llava-512" else [])
    return names + (["trl", "trl+bpo_fast"] if trl_available() else ["naive_full_logits"])


def cpu_grid(reps=3, warmup=1, rss=True, modes=("full", "lora"), shapes=tuple(CPU_SHAPES),
             on_case=None):
    """Rows of the CPU grid, shape by shape and mode by mode; every variant's steps
    interleaved (round-robin, rotating order). ``on_case(rows)`` is called after each case with
    all rows so far (the caller writes them: a long run keeps what it measured)."""
    import time

    rows = []
    for shape in shapes:
        g = CPU_SHAPES[shape]
        names = _grid_names(shape)
        base, processor = cpu_grid_model(g)
        batch = cpu_grid_batch(base, processor, g)
        tokens = int(batch["attention_mask"].sum())
        scored = int((batch["labels"][:, 1:] != -100).sum())
        for mode in modes:
            case = (f"{g['family']}-shaped H{g['hidden_size']} L{g['num_layers']} "
                    f"V{g['vocab']} {mode} pairs={g['n_pairs']} T={g['seq']}")
            torch.manual_seed(0)
            variants = {n: cpu_grid_variant(n, mode, base, processor, batch, g) for n in names}
            firsts = {n: f() for n, (_, f) in variants.items()}
            ours = firsts["bpo_fast"]
            checks = {}
            for n, (loss, lp, ref) in firsts.items():
                checks[n] = {"step1_loss": loss,
                             "step1_loss_abs_diff": abs(loss - ours[0]),
                             "policy_logps": [round(float(x), 4) for x in lp],
                             "policy_logps_max_rel_diff": float(((lp - ours[1]).abs()
                                                                 / ours[1].abs()).max())}
                if ref is not None:
                    checks[n]["ref_logps_max_rel_diff"] = float(((ref - ours[2]).abs()
                                                                 / ours[2].abs()).max())
            times = {n: [] for n in names}
            cpu = {n: [] for n in names}  # CPU-s of the process (all threads): what a shared
            losses = {n: [] for n in names}  # machine's load moves least
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            for it in range(warmup + reps):
                order = names[it % len(names):] + names[:it % len(names)]
                for n in order:
                    t0, c0 = time.perf_counter(), time.process_time()
                    losses[n].append(variants[n][0]())
                    if it >= warmup:
                        times[n].append((time.perf_counter() - t0) * 1e3)
                        cpu[n].append(time.process_time() - c0)
            del variants
            _empty()
            med = {n: statistics.median(v) for n, v in times.items()}
            cmed = {n: statistics.median(v) for n, v in cpu.items()}
            for n in names:
                params = {"model": f"{g['family']}-shaped", "shape": shape, "mode": mode,
                          "lora_r": g["lora_r"] if mode == "lora" else 0, "tokens": tokens,
                          "scored_tokens": scored, "grid": g, "reps": reps, "warmup": warmup,
                          "order": "interleaved round-robin, rotating start",
                          "load_1min_at_start": load, "check": checks[n],
                          "times_ms": [round(x, 1) for x in times[n]],
                          "cpu_s": [round(x, 2) for x in cpu[n]],
                          "losses_per_step": [round(x, 7) for x in losses[n]],
                          "max_abs_loss_diff_vs_bpo_fast": max(
                              abs(a - b) for a, b in zip(losses[n], losses["bpo_fast"])),
                          "lm_head_gemms_per_scored_token": {
                              "bpo_fast": 3, "bpo_fast_composed": 4, "trl+bpo_fast": 3}.get(n)}
                if n == "naive_full_logits":
                    params["baseline"] = ("naive full-logits step (fallback: trl not "
                                          "importable): image per row, [2B, T, V] logits, "
                                          "selective_log_softmax")
                if n in ("trl", "trl+bpo_fast"):
                    import trl

                    params["baseline"] = f"trl {trl.__version__} DPOTrainer.training_step"
                    if n == "trl+bpo_fast":
                        params["baseline"] += (" of bpo_fast.integrations.trl.DPOTrainer (TRL's "
                                               "loop, bpo-fast's step)")
                peak, err = _rss_probe(n, mode, shape) if rss else (None, None)
                v = sorted(times[n])
                rows.append(common.row(case, n, med[n], v[0], v[-1], params=params, pass_="step",
                                       peak_rss_bytes=peak, tokens_per_s=tokens / (med[n] * 1e-3),
                                       speedup_vs={m: med[m] / med[n] for m in names if m != n},
                                       cpu_s_median=cmed[n], cpu_s_min=min(cpu[n]),
                                       cpu_s_max=max(cpu[n]),
                                       cpu_speedup_vs={m: cmed[m] / cmed[n] for m in names
                                                       if m != n},
                                       **({"error": err} if err else {})))
            if on_case is not None:
                on_case(rows)
        del base, batch
        _empty()
    return rows


def cpu_op_grid(reps=15, warmup=2):
    """The loss op alone on the CPU grid's shapes (LM head V 32000 x H 512, the grid's 2 x
    512-token pairs, RPO on): forward + backward of :func:`bpo_fast.ops.preference.
    preference_loss` on its 3-GEMM path vs its composed path, interleaved; trainable and
    frozen LM head (full fine-tune / LoRA)."""
    import time

    from bpo_fast.ops.preference import preference_loss

    g = CPU_GRID
    base, processor = cpu_grid_model()
    batch = cpu_grid_batch(base, processor)
    labels = batch["labels"]
    gen = torch.Generator().manual_seed(0)
    N, T = labels.shape
    hidden0 = torch.randn(N, T, g["hidden_size"], generator=gen)
    weight0 = torch.randn(g["vocab"], g["hidden_size"], generator=gen) * 0.02
    ref = torch.full((N // 2,), -4400.0)
    scored = int((labels[:, 1:] != -100).sum())
    rows = []
    for mode in ("full", "lora"):
        hidden = hidden0.clone().requires_grad_(True)
        weight = weight0.clone().requires_grad_(mode == "full")
        times = {True: [], False: []}
        for it in range(warmup + reps):
            for gif in ((True, False) if it % 2 == 0 else (False, True)):
                t0 = time.perf_counter()
                out = preference_loss(hidden, weight, labels, ref, ref, rpo_alpha=1.0,
                                      grad_in_forward=gif)
                out.loss.backward()
                if it >= warmup:
                    times[gif].append((time.perf_counter() - t0) * 1e3)
                hidden.grad = weight.grad = None
        med = {k: statistics.median(v) for k, v in times.items()}
        case = (f"preference_loss V{g['vocab']} H{g['hidden_size']} {mode} "
                f"scored_tokens={scored}")
        for gif, name in ((True, "bpo_fast"), (False, "bpo_fast_composed")):
            v = sorted(times[gif])
            rows.append(common.row(
                case, name, med[gif], v[len(v) // 5], v[(4 * len(v)) // 5], pass_="fwd+bwd",
                params={"mode": mode, "scored_tokens": scored, "reps": reps,
                        "order": "interleaved, alternating first", "rpo_alpha": 1.0,
                        "lm_head_gemms_per_scored_token": 3 if gif else 4},
                speedup_vs={"bpo_fast_composed" if gif else "bpo_fast":
                            med[not gif] / med[gif]}))
    return rows


def _empty():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="both models (GPU)")
    ap.add_argument("--case", choices=("7b-lora", "1b-full"), action="append")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, writes nothing")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-gc", action="store_true", help="no gradient checkpointing")
    ap.add_argument("--out", default=None, help="results path (default bench/results/...)")
    ap.add_argument("--cpu-grid", action="store_true",
                    help="CPU: the grid of small models of real shapes (CPU_SHAPES: LLaVA V 32000 "
                         "with 512- and 2000-token rows, Qwen2-VL V 151936 with 490-token rows; "
                         "H 512, 4 layers, 2 pairs; full fine-tune and LoRA r 16), writes "
                         "bench/results/dpo_step-cpu.json")
    ap.add_argument("--shapes", nargs="+", choices=tuple(CPU_SHAPES), default=tuple(CPU_SHAPES),
                    help="--cpu-grid: these shapes only")
    ap.add_argument("--no-rss", action="store_true", help="--cpu-grid without the peak-RSS probes")
    ap.add_argument("--cpu-op", action="store_true",
                    help="CPU: the loss op alone on the grid's shapes, 3-GEMM vs composed path; "
                         "writes bench/results/dpo_step_op-cpu.json")
    args = ap.parse_args(argv)

    if args.cpu_op or args.cpu_grid:
        bench = "dpo_step_op" if args.cpu_op else "dpo_step"
        path = args.out or os.path.join(common.RESULTS, f"{bench}-cpu.json")
        load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None

        def write(rows):
            end = [round(x, 2) for x in os.getloadavg()] if load is not None else None
            note = (f"CPU, {os.cpu_count()} cores shared with other jobs (load average 1/5/15 "
                    f"min at the start {load}, at this write {end}): variants interleaved, "
                    "medians; compare ratios, not times")
            return common.write_results(bench, rows, {"note": note, "load_start": load,
                                                      "load_end": end}, path=path)

        if args.cpu_op:
            rows = cpu_op_grid(reps=args.reps)
            cols = ("case", "impl", "median_ms", "p20_ms", "p80_ms")
        else:
            rows = cpu_grid(reps=args.reps, warmup=1, rss=not args.no_rss, shapes=args.shapes,
                            on_case=write)
            cols = ("case", "impl", "median_ms", "peak_rss_bytes", "error")
        common.print_table(rows, cols=cols)
        for r in rows:
            print(r["impl"], r["speedup_vs"], r["params"].get("check", ""))
        print("wrote", write(rows))
        return 0

    if args.smoke:
        from bpo_fast.models.tiny import TinyLlavaConfig, build_tiny_llava

        tiny_cfg = build_tiny_llava(config=TinyLlavaConfig())[0].config
        rows = []
        for name, lora_r in (("tiny-lora", 4), ("tiny-full", 0)):
            rows += run_case(name, tiny_cfg, lora_r=lora_r, device=torch.device("cpu"),
                             dtype=torch.float32, n_pairs=2, seq=96, warmup=1, reps=2,
                             gc=not args.no_gc, smoke=True)
        common.print_table(rows, cols=("case", "impl", "median_ms", "tokens_per_s", "error"))
        for r in rows:
            print(r["impl"], r["params"].get("reference"), r["params"].get("check"))
        return 0

    if not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    cases = args.case or (["7b-lora", "1b-full"] if args.all else ["1b-full"])
    rows = []
    for c in cases:
        kind, mode = c.split("-")
        cfg = llava_config(kind)
        rows += run_case(f"llava-{c}", cfg, lora_r=64 if mode == "lora" else 0, device=device,
                         dtype=torch.bfloat16, n_pairs=args.pairs, seq=args.seq,
                         warmup=args.warmup, reps=args.reps, gc=not args.no_gc, smoke=False)
        _empty()
    common.print_table(rows, cols=("case", "impl", "median_ms", "tokens_per_s",
                                   "peak_total_bytes", "error"))
    ceilings = {"bf16_tflops": common.bf16_tflops()}
    path = common.write_results("dpo_step", rows, ceilings, path=args.out)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
