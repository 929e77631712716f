"""Wrap a base ``nn.Module`` with PEFT modules and freeze everything else (:func:`wrap_model`).

Three methods, each exact at initialisation where that is possible:

* ``"lora"``: ``peft.LoraConfig`` + ``peft.get_peft_model`` on Linear and Conv2d modules. peft
  initialises ``B = 0``, so the wrapped model computes exactly the base model's logits at init.
* ``"adapter"``: peft 0.21 has no bottleneck (Houlsby) adapter for arbitrary vision modules (its
  IA3/BOFT/OFT are multiplicative re-scalings/rotations of weights, not bottleneck adapters, and its
  prompt-learning methods need a text model's word embeddings), so :class:`ResidualAdapter` is ours:
  ``y = m(x); y + up(gelu(down(y)))`` with ``up`` zero-initialised (weight and bias), so ``y + 0``
  is exactly ``y`` at init. It acts on the last dimension after a Linear and on channels (1x1 convs)
  after a Conv2d.
* ``"prompt"``: :class:`VisualPromptViT`, learnable prompt tokens inserted after a timm
  VisionTransformer's prefix (class/register) tokens and dropped again before its head (VPT-shallow).
  **Exact at init is impossible for prompt tokens**: self-attention gives every key a share of each
  query's weight, so any added token changes every other token's output unless it is masked out,
  and a masked token receives no gradient. What is guaranteed instead: the base weights are frozen
  and untouched, only the prompts (and optionally the head) train, and with the prompts switched off
  (``use_prompts=False``) the wrapper computes exactly the base model's logits.

The classifier head (``config.head`` or auto-detected: timm's ``get_classifier()``, else the last
Linear/Conv2d) is never a target; ``train_head=True`` makes its own parameters trainable.
The base model passed in is never changed: :func:`wrap_model` works on a deep copy.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from blackbox_rs.errors import ModelStructureError

from .config import RobustifyConfig

__all__ = ["ResidualAdapter", "VisualPromptViT", "Wrapped", "detect_targets", "find_head", "find_vit",
           "trainable_names", "wrap_model"]

_TARGET_TYPES = (nn.Linear, nn.Conv2d)
_VIT_PARTS = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head",
              "num_prefix_tokens", "embed_dim")


@dataclass
class Wrapped:
    """A wrapped model: ``model`` (what runs), the resolved ``targets`` (module names in the base
    model), the ``head`` name (in the base model), the head module itself (inside ``model``) and the
    ``method``."""

    model: nn.Module
    method: str
    targets: list[str]
    head: str
    head_module: nn.Module


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and isinstance(m, _TARGET_TYPES)}


def find_head(model: nn.Module, override: str | None = None) -> str:
    """Name (in ``model.named_modules()``) of the classifier head: ``override`` if given (it must
    exist), else the classifier of the first submodule with timm's ``get_classifier()``, else the last
    Linear/Conv2d. Raises :class:`ModelStructureError` if there is none."""
    names = dict(model.named_modules())
    if override is not None:
        if override not in names or not override:
            raise ModelStructureError(f"head={override!r} is no module of {type(model).__name__}")
        return override
    for _, sub in model.named_modules():
        get = getattr(sub, "get_classifier", None)
        if callable(get):
            clf = get()
            if isinstance(clf, nn.Module) and not isinstance(clf, nn.Identity):
                for n, m in names.items():
                    if m is clf and n:
                        return n
    layers = list(_layers(model))
    if not layers:
        raise ModelStructureError(f"{type(model).__name__} has no Linear or Conv2d module to use as head")
    return layers[-1]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def detect_targets(model: nn.Module, method: str, head: str, override: tuple[str, ...] | None) -> list[str]:
    """Full names of the Linear/Conv2d modules that get LoRA or an adapter (never the head or anything
    inside it). ``override``: each entry is a full name or a dotted suffix and must match at least one
    such module. Raises :class:`ModelStructureError` naming an entry that matches nothing, or saying
    that nothing is left to target."""
    layers = [n for n in _layers(model) if not _under(n, head)]
    if override is not None:
        chosen: list[str] = []
        for want in override:
            hit = [n for n in layers if n == want or n.endswith("." + want)]
            if not hit:
                sample = ", ".join(layers[:12]) + (" ..." if len(layers) > 12 else "")
                raise ModelStructureError(
                    f"target_modules entry {want!r} matches no Linear/Conv2d module of {type(model).__name__} "
                    f"(the head {head!r} excluded); candidates: {sample or 'none'}")
            chosen += [n for n in hit if n not in chosen]
        return [n for n in layers if n in chosen]
    if method == "adapter":
        houlsby = [n for n in layers if n.endswith("attn.proj") or n.endswith("mlp.fc2")]
        if houlsby:
            layers = houlsby
    if not layers:
        raise ModelStructureError(
            f"{type(model).__name__} has no Linear or Conv2d module besides its head {head!r}: nothing to "
            f"put {method} modules on")
    return layers


class ResidualAdapter(nn.Module):
    """``y = inner(x); y + up(gelu(down(y)))`` with ``up`` zero-initialised: the identity on ``inner``'s
    output at init (exactly). Linear: acts on the last dimension; Conv2d: 1x1 convs on channels."""

    def __init__(self, inner: nn.Module, bottleneck: int) -> None:
        super().__init__()
        self.inner = inner
        if isinstance(inner, nn.Linear):
            width = inner.out_features
            self.down: nn.Module = nn.Linear(width, bottleneck)
            self.up: nn.Module = nn.Linear(bottleneck, width)
        elif isinstance(inner, nn.Conv2d):
            width = inner.out_channels
            self.down = nn.Conv2d(width, bottleneck, 1)
            self.up = nn.Conv2d(bottleneck, width, 1)
        else:  # pragma: no cover - detect_targets only returns Linear/Conv2d
            raise ModelStructureError(f"an adapter needs a Linear or Conv2d, got {type(inner).__name__}")
        self.act = nn.GELU()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)  # type: ignore[arg-type]
        d = self.inner.weight
        self.down.to(device=d.device, dtype=d.dtype)
        self.up.to(device=d.device, dtype=d.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y + self.up(self.act(self.down(y)))


def find_vit(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(vit, parent)``: the model itself if it is a timm-style VisionTransformer (``parent`` None), or
    the last element of an ``nn.Sequential`` (e.g. ``Sequential(Normalize, vit)``). Raises
    :class:`ModelStructureError` naming the missing parts otherwise."""
    cand, parent = model, None
    if isinstance(model, nn.Sequential) and len(model):
        cand, parent = model[-1], model
    missing = [p for p in _VIT_PARTS if not hasattr(cand, p)]
    if missing:
        raise ModelStructureError(
            f"method='prompt' needs a timm VisionTransformer (or an nn.Sequential ending with one); "
            f"{type(cand).__name__} lacks {', '.join(missing)}")
    if getattr(cand, "dynamic_img_size", False) is None:  # pragma: no cover - defensive
        raise ModelStructureError("unsupported VisionTransformer configuration")
    return cand, parent


class VisualPromptViT(nn.Module):
    """A timm VisionTransformer with ``tokens`` learnable prompt tokens inserted after its prefix
    tokens (before the patch tokens) and removed before its head, so pooling and head see what they
    saw before. Not exact at init (see the module docstring); ``use_prompts=False`` runs the base
    model's own path exactly."""

    def __init__(self, vit: nn.Module, tokens: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.vit = vit
        dim = int(vit.embed_dim)  # type: ignore[arg-type]
        ref = next(vit.parameters())
        init = torch.randn((1, tokens, dim), generator=generator, dtype=torch.float32) * 0.02
        self.prompts = nn.Parameter(init.to(device=ref.device, dtype=ref.dtype))
        self.use_prompts = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = v.patch_embed(x)
        x = v._pos_embed(x)
        npre = int(v.num_prefix_tokens)
        k = int(self.prompts.shape[1]) if self.use_prompts else 0
        if k:
            x = torch.cat([x[:, :npre], self.prompts.expand(x.shape[0], -1, -1), x[:, npre:]], dim=1)
        x = v.patch_drop(x)
        x = v.norm_pre(x)
        x = v.blocks(x)
        x = v.norm(x)
        if k:
            x = torch.cat([x[:, :npre], x[:, npre + k:]], dim=1)
        return v.forward_head(x)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def wrap_model(base: nn.Module, config: RobustifyConfig) -> Wrapped:
    """A deep copy of ``base`` wrapped for ``config.method``, with only the PEFT parameters (and the
    head's, with ``train_head``) trainable. Initial PEFT weights depend on ``config.seed`` only (the
    global RNG is left as it was). Raises :class:`ModelStructureError` for a model without what the
    method needs."""
    if not isinstance(base, nn.Module):
        raise ModelStructureError(f"model must be a torch.nn.Module, got {type(base).__name__}")
    model = copy.deepcopy(base)
    head = find_head(model, config.head)
    head_module = model.get_submodule(head)  # the same object inside every wrapper below
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    peft_params: list[nn.Parameter] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        if config.method == "prompt":
            vit, parent = find_vit(model)
            g = torch.Generator().manual_seed(config.seed)
            prompt = VisualPromptViT(vit, config.prompt_tokens, generator=g)
            peft_params = [prompt.prompts]
            wrapped: nn.Module = prompt
            if parent is not None:
                parent[-1] = prompt
                wrapped = parent
            targets: list[str] = []
        elif config.method == "lora":
            import peft

            targets = detect_targets(model, "lora", head, config.target_modules)
            lcfg = peft.LoraConfig(
                r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                target_modules="^(?:" + "|".join(re.escape(t) for t in targets) + ")$", bias="none",
            )
            wrapped = peft.get_peft_model(model, lcfg)
            peft_params = [p for n, p in wrapped.named_parameters() if "lora_" in n and p.requires_grad]
        else:
            targets = detect_targets(model, "adapter", head, config.target_modules)
            for name in targets:
                adapter = ResidualAdapter(model.get_submodule(name), config.adapter_bottleneck)
                peft_params += [*adapter.down.parameters(), *adapter.up.parameters()]
                _set_module(model, name, adapter)
            wrapped = model
    train = {id(p) for p in peft_params}
    if config.train_head:
        train |= {id(p) for p in head_module.parameters()}
    for p in wrapped.parameters():
        p.requires_grad_(id(p) in train)
    return Wrapped(model=wrapped, method=config.method, targets=targets, head=head, head_module=head_module)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that train, in module order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]
