"""DIMAT alignment (`node/alignment.py`): permutation invariance, activation and weight matching, merging."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from p2pnode.node import alignment as al
from p2pnode.node.models import FineTuneModel, build_model

# model name -> (trainable blocks, shape of a batch of random trainable-block inputs)
MODELS = {
    "vit_digits": (2, (64, 17, 64)),
    "vit_small_patch16_224": (1, (4, 197, 384)),
    "deit_small_patch16_224": (1, (4, 197, 384)),
    "swin_small_patch4_window7_224": (1, (8, 7, 7, 768)),
}
MATCHED = ["vit_digits", "deit_small_patch16_224", "swin_small_patch4_window7_224"]


class Setup:
    """A model in float64 with randomised tail parameters (non-zero biases, sharp attention) and random inputs."""

    def __init__(self, name: str) -> None:
        blocks, shape = MODELS[name]
        self.model: FineTuneModel = build_model(name, trainable_blocks=blocks)
        self.model.tail.double()  # float32 noise would sit close to the 1e-5 tolerance on large tails
        g = torch.Generator().manual_seed(0)
        self.params = {n: p.detach() + 0.05 * noise(p, g) for n, p in self.model.tail.named_parameters()}
        self.features = torch.randn(shape, generator=g, dtype=torch.float64)
        self.kind = al.block_kind(self.model)
        self.num_heads = al.head_count(self.model)

    def logits(self, params: al.Params) -> torch.Tensor:
        return self.model.logits(al.to_vector(self.model, params), self.features)


def noise(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(t.shape, generator=g, dtype=t.dtype)


def relative_noise(params: al.Params, scale: float, seed: int) -> al.Params:
    """Each tensor plus Gaussian noise of `scale` times its own standard deviation."""
    g = torch.Generator().manual_seed(seed)
    return {n: t + scale * t.std() * noise(t, g) for n, t in params.items()}


def random_permutations(setup: Setup, seed: int) -> list[al.BlockPermutation]:
    g = torch.Generator().manual_seed(seed)
    perms = []
    for perm in al.identity_permutations(setup.params, setup.num_heads):
        heads, head_dim = perm.qk.shape
        within = [torch.stack([torch.randperm(head_dim, generator=g) for _ in range(heads)]) for _ in range(2)]
        perms.append(
            al.BlockPermutation(torch.randperm(len(perm.mlp), generator=g), torch.randperm(heads, generator=g), *within)
        )
    return perms


def recovered(perm: al.BlockPermutation) -> dict[str, float]:
    """Fraction of each part of a (planted then matched) composition that is the identity."""

    def fraction(p: torch.Tensor) -> float:
        return (p == torch.arange(p.shape[-1])).double().mean().item()

    return {"mlp": fraction(perm.mlp), "heads": fraction(perm.heads), "qk": fraction(perm.qk), "v": fraction(perm.v)}


@pytest.fixture(scope="module")
def setups() -> Callable[[str], Setup]:
    """Each model is built once per module (they are slow to build on CPU)."""
    cache: dict[str, Setup] = {}

    def get(name: str) -> Setup:
        if name not in cache:
            cache[name] = Setup(name)
        return cache[name]

    return get


class Planted:
    """`other` is `own` permuted by `planted` plus 1% relative noise; `matched` aligns it back by activations."""

    def __init__(self, setup: Setup) -> None:
        self.planted = random_permutations(setup, seed=1)
        self.other = relative_noise(al.permute_tail(setup.params, self.planted, setup.kind), 0.01, seed=2)
        self.matched = al.match_activations(setup.model, setup.params, self.other, setup.features)


@pytest.fixture(scope="module")
def planted(setups) -> Callable[[str], Planted]:
    cache: dict[str, Planted] = {}

    def get(name: str) -> Planted:
        if name not in cache:
            cache[name] = Planted(setups(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_random_permutation_leaves_tail_output_unchanged(setups, name: str) -> None:
    s = setups(name)
    permuted = al.permute_tail(s.params, random_permutations(s, seed=3), s.kind)
    assert any(not torch.equal(permuted[n], s.params[n]) for n in s.params)
    assert (s.logits(permuted) - s.logits(s.params)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["vit_digits", "swin_small_patch4_window7_224"])
def test_residual_dimension_is_never_permuted(setups, name: str) -> None:
    s = setups(name)
    perm = random_permutations(s, seed=4)[0]
    permuted = al.permute_block(s.params, "blocks.0.", perm, s.kind)
    changed = {n for n in s.params if not torch.equal(permuted[n], s.params[n])}
    expected = {"attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc1.bias"}
    expected |= {"mlp.fc2.weight"} | ({"attn.relative_position_bias_table"} if s.kind == "swin" else set())
    assert changed == {f"blocks.0.{n}" for n in expected}
    old, new = al._block(s.params, "blocks.0."), al._block(permuted, "blocks.0.")
    # inputs of qkv/fc1 and outputs of proj/fc2 keep their order: only the internal side is gathered
    assert torch.equal(new["mlp.fc1.weight"], old["mlp.fc1.weight"][perm.mlp])
    assert torch.equal(new["mlp.fc2.weight"], old["mlp.fc2.weight"][:, perm.mlp])
    _, v_index = al._attention_indices(perm)
    assert torch.equal(new["attn.proj.weight"], old["attn.proj.weight"][:, v_index])
    if s.kind == "swin":
        table = "attn.relative_position_bias_table"
        assert torch.equal(new[table], old[table][:, perm.heads])


def test_compose_and_inverse_agree_with_applying_permutations_in_turn(setups) -> None:
    s = setups("vit_digits")
    first, second = random_permutations(s, seed=5), random_permutations(s, seed=6)
    twice = al.permute_tail(al.permute_tail(s.params, first, s.kind), second, s.kind)
    composed = al.permute_tail(s.params, [al.compose(a, b) for a, b in zip(first, second, strict=True)], s.kind)
    assert all(torch.equal(twice[n], composed[n]) for n in s.params)
    assert all(al.compose(p, al.inverse(p)).is_identity() for p in first)
    assert not any(p.is_identity() for p in first)


@pytest.mark.parametrize("name", MATCHED)
def test_activation_matching_recovers_planted_permutation_under_noise(planted, name: str) -> None:
    p = planted(name)
    for plant, match in zip(p.planted, p.matched, strict=True):
        found = recovered(al.compose(plant, match))
        assert found["mlp"] >= 0.99 and found["heads"] == 1.0, found
        assert found["qk"] >= 0.99 and found["v"] >= 0.99, found


@pytest.mark.parametrize("name", MATCHED)
def test_aligned_merge_keeps_function_where_naive_average_does_not(setups, planted, name: str) -> None:
    s, p = setups(name), planted(name)
    reference = s.logits(s.params)
    aligned = al.permute_tail(p.other, p.matched, s.kind)
    errors = {}
    for label, other in (("aligned", aligned), ("naive", p.other)):
        merged = s.logits(al.merge(s.params, [(0.5, other)], self_weight=0.5))
        errors[label] = ((merged - reference).norm() / reference.norm()).item()
    print(f"{name}: 0.5/0.5 merge, relative logit error: aligned {errors['aligned']:.4f} naive {errors['naive']:.4f}")
    assert errors["aligned"] < 0.2 * errors["naive"]


@pytest.mark.parametrize("name", MATCHED)
def test_weight_matching_recovers_planted_permutation_exactly(setups, name: str) -> None:
    s = setups(name)
    plants = random_permutations(s, seed=7)
    other = al.permute_tail(s.params, plants, s.kind)
    matched = al.match_weights(s.params, other, s.kind, s.num_heads)
    assert all(al.compose(p, m).is_identity() for p, m in zip(plants, matched, strict=True))
    aligned = al.permute_tail(other, matched, s.kind)
    assert all(torch.equal(aligned[n], s.params[n]) for n in s.params)


@pytest.mark.parametrize("name", MATCHED)
def test_shared_start_with_small_drift_matches_nearly_identity(setups, name: str) -> None:
    s = setups(name)
    own, other = relative_noise(s.params, 0.1, seed=8), relative_noise(s.params, 0.1, seed=9)
    for matched in (
        al.match_activations(s.model, own, other, s.features),
        al.match_weights(own, other, s.kind, s.num_heads),
    ):
        for perm in matched:
            found = recovered(perm)
            assert found["heads"] == 1.0 and min(found.values()) >= 0.95, found


def test_align_vector_undoes_planted_permutation_through_flat_vectors(setups, planted) -> None:
    s, p = setups("vit_digits"), planted("vit_digits")
    own = al.to_vector(s.model, s.params)
    assert torch.equal(al.to_vector(s.model, al.to_params(s.model, own)), own)
    other = al.to_vector(s.model, p.other)
    for features in (s.features, None):
        aligned = al.align_vector(s.model, own, other, features)
        assert (aligned - own).norm() < 0.05 * (other - own).norm()


def test_merge_is_the_weighted_average() -> None:
    a, b, c = ({"w": torch.full((2, 3), v)} for v in (1.0, 2.0, 4.0))
    merged = al.merge(a, [(0.25, b), (0.25, c)], self_weight=0.5)
    assert torch.allclose(merged["w"], torch.full((2, 3), 0.5 + 0.5 + 1.0))
    with pytest.raises(ValueError):
        al.merge(a, [(0.5, {"v": torch.zeros(2, 3)})], self_weight=0.5)


def test_permute_block_refuses_what_it_cannot_permute(setups) -> None:
    s = setups("vit_digits")
    perm = random_permutations(s, seed=10)[0]
    with pytest.raises(ValueError, match="swin"):
        al.permute_block(s.params, "blocks.0.", perm, "swin")
    gated = {**s.params, "blocks.0.attn.gate.weight": torch.zeros(64, 64)}
    with pytest.raises(ValueError, match="unknown"):
        al.permute_block(gated, "blocks.0.", perm, s.kind)
    normed = {**s.params, "blocks.0.attn.q_norm.weight": torch.ones(16)}
    with pytest.raises(ValueError, match="qk_norm"):
        al.permute_block(normed, "blocks.0.", perm, s.kind)


def test_pearson_correlation_accumulated_over_chunks_matches_numpy() -> None:
    g = torch.Generator().manual_seed(11)
    a = torch.randn(300, 5, generator=g, dtype=torch.float64)
    b = a @ torch.randn(5, 4, generator=g, dtype=torch.float64) + 3.0 + torch.randn(300, 4, generator=g)
    corr = al._Correlation()
    for x, y in zip(a.split(70), b.split(70), strict=True):
        corr.add(x, y)
    expected = np.corrcoef(a.numpy(), b.numpy(), rowvar=False)[:5, 5:]
    assert np.allclose(corr.matrix(), expected, atol=1e-10)


def correlations(units: int = 6, heads: int = 2) -> dict[str, np.ndarray]:
    """Synthetic activation correlations: every unit correlates 0.5 with its counterpart, 0 with the rest."""
    eye = 0.5 * np.eye(units)
    return {"mlp": eye.copy(), "q": eye.copy(), "k": eye.copy(), "v": eye.copy(), "out": eye.copy()}


def test_a_swap_that_raises_correlation_by_less_than_the_margin_is_not_made() -> None:
    corr = correlations()
    corr["mlp"][0, 1] = corr["mlp"][1, 0] = 0.55  # swapping units 0 and 1 gains 0.05 per unit
    plain = al.permutation_from_correlations(corr, 2, False, margin=0.0)
    assert plain.mlp.tolist()[:2] == [1, 0]  # the unbiased assignment takes the small gain
    kept = al.permutation_from_correlations(corr, 2, False, margin=0.1)
    assert kept.is_identity()


def test_a_swap_that_raises_correlation_by_a_clear_margin_is_made_for_units_and_heads() -> None:
    corr = correlations()
    corr["mlp"][0, 1] = corr["mlp"][1, 0] = 0.9
    for name in ("q", "k", "v", "out"):  # heads of 3 dimensions: head 0 matches the other's head 1
        corr[name][:3, :3] = corr[name][3:, 3:] = 0.0
        corr[name][:3, 3:] = corr[name][3:, :3] = 0.9 * np.eye(3)
    perm = al.permutation_from_correlations(corr, 2, False, margin=0.1)
    assert perm.mlp.tolist() == [1, 0, 2, 3, 4, 5]
    assert perm.heads.tolist() == [1, 0]
    within = al.matched_correlation(corr, perm)
    assert within == pytest.approx({"mlp": (0.9 * 2 + 0.5 * 4) / 6, "qk": 0.9, "v": 0.9})


def test_a_layer_whose_permutation_gains_little_overall_keeps_the_identity() -> None:
    corr = correlations(units=100, heads=4)
    corr["mlp"][0, 1] = corr["mlp"][1, 0] = 0.8  # two units gain 0.3 each: 0.006 for the layer's mean
    assert al.permutation_from_correlations(corr, 4, False, margin=0.1).is_identity()
    assert al.permutation_from_correlations(corr, 4, False, margin=0.0).mlp.tolist()[:2] == [1, 0]


@pytest.mark.parametrize("scale", [1e150, 1e300])
def test_a_neighbour_whose_parameters_overflow_the_activations_is_matched_by_the_identity_not_an_error(
    setups, scale: float
) -> None:
    """A hostile (or diverged) neighbour's finite parameters, scaled until its activations overflow, made
    the linear assignment raise ('matrix contains invalid numeric entries') inside a DIMAT merge: the
    daemon's compute thread died. Correlations that are not finite count as none, so the identity stays."""
    s = setups("vit_digits")
    other = {n: scale * t for n, t in s.params.items()}
    for perm in al.match_activations(s.model, s.params, other, s.features):
        assert perm.is_identity()
    for perm in al.match_weights(s.params, other, s.kind, s.num_heads):
        assert all(len(torch.unique(p)) == p.shape[-1] for p in (perm.mlp, perm.heads))  # permutations
