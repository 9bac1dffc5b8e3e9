"""Model families with three connectivities each: "acn" (long connections), "residual", "ffn"."""
from .base import CONNECTIVITIES, DepthModel
from .mixer import Mixer
from .mlp import MLP
from .transformer import Encoder, ViT

__all__ = ["CONNECTIVITIES", "DepthModel", "Encoder", "MLP", "Mixer", "ViT"]
