"""Fused ops, one per module: Triton kernels, launchers, the registered custom ops and their autograd
formula, the public function, and the bytes it moves (`traffic_bound`)."""
from .accumulate_norm import accumulate_norm
from .depth_cross_entropy import depth_cross_entropy
from .feed_forward import feed_forward
from .hybrid_accumulate_norm import hybrid_accumulate_norm
from .linear import linear
from .linear_act_accumulate import linear_act_accumulate
from .probe_norm import probe_norm

__all__ = ["accumulate_norm", "depth_cross_entropy", "feed_forward", "hybrid_accumulate_norm", "linear", "linear_act_accumulate", "probe_norm"]
