"""Training on a GPU: messages arrive decoded on the CPU and must be mixed on the node's device.

The first 4-node testnet on a GPU (bench/gpu_check.sh) failed in three places: received tensors stayed on
the CPU, a codec's decoded increment was added to a replica on the GPU, and the push-sum counters were
made on the CPU. Without a GPU here, PyTorch's "meta" device stands in for it: these tests check on which
device the tensors are made (CPU/meta mixing does not always raise, as CPU/CUDA does). The end-to-end CUDA
case runs where there is a GPU.
"""

from __future__ import annotations

import pytest
import torch

from p2pnode.node.algorithms.base import Message, on_device
from p2pnode.node.algorithms.running_sums import PushReceiver, PushSender
from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import Simulation
from p2pnode.node.topology import make_topology
from p2pnode.protocol.codecs import Encoded, get_codec

META = torch.device("meta")


def test_on_device_decodes_every_payload_and_moves_it_to_the_device():
    encoded = get_codec("int8").encode(torch.linspace(-1, 1, 64))
    plain = torch.ones(3)
    messages = [Message(0, 1, 5, "mix", "delta", {"d": encoded, "w": plain}, seq=2, epoch=1)]
    moved = on_device(messages, META)
    assert all(t.device == META for t in moved[0].tensors.values())
    assert not any(isinstance(t, Encoded) for t in moved[0].tensors.values())
    assert (moved[0].src, moved[0].round, moved[0].seq, moved[0].epoch) == (0, 5, 2, 1)
    assert on_device(messages, torch.device("cpu")) is messages  # the CPU path costs nothing


def test_push_sum_counters_live_on_the_device_of_what_they_sum():
    hood = make_topology("directed-ring", 3, 0).neighbourhood(0)
    sender = PushSender(hood, 8, None, META)
    out = sender.send(torch.ones(8, device=META), 1, "track")  # on CUDA: "Expected all tensors on the same device"
    assert out and all(t.device == META for t in [*sender.sigma.values(), *sender.delivered.values()])
    receiver = PushReceiver(hood, 8, META)
    assert all(t.device == META for t in receiver.rho.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
@pytest.mark.parametrize("codec", ["none", "int8"])
def test_p2pft_simulation_on_cuda_matches_the_cpu_run(codec):
    def run(device: str) -> list[float]:
        settings = SimulateSettings(epochs=1, codec=codec, device=device).validate()
        return Simulation(settings).run("p2pft").accuracy

    cuda, cpu = run("cuda"), run("cpu")
    assert all(abs(a - b) <= 0.02 for a, b in zip(cuda, cpu, strict=True)), (cuda, cpu)
