"""One declaration per option: argparse, --help, --config files and the README derive from it."""

import dataclasses
import json
import os

import pytest

from bpo_fast.cli import build_parser, main
from bpo_fast.options import _command_options, cli_fields, render_readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_option_tables_are_current():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    for cmd in _command_options():
        assert f"<!-- options:{cmd} -->" in text, f"README has no option table for {cmd}"
    assert render_readme(text) == text, "run: python -m bpo_fast.options README.md"


@pytest.mark.parametrize("cmd", sorted(_command_options()))
def test_every_option_has_help_and_shows_its_default(cmd, capsys):
    cls = _command_options()[cmd]
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in cli_fields(cls):
        assert len(f.metadata["help"]) > 8, f.name
        if f.metadata.get("positional"):
            continue
        flag = "--" + (f.metadata.get("cli") or f.name.replace("_", "-"))
        assert flag in out, flag
    # the dataclass and the parser agree: every option parses into its field, and the help of
    # each one with a value shows its default
    sub = build_parser(cmd)._subparsers._group_actions[0].choices[cmd]
    actions = {a.dest: a for a in sub._actions}
    for f in cli_fields(cls):
        a = actions[f.name]
        if f.default not in (None, False, True, dataclasses.MISSING) and not \
                f.metadata.get("required"):
            assert "(default:" in a.help, f.name
        assert a.help is None or a.help.count("(default:") <= 1, (f.name, a.help)


def _train_args(tmp_path, *extra):
    from bpo_fast.train.cli import config_from_args

    args = build_parser("train").parse_args(["train", *extra])
    return config_from_args(args)


def test_config_file_json_and_yaml_with_command_line_overrides(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": "m", "data": "d.jsonl", "image-root": "imgs",
                               "output": "o", "learning_rate": 1e-4, "adam_beta2": 0.95,
                               "dtype": "bfloat16", "lora_r": 8}))
    c = _train_args(tmp_path, "--config", str(cfg), "--lr", "3e-5", "--adam-eps", "1e-6")
    assert c.learning_rate == 3e-5 and c.adam_beta2 == 0.95 and c.adam_eps == 1e-6
    assert c.dtype == "bf16" and c.lora_r == 8 and c.reference == "lora" and c.image_root == "imgs"
    y = tmp_path / "run.yaml"
    y.write_text("model: m\ndata: d.jsonl\nimage_root: imgs\noutput: o\nbeta: 0.3\n"
                 "loss_type: ipo\n")
    c = _train_args(tmp_path, "--config", str(y))
    assert c.beta == 0.3 and c.loss_type == "ipo"


@pytest.mark.parametrize("content,name,expect", [
    ('{"model": "m", "learning_rat": 1}', "run.json", "learning_rat"),
    ("model: [unclosed", "run.yaml", "YAML"),
    ('{"model": ', "run.json", "run.json:1"),
    ('[1, 2]', "run.json", "mapping"),
    ('{"loss_type": "nope"}', "run.json", "loss_type"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, content, name, expect):
    p = tmp_path / name
    p.write_text(content)
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--config" in err and expect in err, err


def test_missing_required_options_are_named(capsys):
    assert main(["train", "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "--image-root" in err and "--output" in err
    assert main(["build-pairs", "--out", "x.jsonl"]) == 2
    assert "--data" in capsys.readouterr().err


def test_train_config_from_dict_refuses_unknown_keys():
    from bpo_fast.train import TrainConfig

    base = dict(model="m", data="d", image_root="r", output="o")
    assert TrainConfig.from_dict(base).beta == 0.1
    with pytest.raises(ValueError, match="betta"):
        TrainConfig.from_dict({**base, "betta": 0.2})


def test_one_dtype_vocabulary():
    import torch

    from bpo_fast.data.pairs import PairBuilderConfig  # noqa: F401  (its options parse too)
    from bpo_fast.runtime import parse_dtype
    from bpo_fast.train import TrainConfig

    for name, canon in [("float32", "fp32"), ("bfloat16", "bf16"), ("fp16", "fp16"),
                        ("float16", "fp16"), ("auto", "auto")]:
        c = TrainConfig(model="m", data="d", image_root="r", output="o", dtype=name)
        assert c.dtype == canon
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("bf16") is torch.bfloat16
    a = build_parser("build-pairs").parse_args(["build-pairs", "--dtype", "float16"])
    assert a.dtype == "fp16"
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(model="m", data="d", image_root="r", output="o", dtype="fp8")
