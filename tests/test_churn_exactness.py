"""P2P-FT stays exact under churn (DESIGN §8): a join, a graceful leave, a crash and a return, each
followed by an epoch change and a quiet window, on the heterogeneous least-squares problem of
test_exactness.py over a directed ring + chord, with 20% of the push messages lost.

After every change the members of the new epoch restart tracking (tau = g, empty running sums), so at
the end of each window every member sits at the least-squares solution of the *current* members' data.
Two checks run along: the tracking identity sum tau + sum_links (sigma - rho) = sum g, and a per-link
check that no receiver is ahead of its sender. The identity alone is blind to a rewound node: every
node keeps tau - g + sum_out sigma - sum_in rho constant, so a rewind to one of its own consistent
snapshots never breaks the sum; it only leaves a receiver's rho ahead of the rewound sender's sigma,
negative in-flight mass that the identity adds as if it were credit.

`pytest -s` prints one line per window (`window <name>: max relative error <value>`).
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
from test_exactness import problem, ring_with_chord

from p2pnode.node.algorithms import ALGORITHMS, Message, StepRule
from p2pnode.node.engine import InMemoryNetwork
from p2pnode.node.topology import Neighbourhood

LR = 0.002  # the step of test_exactness.py; 0.0025 already diverges on this problem
DROP = 0.2  # share of the push-phase messages lost
WINDOW = 3000  # quiet rounds after each change of the churn scenario (the slowest reaches 1e-9 by ~2700)
REPAIR_WINDOW = 2000  # after a rewind at round 300 (1e-8 is reached by ~1000)
EXACT = 1e-8
BIASED = 1e-6
CHECK_EVERY = 10  # identity and link checks: every round for CHECK_FIRST rounds after a change, then every 10th
CHECK_FIRST = 20
SEND_HISTORY = 1000  # sequence numbers kept per link for the link check (rewinds go back at most 200 rounds)


def solution(objectives, ids) -> torch.Tensor:
    """The least-squares solution of the data of nodes `ids` together."""
    a = torch.cat([objectives[i].a for i in ids])
    b = torch.cat([objectives[i].b for i in ids])
    return torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)


def clone_state(node) -> dict[str, torch.Tensor]:
    """A checkpoint: `state_dict` hands out live tensors that later rounds update in place."""
    return {name: t.clone() for name, t in node.state_dict().items()}


class Churn:
    """Eight fixed node ids running P2P-FT over changing member lists on an InMemoryNetwork.

    Each epoch's topology is ring_with_chord over the member positions. Push messages are dropped at
    random (seeded); after every round each member asks the senders it has a gap from for a keyframe.
    `sent` records, per link of the current epoch, the counter the sender transmitted with each
    sequence number: its `delivered` counter after the send, which equals sigma for a keyframe and
    which a receiver that applied every delta up to that number holds bit for bit.
    """

    def __init__(self, members, drop: float = DROP, seed: int = 1) -> None:
        self.objectives, _ = problem()
        self.x0 = torch.zeros(self.objectives[0].dim, dtype=torch.float64)
        self.drop, self.rng, self.k = drop, random.Random(seed), 0
        topo = ring_with_chord(len(members))
        nodes = [None] * len(self.objectives)
        for position, node_id in enumerate(members):
            nodes[node_id] = self.fresh(node_id, topo.neighbourhood(position), self.x0)
        self.net = InMemoryNetwork(nodes, self.deliver, list(members))
        self.dropped = self.keyframes = self.since_change = 0
        self.sent: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
        self.identity_gaps: list[float] = []
        self.violations: list[str] = []
        self.log: list[tuple[str, float, float, list[str]]] = []  # per window: name, error, identity gap, violations

    def fresh(self, node_id: int, hood: Neighbourhood, params: torch.Tensor):
        """A new node object (a joiner, or a restarted process), at the run's current round."""
        node = ALGORITHMS["p2pft"](hood, self.objectives[node_id], params, StepRule(lambda k: LR))
        node.iteration = self.k
        return node

    @property
    def live(self) -> list[int]:
        return [i for i in self.net.members if i not in self.net.down]

    def deliver(self, m: Message) -> bool:
        if m.phase != "push":
            return True
        net = self.net
        link = (net.members[m.src], net.members[m.dst])
        self.sent.setdefault(link, {})[m.seq] = net.member(m.src).sender.delivered[m.dst].clone()
        if self.rng.random() < self.drop:
            self.dropped += 1
            return False
        return True

    def change_epoch(self, members) -> None:
        self.net.change_epoch(members, ring_with_chord(len(members)))
        self.sent, self.since_change = {}, 0  # links start afresh: sequence numbers restart at 1

    def rounds(self, count: int) -> None:
        net = self.net
        for _ in range(count):
            net.iteration(self.k)
            self.k += 1
            self.since_change += 1
            for position in range(len(net.members)):
                node = net.member(position)
                for src in list(node.gaps):  # a transport would notice the gap and ask for a keyframe
                    net.member(src).request_keyframe(node.node)
                    self.keyframes += 1
            if self.since_change <= CHECK_FIRST or self.k % CHECK_EVERY == 0:
                self.identity_gaps.append(self.identity_gap())
                self.violations += self.link_violations()
            if self.k % 500 == 0:
                self.prune()

    def links(self) -> list[tuple[int, int]]:
        """(sender position, receiver position) of every link of the current epoch."""
        net = self.net
        return [(j, i) for j in range(len(net.members)) for i in net.member(j).hood.out_neighbours]

    def identity_gap(self) -> float:
        """|sum tau + sum_links (sigma - rho) - sum g| over the current members, relative to their gradients
        (the summed gradient itself goes to zero at the optimum)."""
        nodes = [self.net.member(p) for p in range(len(self.net.members))]
        total = sum(n.tau for n in nodes)
        for j, i in self.links():
            total = total + nodes[j].sender.sigma[i] - nodes[i].receiver.rho[j]
        return float((total - sum(n.grad for n in nodes)).norm()) / sum(float(n.grad.norm()) for n in nodes)

    def link_violations(self) -> list[str]:
        """Links whose receiver is ahead of its sender: it applied a sequence number the sender has not
        reached, or its rho is not the counter the sender transmitted with the receiver's last number
        (so sigma - rho is not mass legitimately in flight from this sender)."""
        net, found = self.net, []
        for j, i in self.links():
            sender, receiver = net.member(j).sender, net.member(i).receiver
            seq, rho = receiver.last_seq[j], receiver.rho[j]
            name = f"round {self.k}, link {net.members[j]}->{net.members[i]}"
            if seq > sender.seq[i]:
                found.append(f"{name}: receiver applied seq {seq}, sender is at seq {sender.seq[i]}")
            elif seq == 0:
                if bool(rho.any()):
                    found.append(f"{name}: receiver holds mass before the sender's first message")
            else:
                sent = self.sent.get((net.members[j], net.members[i]), {}).get(seq)
                if sent is None or not torch.equal(sent, rho):
                    found.append(f"{name}: rho is not the counter the sender sent with seq {seq}")
        return found

    def prune(self) -> None:
        net = self.net
        for j, i in self.links():
            history = self.sent.get((net.members[j], net.members[i]))
            if history:
                oldest = net.member(i).receiver.last_seq[j] - SEND_HISTORY
                for seq in [s for s in history if s < oldest]:
                    del history[seq]

    def error(self) -> float:
        """Max relative distance of the live members to the solution of the live members' data."""
        x_star = solution(self.objectives, self.live)
        return max(float((self.net.nodes[i].params - x_star).norm() / x_star.norm()) for i in self.live)

    def window(self, name: str, rounds: int = WINDOW) -> float:
        """Run a quiet window; log its error and whether the checks held during it."""
        self.rounds(rounds)
        error = self.error()
        print(f"window {name}: max relative error {error:.2g}")
        self.log.append((name, error, max(self.identity_gaps, default=float("nan")), self.violations[:5]))
        self.identity_gaps, self.violations = [], []
        return error

    def assert_exact_and_sound(self) -> None:
        """Every logged window ended exact, with the identity held and no receiver ahead of its sender."""
        assert self.log
        for name, error, identity_gap, violations in self.log:
            assert error <= EXACT, (name, error)
            assert identity_gap <= 1e-10, (name, identity_gap)
            assert not violations, (name, violations)


LEAVER, CRASHER, AGE, DOWN_ROUNDS = 2, 5, 180, 20


@pytest.fixture(scope="module")
def until_crash():
    """Nodes 0-6 start (7 is outside), node 7 joins, node 2 leaves gracefully, a window after each; node
    5's checkpoint is taken AGE rounds before the end. Tests continue from deep copies."""
    churn = Churn(range(7))
    net = churn.net
    churn.window("start (nodes 0-6)")

    joiner = 7  # a fresh object that took a donor's (stale) theta
    net.nodes[joiner] = churn.fresh(joiner, ring_with_chord(8).neighbourhood(7), net.member(0).params)
    churn.change_epoch([*net.members, joiner])
    churn.window("join (node 7 joins)")

    churn.change_epoch([i for i in net.members if i != LEAVER])
    churn.rounds(WINDOW - AGE)
    checkpoint = clone_state(net.nodes[CRASHER])  # its last checkpoint before the crash
    churn.window(f"graceful leave (node {LEAVER} leaves)", AGE)
    return churn, checkpoint


def crash(churn: Churn) -> None:
    """CRASHER stops: nothing reaches it or leaves it while the others still count on it."""
    churn.net.down.add(CRASHER)
    churn.rounds(DOWN_ROUNDS)


def test_p2pft_is_exact_after_a_join_and_a_graceful_leave_with_lost_push_messages(until_crash):
    churn = until_crash[0]
    assert [name.split()[0] for name, *_ in churn.log] == ["start", "join", "graceful"]
    churn.assert_exact_and_sound()
    assert churn.dropped > 1000 and churn.keyframes > 100, (churn.dropped, churn.keyframes)


def test_p2pft_is_exact_after_a_crash_and_a_return_from_an_old_checkpoint(until_crash):
    churn, checkpoint = copy.deepcopy(until_crash[0]), until_crash[1]
    churn.log.clear()
    net = churn.net
    crash(churn)
    churn.change_epoch([i for i in net.members if i != CRASHER])
    churn.window(f"crash (node {CRASHER} crashes)")

    members = [*net.members, CRASHER]  # a restart is a join: appended, its links start afresh
    restarted = churn.fresh(CRASHER, ring_with_chord(len(members)).neighbourhood(len(members) - 1), churn.x0)
    restarted.load_model_state(checkpoint)  # theta and optimizer state of AGE + DOWN_ROUNDS rounds before
    net.nodes[CRASHER] = restarted
    churn.change_epoch(members)
    churn.window(f"return (node {CRASHER} restarts from its state of {AGE + DOWN_ROUNDS} rounds before)")
    churn.assert_exact_and_sound()


def test_negative_control_a_crashed_node_without_an_epoch_change_leaves_everyone_off_the_solution(until_crash):
    churn = copy.deepcopy(until_crash[0])
    crash(churn)  # the same crash, but the node stays in the member list for good
    churn.rounds(WINDOW // 2)
    halfway = churn.error()
    after = churn.window(f"crash of node {CRASHER} without an epoch change (negative control)", WINDOW // 2)
    x_star = solution(churn.objectives, churn.live)
    closest = min(float((churn.net.nodes[i].params - x_star).norm() / x_star.norm()) for i in churn.live)
    assert min(halfway, after, closest) > BIASED, (halfway, after, closest)


@pytest.fixture(scope="module")
def rewind():
    """Eight nodes on reliable links for 300 rounds (still far from the optimum), node 3's full state
    saved 50 rounds before the end: what a node restarted from its last checkpoint would load.

    Links are reliable here (a stream): with lost messages, the first keyframe a receiver asks for once
    the rewound sender's sequence numbers have passed its own carries the absolute counter and so
    happens to apply the negative difference, which heals the link. The defect of DESIGN §8 is
    permanent where nothing forces such a keyframe; the epoch change repairs it either way."""
    churn, node, age = Churn(range(8), drop=0.0), 3, 50
    churn.rounds(300 - age)
    checkpoint = clone_state(churn.net.nodes[node])
    churn.rounds(age)
    assert max(churn.identity_gaps) <= 1e-10 and not churn.violations
    churn.identity_gaps.clear()
    return churn, node, checkpoint


def restart_in_place(churn: Churn, node: int, checkpoint) -> None:
    """A naive restart: the full state, running-sum counters included, and keyframes on reconnect
    (their sequence numbers are ones the receivers already passed, so they are ignored)."""
    restarted = churn.net.nodes[node]
    restarted.load_state_dict(checkpoint)
    for dst in restarted.hood.out_neighbours:
        restarted.request_keyframe(dst)


def test_a_node_rewound_without_an_epoch_change_biases_p2pft_for_good_and_only_the_link_check_sees_it(rewind):
    churn = copy.deepcopy(rewind[0])
    restart_in_place(churn, *rewind[1:])
    churn.rounds(REPAIR_WINDOW // 2)
    halfway = churn.error()
    after = churn.window("rewind 50 rounds, no epoch change (defect)", REPAIR_WINDOW // 2)
    assert min(halfway, after) > BIASED, (halfway, after)
    _, _, identity_gap, _ = churn.log[-1]
    assert identity_gap <= 1e-10, identity_gap  # the identity cannot see it ...
    still = churn.link_violations()  # ... the link check does, to the end: node 3's receivers are ahead of it
    assert still and all(v.split(": ")[0].split("link ")[1].startswith("3->") for v in still), still


def test_a_node_rewound_then_an_epoch_change_with_the_same_members_is_exact_again(rewind):
    churn = copy.deepcopy(rewind[0])
    restart_in_place(churn, *rewind[1:])
    churn.change_epoch(list(churn.net.members))
    churn.log.clear()
    churn.window("rewind 50 rounds, then an epoch change", REPAIR_WINDOW)
    churn.assert_exact_and_sound()


def single_node(hood: Neighbourhood, momentum: float = 0.0):
    objectives, _ = problem()
    x0 = torch.linspace(-1, 1, objectives[0].dim, dtype=torch.float64)
    return ALGORITHMS["p2pft"](hood, objectives[0], x0, StepRule(lambda k: LR, momentum=momentum))


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[name], sb[name]) for name in sa)


def test_messages_of_an_older_epoch_are_ignored():
    hood = ring_with_chord(4).neighbourhood(0)  # in-neighbour 3, out-neighbours 1 and 2
    node = single_node(hood)
    node.enter_epoch(hood, 2)
    value = torch.full((node.params.numel(),), 5.0, dtype=torch.float64)
    for phase, kind, tensors, seq in (("pull", "value", {"v": value}, 0), ("push", "total", {"sigma": value}, 1)):
        assert all(m.epoch == 2 for m in node.send(phase, 0))
        message = Message(3, 0, 0, phase, kind, tensors, seq)
        twin, current = copy.deepcopy(node), copy.deepcopy(node)
        node.receive(phase, 0, [dataclasses.replace(message, epoch=1)])  # stale: sent before the epoch change
        twin.receive(phase, 0, [])
        current.receive(phase, 0, [dataclasses.replace(message, epoch=2)])
        assert same_state(node, twin), phase
        assert not same_state(current, twin), phase  # the same message of the current epoch is applied


def test_enter_epoch_zeroes_every_link_and_restarts_tracking_at_the_latest_gradient():
    node = single_node(ring_with_chord(4).neighbourhood(0), momentum=0.5)  # in-neighbour 3, out 1 and 2
    ones = torch.ones(node.params.numel(), dtype=torch.float64)
    node.send("pull", 0)
    node.receive("pull", 0, [Message(3, 0, 0, "pull", "value", {"v": ones})])
    node.send("push", 0)
    pushed = [
        Message(3, 0, 0, "push", "delta", {"delta": ones}, 1),
        Message(3, 0, 0, "push", "delta", {"delta": ones}, 3),
    ]
    node.receive("push", 0, pushed)  # seq 1 applied, seq 3 leaves a gap
    node.request_keyframe(1)
    assert node.sender.sigma[1].any() and node.receiver.rho[3].any() and node.receiver.gaps == {3}
    assert node.pull.replicas and node.sender.keyframe_due == {1} and not torch.equal(node.tau, node.grad)
    params, grad, momentum = node.params.clone(), node.grad.clone(), node.step.state_dict()["momentum_buffer"].clone()

    hood = Neighbourhood(0, (3, 4), (1, 4))  # renumbered; links to 1 and from 3 exist in both epochs
    node.enter_epoch(hood, 1)

    assert node.epoch == 1 and node.hood == hood
    assert torch.equal(node.tau, grad) and torch.equal(node.grad, grad) and not node.z.any()
    assert torch.equal(node.params, params)  # theta and the optimizer state stay
    assert torch.equal(node.step.state_dict()["momentum_buffer"], momentum)
    sender, receiver, pull = node.sender, node.receiver, node.pull
    assert set(sender.sigma) == set(sender.delivered) == set(sender.seq) == {1, 4}
    assert not any(sigma.any() for sigma in sender.sigma.values()) and not any(sender.seq.values())
    assert not any(delivered.any() for delivered in sender.delivered.values()) and not sender.keyframe_due
    assert set(receiver.rho) == set(receiver.last_seq) == {3, 4}
    assert not any(rho.any() for rho in receiver.rho.values()) and not any(receiver.last_seq.values())
    assert not receiver.gaps
    assert not pull.replicas and pull.last_seq == {3: 0, 4: 0} and pull.replica_round == {3: -1, 4: -1}
    assert not pull.gaps
    assert not node.gaps
