"""AnchorConfig: validation names the bad field, from_dict/to_dict round-trip, `active`.

Written from the issue's specification (issue 2) and METHOD.md, not from the implementation.
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from attanchor.anchoring import AnchorConfig

FIELDS = ["strategy", "threshold", "top_fraction", "max_anchors", "pause_tokens", "scope", "seed",
          "static_shape"]


def test_defaults_are_the_papers_method():
    cfg = AnchorConfig()
    assert cfg.strategy == "text_into_image"
    assert cfg.threshold == 0.12
    assert cfg.top_fraction is None
    assert cfg.max_anchors is None
    assert cfg.pause_tokens == 0
    assert cfg.scope == "image_turn"
    assert cfg.seed == 0
    assert [f.name for f in dataclasses.fields(AnchorConfig)] == FIELDS


@pytest.mark.parametrize(
    "strategy", ["none", "text_into_image", "image_into_text", "random", "append"]
)
def test_every_strategy_is_accepted(strategy):
    assert AnchorConfig(strategy=strategy).strategy == strategy


@pytest.mark.parametrize("scope", ["image_turn", "all_user_turns"])
def test_every_scope_is_accepted(scope):
    assert AnchorConfig(scope=scope).scope == scope


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"strategy": "text-into-image"}, "strategy"),
        ({"strategy": ""}, "strategy"),
        ({"strategy": "TEXT_INTO_IMAGE"}, "strategy"),
        ({"scope": "all"}, "scope"),
        ({"scope": "system"}, "scope"),
        ({"threshold": 2.5}, "threshold"),
        ({"threshold": -1.5}, "threshold"),
        ({"threshold": None, "top_fraction": 0.0}, "top_fraction"),
        ({"threshold": None, "top_fraction": -0.1}, "top_fraction"),
        ({"threshold": None, "top_fraction": 1.5}, "top_fraction"),
        ({"max_anchors": -1}, "max_anchors"),
        ({"max_anchors": 1.5}, "max_anchors"),
        ({"max_anchors": True}, "max_anchors"),
        ({"pause_tokens": -1}, "pause_tokens"),
        ({"pause_tokens": 1.5}, "pause_tokens"),
        ({"pause_tokens": True}, "pause_tokens"),
        ({"strategy": "text_into_image", "pause_tokens": 2}, "pause_tokens"),
        ({"strategy": "random", "pause_tokens": 1}, "pause_tokens"),
        ({"strategy": "append", "pause_tokens": 1}, "pause_tokens"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"static_shape": 1}, "static_shape"),
        ({"static_shape": True}, "max_anchors"),  # the static width needs the cap
    ],
)
def test_invalid_field_raises_value_error_naming_it(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AnchorConfig(**kwargs)


@pytest.mark.parametrize("strategy", ["text_into_image", "image_into_text", "random", "append"])
def test_exactly_one_of_threshold_and_top_fraction(strategy):
    with pytest.raises(ValueError) as both:
        AnchorConfig(strategy=strategy, threshold=0.1, top_fraction=0.1)
    with pytest.raises(ValueError) as neither:
        AnchorConfig(strategy=strategy, threshold=None, top_fraction=None)
    for err in (both, neither):
        assert "threshold" in str(err.value) and "top_fraction" in str(err.value)
    assert AnchorConfig(strategy=strategy, threshold=None, top_fraction=0.1).top_fraction == 0.1


def test_strategy_none_needs_no_selection_rule():
    cfg = AnchorConfig(strategy="none", threshold=None, top_fraction=None)
    assert cfg.threshold is None and cfg.top_fraction is None


def test_boundary_values_are_accepted():
    assert AnchorConfig(threshold=-1.0).threshold == -1.0
    assert AnchorConfig(threshold=1.0).threshold == 1.0
    assert AnchorConfig(threshold=1.5).threshold == 1.5  # > 1 means "no anchors", allowed
    assert AnchorConfig(threshold=None, top_fraction=1.0).top_fraction == 1.0
    assert AnchorConfig(max_anchors=0).max_anchors == 0
    assert AnchorConfig(strategy="image_into_text", pause_tokens=3).pause_tokens == 3
    assert AnchorConfig(seed=-7).seed == -7


def test_frozen():
    cfg = AnchorConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.threshold = 0.5  # type: ignore[misc]


CONFIGS = [
    AnchorConfig(),
    AnchorConfig(strategy="none", threshold=None),
    AnchorConfig(strategy="image_into_text", threshold=0.08, pause_tokens=4, seed=3),
    AnchorConfig(strategy="random", threshold=None, top_fraction=0.1, max_anchors=12, seed=11),
    AnchorConfig(strategy="append", threshold=0.3, scope="all_user_turns"),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_to_dict_from_dict_round_trip(cfg):
    d = cfg.to_dict()
    assert isinstance(d, dict)
    assert sorted(d) == sorted(FIELDS)
    assert AnchorConfig.from_dict(d) == cfg
    # A recipe is YAML: the dict must survive safe_dump/safe_load unchanged.
    assert AnchorConfig.from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg


def test_to_dict_values():
    cfg = AnchorConfig(strategy="random", threshold=None, top_fraction=0.25, max_anchors=5, seed=9)
    assert cfg.to_dict() == {
        "strategy": "random",
        "threshold": None,
        "top_fraction": 0.25,
        "max_anchors": 5,
        "pause_tokens": 0,
        "scope": "image_turn",
        "seed": 9,
        "static_shape": False,
    }


def test_from_dict_partial_fills_defaults():
    cfg = AnchorConfig.from_dict({"strategy": "append", "threshold": 0.2})
    assert cfg == AnchorConfig(strategy="append", threshold=0.2)


def test_from_dict_unknown_key_is_named():
    with pytest.raises(ValueError, match="tau"):
        AnchorConfig.from_dict({"strategy": "text_into_image", "tau": 0.12})


def test_from_dict_invalid_value_still_validated():
    with pytest.raises(ValueError, match="strategy"):
        AnchorConfig.from_dict({"strategy": "bogus"})


@pytest.mark.parametrize(
    ("cfg", "active"),
    [
        (AnchorConfig(strategy="none", threshold=None), False),
        (AnchorConfig(strategy="none"), False),
        (AnchorConfig(), True),
        (AnchorConfig(threshold=1.0), True),  # an exact match (cos = 1) still anchors
        (AnchorConfig(threshold=1.5), False),  # cosine never exceeds 1: nothing is inserted
        (AnchorConfig(strategy="random", threshold=1.01), False),
        (AnchorConfig(strategy="append", threshold=2.0), False),
        (AnchorConfig(strategy="image_into_text", threshold=1.5), False),
        # pause tokens lengthen the sequence even when no copy passes the threshold
        (AnchorConfig(strategy="image_into_text", threshold=1.5, pause_tokens=2), True),
        (AnchorConfig(threshold=None, top_fraction=0.1), True),
        (AnchorConfig(strategy="image_into_text", threshold=-1.0), True),
        # a cap of zero copies leaves the baseline sequence by construction
        (AnchorConfig(max_anchors=0), False),
        (AnchorConfig(strategy="image_into_text", max_anchors=0, pause_tokens=1), True),
    ],
)
def test_active(cfg, active):
    assert cfg.active is active
