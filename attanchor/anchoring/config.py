"""AnchorConfig: which tokens become attention anchors, and where their copies go.

The semantics are specified in ``docs/method.md``; every field is validated on construction
so a bad recipe fails before any model loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Arms that change only position ids (attanchor.anchoring.positions): no copies, no regroup.
POSITION_ONLY_STRATEGIES = ("compress_image_positions", "concentric_image_positions")
STRATEGIES = ("none", "text_into_image", "image_into_text", "random", "append",
              *POSITION_ONLY_STRATEGIES)
SCOPES = ("image_turn", "all_user_turns")


@dataclass(frozen=True)
class AnchorConfig:
    """How to regroup a LLaVA sequence.

    Args:
        strategy: ``none`` (the baseline sequence, untouched), ``text_into_image`` (the paper's
            Algorithm 1: prompt words copied after their best image patch), ``image_into_text``
            (the paper's variant: image tokens copied after their best prompt word), ``random``
            (control: as many copies as ``text_into_image`` would make, after random image
            tokens) or ``append`` (control: the same copies, all after the last image token);
            ``compress_image_positions`` / ``concentric_image_positions`` change only the
            image tokens' position ids (``attanchor.anchoring.positions``; the selection
            fields are then unused).
        threshold: keep a match when its cosine similarity is >= this value (the paper's tau).
        top_fraction: keep the ceil(rho * candidates) best matches of each row instead.
            Exactly one of ``threshold`` and ``top_fraction`` is set unless strategy is ``none``.
        max_anchors: per-row cap applied after the selection rule, keeping the highest scores.
        pause_tokens: K pause tokens before the answer (``image_into_text`` only, "think mode").
        scope: which user turns provide candidates: ``image_turn`` (the turn holding the image)
            or ``all_user_turns``. Read by the data pipeline when it builds candidate masks.
        seed: seed of the ``random`` control's placements.
        static_shape: the sync-free mode (``regroup.py``, "Static shape"): the output width is
            fixed by the input width and the config, L' = L + min(max_anchors, L) +
            pause_tokens, so the regroup reads nothing back to the host and compiles with
            ``torch.compile(fullgraph=True)``. Needs ``max_anchors`` (the cap: copies past it
            are dropped lowest-similarity first and counted in ``Regrouped.num_dropped``).
    """

    strategy: str = "text_into_image"
    threshold: float | None = 0.12
    top_fraction: float | None = None
    max_anchors: int | None = None
    pause_tokens: int = 0
    scope: str = "image_turn"
    seed: int = 0
    static_shape: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"AnchorConfig.strategy={self.strategy!r}: allowed are {STRATEGIES}")
        if self.scope not in SCOPES:
            raise ValueError(f"AnchorConfig.scope={self.scope!r}: allowed are {SCOPES}")
        if self.strategy != "none" and (self.threshold is None) == (self.top_fraction is None):
            raise ValueError(
                "AnchorConfig: set exactly one of threshold and top_fraction "
                f"(got threshold={self.threshold}, top_fraction={self.top_fraction}); "
                "e.g. threshold=0.12 (the paper) or threshold=None, top_fraction=0.1"
            )
        if self.threshold is not None and not -1.0 <= float(self.threshold) <= 2.0:
            # Cosine lives in [-1, 1]; values above 1 are allowed and mean "no anchors".
            raise ValueError(f"AnchorConfig.threshold={self.threshold}: must lie in [-1, 2]")
        if self.top_fraction is not None and not 0.0 < float(self.top_fraction) <= 1.0:
            raise ValueError(f"AnchorConfig.top_fraction={self.top_fraction}: must lie in (0, 1]")
        if self.max_anchors is not None and (
            isinstance(self.max_anchors, bool) or int(self.max_anchors) != self.max_anchors
            or self.max_anchors < 0
        ):
            raise ValueError(f"AnchorConfig.max_anchors={self.max_anchors}: must be an int >= 0")
        if isinstance(self.pause_tokens, bool) or int(self.pause_tokens) != self.pause_tokens \
                or self.pause_tokens < 0:
            raise ValueError(f"AnchorConfig.pause_tokens={self.pause_tokens}: must be an int >= 0")
        if self.pause_tokens and self.strategy != "image_into_text":
            raise ValueError(
                f"AnchorConfig.pause_tokens={self.pause_tokens}: pause tokens belong to "
                f"strategy 'image_into_text' (got {self.strategy!r}); set pause_tokens=0"
            )
        if isinstance(self.seed, bool) or int(self.seed) != self.seed:
            raise ValueError(f"AnchorConfig.seed={self.seed}: must be an int")
        if not isinstance(self.static_shape, bool):
            raise ValueError(f"AnchorConfig.static_shape={self.static_shape!r}: must be a bool")
        if self.static_shape and self.strategy != "none" and self.max_anchors is None:
            raise ValueError(
                "AnchorConfig.static_shape=True needs max_anchors (the per-row cap that fixes "
                "the output width L + max_anchors + pause_tokens); e.g. max_anchors=16"
            )

    @property
    def active(self) -> bool:
        """False when the regrouped sequence is the baseline sequence by construction."""
        if self.strategy == "none":
            return False
        if self.strategy in POSITION_ONLY_STRATEGIES:  # positions change; selection unused
            return True
        if self.pause_tokens > 0:
            return True
        if self.max_anchors == 0:
            return False
        return not (self.threshold is not None and self.threshold > 1.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnchorConfig:
        """Build from a mapping; an unknown key is an error naming the allowed keys."""
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"AnchorConfig: unknown key(s) {unknown}; allowed are {sorted(allowed)}")
        return cls(**data)
