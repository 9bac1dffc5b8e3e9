"""One look for every plot of the experiments: a color per connectivity (so that acn against residual
reads at a glance), a line style per model, a marker per variant (truncated, shrinking, SI, naive)."""
from __future__ import annotations

from .._extras import require

COLORS = {"acn": "#1f77b4", "residual": "#d62728", "ffn": "#7f7f7f", "hybrid": "#2ca02c"}
LINE_STYLES = {"mlp": "-", "mixer": "--", "vit": ":", "gpt": "-."}
MARKERS = {"truncated": "v", "shrinking": "s", "naive": "x", "SI": "o"}


def style(label: str) -> dict:
    """matplotlib keywords for a line whose label names its connectivity, model and variant in words
    ("mlp acn truncated", "mixer L=5 SI residual", "acn")."""
    words = label.split()
    connectivity = next((w for w in words if w in COLORS), None)
    model = next((w for w in words if w in LINE_STYLES), None)
    marker = next((MARKERS[w] for w in words if w in MARKERS), "o")
    return dict(color=COLORS.get(connectivity, "black"), linestyle=LINE_STYLES.get(model, "-"), marker=marker,
                markersize=4 if marker != "o" else 3)


def pyplot(extra: str, what: str):
    """matplotlib.pyplot on the file-only Agg backend, or an ImportError naming the extra."""
    require("matplotlib", extra, what).use("Agg")
    import matplotlib.pyplot as plt
    return plt
