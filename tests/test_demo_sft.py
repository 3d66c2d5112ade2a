"""The demo's supervised loop (bpo_fast.demo.sft): packing a record's turns into one row scores
every answer token exactly as its own sample does, and keeps the step count."""

import copy

import pytest
import torch

from bpo_fast.demo import sft as S
from bpo_fast.demo.world import WorldConfig, make_world, world_vocabulary
from bpo_fast.models.tiny import TinyLlavaConfig, build_tiny_llava


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    wc = WorldConfig()
    world = make_world(out, 12, 2, 0, wc)
    tiny = TinyLlavaConfig(image_size=64, patch_size=32, vision_hidden=32, hidden_size=32,
                           intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2,
                           vision_heads=2, vision_layers=1,
                           words=world_vocabulary(wc) + ["user", "assistant", ":"])
    model, processor = build_tiny_llava(None, tiny, seed=0)
    return world, model, processor, S._load_records(world.train)


def _nll(model, enc):
    ids, mask, labels, pix = enc.batch(list(range(len(enc))))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    lab = labels[:, 1:]
    keep = lab != -100
    return -lp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].sum().item(), \
        int(keep.sum())


def test_packed_rows_score_every_answer_as_its_own_sample(small):
    world, model, processor, records = small
    samples = S.sft_samples(records)
    plain = S._Encoded(processor, samples, world.images, pack=False)
    packed = S._Encoded(processor, samples, world.images, pack=True)
    assert len(plain) == len(samples) and len(packed) == len(records) < len(samples)
    assert sum(packed.answers) == packed.samples == len(samples)
    assert sum(map(len, packed.rows)) < sum(map(len, plain.rows))
    a, b = _nll(model, plain), _nll(model, packed)
    assert a[1] == b[1]                                   # the same answer tokens
    assert a[0] == pytest.approx(b[0], rel=1e-5)          # scored the same


def test_a_record_whose_turns_are_no_prefix_keeps_one_row_per_sample(small, monkeypatch):
    world, model, processor, records = small
    cls = type(S.PreferenceCollator(processor).adapter)
    real = cls.encode_pair

    def shifted(self, processor, template, messages, text, answers, image, tokenizer):
        p, a, im = real(self, processor, template, messages, text, answers, image, tokenizer)
        # a template that renders earlier turns differently once more turns follow
        return (p + [p[-1]] if len(messages) > 1 else p), a, im

    monkeypatch.setattr(cls, "encode_pair", shifted)
    enc = S._Encoded(processor, S.sft_samples(records[:2]), world.images, pack=True)
    assert len(enc) == enc.samples == 6 and enc.answers == [1] * 6


@pytest.mark.parametrize("pack", [True, False])
def test_sft_train_steps_do_not_depend_on_packing(small, pack):
    world, model, processor, records = small
    tiny_model = copy.deepcopy(model)
    losses = S.sft_train(tiny_model, processor, records, world.images, epochs=2, batch_size=14,
                         lr=1e-3, pack=pack)
    assert len(losses) == 2 * -(-3 * len(records) // 14)   # ceil(samples / batch) per epoch
    assert all(l == l for l in losses)


def test_epoch_batches_split_answers_evenly():
    enc = S._Encoded.__new__(S._Encoded)
    enc.answers = [3] * 1200
    groups = enc.epoch_batches(list(range(1200)), 113)
    assert len(groups) == 113 and {len(g) for g in groups} == {10, 11}
    assert sorted(i for g in groups for i in g) == list(range(1200))


def test_text_only_records_train_without_pixels(small):
    world, model, processor, records = small
    text = [{"id": f"t{i}", "conversations": [
        {**t, "value": t["value"].replace("<image>\n", "")} for t in r["conversations"]]}
        for i, r in enumerate(records)]
    enc = S._Encoded(processor, S.sft_samples(text), world.images, pack=True)
    assert enc.pixel_values is None and len(enc) == len(text)
    assert enc.batch([0, 1])[3] is None
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert all(int((r == image_token).sum()) == 0 for r in enc.rows)
    losses = S.sft_train(copy.deepcopy(model), processor, text, world.images, epochs=1,
                         batch_size=18, lr=1e-3)
    assert len(losses) == 2 and all(l == l for l in losses)
    with pytest.raises(ValueError, match="with and without an image"):
        S._Encoded(processor, S.sft_samples(text[:1] + records[:1]), world.images)
