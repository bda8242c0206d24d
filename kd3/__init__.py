"""kd3: data-free knowledge distillation from web images (KD³ and related methods)."""

__version__ = "0.1.0"
