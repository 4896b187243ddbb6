"""Shipped recipes: finding them, `attanchor recipes list | copy`, and `--config NAME`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from attanchor.cli import main as attanchor_main
from attanchor.train.recipe import (
    config_path,
    describe_recipe,
    expand_config_args,
    extends_chain,
    find_recipe,
    recipe_names,
    recipes_dir,
    resolve_recipe,
)
from attanchor.train.recipes_cmd import copy_recipe, list_recipes
from attanchor.train.recipes_cmd import main as recipes_main

ROOT = Path(__file__).resolve().parents[2]


def test_a_checkout_finds_its_top_level_recipes():
    # The test suite runs from a checkout (editable install): the source of truth is used.
    assert recipes_dir() == ROOT / "recipes"
    names = recipe_names()
    assert {"demo/anchored", "demo/baseline", "demo/pretrain", "tinyllava-1b/lora-anchored",
            "llava-1.5-7b/zero3-lora-anchored"} <= set(names)
    assert names == sorted(str(p.relative_to(ROOT / "recipes").with_suffix(""))
                           for p in (ROOT / "recipes").rglob("*.yaml"))
    assert find_recipe("demo/anchored") == ROOT / "recipes" / "demo" / "anchored.yaml"
    assert find_recipe("demo/anchored.yaml") == ROOT / "recipes" / "demo" / "anchored.yaml"


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match=r"'tinyllava-1b/lora-anchord' is neither a file nor a "
                       r"shipped recipe \(close names: tinyllava-1b/lora-anchored"):
        find_recipe("tinyllava-1b/lora-anchord")
    with pytest.raises(ValueError, match="neither a file nor a shipped recipe"):
        find_recipe("../pyproject")  # a name never leaves the recipes directory


def test_describe_uses_the_first_sentence_of_the_leading_comment(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("\n# Tiny run: two steps. Second sentence\n# goes on.\nextends: b.yaml\n")
    assert describe_recipe(a) == "Tiny run: two steps."
    b = tmp_path / "b.yaml"
    b.write_text("# one line that goes on\n# over two lines\nseed_everything: 0\n")
    assert describe_recipe(b) == "one line that goes on over two lines"
    assert describe_recipe(b, width=12) == "one line..."
    c = tmp_path / "c.yaml"
    c.write_text("extends: a.yaml\nmodel:\n  anchor: {strategy: none}\n# trailing comment\n")
    assert describe_recipe(c) == "extends a.yaml; anchor none"
    (tmp_path / "d.yaml").write_text("seed_everything: 0\n")
    assert describe_recipe(tmp_path / "d.yaml") == ""


def test_list_command_prints_names_and_descriptions(capsys):
    rows = dict(list_recipes())
    assert rows["demo/baseline"] == "extends base.yaml; anchor none"
    assert rows["tinyllava-1b/lora-anchored"] == "extends base.yaml; anchor text_into_image"
    # The comment's first sentence (84 characters) cut to 72: 69 characters + "...".
    assert rows["llava-1.5-7b/zero2-lora-anchored"] == \
        "DeepSpeed ZeRO-2 (optimizer state + gradients sharded) across all GPU..."
    assert attanchor_main(["recipes", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"recipes shipped in {ROOT / 'recipes'} ")
    assert len(out) == 1 + len(rows)
    line = next(x for x in out if x.split()[0] == "demo/baseline")
    assert line.split(None, 1)[1] == "extends base.yaml; anchor none"


def test_copy_takes_the_extends_chain_and_keeps_it_valid(tmp_path, capsys):
    name = "tinyllava-1b/qlora-baseline"
    targets = copy_recipe(name, tmp_path / "mine")
    assert [t.name for t in targets] == ["qlora-baseline.yaml", "qlora-anchored.yaml",
                                         "lora-anchored.yaml", "base.yaml"]
    assert all(t.parent == tmp_path / "mine" for t in targets)
    for target in targets:  # byte-for-byte copies, comments included
        assert target.read_bytes() == (ROOT / "recipes" / "tinyllava-1b" / target.name).read_bytes()
    # The copy resolves on its own, to what the shipped recipe resolves to.
    assert extends_chain(targets[0]) == [t.resolve() for t in targets]
    assert resolve_recipe(targets[0]) == resolve_recipe(find_recipe(name))

    # A second copy refuses, naming the clash, and writes nothing; --force overwrites.
    targets[-1].write_text("edited: true\n")
    assert recipes_main(["copy", name, str(tmp_path / "mine")]) == 1
    err = capsys.readouterr().err
    assert "would overwrite" in err and str(targets[-1]) in err and "--force" in err
    assert targets[-1].read_text() == "edited: true\n"
    assert recipes_main(["copy", name, str(tmp_path / "mine"), "--force"]) == 0
    assert "seed_everything" in targets[-1].read_text()
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"run it with: attanchor fit --config {targets[0]}"
    assert recipes_main(["copy", "demo/nope", str(tmp_path / "x")]) == 1
    assert "close names" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_copy_keeps_the_layout_of_a_chain_across_folders(tmp_path):
    root = tmp_path / "recipes"
    (root / "shared").mkdir(parents=True)
    (root / "fam").mkdir()
    (root / "shared" / "base.yaml").write_text("seed_everything: 3\ntrainer: {max_steps: 5}\n")
    (root / "fam" / "run.yaml").write_text(
        "extends: ../shared/base.yaml\ntrainer: {max_steps: 7}\n")
    targets = copy_recipe("fam/run", tmp_path / "out", root=root)
    assert targets == [tmp_path / "out" / "fam" / "run.yaml",
                       tmp_path / "out" / "shared" / "base.yaml"]
    assert resolve_recipe(targets[0]) == {"seed_everything": 3, "trainer": {"max_steps": 7}}


def test_config_accepts_a_shipped_name(tmp_path):
    shipped = resolve_recipe(ROOT / "recipes" / "demo" / "anchored.yaml")
    for argv in (["fit", "--config", "demo/anchored"], ["fit", "--config=demo/anchored.yaml"]):
        out = expand_config_args(argv)
        assert out[:2] == ["fit", "--config"] and yaml.safe_load(out[2]) == shipped
    assert resolve_recipe("demo/anchored") == shipped
    # A file of that name wins over the shipped recipe.
    local = tmp_path / "demo" / "anchored.yaml"
    local.parent.mkdir()
    local.write_text("seed_everything: 7\n")
    assert config_path(str(local)) == local
    # YAML strings and other existing files pass through to LightningCLI untouched.
    assert expand_config_args(["--config", "trainer: {max_steps: 3}"]) == \
        ["--config", "trainer: {max_steps: 3}"]
    other = tmp_path / "cfg.json"
    other.write_text("{}")
    assert expand_config_args(["--config", str(other)]) == ["--config", str(other)]
    with pytest.raises(ValueError, match="close names: demo/anchored"):
        expand_config_args(["fit", "--config", "demo/anchord"])


def test_validate_recipe_by_name():
    from attanchor.train.cli import validate_recipe

    cfg = validate_recipe("demo/baseline")
    assert cfg.model.anchor_config.strategy == "none"
