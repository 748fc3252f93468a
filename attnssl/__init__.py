"""attnssl: self-supervised learning of vision transformers built around self-attention."""

__version__ = "0.1.0"
