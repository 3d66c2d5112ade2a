"""The tolerance of every half-precision comparison against a Hugging Face forward.

A bf16 run cannot equal the fp32 forward; how far it may be is measured, not guessed: the
**noise floor** is how far HF's own forward in the same low precision lands from HF's fp32
forward on the same batch, ``floor = max over rows |HF_low - HF_fp32|``. Ours passes when every
row is within ``K * floor + ATOL`` of HF fp32, and each test also shows that an output that is
wrong (images dropped, as under transformers < 5.18) is *rejected* by the same tolerance: a
tolerance that accepts the wrong answer proves nothing.

Where it applies: the model-level GPU tests (``test_family_cuda_bf16_matches_hf_forward``,
``test_cuda_bf16_matches_naive_forward``), whose old ``rtol=2e-2, atol=0.5`` could not fail. The
kernel-level GPU tests (``test_linear*.py``, ``test_logprobs.py``, ``test_dpo.py``) compare with
an fp32 reference of the op on the *same* half-precision inputs, with no bf16 model in between:
their error is fp32 accumulation order (logits and log-probs within 1e-3) or the rounding of
their bf16 outputs (gradients within ~5 bf16 ulps), already far below a bf16 model's noise
floor, so they keep their tolerances.

Why these constants:

- ``K = 3``: ours runs the same bf16 decoder as HF (same weights, same kernels up to batching and
  padding), and its LM head accumulates in fp32 where HF rounds the logits to bf16, so its error
  is one more draw of the same noise. The floor is the batch maximum (never a lucky near-zero
  row). Measured on CPU bf16 over the 12 families of ``tests/test_vlm_families.py``
  (``test_noise_floor_rule_on_cpu_bf16``): ``max|ours - fp32| / floor`` was 0.67-1.18, so 3 leaves
  2.5x for a GPU's other kernels (cuBLAS algorithms, split-K, flash-attention); the images
  dropped moved the worst row 15.6x (PaliGemma) to 306x (PaliGemma 2) the floor, 0.08-3.16 nats,
  so the negative control is rejected with >= 5x to spare. (The old ``rtol=2e-2, atol=0.5``
  accepted the dropped images of every family but Gemma 3.)
- ``ATOL = 1e-3`` nats per row: room for fp32 reduction-order differences when the floor is
  ~0 (e.g. an fp32 comparison), far below any real error (a dropped image moves the worst row
  by >= 0.08 nats on the tiny models).
"""

K = 3.0
ATOL = 1e-3


def noise_floor(ref_low, ref32):
    """``max over rows |ref_low - ref32|``: how far the HF forward itself moves in low precision."""
    return float((ref_low.double() - ref32.double()).abs().max())


def tolerance(ref_low, ref32, k=K, atol=ATOL):
    return k * noise_floor(ref_low, ref32) + atol


def check_noise_floor(ours, ref32, ref_low, k=K, atol=ATOL):
    """``(ok, error, tolerance)``: ``ok`` when every row of ``ours`` is within ``k * floor + atol``
    of ``ref32``; ``error`` is the largest row gap."""
    err = float((ours.double().cpu() - ref32.double().cpu()).abs().max())
    tol = tolerance(ref_low.cpu(), ref32.cpu(), k, atol)
    return err <= tol, err, tol


def assert_noise_floor(ours, ref32, ref_low, *, wrong=None, what=""):
    """Assert ``ours`` passes the rule and, when given, that ``wrong`` (a negative control: the
    images removed, a perturbed weight) fails it."""
    ok, err, tol = check_noise_floor(ours, ref32, ref_low)
    floor = noise_floor(ref_low.cpu(), ref32.cpu())
    assert ok, (f"{what}: max |ours - HF fp32| = {err:.4g} > tolerance {tol:.4g} "
                f"({K:g} x noise floor {floor:.4g} + {ATOL:g})")
    if wrong is not None:
        bad, werr, _ = check_noise_floor(wrong, ref32, ref_low)
        assert not bad, (f"{what}: the negative control passes the tolerance (max gap "
                         f"{werr:.4g} <= {tol:.4g}): this comparison could not see the error")
