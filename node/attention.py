"""Attention maps of the last transformer block (DESIGN §10): Local-FT against P2P-FT against central.

Extraction (timm 1.0.x): fused attention returns no weights, so it is turned off on the last block
only, for the duration of one forward pass, and restored; the attention probabilities are taken
from a forward hook on `attn.attn_drop` (ViT/DeiT, identity in eval mode) or `attn.softmax` (Swin).

- ViT/DeiT with a class token: the class token's row over the patch tokens (the first
  `num_prefix_tokens` keys, class/distillation/register tokens, are skipped), averaged over heads,
  renormalised to sum to 1 over the patches, reshaped to the patch grid.
- Swin, and ViTs that average-pool their tokens: the attention each patch token receives, averaged
  over heads and over the (real, unpadded) query tokens: what the average-pooled head sees. Windows
  are put back in place with timm's own `window_reverse`, padding cropped and the cyclic shift
  undone; renormalised to sum to 1 over the grid (mass on padding tokens is dropped).

With the last block the only trained one and a frozen trunk, every variant sees the same input at
the last block, so differences between maps come from fine-tuning alone (no rollout).

`attention_report` reads saved models (`node/saved_models.py`), picks test images, and writes one
PNG grid (a row per image, columns original / Local-FT / P2P-FT / central / others, one colour
scale per row) and optionally a JSON with every map and each algorithm's mean cosine similarity
to the central model's maps.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from timm.models.swin_transformer import SwinTransformer, window_partition, window_reverse
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .algorithms import label_of
from .errors import BadInput
from .saved_models import CENTRAL, SavedModel, build_saved_model, check_fits, load_saved_models

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .models import FineTuneModel

COLUMN_ORDER = ("local", "p2pft", "central")  # then any other algorithm, in the order given


# --- extraction ----------------------------------------------------------------------------------


@dataclass
class _Capture:
    kind: str  # "token" (class-token row), "received" (ViT without class token), "swin"
    prefix: int
    grid: tuple[int, int] | None
    block: nn.Module
    probs: list[torch.Tensor] = field(default_factory=list)
    inputs: list[tuple[int, ...]] = field(default_factory=list)  # Swin: the block's input shape per call

    def maps(self) -> torch.Tensor:
        """(B, H, W) maps of every forward pass made in the context, each summing to 1."""
        if not self.probs:
            raise RuntimeError("no attention was captured: was the model run inside the context?")
        if self.kind == "swin":
            return torch.cat([self._swin(p, s) for p, s in zip(self.probs, self.inputs, strict=True)])
        return torch.cat([self._vit(p) for p in self.probs])

    def _vit(self, probs: torch.Tensor) -> torch.Tensor:
        probs = probs.float()
        b, _, n, _ = probs.shape
        if self.kind == "token":
            m = probs[:, :, 0, self.prefix :].mean(1)
        else:  # average pooling over the patch tokens: attention received from the patch queries
            m = probs[:, :, self.prefix :, self.prefix :].mean(1).mean(1)
        gh, gw = self.grid if self.grid and self.grid[0] * self.grid[1] == n - self.prefix else _square(n - self.prefix)
        return _normalise(m).reshape(b, gh, gw)

    def _swin(self, probs: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        blk = self.block
        b, h, w = shape[0], shape[1], shape[2]
        ws, shift = tuple(blk.window_size), tuple(blk.shift_size)
        hp, wp = math.ceil(h / ws[0]) * ws[0], math.ceil(w / ws[1]) * ws[1]
        # which query positions of each window are real tokens (not padding)
        valid = torch.zeros(1, hp, wp, 1, dtype=probs.dtype, device=probs.device)
        valid[:, :h, :w] = 1
        valid_q = window_partition(valid, ws).reshape(-1, ws[0] * ws[1])  # (nW, N)
        windows = probs.shape[0] // b
        per_head = probs.float().mean(1)  # (B*nW, N, N): query x key
        q_mask = valid_q.float().repeat(b, 1)  # (B*nW, N)
        received = torch.einsum("wqk,wq->wk", per_head, q_mask) / (h * w)  # (B*nW, N)
        grid = window_reverse(received.reshape(b * windows, ws[0], ws[1], 1), ws, hp, wp)[:, :h, :w, 0]
        if any(shift):
            grid = torch.roll(grid, shifts=shift, dims=(1, 2))
        return _normalise(grid.reshape(b, -1)).reshape(b, h, w)


def _square(n: int) -> tuple[int, int]:
    side = round(math.sqrt(n))
    if side * side != n:
        raise BadInput(f"cannot lay {n} patch tokens out on a grid")
    return side, side


def _normalise(m: torch.Tensor) -> torch.Tensor:
    return m / m.sum(-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)


def last_block(model: nn.Module) -> nn.Module:
    """The last transformer block of a timm ViT/DeiT or Swin (last stage)."""
    if isinstance(model, VisionTransformer):
        return model.blocks[-1]
    if isinstance(model, SwinTransformer):
        return model.layers[-1].blocks[-1]
    raise BadInput(f"attention maps need a timm ViT/DeiT or Swin model, not {type(model).__name__}")


@contextlib.contextmanager
def last_attention(model: nn.Module) -> Iterator[_Capture]:
    """Record the last block's attention during forward passes run inside the context.

    Fused attention is turned off on that block only and restored on exit, as are the hooks."""
    block = last_block(model)
    attn = block.attn
    swin = isinstance(model, SwinTransformer)
    target = getattr(attn, "softmax" if swin else "attn_drop", None)
    if target is None or not hasattr(attn, "fused_attn"):
        raise BadInput(f"the last block's attention ({type(attn).__name__}) has no hook point for attention maps")
    if swin:
        capture = _Capture("swin", 0, None, block)
    else:
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        kind = (
            "token" if getattr(model, "global_pool", "token") == "token" and model.cls_token is not None else "received"
        )
        capture = _Capture(kind, prefix, tuple(model.patch_embed.grid_size), block)
    fused = attn.fused_attn
    hooks = [target.register_forward_hook(lambda _m, _i, out: capture.probs.append(out.detach()))]
    if swin:
        hooks.append(block.register_forward_pre_hook(lambda _m, args: capture.inputs.append(tuple(args[0].shape))))
    attn.fused_attn = False
    try:
        yield capture
    finally:
        attn.fused_attn = fused
        for h in hooks:
            h.remove()


def describe(model: nn.Module) -> str:
    """What the maps of `model` are (for the JSON)."""
    if isinstance(model, SwinTransformer):
        return "attention each token receives in the last block, mean over heads and queries; sums to 1 over the grid"
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if getattr(model, "global_pool", "token") == "token" and getattr(model, "cls_token", None) is not None:
        return (
            f"class token's row over the patch tokens ({prefix} prefix tokens skipped) in the last block, mean over "
            "heads, renormalised to sum to 1 over the patches"
        )
    return "attention each patch token receives from the patch tokens in the last block, mean over heads; sums to 1"


def map_extent(model: nn.Module, height: int, width: int) -> tuple[float, float, float, float]:
    """Where a map's cells lie on the image, as matplotlib's (left, right, bottom, top) in pixels.

    Each patch token is drawn centred on the pixels its patch embedding sees: for side-by-side
    patches (kernel = stride) that tiles the whole image; for overlapping ones (vit_digits: 5x5 pixels
    every pixel) the map covers the centres of its patches. Swin's maps tile the whole image."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(model, SwinTransformer) or not isinstance(proj, nn.Conv2d):
        return (-0.5, width - 0.5, height - 0.5, -0.5)
    grid = model.patch_embed.grid_size

    def span(axis: int) -> tuple[float, float]:
        k, s, p = proj.kernel_size[axis], proj.stride[axis], proj.padding[axis]
        first = -p + (k - 1) / 2
        return first - s / 2, first + (grid[axis] - 1) * s + s / 2

    (top, bottom), (left, right) = span(0), span(1)
    return (left, right, bottom, top)


def attention_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) last-block attention maps of a timm model on `images` (run in eval mode, then the
    model's mode is restored); each map sums to 1 over the patch grid."""
    training = model.training
    model.eval()
    try:
        with last_attention(model) as capture, torch.no_grad():
            model(images)
    finally:
        model.train(training)
    return capture.maps()


def tail_attention(
    model: FineTuneModel, vector: torch.Tensor, features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps and logits of a FineTuneModel whose trainable tail holds `vector`, on trunk `features`
    (the frozen trunk's output is the same for every variant, so it is computed once)."""
    with last_attention(model.model) as capture, torch.no_grad():
        logits = model.logits(vector.to(features.device, features.dtype), features)
    return capture.maps(), logits


# --- choosing models and images ------------------------------------------------------------------


def pick_models(saved: Sequence[SavedModel], node: int) -> dict[str, SavedModel]:
    """One model per algorithm: node `node` of each (the central model is its only node)."""
    by_algo: dict[str, dict[int, SavedModel]] = {}
    for s in saved:
        nodes = by_algo.setdefault(s.algorithm, {})
        if s.node in nodes:
            raise BadInput(f"{s.source} and {nodes[s.node].source} are both node {s.node} of {s.algorithm}: give one")
        nodes[s.node] = s
    chosen = {}
    for algo, nodes in by_algo.items():
        if algo == CENTRAL:
            chosen[algo] = nodes[min(nodes)]
        elif node in nodes:
            chosen[algo] = nodes[node]
        else:
            have = ", ".join(str(n) for n in sorted(nodes))
            raise BadInput(
                f"{algo} has no node {node} among the saved models (it has node {have}): pick one with --node"
            )
    order = [a for a in COLUMN_ORDER if a in chosen] + [a for a in chosen if a not in COLUMN_ORDER]
    return {a: chosen[a] for a in order}


def _resolve_classes(s: SavedModel, labels: np.ndarray, num_classes: int, data_name: str) -> list[int]:
    if s.classes is not None:
        return [int(c) for c in s.classes]
    if s.algorithm == CENTRAL:
        return list(range(num_classes))
    from .data import parse_split, partition

    st = s.settings
    nodes = st.get("nodes") or 1
    parts = partition(labels, parse_split(st.get("split", "iid")), nodes, st.get("seed", 0), num_classes, data_name)
    return sorted(int(c) for c in np.unique(labels[parts[s.node]]))


def select_images(
    test_labels: np.ndarray, seen: Sequence[int], count: int, classes: Sequence[int] | None = None
) -> list[int]:
    """Test-set indices: by default about half from classes the node never saw (first), half from
    classes it saw, cycling through the classes so each appears before any repeats; `classes`
    restricts the choice to those classes. Deterministic."""
    if count < 1:
        raise BadInput(f"--images must be at least 1 (got {count})")
    labels = np.asarray(test_labels)
    present = sorted(int(c) for c in np.unique(labels))
    if classes is not None:
        pool = [c for c in present if c in set(classes)]
        if not pool:
            raise BadInput(f"none of classes {list(classes)} is in the test set (it has {present[0]}-{present[-1]})")
        groups = [[c for c in pool if c not in seen], [c for c in pool if c in seen]]
    else:
        groups = [[c for c in present if c not in seen], [c for c in present if c in seen]]
    groups = [g for g in groups if g]
    shares = [count // len(groups) + (1 if i < count % len(groups) else 0) for i in range(len(groups))]
    picked: list[int] = []
    for group, share in zip(groups, shares, strict=True):
        picked += _round_robin(labels, group, share)
    short = count - len(picked)
    if short > 0:  # a group ran out of images: fill from the others
        rest = [c for g in groups for c in g]
        picked += [i for i in _round_robin(labels, rest, count) if i not in picked][:short]
    return picked


def _round_robin(labels: np.ndarray, group: Sequence[int], count: int) -> list[int]:
    queues = [list(np.flatnonzero(labels == c)) for c in group]
    out: list[int] = []
    depth = 0
    while len(out) < count and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(out) < count:
                out.append(int(q[depth]))
        depth += 1
    return out


# --- the report ----------------------------------------------------------------------------------


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300))


def attention_report(
    directory_or_dirs: str | Path | Sequence[str | Path],
    out_png: str | Path,
    json_path: str | Path | None = None,
    images: int = 8,
    classes: Sequence[int] | str | None = None,
    node: int = 0,
) -> dict:
    """Read saved models, compute last-block attention maps on chosen test images, write the PNG grid
    (and the JSON). Returns the JSON's content.

    `node` is the node whose models (and data) are compared: node<i> of a `--save` directory, a
    daemon's --index. `classes` ("3-5", "0,7" or a list) restricts the images to those classes."""
    from .data import load_data, parse_class_set
    from .report import check_output, check_plot_format

    check_plot_format(out_png, "--out")
    check_output("--out", out_png)
    if json_path is not None:
        check_output("--json", json_path)
    saved = load_saved_models(directory_or_dirs)
    chosen = pick_models(saved, node)
    first = next(iter(chosen.values()))
    model = build_saved_model(first)
    for s in chosen.values():
        check_fits(s, model)
    st = first.run_settings()
    data = load_data(st.data, model.input_size, model.mean, model.std, st.data_root, False, False)
    labels = np.asarray(data.test_labels)
    if isinstance(classes, str):
        classes = parse_class_set(classes)
    if classes is not None:
        missing = [c for c in classes if c >= data.num_classes]
        if missing:
            raise BadInput(f"class {missing[0]} is not in {data.name} (classes 0-{data.num_classes - 1})")
    reference = next((s for a, s in chosen.items() if a != CENTRAL), first)
    train_labels = np.asarray(data.train_labels)
    seen = _resolve_classes(reference, train_labels, data.num_classes, data.name)
    picked = select_images(labels, seen, images, classes)

    x = torch.stack([data.test[i][0] for i in picked])
    features = model.features(x)
    maps, preds = {}, {}
    for algo, s in chosen.items():
        m, logits = tail_attention(model, s.params, features)
        maps[algo], preds[algo] = m, logits.argmax(-1).tolist()
    similarity = None
    if CENTRAL in maps:
        similarity = {
            algo: float(np.mean([cosine_similarity(m[i], maps[CENTRAL][i]) for i in range(len(picked))]))
            for algo, m in maps.items()
        }
    grid = tuple(next(iter(maps.values())).shape[1:])
    rows = [
        {
            "test_index": int(idx),
            "label": int(labels[idx]),
            "seen_by_node": int(labels[idx]) in seen,
            "maps": {algo: _rounded(maps[algo][r]) for algo in chosen},
            "predicted": {algo: int(preds[algo][r]) for algo in chosen},
        }
        for r, idx in enumerate(picked)
    ]
    report = {
        "model": model.name,
        "fingerprint": model.fingerprint,
        "data": data.name,
        "node": node,
        "node_classes": seen,
        "grid": list(grid),
        "normalisation": describe(model.model),
        "columns": ["original", *chosen],
        "sources": {algo: str(s.source) for algo, s in chosen.items()},
        "images": rows,
        "similarity_to_central": similarity,
    }
    extent = map_extent(model.model, *x.shape[-2:])
    report["map_extent"] = list(extent)
    report["layout"] = list(draw_grid(x, model.mean, model.std, maps, rows, node, out_png, data.classes, extent))
    if json_path is not None:
        _write(Path(json_path), lambda p: p.write_text(json.dumps(report, indent=1)))
    return report


def _rounded(m: torch.Tensor) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in m.tolist()]


CELL_INCHES = 1.7
DPI = 100


def draw_grid(
    x: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    maps: dict[str, torch.Tensor],
    rows: list[dict],
    node: int,
    out_png: str | Path,
    class_names: Sequence[str] | None = None,
    extent: tuple[float, float, float, float] | None = None,
) -> tuple[int, int]:
    """One row per image: the image, then each algorithm's map over it (placed at `extent`, see
    `map_extent`; the whole image if None); one colour scale per row (the row's smallest to largest
    value over all its maps, shown by the bar at the right).
    Returns (rows, columns) of image panels as laid out in the saved figure."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    algos = list(maps)
    n_rows, n_cols = len(rows), 1 + len(algos)
    width, height = CELL_INCHES * n_cols + 0.9, CELL_INCHES * n_rows + 0.8
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(
        n_rows,
        n_cols + 1,
        width_ratios=[1] * n_cols + [0.08],
        wspace=0.08,
        hspace=0.2,
        left=0.35 / width,
        right=1 - 0.45 / width,
        top=1 - 0.7 / height,
        bottom=0.1 / height,
    )
    m_ = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s_ = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    cmap = colormaps["inferno"]
    panels = []
    for r, row in enumerate(rows):
        img = (x[r] * s_ + m_).clamp(0, 1)
        shown = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
        h, w = shown.shape[:2]
        whole = (-0.5, w - 0.5, h - 0.5, -0.5)
        low = min(float(maps[a][r].min()) for a in algos)
        high = max(float(maps[a][r].max()) for a in algos)
        norm = Normalize(low, high if high > low else low + 1e-12)
        name = class_names[row["label"]] if class_names else str(row["label"])
        ax = fig.add_subplot(gs[r, 0])
        panels.append(ax)
        ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1, extent=whole)
        ax.set_ylabel(f"{name}\n{'seen' if row['seen_by_node'] else 'never seen'}", fontsize=8)
        _bare(ax)
        if r == 0:
            ax.set_title("original", fontsize=9)
        for c, algo in enumerate(algos, start=1):
            ax = fig.add_subplot(gs[r, c])
            panels.append(ax)
            ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1, extent=whole)
            ax.imshow(
                maps[algo][r].numpy(), cmap=cmap, norm=norm, alpha=0.6, extent=extent or whole, interpolation="nearest"
            )
            ax.set_xlim(whole[0], whole[1])
            ax.set_ylim(whole[2], whole[3])
            pred = row["predicted"][algo]
            ax.text(
                0.03,
                0.97,
                str(class_names[pred] if class_names else pred),
                transform=ax.transAxes,
                fontsize=7,
                va="top",
                color="white" if pred == row["label"] else "red",
            )
            _bare(ax)
            if r == 0:
                ax.set_title(label_of(algo) if algo != CENTRAL else "central", fontsize=9)
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=fig.add_subplot(gs[r, n_cols]))
        bar.ax.tick_params(labelsize=6)
    # placed in inches from the top: the default (2% of the height) lands inside the first row of a tall grid
    title = f"last-block attention, node {node} (top left: predicted class, red if wrong)"
    fig.suptitle(title, fontsize=9, y=1 - 0.1 / height, va="top")
    image_format = Path(out_png).suffix.lstrip(".").lower() or "png"
    _write(Path(out_png), lambda p: fig.savefig(p, dpi=DPI, format=image_format))
    boxes = [ax.get_position() for ax in panels]
    return len({round(b.y0, 4) for b in boxes}), len({round(b.x0, 4) for b in boxes})


def _bare(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _write(path: Path, write: Callable[[Path], object]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as e:
        raise BadInput(f"cannot write {path}: {e.strerror}") from None
