"""Recipes load into the typed tree; every bad value is one clear message and exit code 2."""

import re
from pathlib import Path

import pytest
import yaml

from addertrain import cli, config
from addertrain.errors import UserError
from conftest import cli as _cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(recipe):
    cfg = config.load(recipe)
    assert cfg.train.global_batch % cfg.train.micro_batch == 0


def test_imagenet_recipes_follow_the_paper():
    for name, arch in (("resnet50_imagenet", "resnet50"), ("resnet18_imagenet", "resnet18")):
        cfg = config.load(ROOT / "recipes" / f"{name}.yaml")
        assert (cfg.model.arch, cfg.model.conv, cfg.model.num_classes) == (arch, "adder", 1000)
        assert cfg.schedule.epochs == 150 and cfg.schedule.kind == "cosine"
        assert cfg.schedule.warmup_epochs == 0
        assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 1e-4)
        assert cfg.optim.nesterov  # NAG, as the paper says (the release's CIFAR script: plain)
        assert cfg.train.global_batch == 256
        # the paper's eta (the release hard-codes 0.2), the paper's backward rules
        assert (cfg.adder.lr, cfg.adder.eta) == ("alr", 0.1)
        assert (cfg.adder.grad, cfg.adder.input_grad) == ("full", "hardtanh")
        assert (cfg.data.image_size, cfg.data.eval_resize) == (224, 256)
        assert cfg.data.crop_scale == (0.08, 1.0) and cfg.data.flip


def test_overrides_are_typed_and_nested():
    cfg = config.from_dict(
        config.apply_overrides(
            {},
            [
                "optim.lr=0.05",
                "train.precision=bf16",
                "distributed.zero_stage=1",
                "data.crop_scale=[0.5, 1.0]",
                "optim.nesterov=true",
                "run.name=x",
            ],
        )
    )
    assert cfg.optim.lr == 0.05 and cfg.train.precision == "bf16"
    assert cfg.data.crop_scale == (0.5, 1.0) and cfg.optim.nesterov is True
    assert cfg.run.name == "x"


@pytest.mark.parametrize(
    "tree, expected",
    [
        ({"optim": {"lrr": 0.1}}, "unknown key optim.lrr; did you mean optim.lr?"),
        ({"optimm": {}}, "unknown key optimm; did you mean optim?"),
        ({"optim": {"lr": -1}}, "optim.lr: Input should be greater than 0"),
        (
            {"train": {"precision": "fp8"}},
            "train.precision: Input should be 'fp32', 'bf16' or 'fp16'",
        ),
        ({"data": {"image_size": "big"}}, "data.image_size: Input should be a valid integer"),
        (
            {"train": {"global_batch": 100, "micro_batch": 64}},
            "train.global_batch (100) must be a multiple of train.micro_batch (64)",
        ),
        (
            {"train": {"global_batch": 64, "micro_batch": 16}, "distributed": {"workers": 3}},
            "multiple of train.micro_batch x distributed.workers",
        ),
        ({"data": {"source": "folder"}}, "data.root must name the dataset folder"),
        ({"schedule": {"epochs": 2, "warmup_epochs": 3}}, "warmup_epochs must be shorter"),
        (
            {"distributed": {"elastic": True, "executor": "local"}},
            "distributed.elastic needs distributed.executor=ray",
        ),
        (
            {"distributed": {"elastic": True, "zero_stage": 1, "workers": 2}},
            "distributed.elastic needs distributed.zero_stage=0",
        ),
        (
            {"distributed": {"elastic": True, "min_workers": 3, "workers": 2}},
            "distributed.min_workers (3) is more than distributed.workers (2)",
        ),
        (
            {
                "train": {"global_batch": 64, "micro_batch": 16},
                "distributed": {"elastic": True, "workers": 4},
            },
            "does not over 3; raise distributed.min_workers",
        ),
    ],
)
def test_bad_values_name_the_key(tree, expected):
    with pytest.raises(UserError) as err:
        config.from_dict(tree)
    assert expected in str(err.value)


def test_bad_override_syntax():
    with pytest.raises(UserError, match="must look like key.path=value"):
        config.apply_overrides({}, ["optim.lr"])
    with pytest.raises(UserError, match="is a value, not a section"):
        config.apply_overrides({"run": {"name": "a"}}, ["run.name.x=1"])


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config.load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="must be a mapping"):
        config.load(bad)


@pytest.mark.parametrize(
    "tree, expected",
    [
        ({"optim": {"lr": float("inf")}}, "optim.lr: Input should be a finite number"),
        (
            {"schedule": {"epochs": float("nan")}},
            "schedule.epochs: Input should be a finite number",
        ),
        (
            {"data": {"crop_scale": [float("nan"), 1.0]}},
            "data.crop_scale: Input should be a finite number",
        ),
        ({"run": {"seed": -1}}, "run.seed: Input should be greater than or equal to 0"),
        ({"run": {"seed": 2**32}}, "run.seed: Input should be less than 4294967296"),
        ({"run": {"seed": True}}, "run.seed: Input should be a valid integer (got True)"),
        ({"train": {"global_batch": 32.0}}, "train.global_batch: Input should be a valid integer"),
        ({"run": {"deterministic": 1}}, "run.deterministic: Input should be a valid boolean"),
        ({"optim": {"lr": True}}, "optim.lr: Input should be a valid number"),
    ],
)
def test_non_finite_out_of_range_and_mistyped_values(tree, expected):
    with pytest.raises(UserError) as err:
        config.from_dict(tree)
    assert expected in str(err.value)


def test_ints_fill_float_keys_and_lists_fill_pairs():
    cfg = config.from_dict(
        config.apply_overrides({}, ["optim.lr=1", "run.seed=4294967295", "data.crop_scale=[1, 1]"])
    )
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.run.seed == 2**32 - 1 and cfg.data.crop_scale == (1.0, 1.0)
    assert config.Config.model_validate(cfg.to_dict()) == cfg  # what the workers receive


BAD_RECIPES = {
    "empty": (b"", "is empty"),
    "comments": (b"# only a comment\n", "is empty"),
    "null": (b"null\n", "is empty"),
    "duplicate": (
        b"optim:\n  lr: 0.1\n  lr: 0.2\n",
        "key 'lr' appears twice in one section (line 3)",
    ),
    "duplicate-section": (b"run: {seed: 1}\nrun: {seed: 2}\n", "key 'run' appears twice"),
    "latin-1": ("run: {name: caf\u00e9}\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9"),
}


@pytest.mark.parametrize("name", BAD_RECIPES)
def test_bad_recipe_files(tmp_path, name):
    content, expected = BAD_RECIPES[name]
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(expected)):
        config.load(path)


def test_a_directory_is_not_a_recipe(tmp_path):
    (tmp_path / "a.yaml").write_text("run: {}\n")
    with pytest.raises(UserError, match=r"is a directory; pass a YAML file from it \(a.yaml\)"):
        config.load(tmp_path)


def test_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("base: &b {lr: 0.3, momentum: 0.5}\noptim:\n  <<: *b\n  lr: 0.2\n")
    tree = yaml.load(path.read_text(), Loader=config._Loader)
    assert tree["optim"] == {"lr": 0.2, "momentum": 0.5}


def test_resolved_config_round_trips():
    cfg = config.load(ROOT / "recipes" / "digits.yaml", ["optim.lr=0.2"])
    again = config.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.digest(("model", "data")) == cfg.digest(("model", "data"))
    assert again.digest(("optim",)) != config.load(ROOT / "recipes" / "digits.yaml").digest(
        ("optim",)
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["launch", "recipes/digits.yaml", "optim.lrr=1"], "did you mean optim.lr?"),
        (["launch", "recipes/missing.yaml"], "does not exist"),
        (
            ["launch", "recipes/synthetic_tiny.yaml", "train.precision=fp16", "train.device=cpu"],
            "fp16 needs a CUDA device",
        ),
        (
            ["launch", "recipes/synthetic_tiny.yaml", "distributed.zero_stage=3"],
            "zero_stage=3 is not supported",
        ),
    ],
)
def test_cli_errors_exit_2_without_traceback(args, expected, tmp_path):
    out = _cli(*args, f"run.dir={tmp_path}")
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "case", [*BAD_RECIPES, "directory", "inf", "nan", "seed-negative", "seed-huge", "seed-bool"]
)
def test_bad_recipes_exit_2_through_the_cli(case, tmp_path):
    overrides = {
        "inf": ("optim.lr=.inf", "optim.lr: Input should be a finite number"),
        "nan": ("schedule.epochs=.nan", "schedule.epochs: Input should be a finite number"),
        "seed-negative": ("run.seed=-1", "run.seed: Input should be greater than or equal to 0"),
        "seed-huge": ("run.seed=1099511627776", "run.seed: Input should be less than 4294967296"),
        "seed-bool": ("run.seed=true", "run.seed: Input should be a valid integer"),
    }
    if case in overrides:
        override, expected = overrides[case]
        args = ["recipes/synthetic_tiny.yaml", override]
    elif case == "directory":
        args, expected = ["recipes"], "recipe recipes is a directory"
    else:
        content, expected = BAD_RECIPES[case]
        (tmp_path / "r.yaml").write_bytes(content)
        args = [str(tmp_path / "r.yaml")]
    out = _cli("launch", *args, f"run.dir={tmp_path}")
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("addertrain: error: ") and expected in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "synthetic-tiny").exists()  # stopped before anything was written


def test_help_for_every_command(capsys):
    out = _cli("--help")
    assert out.returncode == 0
    assert all(
        re.search(rf"^ +{group or name}\b", out.stdout, re.M) for group, name in cli.COMMANDS
    ), out.stdout
    for group, name in cli.COMMANDS:
        args = [name] if group is None else [group, name]
        with pytest.raises(SystemExit) as done:
            cli.main([*args, "--help"])
        assert done.value.code == 0, args
        assert capsys.readouterr().out.startswith("usage: addertrain " + " ".join(args) + " ")


def test_exponent_floats_are_numbers_in_recipes_and_overrides(tmp_path):
    # PyYAML (YAML 1.1) would read these as strings, which strict types then refuse
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {lr: 1e-3, weight_decay: 5e-4}\n")
    cfg = config.load(recipe, ["schedule.min_lr=1e-6"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule.min_lr) == (1e-3, 5e-4, 1e-6)
