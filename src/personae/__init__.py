"""personae: multimodal role-playing models."""

__version__ = "0.1.0"
