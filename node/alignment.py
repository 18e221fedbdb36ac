"""Permutation alignment of transformer tails for DIMAT (DESIGN §5).

Everything works on parameter dicts named like `model.tail.named_parameters()` (the output of
`model.unflatten(vector)`), so an algorithm can align flat vectors received from neighbours.

Only the internal dimensions of a trainable block are permuted: MLP hidden units, whole attention
heads, inside each head one permutation shared by q and k and one for v (with the matching proj
columns); for Swin the head permutation also reorders the columns of relative_position_bias_table.
The residual dimension is shared with the frozen trunk and is never touched.

Index convention: a permutation `p` gathers, `new[i] = old[p[i]]`. A `BlockPermutation` returned
by the matchers, applied to the neighbour's parameters, aligns them to the node's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.func import functional_call

from .models import FineTuneModel

Params = dict[str, torch.Tensor]
Kind = Literal["vit", "swin"]

# Block parameters (suffixes after `blocks.{i}.`) that live in the residual dimension or are handled explicitly.
_RESIDUAL = {"norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "ls1.gamma", "ls2.gamma"}
_RESIDUAL |= {"attn.proj.bias", "mlp.fc2.bias"}
_QK_NORM = {"attn.q_norm.weight", "attn.q_norm.bias", "attn.k_norm.weight", "attn.k_norm.bias"}
_PERMUTED = {"attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.norm.weight", "attn.norm.bias"}
_PERMUTED |= {"mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.norm.weight", "mlp.norm.bias"}
_PERMUTED |= {"attn.relative_position_bias_table"}


@dataclass
class BlockPermutation:
    """Permutations of one trainable block's internal dimensions (gather indices, `new[i] = old[p[i]]`).

    mlp: (hidden,) fc1 rows and bias, fc2 columns. heads: (num_heads,) whole heads. qk: (num_heads,
    head_dim) within-head permutation shared by q and k; row i applies to the head that ends up at
    position i, i.e. it indexes the dimensions of old head heads[i]. v: same layout, for v and the
    matching proj input columns.
    """

    mlp: torch.Tensor
    heads: torch.Tensor
    qk: torch.Tensor
    v: torch.Tensor

    @classmethod
    def identity(cls, hidden: int, num_heads: int, head_dim: int) -> BlockPermutation:
        within = torch.arange(head_dim).repeat(num_heads, 1)
        return cls(torch.arange(hidden), torch.arange(num_heads), within, within.clone())

    def is_identity(self) -> bool:
        same = BlockPermutation.identity(len(self.mlp), len(self.heads), self.qk.shape[1])
        return all(torch.equal(a.cpu(), b) for a, b in zip(self._parts(), same._parts(), strict=True))

    def _parts(self) -> tuple[torch.Tensor, ...]:
        return self.mlp, self.heads, self.qk, self.v


def compose(first: BlockPermutation, second: BlockPermutation) -> BlockPermutation:
    """The permutation equal to applying `first`, then `second`."""
    return BlockPermutation(
        mlp=first.mlp[second.mlp],
        heads=first.heads[second.heads],
        qk=first.qk[second.heads].gather(1, second.qk),
        v=first.v[second.heads].gather(1, second.v),
    )


def inverse(perm: BlockPermutation) -> BlockPermutation:
    """The permutation that undoes `perm`."""
    heads = torch.argsort(perm.heads)
    return BlockPermutation(
        mlp=torch.argsort(perm.mlp),
        heads=heads,
        qk=torch.argsort(perm.qk, dim=1)[heads],
        v=torch.argsort(perm.v, dim=1)[heads],
    )


def block_kind(model: FineTuneModel) -> Kind:
    """ "swin" for timm Swin transformers, "vit" for ViT/DeiT-style models."""
    if isinstance(model.model, SwinTransformer):
        return "swin"
    if isinstance(model.model, VisionTransformer):
        return "vit"
    raise ValueError(f"{model.name} is a {type(model.model).__name__}: only ViT/DeiT and Swin blocks can be aligned")


def head_count(model: FineTuneModel) -> int:
    """Attention heads per trainable block (all trainable blocks share it)."""
    return int(model.tail.blocks[0].attn.num_heads)


def block_prefixes(params: Params) -> list[str]:
    """`blocks.{i}.` for every trainable block in `params`, in block order."""
    indices = {int(name.split(".")[1]) for name in params if name.startswith("blocks.")}
    return [f"blocks.{i}." for i in sorted(indices)]


def to_params(model: FineTuneModel, vector: torch.Tensor) -> Params:
    """A flat trainable vector as named tensors (views of `vector`)."""
    return model.unflatten(vector)


def to_vector(model: FineTuneModel, params: Params) -> torch.Tensor:
    """Named tensors back to a flat vector, in the order of `model.tail.named_parameters()`."""
    return torch.cat([params[name].reshape(-1) for name, _ in model.tail.named_parameters()])


def _block(params: Params, prefix: str) -> Params:
    return {name[len(prefix) :]: t for name, t in params.items() if name.startswith(prefix)}


def _dims(block: Params, num_heads: int) -> tuple[int, int]:
    """(hidden units, head_dim) of one block."""
    attn_dim = block["attn.qkv.weight"].shape[0] // 3
    if attn_dim % num_heads:
        raise ValueError(f"attention width {attn_dim} is not a multiple of {num_heads} heads")
    return block["mlp.fc1.weight"].shape[0], attn_dim // num_heads


def _has_qk_norm(block: Params) -> bool:
    return any(name in block for name in _QK_NORM)


def _check_block(block: Params, prefix: str, kind: Kind) -> None:
    unknown = set(block) - _RESIDUAL - _QK_NORM - _PERMUTED
    if unknown:
        raise ValueError(f"cannot permute {prefix}{sorted(unknown)[0]}: unknown block parameter")
    has_table = "attn.relative_position_bias_table" in block
    if has_table != (kind == "swin"):
        raise ValueError(f"{prefix} does not look like a {kind} block (relative_position_bias_table: {has_table})")


def _attention_indices(perm: BlockPermutation) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices into the attention width (num_heads * head_dim, head-major) for q/k and for v."""
    head_dim = perm.qk.shape[1]
    base = perm.heads[:, None] * head_dim
    return (base + perm.qk).reshape(-1), (base + perm.v).reshape(-1)


def permute_block(params: Params, prefix: str, perm: BlockPermutation, kind: Kind) -> Params:
    """A copy of `params` with the block at `prefix` permuted by `perm`; other tensors are shared, not copied."""
    block = _block(params, prefix)
    if not block:
        raise ValueError(f"no parameters under {prefix!r}")
    _check_block(block, prefix, kind)
    hidden, head_dim = _dims(block, len(perm.heads))
    if perm.mlp.numel() != hidden or perm.qk.shape[1] != head_dim:
        raise ValueError(f"{prefix}: permutation sizes do not fit (hidden {hidden}, head_dim {head_dim})")
    if _has_qk_norm(block) and not torch.equal(perm.qk.cpu(), torch.arange(head_dim).repeat(len(perm.heads), 1)):
        raise ValueError(f"{prefix} normalises q and k per head (qk_norm): its qk permutation must be the identity")
    device = block["attn.qkv.weight"].device
    mlp, heads = perm.mlp.to(device), perm.heads.to(device)
    qk, v = (i.to(device) for i in _attention_indices(perm))
    attn_dim = qk.numel()
    # qkv rows are [q; k; v]: q and k share one gather, v has its own
    rows = torch.cat([qk, qk + attn_dim, v + 2 * attn_dim])
    gathers = {
        "attn.qkv.weight": (0, rows),
        "attn.qkv.bias": (0, rows),
        "attn.proj.weight": (1, v),
        "attn.norm.weight": (0, v),
        "attn.norm.bias": (0, v),
        "attn.relative_position_bias_table": (1, heads),
        "mlp.fc1.weight": (0, mlp),
        "mlp.fc1.bias": (0, mlp),
        "mlp.fc2.weight": (1, mlp),
        "mlp.norm.weight": (0, mlp),
        "mlp.norm.bias": (0, mlp),
    }
    out = dict(params)
    for name, (dim, index) in gathers.items():
        if name in block:
            out[prefix + name] = block[name].index_select(dim, index)
    return out


def permute_tail(params: Params, perms: Sequence[BlockPermutation], kind: Kind) -> Params:
    """Apply one `BlockPermutation` per trainable block, in block order."""
    prefixes = block_prefixes(params)
    if len(prefixes) != len(perms):
        raise ValueError(f"{len(perms)} permutations for {len(prefixes)} trainable blocks")
    for prefix, perm in zip(prefixes, perms, strict=True):
        params = permute_block(params, prefix, perm, kind)
    return params


def identity_permutations(params: Params, num_heads: int) -> list[BlockPermutation]:
    """One identity permutation per trainable block of `params`."""
    perms = []
    for prefix in block_prefixes(params):
        hidden, head_dim = _dims(_block(params, prefix), num_heads)
        perms.append(BlockPermutation.identity(hidden, num_heads, head_dim))
    return perms


def merge(own: Params, others: Sequence[tuple[float, Params]], self_weight: float) -> Params:
    """self_weight * own + sum_j w_j * params_j (the weights pi_ij, used as given: they should sum to 1)."""
    for _, params in others:
        if params.keys() != own.keys():
            raise ValueError("cannot merge parameter dicts with different names")
    merged = {}
    for name, t in own.items():
        acc = t * self_weight
        for weight, params in others:
            acc = acc + params[name] * weight
        merged[name] = acc
    return merged


def _finite(a: np.ndarray) -> np.ndarray:
    """`a` with every value that is not finite set to 0: a neighbour's parameters so large that its
    activations or weight products overflow give no evidence either way (linear_sum_assignment raises
    on NaN, and a NaN gain would keep any permutation)."""
    return a if np.isfinite(a).all() else np.where(np.isfinite(a), a, 0.0)


def _assign(score: np.ndarray) -> np.ndarray:
    """cols[i] = the column matched to row i, maximising the total score (scores that are not finite: 0)."""
    _, cols = linear_sum_assignment(_finite(score), maximize=True)
    return cols


def _match_heads(
    qk: np.ndarray, v: np.ndarray, num_heads: int, fixed_qk: bool, head_bonus: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heads, then the within-head q/k and v dimensions.

    qk and v are (attn_dim, attn_dim) similarities between own dimensions (rows) and the other's
    (columns). A head pair scores the sum of its optimal within-head qk and v matchings (plus
    head_bonus[h, g]); the head assignment maximises the total over pairs.
    """
    head_dim = qk.shape[0] // num_heads
    qk_blocks = qk.reshape(num_heads, head_dim, num_heads, head_dim).transpose(0, 2, 1, 3)
    v_blocks = v.reshape(num_heads, head_dim, num_heads, head_dim).transpose(0, 2, 1, 3)
    identity = np.arange(head_dim)
    score = np.zeros((num_heads, num_heads)) if head_bonus is None else head_bonus.astype(np.float64)
    inner_qk = np.empty((num_heads, num_heads, head_dim), dtype=np.int64)
    inner_v = np.empty_like(inner_qk)
    for h in range(num_heads):
        for g in range(num_heads):
            inner_qk[h, g] = identity if fixed_qk else _assign(qk_blocks[h, g])
            inner_v[h, g] = _assign(v_blocks[h, g])
            score[h, g] += qk_blocks[h, g][identity, inner_qk[h, g]].sum()
            score[h, g] += v_blocks[h, g][identity, inner_v[h, g]].sum()
    heads = _assign(score)
    own = np.arange(num_heads)
    return torch.from_numpy(heads), torch.from_numpy(inner_qk[own, heads]), torch.from_numpy(inner_v[own, heads])


class _Correlation:
    """Running sums for the Pearson correlation between the columns of a and of b (rows are samples)."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: list[torch.Tensor] = []

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        parts = [a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), a.T @ b]
        self.sums = parts if not self.sums else [s + p for s, p in zip(self.sums, parts, strict=True)]
        self.n += a.shape[0]

    def matrix(self) -> np.ndarray:
        sa, sb, saa, sbb, sab = (s / self.n for s in self.sums)
        cov = sab - sa[:, None] * sb[None, :]
        # a constant unit has no correlation with anything (instead of 0/0)
        std_a = (saa - sa * sa).clamp_min(1e-12).sqrt()
        std_b = (sbb - sb * sb).clamp_min(1e-12).sqrt()
        return _finite((cov / (std_a[:, None] * std_b[None, :])).cpu().numpy())


def _run_block(block: nn.Module, params: Params, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The block's output and its hidden activations, each flattened to (samples * tokens, units)."""
    acts: dict[str, torch.Tensor] = {}

    def keep_output(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            acts[name] = output

        return hook

    def keep_input(module: nn.Module, inputs: tuple) -> None:
        acts["out"] = inputs[0]

    hooks = [
        block.attn.qkv.register_forward_hook(keep_output("qkv")),
        block.attn.proj.register_forward_pre_hook(keep_input),
        block.mlp.act.register_forward_hook(keep_output("mlp")),
    ]
    try:
        y = functional_call(block, params, (x,))
    finally:
        for h in hooks:
            h.remove()
    flat = {name: t.reshape(-1, t.shape[-1]) for name, t in acts.items()}
    q, k, v = flat.pop("qkv").chunk(3, dim=1)
    return y, {**flat, "q": q, "k": k, "v": v}


@torch.no_grad()
def activation_correlations(
    model: FineTuneModel, own: Params, other: Params, features: torch.Tensor, batch_size: int = 32
) -> list[dict[str, np.ndarray]]:
    """Per trainable block, the Pearson correlations between `own`'s hidden units (rows) and `other`'s
    (columns) on `features` (inputs of the first trainable block), pooling samples and tokens: "q",
    "k", "v", "out" (each head's attention output, before proj) and "mlp" (after the activation).

    Each tail runs its own blocks in order, so block i of each model sees that model's own block i-1
    output; permuting internal dimensions never changes a block's output, so this equals feeding the
    aligned other model forward."""
    blocks = list(model.tail.blocks)
    prefixes = block_prefixes(own)
    if len(prefixes) != len(blocks) or block_prefixes(other) != prefixes:
        raise ValueError(f"expected parameters of {len(blocks)} trainable blocks")
    names = ("q", "k", "v", "out", "mlp")
    stats = [{name: _Correlation() for name in names} for _ in blocks]
    for chunk in features.split(batch_size):
        x_own, x_other = chunk, chunk
        for block, prefix, block_stats in zip(blocks, prefixes, stats, strict=True):
            x_own, a = _run_block(block, _block(own, prefix), x_own)
            x_other, b = _run_block(block, _block(other, prefix), x_other)
            for name in names:
                block_stats[name].add(a[name], b[name])
    return [{name: s.matrix() for name, s in block_stats.items()} for block_stats in stats]


def matched_correlation(corr: dict[str, np.ndarray], perm: BlockPermutation) -> dict[str, float]:
    """Mean correlation of the unit pairs `perm` matches (own unit i with other's unit perm[i]):
    "mlp" over MLP units, "qk" over q and k dimensions, "v" over v and attention-output dimensions."""
    qk, v = (i.numpy() for i in _attention_indices(perm))
    rows = np.arange(len(qk))
    return {
        "mlp": float(corr["mlp"][np.arange(len(perm.mlp)), perm.mlp.numpy()].mean()),
        "qk": float((corr["q"][rows, qk] + corr["k"][rows, qk]).mean() / 2),
        "v": float((corr["v"][rows, v] + corr["out"][rows, v]).mean() / 2),
    }


# Activation matching keeps a unit where it is unless moving it raises the correlation of its pair by more
# than this, and a block's MLP or attention permutation only if it raises the mean correlation of all its
# pairs by more than LAYER_GAIN. Every node aligns its neighbours to its own unit order, so small early
# gains split the nodes' orders apart, and later merges then average units matched less well than the
# unpermuted ones were (measured: bench/dimat_alignment.py; non-IID DIMAT fell 3.6 points below WA).
IDENTITY_MARGIN = 0.1
LAYER_GAIN = 0.05


@torch.no_grad()
def match_activations(
    model: FineTuneModel,
    own: Params,
    other: Params,
    features: torch.Tensor,
    batch_size: int = 32,
    margin: float | None = None,
) -> list[BlockPermutation]:
    """Permutations aligning `other` to `own` by the correlation of their hidden activations on the
    node's own `features` (`activation_correlations`). MLP units: linear assignment on the
    correlation. Heads: a head pair scores the sum of its optimal within-head matchings (q and k
    together, v together with the head's attention output); heads are assigned on that score, then
    the within-head permutations of the assigned pairs are kept. Every unit's own position gets a
    bonus of `margin` per correlation, so a permutation must raise the correlation of the pairs it
    changes by more than `margin` on average (None: IDENTITY_MARGIN; 0: the plain maximum-correlation
    assignment).
    """
    margin = IDENTITY_MARGIN if margin is None else margin
    num_heads = head_count(model)
    correlations = activation_correlations(model, own, other, features, batch_size)
    return [
        permutation_from_correlations(corr, num_heads, _has_qk_norm(_block(own, prefix)), margin)
        for prefix, corr in zip(block_prefixes(own), correlations, strict=True)
    ]


def permutation_from_correlations(
    corr: dict[str, np.ndarray], num_heads: int, fixed_qk: bool, margin: float
) -> BlockPermutation:
    """One block's permutation from its activation correlations, with the identity bonus `margin`; the MLP
    part and the attention part each stay the identity unless they gain more than LAYER_GAIN (when the
    margin is on: margin 0 is the plain maximum-correlation assignment)."""
    mlp_score = corr["mlp"] + margin * np.eye(len(corr["mlp"]))
    qk_score = corr["q"] + corr["k"] + 2 * margin * np.eye(len(corr["q"]))
    v_score = corr["v"] + corr["out"] + 2 * margin * np.eye(len(corr["v"]))
    heads, qk, v = _match_heads(qk_score, v_score, num_heads, fixed_qk)
    perm = BlockPermutation(torch.from_numpy(_assign(mlp_score)), heads, qk, v)
    if margin <= 0:
        return perm
    same = BlockPermutation.identity(len(perm.mlp), num_heads, perm.qk.shape[1])
    before, after = matched_correlation(corr, same), matched_correlation(corr, perm)
    if after["mlp"] - before["mlp"] <= LAYER_GAIN:
        perm.mlp = same.mlp
    if (after["qk"] + after["v"]) - (before["qk"] + before["v"]) <= 2 * LAYER_GAIN:
        perm.heads, perm.qk, perm.v = same.heads, same.qk, same.v
    return perm


def _weight_features(block: Params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-unit weight vectors: MLP units (hidden, .), q/k dimensions and v dimensions (attn_dim, .)."""

    def with_bias(name: str, rows: int) -> torch.Tensor:
        w = block[f"{name}.weight"]
        b = block.get(f"{name}.bias", torch.zeros(rows, dtype=w.dtype, device=w.device))
        return torch.cat([w, b[:, None]], dim=1)

    hidden = block["mlp.fc1.weight"].shape[0]
    mlp = torch.cat([with_bias("mlp.fc1", hidden), block["mlp.fc2.weight"].T], dim=1)
    qkv = with_bias("attn.qkv", block["attn.qkv.weight"].shape[0])
    q, k, v = qkv.chunk(3, dim=0)
    return mlp, torch.cat([q, k], dim=1), torch.cat([v, block["attn.proj.weight"].T], dim=1)


def match_weights(own: Params, other: Params, kind: Kind, num_heads: int) -> list[BlockPermutation]:
    """Weight matching (WM): the same assignments, scored by inner products of the weights.

    MLP unit: fc1 row, fc1 bias, fc2 column. q/k dimension: its q and k rows and biases. v dimension:
    its v row and bias and proj column. Swin heads also score their relative_position_bias_table columns.
    """
    prefixes = block_prefixes(own)
    if block_prefixes(other) != prefixes:
        raise ValueError("own and other parameters have different trainable blocks")
    perms = []
    for prefix in prefixes:
        mine, theirs = _block(own, prefix), _block(other, prefix)
        _check_block(mine, prefix, kind)
        a, b = _weight_features(mine), _weight_features(theirs)
        mlp_score, qk_score, v_score = ((x.double() @ y.double().T).cpu().numpy() for x, y in zip(a, b, strict=True))
        bonus = None
        if kind == "swin":
            table = "attn.relative_position_bias_table"
            bonus = (mine[table].double().T @ theirs[table].double()).cpu().numpy()
        heads, qk, v = _match_heads(qk_score, v_score, num_heads, _has_qk_norm(mine), bonus)
        perms.append(BlockPermutation(torch.from_numpy(_assign(mlp_score)), heads, qk, v))
    return perms


def align_vector(
    model: FineTuneModel, own: torch.Tensor, other: torch.Tensor, features: torch.Tensor | None = None
) -> torch.Tensor:
    """`other` (a flat trainable vector) permuted to align with `own`: by activations on `features`
    when given, else by weights."""
    mine, theirs = to_params(model, own), to_params(model, other)
    kind = block_kind(model)
    if features is None:
        perms = match_weights(mine, theirs, kind, head_count(model))
    else:
        perms = match_activations(model, mine, theirs, features)
    return to_vector(model, permute_tail(theirs, perms, kind))
