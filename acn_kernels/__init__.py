"""Fused Triton and CUDA kernels for Auto-Compressing Networks."""

from .versions import __version__  # noqa: E402
from .versions import unsupported as _unsupported  # noqa: E402

if (_why := _unsupported()) is not None:
    raise ImportError(_why)

from .convert import acnify  # noqa: E402
from .depth import Compression, ShrinkOnCompression, compress, early_exit_sweep, effective_depth  # noqa: E402
from .long_connections import LongConnections  # noqa: E402
from .models import CONNECTIVITIES, GPT, Encoder, MLP, Mixer, ViT  # noqa: E402
from .reference import ExitStatistics  # noqa: E402
from .speculative import SpeculativeStats, speculative_generate  # noqa: E402
from .training import EarlyExitLoss, GateAnnealing, LayerDropout, as_acn, early_exit_loss  # noqa: E402
from .ops import (accumulate_norm, depth_cross_entropy, feed_forward, hybrid_accumulate_norm, linear,  # noqa: E402
                  linear_act_accumulate, probe_norm)
import torch.distributed as _distributed  # noqa: E402

if _distributed.is_available():
    from . import parallel  # noqa: E402,F401  (the fused ops' DTensor sharding rules, registered on import)

__all__ = ["CONNECTIVITIES", "Compression", "EarlyExitLoss", "Encoder", "ExitStatistics", "GPT", "GateAnnealing", "LayerDropout",
           "LongConnections", "MLP", "Mixer", "ShrinkOnCompression", "SpeculativeStats", "ViT", "__version__",
           "accumulate_norm", "acnify", "as_acn", "compress", "depth_cross_entropy", "early_exit_loss",
           "early_exit_sweep", "effective_depth", "feed_forward", "hybrid_accumulate_norm", "linear",
           "linear_act_accumulate", "probe_norm", "speculative_generate"]
