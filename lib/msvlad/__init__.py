"""msvlad: multi-scale pooled NetVLAD trained with difficulty-based triplet mining."""

__version__ = "0.1.0"
