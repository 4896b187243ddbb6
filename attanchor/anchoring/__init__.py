"""Attention anchoring: configuration, the regrouping engine and the anchored model wrapper."""

from attanchor.anchoring.config import SCOPES, STRATEGIES, AnchorConfig
from attanchor.anchoring.model import AnchoredVLM
from attanchor.anchoring.regroup import Regrouped, regroup

__all__ = ["SCOPES", "STRATEGIES", "AnchorConfig", "AnchoredVLM", "Regrouped", "regroup"]
