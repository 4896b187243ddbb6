"""Attention anchoring: configuration, the regrouping engine and the anchored model wrapper."""

from attanchor.anchoring.config import AnchorConfig
from attanchor.anchoring.model import AnchoredVLM
from attanchor.anchoring.regroup import Regrouped, regroup

__all__ = ["AnchorConfig", "AnchoredVLM", "Regrouped", "regroup"]
