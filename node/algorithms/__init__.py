"""Algorithm registry: `ALGORITHMS[name]` maps each name to its per-node state machine class."""

from . import dimat, dsgd, local, p2pft, sgp  # noqa: F401  (importing registers them)
from .base import (
    ALGORITHMS,
    PARAMS,
    Algorithm,
    Layout,
    Layouts,
    Message,
    Objective,
    StepRule,
    as_tensor,
    get_algorithm,
    label_of,
    register,
)

__all__ = [
    "ALGORITHMS",
    "PARAMS",
    "Algorithm",
    "Layout",
    "Layouts",
    "Message",
    "Objective",
    "StepRule",
    "as_tensor",
    "get_algorithm",
    "label_of",
    "register",
]
