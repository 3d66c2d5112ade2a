"""What the commands print: each thing once, and no library warning a default setting causes."""

import logging
import warnings

from bpo_fast import runtime


def test_default_workers_never_exceed_the_cpus_this_process_may_use(monkeypatch, tmp_path):
    from bpo_fast.data.pair_builder import PairBuilderConfig, _validate_config

    monkeypatch.setattr(runtime, "_affinity", lambda: [0, 1])
    assert runtime.default_num_workers() == 2
    monkeypatch.setattr(runtime, "_affinity", lambda: list(range(64)))
    assert runtime.default_num_workers() == 4
    monkeypatch.setattr(runtime, "_affinity", lambda: [3])
    data = tmp_path / "d.jsonl"
    data.write_text("")
    cfg = _validate_config(PairBuilderConfig(data=str(data), out=str(tmp_path / "o.jsonl")))
    assert cfg.num_workers == 1
    # more than the CPUs allowed is clamped (10000 workers would fork 10000 processes)
    assert _validate_config(PairBuilderConfig(data=str(data), out=str(tmp_path / "o.jsonl"),
                                              num_workers=3)).num_workers == 1
    monkeypatch.setattr(runtime, "_affinity", lambda: [0, 1, 2, 3])
    assert _validate_config(PairBuilderConfig(data=str(data), out=str(tmp_path / "o.jsonl"),
                                              num_workers=3)).num_workers == 3


def test_build_pairs_default_workers_raise_no_dataloader_warning(tiny_llava_dir, tmp_path):
    from test_pairs import make_data

    from bpo_fast.data.pairs import PairBuilderConfig, build_pairs

    data, root = make_data(tmp_path, n=2, turns=1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build_pairs(PairBuilderConfig(model=tiny_llava_dir, data=data, image_root=root,
                                      out=str(tmp_path / "p.jsonl"), strategies=("image_weakened",),
                                      max_new_tokens=2, device="cpu", progress=False))
    assert not [w for w in seen if "worker" in str(w.message)], [str(w.message) for w in seen]


def test_train_logs_the_attention_choice_once(tiny_llava_dir, tmp_path, caplog):
    from bpo_fast.train import TrainConfig, train
    from bpo_fast.train.synthetic import make_pairs

    root = str(tmp_path / "pairs")
    data = make_pairs(root, n=4, seed=1)
    with caplog.at_level(logging.INFO, logger="bpo_fast"):
        train(TrainConfig(model=tiny_llava_dir, data=data, image_root=root,
                          output=str(tmp_path / "out"), batch_size=2, max_steps=1, device="cpu",
                          max_length=64, progress=False, reference="model"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention:")]
    assert len(lines) == 1, lines
