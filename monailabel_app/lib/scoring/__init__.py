from .mc_dropout import EpistemicMCDropoutScoring

__all__ = ["EpistemicMCDropoutScoring"]
