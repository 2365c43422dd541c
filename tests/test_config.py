"""Config: recipes load, overrides apply, and every bad input is a one-line RloptError."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlopt_cli.config.recipes import from_dict, load_config, parse_override, to_dict, to_toml
from rlopt_cli.config.schema import RunConfig
from rlopt_cli.errors import RloptError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.toml"))


def test_recipes_exist() -> None:
    assert RECIPES, "recipes/ must hold at least one recipe"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_loads_and_round_trips(recipe: Path) -> None:
    text = recipe.read_text()
    assert text.startswith("#"), "a recipe is headed by the command that runs it"
    if "[grid" in text or "[sweep" in text:
        pytest.skip("sweep files are loaded by the sweep tests")
    cfg = load_config(recipe)
    assert from_dict(to_dict(cfg)) == cfg


def test_overrides_and_flags_take_precedence(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("# rlopt train -r r.toml\n[optimizer]\nname = 'adamw'\nlr = 1e-5\n[grpo]\nbeta = 0.1\n")
    cfg = load_config(recipe, ["grpo.beta=0.04", "optimizer.betas=[0.9, 0.95]"], {"optimizer.lr": 2e-5})
    assert cfg.grpo.beta == 0.04
    assert cfg.optimizer.betas == (0.9, 0.95)
    assert cfg.optimizer.lr == 2e-5
    assert cfg.run_name == "arithmetic__grpo__adamw__lr2e-05__s0"


def test_resolved_toml_round_trips() -> None:
    cfg = load_config(None, ["grpo.epsilon_high=0.28", "optimizer.momentum=0.9"])
    import tomllib

    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("grpo.beta=0.04", ("grpo.beta", 0.04)),
        ("train.device=cpu", ("train.device", "cpu")),
        ("log.wandb=true", ("log.wandb", True)),
        ("optimizer.betas=[0.9,0.95]", ("optimizer.betas", [0.9, 0.95])),
    ],
)
def test_parse_override(item: str, expected: tuple) -> None:
    assert parse_override(item) == expected


@pytest.mark.parametrize(
    ("overrides", "flags", "message"),
    [
        ([], {"optimizer.name": "adam"}, "unknown optimizer 'adam'; choose one of sgd, adamw, rmsprop"),
        ([], {"optimizer.lr": 0.0}, "optimizer.lr = 0.0 must be a positive number"),
        ([], {"optimizer.lr": -1.0}, "must be a positive number"),
        (["grpo.bta=0.1"], {}, "unknown config key 'grpo.bta'; did you mean: grpo.beta"),
        (["optimiser.lr=0.1"], {}, "did you mean: optimizer.lr"),
        (["grpo.batch_size=30"], {}, "grpo.batch_size = 30 is not divisible by grpo.num_generations = 8"),
        (["optimizer.betas=[0.9, 0.99]"], {}, "optimizer 'sgd' has no argument 'betas'"),
        (
            ["optimizer.name='adamw'", "optimizer.momentum=0.9"],
            {},
            "optimizer 'adamw' has no argument 'momentum'",
        ),
        (["optimizer.nesterov=true"], {}, "nesterov = true needs optimizer.momentum > 0"),
        (["grpo.loss_type='drgrpo'"], {}, "did you mean: dr_grpo"),
        (["train.steps=1.5"], {}, "train.steps must be an integer"),
        (["grpo.num_generations=1", "grpo.batch_size=4"], {}, "must be >= 2"),
        (["badformat"], {}, "must look like section.key=value"),
        (
            ["grpo.sampler_correction=token_truncate"],
            {},
            "set rollout.backend=vllm or grpo.sampler_correction=none",
        ),
        (["grpo.sampler_correction=tis"], {}, "grpo.sampler_correction"),
        (["grpo.sampler_correction_max=0.5"], {}, "must be > 1"),
    ],
)
def test_bad_config_is_one_line_error(overrides: list[str], flags: dict, message: str) -> None:
    with pytest.raises(RloptError) as err:
        load_config(None, overrides, flags)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_recipe(tmp_path: Path) -> None:
    with pytest.raises(RloptError, match="recipe not found"):
        load_config(tmp_path / "nope.toml")


def test_malformed_toml_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[optimizer]\nname = 'sgd'\nlr = = 0.1\n")
    with pytest.raises(RloptError, match=r"malformed TOML in .*line 3"):
        load_config(bad)


def test_unknown_section(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[optimiser]\nlr = 0.1\n")
    with pytest.raises(RloptError, match=r"unknown config section \[optimiser\].*did you mean: optimizer"):
        load_config(bad)


def test_defaults_are_valid_and_documented() -> None:
    import dataclasses
    import inspect

    cfg = RunConfig()
    for section in dataclasses.fields(cfg):
        source = inspect.getsource(type(getattr(cfg, section.name)))
        for f in dataclasses.fields(getattr(cfg, section.name)):
            # every field carries a docstring line right under it
            assert f"{f.name}:" in source and '"""' in source.split(f"{f.name}:", 1)[1].splitlines()[1], (
                f.name
            )
