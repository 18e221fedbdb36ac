"""Churn schedules: who joins, leaves, crashes and comes back, and when (`--churn EVENTS`).

EVENTS is comma-separated `ACTION:NODE@WHEN`: ACTION is `join` (a fresh node enters, taking the
parameters of a donor), `leave` (graceful: announced, the node takes part until the epoch that drops
it), `crash` (the node vanishes; the others notice its silence) or `rejoin` (a node that left or
crashed comes back from its own last checkpoint, as a joiner). WHEN is a round (`@200`) for the
simulator and seconds since the start (`@40s`) for the testnet. A node whose first event is `join`
starts outside the run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BadInput

ACTIONS = ("join", "leave", "crash", "rejoin")
_EVENT = re.compile(r"^(?P<action>[a-z]+):(?P<node>\d+)@(?P<when>\d+(?:\.\d+)?)(?P<unit>s?)$")


@dataclass(frozen=True)
class ChurnEvent:
    action: str
    node: int
    when: float  # a round, or seconds when `seconds`
    seconds: bool = False

    def __str__(self) -> str:
        when = f"{self.when:g}s" if self.seconds else f"{int(self.when)}"
        return f"{self.action}:{self.node}@{when}"


def parse_churn(spec: str | None, nodes: int, seconds: bool = False) -> list[ChurnEvent]:
    """Parse and check a churn schedule for a run of `nodes` nodes (ids 0..nodes-1), sorted by time.

    `seconds` says which unit the command takes: rounds (`@200`) or seconds (`@40s`)."""
    if not spec:
        return []
    unit, example = ("seconds", "crash:1@40s,rejoin:1@70s") if seconds else ("rounds", "crash:1@300,rejoin:1@350")
    events = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        m = _EVENT.match(item)
        if m is None:
            raise BadInput(f"bad --churn event {item!r}: write ACTION:NODE@{unit.upper()[:-1]}, e.g. {example}")
        action, node, when, has_s = m["action"], int(m["node"]), float(m["when"]), bool(m["unit"])
        if action not in ACTIONS:
            raise BadInput(f"bad --churn action {action!r} in {item!r}: choose one of {', '.join(ACTIONS)}")
        if has_s != seconds:
            raise BadInput(f"--churn event {item!r}: this command times events in {unit}, e.g. {example}")
        if not seconds and when != int(when):
            raise BadInput(f"--churn event {item!r}: rounds are whole numbers")
        if node >= nodes:
            raise BadInput(f"--churn event {item!r} names node {node}, but the run has nodes 0..{nodes - 1}")
        events.append(ChurnEvent(action, node, when, seconds))
    events.sort(key=lambda e: e.when)
    check_sequence(events, nodes)
    return events


def initial_members(events: list[ChurnEvent], nodes: int) -> list[int]:
    """Nodes that start in the run: all but those whose first event is `join`."""
    first: dict[int, str] = {}
    for e in events:
        first.setdefault(e.node, e.action)
    return [i for i in range(nodes) if first.get(i) != "join"]


def check_sequence(events: list[ChurnEvent], nodes: int) -> None:
    """Each node's events must make sense in order: only a member can leave or crash, only an outsider
    can join, and only a node that was in the run before can rejoin (it needs its own checkpoint)."""
    inside = set(initial_members(events, nodes))
    was_member = set(inside)
    for e in events:
        if e.action in ("leave", "crash"):
            if e.node not in inside:
                raise BadInput(f"--churn event {e}: node {e.node} is not in the run at that time")
            inside.discard(e.node)
            if not inside:
                raise BadInput(f"--churn event {e} leaves nobody in the run; keep at least one node in it")
        elif e.node in inside:
            raise BadInput(f"--churn event {e}: node {e.node} is already in the run at that time")
        elif e.action == "rejoin" and e.node not in was_member:
            raise BadInput(f"--churn event {e}: node {e.node} was never in the run, so it has no state; use join")
        else:
            inside.add(e.node)
            was_member.add(e.node)
