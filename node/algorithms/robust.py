"""`--robust clip`: self-centred clipping (He, Karimireddy & Jaggi, "Byzantine-robust decentralized
learning via self-centered clipping", 2022; DESIGN §9).

Pull channels (p2pft, dsgd, cdsgd, dimat, wa, wm). Instead of x_i <- sum_j w_ij x_j a node mixes

    x_i <- sum_j w_ij (x_i + clip(x_j - x_i, c_i)),      clip(v, c) = v * min(1, c / ||v||)

so no in-neighbour moves x_i by more than w_ij c_i, however far away it claims to be. The radius c_i
is the (d_i - b)-th smallest of the d_i distances ||x_j - x_i||, with b = 1 bad in-neighbour
tolerated: the adaptive rule of the paper's reference code (with b = 1, the second largest distance).
If at most b in-neighbours are bad and one of them is the farthest, c_i is the largest honest
distance and no honest neighbour is clipped; one that hides closer than that is not clipped either,
but then it cannot pull further than an honest neighbour does. A node with d_i <= b in-neighbours
cannot tell a bad one from a good one and clips nothing.

Push channels carry mass, not values. SGP's push-sum shares (x, w) are clipped per round around the
node's own share of its own mass (what it keeps for itself; on a regular graph an honest
in-neighbour sends about as much), like values, and the weights are pulled back towards 1 by
TRACKER_LEAK per round (keeping x / w). P2P-FT's tracker mass is different: an honest increment
b z_j = b (tau_j + g_j^{k+1} - g_j^k) is mostly mini-batch noise, so a sign-flipped one hides inside
any per-round radius, and the tracker adds up whatever is let in. `MassClipper` therefore clips the
running totals each link has delivered, around this node's own total: the noise telescopes in a
total, a bad link's total drifts away linearly and is held within the radius. The tracker is leaky:
P2P-FT sends z = g^{k+1} + (1 - TRACKER_LEAK)(tau - g^k) instead of tau + g^{k+1} - g^k, so stray
mass (clipped, or pushed to a bad neighbour that never returns it) fades by (1 - TRACKER_LEAK) per
round instead of staying in sum tau for good.

The price, plainly: robust mixing is not exact. P2P-FT no longer reaches the exact optimum on
heterogeneous data (the leak makes tau partly local, and honest totals are clipped too), and what
an attacker can still do is bounded, not zero: on the pull channel up to w_ij c_i every round, in a
direction of its choosing (a sign-flipper shrinks the parameters a little each round), and on
P2P-FT's tracker up to the honest totals' spread. It needs in-degree >= 2b + 1 (3 here) for the
radius to come from honest neighbours, and an honest majority of every node's in-weight; a node
whose only path to the others runs through a bad node (a cut) cannot be protected, and a bad value
that stays inside the honest spread (alie) is by construction not clipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

TOLERATED = 1  # b: bad in-neighbours per node that the radius rule tolerates
TRACKER_LEAK = 0.1  # per round: what a leaky tracker forgets of its accumulated error


def clip(v: torch.Tensor, c: float) -> torch.Tensor:
    """v scaled to norm c if it is longer; zero if it is not finite (nothing usable came)."""
    norm = float(torch.linalg.vector_norm(v))
    if not math.isfinite(norm):
        return torch.zeros_like(v)
    return v if norm <= c else v * (c / norm)


def radius(distances: Sequence[float], tolerated: int = TOLERATED) -> float:
    """The (d - b)-th smallest of d distances (all of them count if d <= b: nothing is clipped)."""
    ordered = sorted(distances)
    if len(ordered) <= tolerated:
        return math.inf
    return ordered[-(tolerated + 1)]


def clip_around(centre: torch.Tensor, values: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Each value moved to centre + clip(value - centre, c), c = `radius` of the distances to centre."""
    diffs = {j: v.to(centre.dtype) - centre for j, v in values.items()}
    norms = [float(torch.linalg.vector_norm(d)) for d in diffs.values()]
    c = radius([n if math.isfinite(n) else math.inf for n in norms])
    return {j: centre + clip(d, c) for j, d in diffs.items()}


class MassClipper:
    """Self-centred clipping of pushed mass, applied to the running sums (running_sums.py).

    Each round this node adds its own share s to its own total S; each in-link's total rho_j (all
    the mass it has delivered) is accepted as A_j = S + clip(rho_j - S, c), c the `radius` of the
    distances ||rho_j - S||, and the tracker gets the change of sum_j A_j. Totals, not the round's
    increments, are compared because an honest increment is mostly mini-batch noise, in which a
    sign-flipped one hides; g^{k+1} - g^k telescopes in a total, so honest totals stay close to S
    while a bad link's drifts away linearly and is held within c of S."""

    def __init__(self, in_neighbours: Sequence[int], like: torch.Tensor) -> None:
        self.own = torch.zeros_like(like, dtype=torch.float64)
        self.accepted = {j: torch.zeros_like(self.own) for j in in_neighbours}

    def apply(self, share: torch.Tensor, totals: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Add this round's own `share`; return the mass to apply given the links' `totals` (rho)."""
        self.own += share.to(torch.float64)
        accepted = clip_around(self.own, {j: totals[j] for j in self.accepted})
        mass = sum((accepted[j] - self.accepted[j] for j in accepted), torch.zeros_like(self.own))
        self.accepted = accepted
        return mass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"clip.own": self.own, **{f"clip.accepted.{j}": a for j, a in self.accepted.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "clip.own" in state:
            self.own = state["clip.own"].clone()
            self.accepted = {j: state[f"clip.accepted.{j}"].clone() for j in self.accepted}
