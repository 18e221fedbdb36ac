"""Build a timm model for fine-tuning: a frozen trunk and a trainable tail.

The tail is the last `trainable_blocks` transformer blocks (for Swin: of the last stage), the final
norm and a new classification head; everything before it is the trunk, frozen and identical on every
node. `FineTuneModel.fingerprint` hashes the trunk so peers can check they fine-tune the same model.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import timm
import torch
from timm.layers import PatchEmbed, to_2tuple
from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.func import functional_call

from ..protocol.errors import one_line
from .errors import BadInput

DEFAULT_MODEL = "vit_digits"


class OverlappingPatchEmbed(PatchEmbed):
    """Patches of `patch_size` pixels every `stride` pixels (timm's PatchEmbed cuts them side by side)."""

    def __init__(self, img_size: int = 8, patch_size: int = 5, stride: int = 1, **kwargs) -> None:
        super().__init__(img_size=img_size, patch_size=stride, **kwargs)
        self.kernel = to_2tuple(patch_size)
        self.grid_size = tuple((s - k) // stride + 1 for s, k in zip(self.img_size, self.kernel, strict=True))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        old = self.proj
        self.proj = nn.Conv2d(old.in_channels, old.out_channels, self.kernel, stride, bias=old.bias is not None)


def _digits_vit(**kwargs) -> VisionTransformer:
    args = dict(img_size=8, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    model = VisionTransformer(**{**args, **kwargs})
    model.pretrained_cfg = {
        "input_size": (model.patch_embed.proj.in_channels, *model.patch_embed.img_size),
        "mean": (0.5,),
        "std": (0.5,),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    return model


def _sincos_position_embedding(model: VisionTransformer) -> VisionTransformer:
    """The fixed 2-D sin-cos position embedding (part of the frozen trunk): with 16 patch tokens a
    random one leaves them hard to tell apart, and P2P-FT far below central (bench/patch_grid.py)."""
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    grid = model.patch_embed.grid_size
    with torch.no_grad():
        model.pos_embed[:, model.num_prefix_tokens :] = build_sincos2d_pos_embed(list(grid), model.embed_dim)
        model.pos_embed[:, : model.num_prefix_tokens] = 0.0
    return model


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Without the Hugging Face hub, its client logs every retry ('Retrying in 8s [Retry 3/5]')
    before the one line that says what to do; its errors still reach that line."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


def _no_weights(name: str, pretrained: bool) -> None:
    if pretrained:
        raise BadInput(f"{name} has no pretrained weights: it is built from a seeded random initialisation")


@register_model
def vit_digits(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The embedded default: a small ViT for 8x8 single-channel images (scikit-learn's digits).

    16 patch tokens of 5x5 pixels at stride 1 (a 4x4 attention map) with a fixed 2-D sin-cos position
    embedding. Trained from a seeded random initialisation, so it needs no download."""
    _no_weights("vit_digits", pretrained)
    embed = partial(OverlappingPatchEmbed, stride=1)
    return _sincos_position_embedding(_digits_vit(**{"patch_size": 5, "embed_layer": embed, **kwargs}))


@register_model
def vit_digits_4px(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The default digits model before 2026-12: four 4-pixel patches (a 2x2 attention map, whose four
    weights are all near 0.25), a random position embedding. The README's tables measured before
    then ran it (with --lr 0.005)."""
    _no_weights("vit_digits_4px", pretrained)
    return _digits_vit(**{"patch_size": 4, **kwargs})


@register_model
def vit_digits_p2(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """vit_digits_4px with 2-pixel patches and the sin-cos position embedding (a 4x4 map).

    17 tokens of 4 pixels each; trains best with `--optimizer adam --lr 0.001`
    (bench/attention_similarity.py)."""
    _no_weights("vit_digits_p2", pretrained)
    return _sincos_position_embedding(_digits_vit(**{"patch_size": 2, **kwargs}))


@register_model
def vit_digits_s(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """vit_digits_4px at ViT-S's width (384, 6 heads, MLP ratio 4): its trainable tail (last block, norm
    and a 10-class head) is 1.78M floats, the size of `vit_small_patch16_224`'s, so a round moves what
    a ViT-S run moves over the network, while a step costs a CPU what ViT-S's block costs a GPU
    (5 tokens, not 197). For network benchmarks (bench/wan.py)."""
    return vit_digits_4px(pretrained, **{"embed_dim": 384, "num_heads": 6, "mlp_ratio": 4.0, **kwargs})


class _ViTTrunk(nn.Module):
    def __init__(self, model: VisionTransformer, frozen_blocks: int) -> None:
        super().__init__()
        self.model = model
        self.frozen_blocks = frozen_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for blk in m.blocks[: self.frozen_blocks]:
            x = blk(x)
        return x


class _ViTTail(nn.Module):
    def __init__(self, model: VisionTransformer, frozen_blocks: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*model.blocks[frozen_blocks:])
        self.norm = model.norm
        self.fc_norm = model.fc_norm
        self.head = model.head
        self._model = [model]  # kept out of the module tree: only the pieces above are trainable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._model[0]
        x = self.norm(self.blocks(x))
        return self.head(self.fc_norm(m.pool(x)))


class _SwinTrunk(nn.Module):
    def __init__(self, model: SwinTransformer, frozen_blocks: int) -> None:
        super().__init__()
        self.model = model
        self.frozen_blocks = frozen_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(x)
        for stage in m.layers[:-1]:
            x = stage(x)
        last = m.layers[-1]
        x = last.downsample(x)
        for blk in last.blocks[: self.frozen_blocks]:
            x = blk(x)
        return x


class _SwinTail(nn.Module):
    def __init__(self, model: SwinTransformer, frozen_blocks: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*model.layers[-1].blocks[frozen_blocks:])
        self.norm = model.norm
        self.head = model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(x)))


@dataclass
class FineTuneModel:
    name: str
    model: nn.Module
    trunk: nn.Module
    tail: nn.Module
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    def __post_init__(self) -> None:
        self._names = [n for n, _ in self.tail.named_parameters()]
        self._shapes = [p.shape for _, p in self.tail.named_parameters()]
        self._sizes = [p.numel() for _, p in self.tail.named_parameters()]
        self.fingerprint = self._fingerprint()

    @property
    def num_trainable(self) -> int:
        return sum(self._sizes)

    def trainable_vector(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.tail.parameters()]).clone()

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat trainable vector, named like the tail's parameters."""
        parts = torch.split(vector, self._sizes)
        return {n: t.view(s) for n, t, s in zip(self._names, parts, self._shapes, strict=True)}

    def logits(self, vector: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The tail's output with its parameters taken from `vector` (gradients flow to it)."""
        return functional_call(self.tail, self.unflatten(vector), (features,))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Input of the first trainable block: a fixed function of the image (the trunk is frozen)."""
        return self.trunk(images)

    def _fingerprint(self) -> str:
        tail_ids = {id(p) for p in self.tail.parameters()}
        h = hashlib.sha256(f"{self.name}|{self.input_size}|{type(self.model).__name__}".encode())
        for name, t in self.model.state_dict(keep_vars=True).items():
            if id(t) in tail_ids:
                continue
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def to(self, device: str | torch.device) -> FineTuneModel:
        self.model.to(device)
        return self


def _check_name(name: str) -> None:
    """Accept any name timm can build, pretrained tags included (`deit_small_patch16_224.fb_in1k`)."""
    if not timm.is_model(name):
        near = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else f"; see `timm.list_models()` or use {DEFAULT_MODEL}"
        raise BadInput(f"unknown model {name!r}{hint}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BadInput(f"checkpoint {path} does not exist; pass the path of a .safetensors or .pt file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = one_line(f"{type(e).__name__}: {e}", 160)
        raise BadInput(f"checkpoint {path} is not a weights file (.safetensors, or .pt of tensors): {reason}") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"checkpoint {path} holds no state dict of tensors")
    return state


CHECKPOINT_HEADER_KEY = "p2pnode"  # a daemon checkpoint's metadata (JSON) in its safetensors header
SAVED_MODEL_FORMAT = "p2pnode-saved-model"  # the "format" of a --save model's JSON


def _is_p2pnode_file(path: Path) -> bool:
    """A daemon's checkpoint (its metadata in the safetensors header) or a `--save` model (a JSON beside it)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                if CHECKPOINT_HEADER_KEY in (f.metadata() or {}):
                    return True
        beside = path.with_suffix(".json")
        return beside.is_file() and json.loads(beside.read_text()).get("format") == SAVED_MODEL_FORMAT
    except Exception:
        return False


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load local weights; a classifier of another class count is skipped (the head is new)."""
    path = Path(path)
    state = _read_state_dict(path)
    own = model.state_dict()
    classifier = model.get_classifier()
    head_names = {n for n, p in model.named_parameters() if any(p is q for q in classifier.parameters())}
    state = {k: v for k, v in state.items() if not (k in head_names and v.shape != own.get(k, v).shape)}
    wrong = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise _misfit(
            path,
            f"does not fit the model: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
            f"expected {tuple(own[wrong[0]].shape)}",
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in head_names]
    if missing or result.unexpected_keys:
        what = (
            f"lacks {len(missing)} tensors (e.g. {missing[0]})"
            if missing
            else (f"has {len(result.unexpected_keys)} unknown tensors (e.g. {result.unexpected_keys[0]})")
        )
        raise _misfit(path, f"{what}: was it saved from another architecture?")


def _misfit(path: Path, what: str) -> BadInput:
    """Why these weights do not fit: p2pnode's own files (only looked for once they do not) named as such."""
    if _is_p2pnode_file(path):
        return BadInput(
            f"checkpoint {path} is p2pnode's own file (a daemon's checkpoint or a --save model: the trained "
            "block only), not a model's weights; --checkpoint takes a timm state dict, and `p2pnode attention` "
            "reads p2pnode's files"
        )
    return BadInput(f"checkpoint {path} {what}")


def build_model(
    name: str = DEFAULT_MODEL,
    num_classes: int = 10,
    trainable_blocks: int = 1,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    seed: int = 0,
) -> FineTuneModel:
    """Any timm ViT/DeiT/Swin-style model with a new head for `num_classes`, all but the tail frozen.

    Random initialisation is seeded by `seed`, so every node builds the same trunk and head.
    `pretrained` loads timm hub weights (needs internet); `checkpoint` loads a local file.
    """
    _check_name(name)
    if trainable_blocks < 1:
        raise BadInput(f"--trainable-blocks must be at least 1 (got {trainable_blocks})")
    with torch.random.fork_rng(devices=[]), _quiet_hub():
        torch.manual_seed(seed)
        try:
            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
        except BadInput:
            raise
        except Exception as e:
            if not pretrained:
                raise
            raise BadInput(
                f"could not load pretrained weights for {name} ({type(e).__name__}); this needs "
                f"the Hugging Face hub: download them elsewhere and pass --checkpoint FILE"
            ) from None
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    if isinstance(model, VisionTransformer):
        if getattr(model, "attn_pool", None) is not None:
            raise BadInput(f"{name} uses attention pooling, which p2pnode does not split yet")
        depth = len(model.blocks)
        trunk_cls, tail_cls = _ViTTrunk, _ViTTail
    elif isinstance(model, SwinTransformer):
        depth = len(model.layers[-1].blocks)
        trunk_cls, tail_cls = _SwinTrunk, _SwinTail
    else:
        raise BadInput(f"{name} is a {type(model).__name__}; p2pnode fine-tunes ViT/DeiT-style and Swin models")
    if trainable_blocks > depth:
        raise BadInput(f"--trainable-blocks {trainable_blocks} exceeds the {depth} blocks of {name}'s last stage")
    frozen = depth - trainable_blocks
    trunk, tail = trunk_cls(model, frozen), tail_cls(model, frozen)
    model.requires_grad_(False)
    tail.requires_grad_(True)
    model.eval()  # drop-path and dropout off: cached and uncached features must agree
    cfg = model.pretrained_cfg
    return FineTuneModel(
        name=name,
        model=model,
        trunk=trunk,
        tail=tail,
        input_size=tuple(cfg["input_size"]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        num_classes=num_classes,
    )
