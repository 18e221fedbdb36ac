"""Saved models: each node's final trainable parameters, per algorithm, and how to read them back.

`save_models` writes, for one algorithm, `DIR/<algorithm>/node<i>.safetensors` (the trainable tail's
tensors, named as in the full timm model, e.g. `blocks.3.attn.qkv.weight`, `norm.weight`,
`head.weight`: `timm_model.load_state_dict(tensors, strict=False)` takes them) and `node<i>.json`:

    {"format": "p2pnode-saved-model", "version": 1, "algorithm": "p2pft", "node": 0,
     "classes": [0, 1], "model": "vit_digits", "fingerprint": "<trunk hash>", "num_classes": 10,
     "parameters": [[name, shape], ...]   # the order of the flat trainable vector
     "settings": {...}}                   # the run's settings: enough to rebuild the model and data

`load_saved_models` reads such directories (a `--save` directory, one algorithm's folder, or one
`node<i>.json`) and daemon state directories (`state.safetensors` holds the flat trainable vector
under `params`; `state.json` the trunk fingerprint; the settings come from `result.json`, or from
the `start` event of `events.jsonl` for a node that left before the end). Models of different
trunks are refused: they cannot be compared.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import BadInput
from .models import SAVED_MODEL_FORMAT, FineTuneModel
from .settings import RunSettings
from .state_store import SET_ASIDE, set_aside_run_files

if TYPE_CHECKING:
    from .simulator import Simulation

FORMAT = SAVED_MODEL_FORMAT
VERSION = 1
CENTRAL = "central"


@dataclass
class SavedModel:
    """One node's trainable parameters and what they belong to."""

    algorithm: str
    node: int
    classes: list[int] | None  # classes of the node's training data (None: not known without the data)
    model: str
    fingerprint: str
    settings: dict
    params: torch.Tensor  # the flat trainable vector, in FineTuneModel's tail order
    source: Path

    def run_settings(self) -> RunSettings:
        """The settings that rebuild the model and the data (not validated: a topology file may be gone)."""
        names = {f.name for f in fields(RunSettings)}
        return RunSettings(**{k: v for k, v in self.settings.items() if k in names})


def tail_names(model: FineTuneModel) -> list[tuple[str, tuple[int, ...]]]:
    """The trainable tensors as named in the full timm model, in the flat vector's order."""
    full = {id(p): n for n, p in model.model.named_parameters()}
    return [(full[id(p)], tuple(p.shape)) for p in model.tail.parameters()]


def node_classes(labels: np.ndarray, parts: Sequence[np.ndarray]) -> list[list[int]]:
    """The classes present in each node's training samples."""
    labels = np.asarray(labels)
    return [sorted(int(c) for c in np.unique(labels[np.asarray(p, dtype=np.int64)])) for p in parts]


def save_models(
    directory: str | Path,
    algorithm_name: str,
    per_node_params: Sequence[torch.Tensor | None],
    model: FineTuneModel,
    settings: RunSettings | dict,
    node_classes: Sequence[Sequence[int] | None],
) -> list[Path]:
    """Write each node's trainable parameters of one algorithm; a None entry (a node outside the run
    at the end) is skipped. Returns the paths of the JSON files written."""
    folder = Path(directory) / algorithm_name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot create {folder}: {e.strerror}") from None
    names = tail_names(model)
    settings_dict = settings if isinstance(settings, dict) else settings.to_dict()
    written = []
    for i, params in enumerate(per_node_params):
        if params is None:
            continue
        if params.numel() != model.num_trainable:
            raise BadInput(
                f"node {i} of {algorithm_name} has {params.numel()} parameters; "
                f"{model.name} trains {model.num_trainable}"
            )
        flat = params.detach().to("cpu").reshape(-1)
        tensors = {n: t.clone().contiguous() for (n, _), t in zip(names, model.unflatten(flat).values(), strict=True)}
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "algorithm": algorithm_name,
            "node": i,
            "classes": None if node_classes[i] is None else [int(c) for c in node_classes[i]],
            "model": model.name,
            "fingerprint": model.fingerprint,
            "num_classes": model.num_classes,
            "parameters": [[n, list(s)] for n, s in names],
            "settings": settings_dict,
        }
        write_atomically(folder / f"node{i}.safetensors", lambda tmp, t=tensors: save_file(t, str(tmp)))
        write_atomically(folder / f"node{i}.json", lambda tmp, m=meta: tmp.write_text(json.dumps(m, indent=1)))
        written.append(folder / f"node{i}.json")
    return written


def set_aside_saved_models(directory: str | Path) -> Path | None:
    """A `--save` directory used before: the earlier run's algorithm folders move into `set-aside-<time>/`
    there (which readers skip), so that one directory never mixes two runs' models."""
    root = Path(directory)
    folders = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    earlier = [p.name for p in folders if not p.name.startswith(SET_ASIDE) and any(p.glob("node*.json"))]
    return set_aside_run_files(root, "an earlier run's saved models", earlier)


def save_simulation_run(directory: str | Path, sim: Simulation, name: str) -> list[Path]:
    """Save the nodes of `sim`'s last run (`Simulation.run(name)` just returned) under `name`."""
    parts = [np.concatenate(sim.parts)] if name == CENTRAL else sim.parts
    classes = node_classes(sim.data.train_labels, parts)
    params = [None if n is None else n.params for n in sim.nodes]
    return save_models(directory, name, params, sim.model, sim.settings, classes)


def save_state_dirs(
    directory: str | Path,
    state_dirs: Iterable[str | Path] | Mapping[int, str | Path],
    model: FineTuneModel | None = None,
) -> list[Path]:
    """Copy the final parameters in daemon state directories into a `--save` directory (one file per node,
    under each daemon's algorithm). Given a mapping {node: state_dir}, those are the node numbers (a
    joiner started without --index has none of its own); else each daemon's --index. `model` (already
    built from the same settings) saves building it again."""
    numbered = dict(state_dirs) if isinstance(state_dirs, Mapping) else None
    paths = list(numbered.values()) if numbered is not None else list(state_dirs)
    saved = load_saved_models(paths)
    if numbered is not None:
        for s, node in zip(saved, numbered, strict=True):
            s.node = int(node)
    if model is None:
        model = build_saved_model(saved[0])
    written = []
    for s in saved:
        check_fits(s, model)
        classes: list[list[int] | None] = [None] * (s.node + 1)
        classes[s.node] = s.classes
        params: list[torch.Tensor | None] = [None] * (s.node + 1)
        params[s.node] = s.params
        written += save_models(directory, s.algorithm, params, model, s.settings, classes)
    return written


def build_saved_model(saved: SavedModel) -> FineTuneModel:
    """The model these parameters belong to, rebuilt from the saved settings; its trunk must match."""
    from .training import prepare_model_and_data

    model, _ = prepare_model_and_data(saved.run_settings(), torch.device("cpu"))
    check_fits(saved, model)
    return model


def check_fits(saved: SavedModel, model: FineTuneModel) -> None:
    if model.fingerprint != saved.fingerprint:
        raise BadInput(
            f"{saved.source}: the model rebuilt from its settings has trunk {model.fingerprint}, not the saved "
            f"{saved.fingerprint} (another timm version, checkpoint file or --model-seed?)"
        )
    if saved.params.numel() != model.num_trainable:
        raise BadInput(
            f"{saved.source} holds {saved.params.numel()} trainable parameters; "
            f"{model.name} trains {model.num_trainable}"
        )


# --- reading -------------------------------------------------------------------------------------


def load_saved_models(paths: str | Path | Iterable[str | Path]) -> list[SavedModel]:
    """Every saved model under `paths`: `--save` directories, algorithm folders, `node<i>.json` files
    or daemon state directories, in any mix, all of one trunk (else `BadInput`, one line)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[SavedModel] = []
    for path in map(Path, paths):
        found += _read_path(path)
    if not found:
        raise BadInput("no saved models given: pass a `--save` directory or daemon state directories")
    first = found[0]
    for s in found[1:]:
        if s.fingerprint != first.fingerprint:
            raise BadInput(
                f"{s.source} fine-tunes another trunk ({s.model}, fingerprint {s.fingerprint}) than {first.source} "
                f"({first.model}, {first.fingerprint}): give models of one run's model"
            )
    return found


def _read_path(path: Path) -> list[SavedModel]:
    if path.is_file() and path.suffix == ".json":
        return [_read_node_file(path)]
    if not path.is_dir():
        what = "is a file, not a saved model's nodeI.json" if path.is_file() else "does not exist"
        raise BadInput(f"{path} {what}: pass a `--save` directory or a daemon's --state-dir")
    if (path / "state.json").is_file():
        return [_read_state_dir(path)]
    own = sorted(path.glob("node*.json"), key=_node_number)
    if own:
        return [_read_node_file(p) for p in own]
    nested = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(SET_ASIDE)):
        if (sub / "state.json").is_file():
            nested.append(_read_state_dir(sub))
        else:
            nested += [_read_node_file(p) for p in sorted(sub.glob("node*.json"), key=_node_number)]
    if not nested:
        raise BadInput(
            f"{path} holds no saved models: expected ALGORITHM/node<i>.json (from --save) or state.json (a --state-dir)"
        )
    return nested


def _node_number(path: Path) -> tuple[int, str]:
    digits = path.stem.removeprefix("node")
    return (int(digits), "") if digits.isdigit() else (1 << 30, path.stem)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} is not a JSON object")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BadInput(f"{path} is missing")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise BadInput(f"{path} cannot be read ({e})") from None


def _read_node_file(path: Path) -> SavedModel:
    meta = _read_json(path)
    if meta.get("format") != FORMAT:
        raise BadInput(f'{path} is not a p2pnode saved model (no "format": "{FORMAT}")')
    if meta.get("version", 0) > VERSION:
        raise BadInput(f"{path} was written by a newer p2pnode (format version {meta['version']})")
    tensors = _read_tensors(path.with_suffix(".safetensors"))
    order = [name for name, _ in meta["parameters"]]
    missing = [n for n in order if n not in tensors]
    if missing:
        raise BadInput(f"{path.with_suffix('.safetensors')} lacks {missing[0]} listed in {path.name}")
    params = torch.cat([tensors[n].reshape(-1) for n in order])
    return SavedModel(
        algorithm=str(meta["algorithm"]),
        node=int(meta["node"]),
        classes=meta.get("classes"),
        model=str(meta["model"]),
        fingerprint=str(meta["fingerprint"]),
        settings=dict(meta.get("settings") or {}),
        params=params,
        source=path,
    )


def _daemon_settings(state_dir: Path) -> dict:
    result = state_dir / "result.json"
    if result.is_file():
        settings = _read_json(result).get("settings")
        if isinstance(settings, dict):
            return settings
    for log in (state_dir / "events.jsonl", state_dir / "events.jsonl.1"):
        if not log.is_file():
            continue
        for line in log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("kind") == "start" and isinstance(event.get("settings"), dict):
                return event["settings"]
    raise BadInput(f"{state_dir} has a checkpoint but no settings (no result.json, no start event in events.jsonl)")


def _read_state_dir(state_dir: Path) -> SavedModel:
    meta = _read_json(state_dir / "state.json")
    state = _read_tensors(state_dir / "state.safetensors")
    if "params" not in state or "fingerprint" not in meta:
        raise BadInput(f"{state_dir} does not hold a p2pnode checkpoint (no params or fingerprint)")
    settings = _daemon_settings(state_dir)
    index = int(settings.get("index", -1))
    node = index if index >= 0 else int(meta.get("index", 0))
    return SavedModel(
        algorithm=str(settings.get("algorithm", "p2pft")),
        node=node,
        classes=_daemon_classes(settings, index),
        model=str(settings.get("model", "")),
        fingerprint=str(meta["fingerprint"]),
        settings=settings,
        params=state["params"].reshape(-1),
        source=state_dir,
    )


def _daemon_classes(settings: dict, index: int) -> list[int] | None:
    """A daemon's classes: its --classes, else its share of a class-range --split (None: known only
    from the data, for iid and dirichlet splits)."""
    from .data import parse_class_set, parse_split

    if settings.get("classes"):
        return parse_class_set(settings["classes"])
    split = parse_split(settings.get("split") or "iid")
    if isinstance(split, list) and index >= 0:
        return sorted(split[index % len(split)])
    return None


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` next to `path`, then rename it over `path`; BadInput if the disk refuses."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise BadInput(f"cannot write {path}: {e.strerror}") from None
