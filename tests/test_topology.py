"""Communication graphs: named topologies, edge-list files, connectivity checks and local mixing weights."""

from __future__ import annotations

import pytest
import torch

from p2pnode.node.errors import BadInput
from p2pnode.node.topology import (
    RING_MEMBERS_MAX,
    Topology,
    make_topology,
    random_graph,
    read_edge_list,
    slow_mixing_warning,
)

NAMED = ["directed-ring", "exponential", "complete", "ring", "random:2"]
SIZES = [3, 4, 5, 8, 13]


def reachable(topo: Topology, start: int) -> set[int]:
    seen, stack = {start}, [start]
    while stack:
        for j in topo.out_neighbours(stack.pop()):
            if j not in seen:
                seen.add(j)
                stack.append(j)
    return seen


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", [*NAMED, "one-peer-exponential"])
def test_named_topology_is_strongly_connected(name, n):
    topo = make_topology(name, n, seed=0)
    assert topo.n == n
    assert topo.unreachable_pair() is None
    for i in range(n):  # independent check: every node reaches every other along out-links
        assert reachable(topo, i) == set(range(n))
    assert all((s, s) not in topo.edges for s in range(n))  # self-loops are implicit, not edges


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", NAMED)
def test_row_stochastic_rows_sum_to_one_from_own_in_degree(name, n):
    topo = make_topology(name, n, seed=0)
    a = topo.row_stochastic()
    assert a.shape == (n, n)
    assert torch.allclose(a.sum(1), torch.ones(n, dtype=torch.float64), atol=1e-12)
    for i in range(n):
        ins = set(topo.in_neighbours(i))
        w = 1.0 / (len(ins) + 1)
        for j in range(n):
            expected = w if (j == i or j in ins) else 0.0
            assert a[i, j].item() == pytest.approx(expected, abs=1e-15), (i, j)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", NAMED)
def test_column_stochastic_columns_sum_to_one_from_own_out_degree(name, n):
    topo = make_topology(name, n, seed=0)
    b = topo.column_stochastic()
    assert torch.allclose(b.sum(0), torch.ones(n, dtype=torch.float64), atol=1e-12)
    for j in range(n):
        outs = set(topo.out_neighbours(j))
        w = 1.0 / (len(outs) + 1)
        for dst in range(n):
            expected = w if (dst == j or dst in outs) else 0.0
            assert b[dst, j].item() == pytest.approx(expected, abs=1e-15), (dst, j)


def test_neighbourhood_weights_depend_only_on_own_degrees():
    topo = Topology(4, frozenset({(0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (1, 0)}))
    h = topo.neighbourhood(0)
    assert set(h.in_neighbours) == {1, 3}
    assert set(h.out_neighbours) == {1, 2}
    assert h.self_row_weight == pytest.approx(1 / 3)
    assert h.row_weight(3) == pytest.approx(1 / 3)
    assert h.self_col_weight == pytest.approx(1 / 3)
    assert h.col_weight(2) == pytest.approx(1 / 3)
    h2 = topo.neighbourhood(2)
    assert set(h2.in_neighbours) == {0, 1}
    assert set(h2.out_neighbours) == {3}
    assert h2.self_row_weight == pytest.approx(1 / 3)
    assert h2.self_col_weight == pytest.approx(1 / 2)


@pytest.mark.parametrize("n", [3, 5, 8])
def test_ring_and_complete_are_undirected_and_directed_ring_is_not(n):
    assert make_topology("ring", n).is_undirected
    assert make_topology("complete", n).is_undirected
    assert not make_topology("directed-ring", n).is_undirected


@pytest.mark.parametrize("n", [3, 6, 9])
def test_named_topologies_have_the_documented_links(n):
    assert make_topology("directed-ring", n).edges == {(i, (i + 1) % n) for i in range(n)}
    assert make_topology("ring", n).edges == {(i, (i + 1) % n) for i in range(n)} | {((i + 1) % n, i) for i in range(n)}
    assert make_topology("complete", n).edges == {(i, j) for i in range(n) for j in range(n) if i != j}
    hops = [h for h in (1, 2, 4, 8) if h < n]
    assert make_topology("exponential", n).edges == {(i, (i + h) % n) for i in range(n) for h in hops}


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("k", [1, 2])
def test_random_topology_gives_every_node_exactly_k_out_neighbours(n, k):
    topo = make_topology(f"random:{k}", n, seed=3)
    for i in range(n):
        outs = topo.out_neighbours(i)
        assert len(outs) == k
        assert i not in outs
    assert topo.unreachable_pair() is None


def test_random_topology_is_seeded():
    a = make_topology("random:2", 10, seed=1).edges
    assert a == make_topology("random:2", 10, seed=1).edges
    others = {make_topology("random:2", 10, seed=s).edges for s in range(2, 8)}
    assert any(o != a for o in others)


@pytest.mark.parametrize(("n", "k"), [(4, 0), (4, 4), (4, 9)])
def test_random_topology_rejects_impossible_degree(n, k):
    with pytest.raises(BadInput, match="random:K"):
        random_graph(n, k, 0)


@pytest.mark.parametrize("spec", ["random:x", "random:"])
def test_random_topology_rejects_non_integer_k(spec):
    with pytest.raises(BadInput, match="random:K"):
        make_topology(spec, 4)


def test_unknown_topology_name_raises_bad_input():
    with pytest.raises(BadInput, match="unknown topology 'star'"):
        make_topology("star", 4)


def test_zero_nodes_raises_bad_input():
    with pytest.raises(BadInput, match="at least one node"):
        make_topology("ring", 0)


# --- edge-list files ----------------------------------------------------------------------------


EDGE_LIST = """\
# a directed ring 0 -> 1 -> 2 -> 3 -> 0, plus a two-way chord
0 -> 1
1->2   # no spaces around the arrow

2 3
3 -> 0
0 <-> 2
"""


def test_edge_list_file_is_read_with_comments_arrows_and_two_way_links(tmp_path):
    path = tmp_path / "graph.txt"
    path.write_text(EDGE_LIST)
    topo = read_edge_list(path)
    assert topo.n == 4
    assert topo.edges == {(0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (2, 0)}
    assert topo.name == "graph.txt"
    assert set(topo.out_neighbours(0)) == {1, 2}
    assert set(topo.in_neighbours(0)) == {2, 3}


def test_edge_list_file_is_accepted_by_make_topology(tmp_path):
    path = tmp_path / "graph.txt"
    path.write_text(EDGE_LIST)
    topo = make_topology(str(path), 4)
    assert topo.edges == read_edge_list(path).edges
    assert topo.unreachable_pair() is None


@pytest.mark.parametrize(
    ("text", "n", "unreachable"),
    [
        ("0 <-> 1\n2 <-> 3\n", 4, "node 2"),  # two islands
        ("0 -> 1\n1 -> 2\n", 3, "node 0"),  # a path: nothing leads back to 0
        ("0 <-> 1\n1 <-> 2\n", 4, "node 3"),  # node 3 named by the run but by no link
    ],
)
def test_disconnected_edge_list_raises_bad_input_naming_unreachable_node(tmp_path, text, n, unreachable):
    path = tmp_path / "islands.txt"
    path.write_text(text)
    with pytest.raises(BadInput, match="not strongly connected") as err:
        make_topology(str(path), n)
    assert f"{unreachable} cannot be reached" in str(err.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 -> x", "expected 'SRC DST'"),
        ("0 1 2", "expected 'SRC DST'"),
        ("7", "expected 'SRC DST'"),
        ("a <-> b", "expected 'SRC DST'"),
        ("0 -> 1.5", "expected 'SRC DST'"),
        ("0 -> -1", "must be >= 0"),
    ],
)
def test_malformed_edge_list_line_raises_bad_input_with_line_number(tmp_path, line, message):
    path = tmp_path / "bad.txt"
    path.write_text(f"# header\n{line}\n1 -> 0\n")
    with pytest.raises(BadInput, match=message) as err:
        read_edge_list(path)
    assert "bad.txt:2:" in str(err.value)


def test_edge_list_naming_node_beyond_run_size_raises_bad_input(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("0 <-> 1\n1 <-> 5\n")
    with pytest.raises(BadInput, match="names node 5 but the run has 4 nodes"):
        make_topology(str(path), 4)


def test_edge_list_without_links_raises_bad_input(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# nothing here\n\n")
    with pytest.raises(BadInput, match="lists no links"):
        read_edge_list(path)


def test_missing_edge_list_file_raises_bad_input(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        make_topology(str(tmp_path / "nope.txt"), 4)


def test_an_edge_list_that_is_not_text_or_is_a_directory_raises_bad_input_saying_so(tmp_path):
    binary = tmp_path / "e7.txt"
    binary.write_bytes(b"\x00\xff\xfe")
    with pytest.raises(BadInput, match=r"topology file .*e7\.txt is not text"):  # was a UnicodeDecodeError
        make_topology(str(binary), 4)
    (tmp_path / "edges").mkdir()
    with pytest.raises(BadInput, match=r"topology file .*edges is a directory"):  # said "does not exist"
        make_topology(str(tmp_path / "edges"), 4)


def test_a_testnet_checks_its_topology_file_before_it_starts_a_process(tmp_path):
    """Checked only by each daemon, a bad file made four daemons fail with tracebacks in their logs."""
    from p2pnode.node.settings import TestnetSettings

    binary = tmp_path / "e7.txt"
    binary.write_bytes(b"\x00\xff\xfe")
    with pytest.raises(BadInput, match="is not text"):
        TestnetSettings(topology=str(binary)).validate()


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 13])
def test_one_peer_exponential_uses_one_in_and_one_out_link_a_round_with_stochastic_weights(n):
    topo = make_topology("one-peer-exponential", n)
    assert topo.edges == make_topology("exponential", n).edges and topo.unreachable_pair() is None
    hops = [2**m for m in range(n.bit_length()) if 2**m < n]
    for k in range(2 * len(hops)):
        a, b = topo.row_stochastic(k), topo.column_stochastic(k)
        assert torch.equal(a.sum(1), torch.ones(n, dtype=torch.float64))
        assert torch.equal(b.sum(0), torch.ones(n, dtype=torch.float64))
        for i in range(n):
            h = topo.neighbourhood(i)
            hop = hops[k % len(hops)]
            assert h.senders(k) == ((i - hop) % n,) and h.receivers(k) == ((i + hop) % n,)
            assert a[i, i] == 0.5 and a[i, (i - hop) % n] == 0.5 and b[(i + hop) % n, i] == 0.5


@pytest.mark.parametrize("n", [4, 8, 16])
def test_one_peer_exponential_averages_exactly_over_log2_n_rounds_where_n_is_a_power_of_two(n):
    topo = make_topology("one-peer-exponential", n)
    rounds = n.bit_length() - 1
    for start in range(rounds):  # whichever round a node starts at
        product = torch.eye(n, dtype=torch.float64)
        for k in range(start, start + rounds):
            product = topo.row_stochastic(k) @ product
        assert torch.allclose(product, torch.full((n, n), 1 / n, dtype=torch.float64), atol=1e-15)


def test_a_fixed_graph_uses_every_link_every_round_with_its_degree_weights():
    topo = make_topology("exponential", 8)
    for i in range(8):
        h = topo.neighbourhood(i)
        assert not h.time_varying
        for k in range(3):
            assert h.senders(k) == h.in_neighbours and h.receivers(k) == h.out_neighbours
            assert h.row_weight_at(k) == h.self_row_weight and h.col_weight_at(k) == h.self_col_weight


@pytest.mark.parametrize("algorithm", ["sgp", "dimat", "cdsgd"])
def test_algorithms_that_mix_over_a_fixed_graph_refuse_one_peer_exponential(algorithm):
    from p2pnode.node.settings import SimulateSettings

    reason = "changes its links every round" if algorithm == "sgp" else "need an undirected topology"
    with pytest.raises(BadInput, match=f"^{algorithm} .*{reason}"):
        SimulateSettings(topology="one-peer-exponential", algorithm=algorithm, nodes=4).validate()
    with pytest.raises(BadInput, match="sgp mixes over a fixed graph"):
        SimulateSettings(topology="one-peer-exponential", compare=["sgp"], nodes=4).validate()
    assert SimulateSettings(topology="one-peer-exponential", compare=["dsgd", "local", "central"]).validate()


def test_robust_clipping_refuses_one_peer_exponential_which_hears_one_in_neighbour_a_round():
    """Self-centred clipping takes its radius from several in-neighbours and compares each link's total
    with this node's own; on a graph of one in-link a round neither holds (a clipped run ended at 90.3%
    where the ring's ends at 96.9%)."""
    from p2pnode.node.settings import SimulateSettings

    with pytest.raises(BadInput, match="--robust clip needs at least 3 in-neighbours a round"):
        SimulateSettings(topology="one-peer-exponential", robust="clip").validate()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 8, 13])
def test_auto_is_the_directed_ring_up_to_four_nodes_and_the_exponential_graph_above(n):
    expected = make_topology("directed-ring" if n <= RING_MEMBERS_MAX else "exponential", n)
    auto = make_topology("auto", n)
    assert auto.edges == expected.edges
    assert auto.name == expected.name  # messages name the graph a run actually uses


def test_slow_mixing_warning_is_given_for_the_directed_ring_past_four_nodes_only():
    assert slow_mixing_warning("directed-ring", RING_MEMBERS_MAX) is None
    assert "directed-ring over 5 nodes" in slow_mixing_warning("directed-ring", 5)
    assert all(slow_mixing_warning(name, 16) is None for name in ("auto", "exponential", "complete"))
    # an elastic run: said once, when it grows past 4 members, not at every epoch after
    assert "over 5 nodes" in slow_mixing_warning("directed-ring", 5, grown_from=4)
    assert slow_mixing_warning("directed-ring", 6, grown_from=5) is None


def test_default_graph_keeps_six_nodes_learning_where_the_directed_ring_diverges():
    """At the default step, gradient tracking with momentum on a directed ring of 6 stays near chance
    (its mixing is too slow for the step: README, "How many volunteers"); the default graph learns."""
    from p2pnode.node.settings import SimulateSettings
    from p2pnode.node.simulator import simulate

    def accuracy(topology: str) -> float:
        settings = SimulateSettings(nodes=6, split="0-1,2-3,4,5,6-7,8-9", epochs=6, topology=topology, device="cpu")
        return min(simulate(settings).results["p2pft"].accuracy)

    assert SimulateSettings().topology == "auto"
    assert accuracy("directed-ring") < 0.3  # 16.4% when written
    assert accuracy("auto") > 0.6  # 73.3%
