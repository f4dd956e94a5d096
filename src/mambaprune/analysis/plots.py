"""The paper's analysis figures as PNG files (DTP paper, Figures 3, 4, 5, and kept tokens over the image).

Every function writes one PNG and returns the numbers it drew, so a test (or a report) can check them.
Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, without pyplot: nothing
global (backend, current figure) is touched and no display is needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import LogNorm, Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from ..pruning.base import check_ratio, num_to_keep, topk_in_order
from .implicit_attention import LayerImplicitAttention

#: Fractions of the depth that bound the candidate layers of DTP (Section 4.2, Eq. 8-9).
EARLY_FRACTION = 0.25
LATE_FRACTION = 0.7
SCALES = ("linear", "log", "power")


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _as_vector(values, name: str) -> np.ndarray:
    x = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values")
    return x


# ---------------------------------------------------------------------------------------------- Figure 3
@dataclass
class StdCurvePlot:
    """What :func:`plot_std_curve` drew. Ranges are inclusive layer intervals."""

    std: np.ndarray
    early_layer: int
    late_layer: int
    early_range: tuple[int, int]
    late_range: tuple[int, int]


def plot_std_curve(std_per_layer, early_layer: int, late_layer: int, path, title: str | None = None) -> StdCurvePlot:
    """Figure 3: the layer-wise Std of the visual tokens' importance (Eq. 7), with the chosen layers marked.

    The shaded candidate ranges follow Eq. 8-9 for ``L = len(std_per_layer)`` layers: early candidates are
    layers ``0 .. int(0.25 L)`` (first 25%), the late range is ``int(0.7 L) .. L - 1`` (last 30%), the layers
    whose adjacent Std differences Eq. 9 compares. ``early_layer`` and ``late_layer`` are marked at those
    x positions of the curve as given (they need not lie in the ranges, e.g. a hand-chosen layer).
    """
    std = _as_vector(std_per_layer, "std_per_layer")
    L = std.size
    if L < 2:
        raise ValueError(f"std_per_layer needs at least 2 layers, got {L}")
    for name, layer in (("early_layer", early_layer), ("late_layer", late_layer)):
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < L:
            raise ValueError(f"{name} = {layer!r} is outside [0, {L - 1}] for a {L}-layer Std curve")
    early_range = (0, min(int(EARLY_FRACTION * L), L - 1))
    late_range = (int(LATE_FRACTION * L), L - 1)

    fig = Figure(figsize=(8, 4), dpi=100)
    ax = fig.add_subplot()
    ax.axvspan(early_range[0] - 0.5, early_range[1] + 0.5, color="tab:green", alpha=0.12,
               label=f"early candidates (first {EARLY_FRACTION:.0%})")
    ax.axvspan(late_range[0] - 0.5, late_range[1] + 0.5, color="tab:red", alpha=0.12,
               label=f"late candidates (last {1 - LATE_FRACTION:.0%})")
    ax.plot(np.arange(L), std, color="tab:blue", marker=".", label="Std of importance")
    for layer, color, name in ((early_layer, "tab:green", "early"), (late_layer, "tab:red", "late")):
        ax.axvline(layer, color=color, linestyle="--", linewidth=1)
        ax.plot([layer], [std[layer]], marker="o", markersize=8, color=color, linestyle="none",
                label=f"{name} layer = {int(layer)}")
    ax.set_xlabel("layer")
    ax.set_ylabel("Std of token importance")
    ax.set_xlim(-0.5, L - 0.5)
    ax.set_title(title or "Layer-wise standard deviation of token importance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return StdCurvePlot(std=std, early_layer=int(early_layer), late_layer=int(late_layer),
                        early_range=early_range, late_range=late_range)


# ---------------------------------------------------------------------------------------------- Figure 4
@dataclass
class TopTokens:
    """One panel of :func:`importance_scatter`: the scores, the top tokens (ascending indices), the threshold.

    ``threshold`` is the lowest score among the top tokens (None when none is highlighted).
    """

    scores: np.ndarray
    top_indices: np.ndarray
    threshold: float | None


def importance_scatter(importance_by_layer: dict, path, top_fraction: float = 0.5,
                       title: str | None = None) -> dict[int, TopTokens]:
    """Figure 4: per layer, the visual tokens' importance against their index, the top ones in red.

    ``importance_by_layer`` maps a layer to a 1-D tensor or array of visual-token scores. The top tokens are
    the ``round(top_fraction * n)`` highest (half rounds up; ties go to the earlier token), selected as the
    pruners select (:func:`~mambaprune.pruning.base.topk_in_order`), so a panel shows exactly what a top-k
    method with ``keep_ratio = top_fraction`` would keep from these scores.
    """
    if not isinstance(importance_by_layer, dict) or not importance_by_layer:
        raise ValueError("importance_by_layer must be a non-empty dict {layer: 1-D scores}")
    top_fraction = check_ratio(top_fraction, "top_fraction")
    result = {}
    for layer, values in importance_by_layer.items():
        scores = _as_vector(values, f"importance_by_layer[{layer!r}]")
        k = num_to_keep(scores.size, top_fraction)
        top = topk_in_order(torch.from_numpy(scores)[None], torch.ones(1, scores.size, dtype=torch.bool), k)[0]
        top_indices = torch.nonzero(top).flatten().numpy()
        threshold = float(scores[top_indices].min()) if top_indices.size else None
        result[layer] = TopTokens(scores=scores, top_indices=top_indices, threshold=threshold)

    n = len(result)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4 * ncols, 3 * nrows), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, (layer, panel) in zip(axes, result.items()):
        is_top = np.zeros(panel.scores.size, dtype=bool)
        is_top[panel.top_indices] = True
        idx = np.arange(panel.scores.size)
        ax.scatter(idx[~is_top], panel.scores[~is_top], s=6, color="tab:blue", label="others")
        ax.scatter(idx[is_top], panel.scores[is_top], s=6, color="tab:red", label=f"top {top_fraction:.0%}")
        if panel.threshold is not None:
            ax.axhline(panel.threshold, color="gray", linestyle=":", linewidth=1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("visual token")
        ax.set_ylabel("importance")
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    return result


# ---------------------------------------------------------------------------------------------- Figure 5
@dataclass
class ImplicitAttentionPlot:
    """What :func:`plot_implicit_attention` drew: per layer the (L, L) array shown (NaN above the diagonal;
    |K| for the log and power scales) and its colour range (vmin, vmax)."""

    scale: str
    drawn: dict[int, np.ndarray]
    color_range: dict[int, tuple[float, float]]


def plot_implicit_attention(maps: dict, path, visual_span=None, scale: str = "log", gamma: float = 0.5,
                            decades: float = 6.0, title: str | None = None) -> ImplicitAttentionPlot:
    """Figure 5: implicit attention heatmaps (Eq. 5) of chosen layers, side by side.

    Args:
        maps: ``{layer: (L, L) tensor or array}``, or ``{layer: LayerImplicitAttention}`` (then its visual
            span is used unless ``visual_span`` is given).
        visual_span: ``(start, end)`` rows/columns of the visual tokens (end exclusive), or a dict per
            layer; drawn as a box (the visual-visual block).
        scale: ``"linear"`` shows K itself (signed, colours symmetric about 0); ``"log"`` shows |K| on a log
            scale covering ``decades`` powers of ten below the panel's maximum (smaller values take the lowest
            colour); ``"power"`` shows |K| with a ``gamma`` power scale. Values span orders of magnitude,
            hence the log default.
    The upper triangle (t < j, exactly 0 by causality) is left blank. Each panel has its own colour scale.
    """
    if not isinstance(maps, dict) or not maps:
        raise ValueError("maps must be a non-empty dict {layer: (L, L) map}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not gamma > 0 or not decades > 0:
        raise ValueError(f"gamma and decades must be > 0, got gamma={gamma!r}, decades={decades!r}")
    panels = []
    for layer, value in maps.items():
        span = visual_span.get(layer) if isinstance(visual_span, dict) else visual_span
        if isinstance(value, LayerImplicitAttention):
            span = value.visual_span if visual_span is None else span
            value = value.map
        k = value.detach().cpu().double().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, float)
        if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] == 0:
            raise ValueError(f"maps[{layer!r}] must be a square (L, L) matrix, got shape {k.shape}")
        if span is not None:
            start, end = span
            if not 0 <= start < end <= k.shape[0]:
                raise ValueError(f"visual span {span!r} of layer {layer!r} is outside [0, {k.shape[0]}]")
        panels.append((layer, k, span))

    result = ImplicitAttentionPlot(scale=scale, drawn={}, color_range={})
    fig = Figure(figsize=(4.2 * len(panels), 4), dpi=100)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (layer, k, span) in zip(axes, panels):
        drawn = k if scale == "linear" else np.abs(k)
        drawn = np.where(np.triu(np.ones(k.shape, dtype=bool), 1), np.nan, drawn)
        peak = float(np.nanmax(np.abs(drawn)))
        if scale == "linear":
            bound = peak if peak > 0 else 1.0
            norm, cmap = Normalize(-bound, bound), "RdBu_r"
        elif scale == "log":
            top = peak if peak > 0 else 1.0
            norm, cmap = LogNorm(top * 10.0 ** (-decades), top, clip=True), "viridis"
        else:
            norm, cmap = PowerNorm(gamma, 0.0, peak if peak > 0 else 1.0), "viridis"
        image = ax.imshow(drawn, norm=norm, cmap=cmap, interpolation="nearest")
        if span is not None:
            start, end = span
            ax.add_patch(_box(start - 0.5, end - start))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("input token j")
        ax.set_ylabel("output token t")
        result.drawn[layer] = drawn
        result.color_range[layer] = (float(norm.vmin), float(norm.vmax))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    return result


def _box(corner: float, size: float) -> Rectangle:
    return Rectangle((corner, corner), size, size, fill=False, edgecolor="tab:orange", linewidth=1.2)


# ---------------------------------------------------------------------------------------------- kept tokens
def _as_image(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image must be a PIL image or an (H, W, 3) array, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise ValueError("a floating-point image must hold values in [0, 1]")
    return arr


def plot_kept_tokens(image, grid: tuple[int, int], kept_positions, path, title: str | None = None,
                     visual_offset: int = 0, dim: float = 0.25) -> np.ndarray:
    """The kept visual tokens over the input image; the patches of dropped tokens are dimmed.

    Visual token i is patch i of a ``grid = (rows, cols)`` tiling of the image in row-major order, and has
    original position ``visual_offset + i`` (the index of the first visual token in the input sequence).
    ``kept_positions`` are original positions, e.g. one sample's entry of
    :attr:`~mambaprune.analysis.hooks.KeptTokenRecorder.positions_by_layer`; every one must be a visual
    position. Pixel row y belongs to patch row ``floor(y * rows / H)`` (likewise for columns), so the
    patches cover the image exactly even when H or W is not a multiple of the grid.

    Returns the (rows, cols) bool keep map that was drawn.
    """
    img = _as_image(image)
    if len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1 for g in grid):
        raise ValueError(f"grid must be (rows, cols) of positive ints, got {grid!r}")
    rows, cols = int(grid[0]), int(grid[1])
    H, W = img.shape[:2]
    if rows > H or cols > W:
        raise ValueError(f"grid {grid} has more patches per side than the image has pixels ({H}x{W})")
    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim must lie in [0, 1], got {dim!r}")
    if isinstance(kept_positions, torch.Tensor):
        kept_positions = kept_positions.detach().cpu().numpy()
    pos = np.asarray(list(np.ravel(kept_positions)), dtype=np.int64)
    index = pos - visual_offset
    if index.size and (index.min() < 0 or index.max() >= rows * cols):
        raise ValueError(f"kept_positions must lie in the visual range [{visual_offset}, "
                         f"{visual_offset + rows * cols}) (visual_offset + patch index), got "
                         f"[{int(pos.min())}, {int(pos.max())}]")
    keep = np.zeros(rows * cols, dtype=bool)
    keep[index] = True
    keep = keep.reshape(rows, cols)

    pixel_rows = np.arange(H) * rows // H
    pixel_cols = np.arange(W) * cols // W
    kept_pixels = keep[pixel_rows[:, None], pixel_cols[None, :]]
    shown = np.where(kept_pixels[..., None], img, img * dim)

    fig = Figure(figsize=(5, 5 * H / W), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(shown, interpolation="nearest", extent=(0, W, H, 0))
    for r in range(1, rows):
        ax.axhline(r * H / rows, color="white", linewidth=0.3, alpha=0.5)
    for c in range(1, cols):
        ax.axvline(c * W / cols, color="white", linewidth=0.3, alpha=0.5)
    ax.set_axis_off()
    ax.set_title(title or f"kept visual tokens: {int(keep.sum())} / {rows * cols}")
    fig.tight_layout()
    _save(fig, path)
    return keep
