"""Model families with four connectivities each: "acn" (long connections), "residual", "ffn", "hybrid"."""
from .base import CONNECTIVITIES, DepthModel
from .gpt import GPT
from .mixer import Mixer
from .mlp import MLP
from .transformer import Encoder, ViT

__all__ = ["CONNECTIVITIES", "DepthModel", "Encoder", "GPT", "MLP", "Mixer", "ViT"]
