"""One declaration per option: argparse, --help, --config files and the README derive from it."""

import dataclasses
import json
import os

import pytest

from bpo_fast.cli import build_parser, main
from bpo_fast.options import cli_fields
from bpo_fast.tools.readme_tables import command_options as _command_options, render_readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_option_tables_are_current():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    for cmd in _command_options():
        assert f"<!-- options:{cmd} -->" in text, f"README has no option table for {cmd}"
    assert render_readme(text) == text, "run: python -m bpo_fast.tools.readme_tables README.md"


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
    # each value by its declared type and range (these were tracebacks, some after the model
    # loaded)
    ("batch_size: true\n", "run.yaml", "batch_size: expected an integer, got True"),
    ("batch_size: 2.5\n", "run.yaml", "batch_size: expected an integer"),
    ("dtype: fp8\n", "run.yaml", "dtype: expected auto, fp32, bf16 or fp16"),
    ("device: tpu\n", "run.yaml", "device: expected cpu, cuda or cuda:N, got 'tpu'"),
    ("device: mps\n", "run.yaml", "device: 'mps' cannot be used"),
    ("packing: maybe\n", "run.yaml", "packing: expected auto, on or off"),
    ("adam_beta1: 1.0\n", "run.yaml", "adam_beta1: expected a number in [0, 1), got 1.0"),
    ("learning_rate: .nan\n", "run.yaml", "learning_rate: expected a finite number"),
    ('{"lr": "fast"}', "run.json", "lr: expected a number, got 'fast'"),
    ("progress: sometimes\n", "run.yaml", "progress: expected true or false"),
    ("max_length: 1\n", "run.yaml", "max_length: expected an integer >= 2"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, content, name, expect):
    p = tmp_path / name
    p.write_text(content)
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--config" in err and expect in err, err


def test_a_config_file_with_a_byte_that_is_not_utf8(tmp_path, capsys):
    p = tmp_path / "run.yaml"
    p.write_bytes(b"model: m\nbeta: 0.3\n# caf\xe9\n")    # Latin-1, at the very end
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not UTF-8 text (byte 24" in err, err


def test_config_values_are_parsed_by_their_declared_type(tmp_path):
    """PyYAML reads 1e-4 as a string (YAML 1.1 wants 1.0e-4): a float option parses it; yes/on/
    true are booleans; a negated flag's own name (no-progress, greedy) means what it says."""
    y = tmp_path / "run.yaml"
    y.write_text("model: m\ndata: d.jsonl\nimage_root: imgs\noutput: o\nlearning_rate: 1e-4\n"
                 "adam_eps: 1E-6\nbatch_size: '8'\nmax_steps: 1e3\nstrict: 'yes'\n"
                 "no-progress: true\npacking: off\n")
    c = _train_args(tmp_path, "--config", str(y))
    assert c.learning_rate == 1e-4 and c.adam_eps == 1e-6 and c.batch_size == 8
    assert c.max_steps == 1000 and c.strict is True and c.progress is False
    assert c.packing is False
    from bpo_fast.data.cli_build import config_from_args

    b = tmp_path / "bp.yaml"
    b.write_text("data: d.jsonl\nout: o.jsonl\ngreedy: true\ntop_p: '0.9'\n")
    cfg = config_from_args(build_parser("build-pairs").parse_args(["build-pairs", "--config",
                                                                  str(b)]))
    assert cfg.do_sample is False and cfg.top_p == 0.9


def test_the_python_api_checks_values_the_same_way():
    from bpo_fast.errors import UserError
    from bpo_fast.train import TrainConfig

    base = dict(model="m", data="d", image_root="i", output="o")
    with pytest.raises(UserError, match=r"adam_beta1: expected a number in \[0, 1\), got 1.0"):
        TrainConfig(**base, adam_beta1=1.0)
    with pytest.raises(UserError, match="learning_rate: expected a finite number"):
        TrainConfig(**base, learning_rate=float("nan"))
    assert TrainConfig(**base, learning_rate="1e-4").learning_rate == 1e-4


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
