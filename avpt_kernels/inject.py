"""Drop-in PIM: add prompt-token interaction (Eqs. 5-10) to the blocks of any ViT in one call.

``inject_pim(model, layers=[0, 4, 8], num_prompts=6)`` finds the transformer blocks of an
open_clip visual tower, a timm ``VisionTransformer`` or a Hugging Face ``ViTModel`` /
``CLIPVisionModel`` (a small registry of adapters: block list, width, token layout), and
replaces each chosen block by a ``PIMBlock``: tokens in, tokens out, a PIM before the block,
with its own prompt state. The model object, its forward signature and its outputs' structure
stay as they were; ``remove_pim`` puts the original blocks back; ``pim_state_dict`` /
``load_pim_state_dict`` save and load only the added weights (safetensors, PEFT style).

Prompts (per wrapped block):
  * ``"learned"``: a parameter [K, D] of its own, N(0, 1) per element (the scale of the A-VPT
    prompt bank's LayerNorm output), broadcast over the batch;
  * a tensor [K, D] or [1, K, D] (a buffer; an ``nn.Parameter`` stays a parameter and may be
    shared by several blocks), broadcast over the batch, or [B, K, D] for a fixed batch size;
  * a callable ``prompts(tokens [B, T, D], layer: int) -> [B, K, D] | [1, K, D] | [K, D]``
    computing them per image from the tokens entering the block (batch-first whatever the
    model's layout; an ``nn.Module`` callable is registered, so it moves, trains and saves with
    the PIM weights);
  * ``None``: no prompt source of its own; the block then runs as the plain block unless the
    caller gives the prompts to ``PIMBlock.run`` (what the A-VPT model does, which computes
    them for all layers at once from the image and carries them from layer to layer).

Broadcasting over the batch is an ``expand`` (a view). On the fused path the wrapper adds no
launch and no host sync of its own: sequence-first layouts are transposed as views and the
prompts are cast (under autocast, or to the tokens' dtype) before they are broadcast, while
still [K, D]. The op itself copies a broadcast prompt tensor to a dense [B, K, D] (its kernels
take contiguous prompts; one launch) and the backward sums its gradient over the batch (one).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._autocast import autocast_dtype
from .modules import PromptTokenInteraction

__all__ = ["PIMBlock", "TokenLayout", "ViTAdapter", "inject_pim", "make_pim_blocks", "remove_pim",
           "pim_state_dict", "load_pim_state_dict", "pim_gates_shut", "find_adapter",
           "register_adapter", "ADAPTERS"]

PromptSpec = Union[str, Tensor, Callable[[Tensor, Optional[int]], Tensor], None]
_FORMAT = "avpt-pim"


# ----------------------------------------------------------------------------------------------
# Adapters: where the blocks are, how wide, which token layout
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLayout:
    """How a block's tokens are laid out: ``batch_first`` ([B, T, D]) or sequence-first
    ([T, B, D]), and ``prefix_tokens``, the tokens before the patch tokens (class token first,
    then register tokens, if any)."""
    batch_first: bool
    prefix_tokens: int


@dataclass(frozen=True)
class ViTAdapter:
    """One model family: ``tower(module)`` is the module itself when it is the family's vision
    transformer, else None; ``blocks(tower)`` the block container (``nn.ModuleList`` or
    ``nn.Sequential``), ``dim(tower)`` the token width D, ``layout(tower)`` the ``TokenLayout``."""
    name: str
    tower: Callable[[nn.Module], Optional[nn.Module]]
    blocks: Callable[[nn.Module], nn.Module]
    dim: Callable[[nn.Module], int]
    layout: Callable[[nn.Module], TokenLayout]


def _instance_of(obj, module_name: str, class_name: str) -> bool:
    """isinstance against ``module_name.class_name`` without importing it: a model of a library
    that was never imported cannot be an instance of its classes (timm and transformers stay
    optional)."""
    cls = getattr(sys.modules.get(module_name), class_name, None)
    return cls is not None and isinstance(obj, cls)


def _first_attr(obj, *paths: str):
    for path in paths:
        cur = obj
        for part in path.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    raise ValueError(f"{type(obj).__name__} has none of the block lists {paths}: an unknown "
                     f"version of the library? register_adapter() one for it")


ADAPTERS: List[ViTAdapter] = []


def register_adapter(adapter: ViTAdapter) -> ViTAdapter:
    """Add a model family (tried before the built-in ones)."""
    if not isinstance(adapter, ViTAdapter):
        raise TypeError(f"adapter must be a ViTAdapter, got {type(adapter).__name__}")
    ADAPTERS.insert(0, adapter)
    return adapter


ADAPTERS.extend([
    ViTAdapter(  # open_clip VisionTransformer (CLIP.visual): transformer.resblocks
        "open_clip",
        lambda m: m if _instance_of(m, "open_clip.transformer", "VisionTransformer") else None,
        lambda t: t.transformer.resblocks,
        lambda t: t.transformer.width,
        lambda t: TokenLayout(bool(getattr(t.transformer, "batch_first", False)),
                              0 if getattr(t, "class_embedding", None) is None else 1)),
    ViTAdapter(  # timm VisionTransformer: blocks (nn.Sequential), batch-first
        "timm",
        lambda m: m if _instance_of(m, "timm.models.vision_transformer", "VisionTransformer")
        else None,
        lambda t: t.blocks,
        lambda t: t.embed_dim,
        lambda t: TokenLayout(True, int(t.num_prefix_tokens))),
    ViTAdapter(  # Hugging Face ViTModel: layers (transformers 5), encoder.layer (4.x, untested)
        "transformers-vit",
        lambda m: m if _instance_of(m, "transformers.models.vit.modeling_vit", "ViTModel")
        else None,
        lambda t: _first_attr(t, "layers", "encoder.layer"),
        lambda t: t.config.hidden_size,
        lambda t: TokenLayout(True, 1)),
    ViTAdapter(  # Hugging Face CLIPVisionModel / CLIPVisionTransformer: encoder.layers
        "transformers-clip",
        lambda m: m if (_instance_of(m, "transformers.models.clip.modeling_clip", "CLIPVisionModel")
                        or _instance_of(m, "transformers.models.clip.modeling_clip",
                                        "CLIPVisionTransformer")) else None,
        lambda t: _first_attr(t, "encoder.layers", "vision_model.encoder.layers"),
        lambda t: t.config.hidden_size,
        lambda t: TokenLayout(True, 1)),
])

# Where a vision tower sits inside a bigger model: open_clip CLIP.visual (TimmModel.trunk),
# transformers CLIPModel.vision_model, ViTForImageClassification.vit.
_TOWER_ATTRS = ("visual", "trunk", "vision_model", "vit")


def find_adapter(model: nn.Module) -> Tuple[ViTAdapter, nn.Module]:
    """(adapter, vision tower) for ``model`` or the tower inside it (``model.visual``,
    ``.vision_model``, ``.vit``, ``.visual.trunk``); ValueError naming the families otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (an open_clip, timm or Hugging Face ViT), "
                        f"got {type(model).__name__}")
    frontier = [model]
    for _ in range(3):
        for module in frontier:
            for adapter in ADAPTERS:
                tower = adapter.tower(module)
                if tower is not None:
                    return adapter, tower
        frontier = [getattr(m, a) for m in frontier for a in _TOWER_ATTRS
                    if isinstance(getattr(m, a, None), nn.Module)]
    raise ValueError(f"model must be a vision transformer of a known family "
                     f"({', '.join(a.name for a in ADAPTERS)}) or contain one as "
                     f"{'/'.join(_TOWER_ATTRS)}; got {type(model).__name__} (wrap blocks with "
                     f"PIMBlock yourself, or register_adapter() one)")


# ----------------------------------------------------------------------------------------------
# PIMBlock
# ----------------------------------------------------------------------------------------------
class PIMBlock(nn.Module):
    """A transformer block with a PIM (Eqs. 5-10) before it: ``forward(x, *args, **kwargs)``
    takes the block's tokens (``[B, T, D]``, or ``[T, B, D]`` with ``batch_first=False``) and
    returns what the block returns, so it can replace the block, sit in ``nn.Sequential``, and
    any further arguments (attention masks, ...) go to the block unchanged.

    The PIM: ``PromptTokenInteraction(dim, num_heads, head_dim, gate_hidden, t2p_reduce)``,
    ``t2p_reduce="mean"`` by default as in the paper's model (the Eq. 6 sum grows with T), or
    ``pim=``, an existing module (several blocks may share one). Prompts: see the module
    docstring (``"learned"`` [K, D] by default, a tensor, a callable, or None).

    Initialisation: the PIM's output projection ``p2t_o`` starts at zero, so a new PIMBlock
    returns exactly what the block alone returns (z_out = z). The gates themselves are open
    (alpha = sigmoid of the gate MLP, about 0.5); the update they gate is zero. Hence at the
    first step only ``p2t_o`` receives a gradient (everything before it, and the gate, sees a
    zero update): expected, not a bug; after one step the other weights train too.
    ``gates_shut = True`` (or ``pim_gates_shut(model)``) forces alpha = 0 (a gate bias of
    -inf), i.e. the plain block exactly, at any point of training.
    """

    def __init__(self, block: nn.Module, dim: Optional[int] = None, *, num_prompts: int = 6,
                 num_heads: int = 4, head_dim: int = 16, gate_hidden: int = 16,
                 prompts: PromptSpec = "learned", t2p_reduce: str = "mean",
                 batch_first: bool = True,
                 layer: Optional[int] = None, pim: Optional[PromptTokenInteraction] = None,
                 backend: Optional[str] = None):
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"block must be an nn.Module (a transformer block), got "
                            f"{type(block).__name__}")
        if isinstance(block, PIMBlock):
            raise ValueError("block is already a PIMBlock: wrap the original block once")
        ref = next(block.parameters(), None)
        device = ref.device if ref is not None else None
        if pim is not None:
            if not isinstance(pim, PromptTokenInteraction):
                raise TypeError(f"pim must be a PromptTokenInteraction, got {type(pim).__name__}")
            if dim is not None and dim != pim.dim:
                raise ValueError(f"dim={dim} does not match pim.dim={pim.dim}")
        else:
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
                raise ValueError(f"dim must be the block's token width D (a positive int), "
                                 f"got {dim!r}")
            pim = PromptTokenInteraction(dim, num_heads, head_dim, gate_hidden,
                                         t2p_reduce=t2p_reduce, backend=backend)
            if device is not None:
                pim = pim.to(device)
        self.block, self.pim = block, pim
        self.batch_first, self.layer, self.gates_shut = bool(batch_first), layer, False
        self._prompt_fn = None
        self.prompt_kind = _set_prompts(self, prompts, num_prompts, pim.dim, device)

    # -- prompts -------------------------------------------------------------------------------
    @property
    def has_prompts(self) -> bool:
        """Whether the block has prompts of its own (else ``forward`` is the plain block)."""
        return self.prompt_kind != "none"

    def prompts_for(self, z: Tensor) -> Tensor:
        """This block's prompts for batch-first tokens ``z`` [B, T, D], broadcast: [B, K, D]."""
        if self.prompt_kind in ("learned", "tensor"):
            p = self.prompts
        elif self.prompt_kind == "callable":
            fn = self.prompt_fn if "prompt_fn" in self._modules else self._prompt_fn
            p = fn(z, self.layer)
        else:
            raise ValueError(f"PIMBlock(layer={self.layer}) has no prompts of its own "
                             f"(prompts=None): give them to run(x, p)")
        return broadcast_prompts(p, z)

    # -- forward -------------------------------------------------------------------------------
    def interact(self, x: Tensor, p: Optional[Tensor] = None, *, return_attn: bool = False,
                 gates_shut: Optional[bool] = None):
        """The PIM alone: ``x`` the block's tokens (its layout), ``p`` prompts [B, K, D],
        [1, K, D] or [K, D] (default: this block's own) -> ``(x_out, p_tilde [B, K, D], attn)``,
        x_out in x's layout, attn the prompt->token attention [B, H, K, T] or None unless
        ``return_attn``. ``gates_shut`` (default: the ``gates_shut`` attribute) forces alpha = 0."""
        z = x if self.batch_first else x.transpose(0, 1)  # a view
        if z.dim() != 3 or z.shape[-1] != self.pim.dim:
            layout = "[B, T, D]" if self.batch_first else "[T, B, D]"
            raise ValueError(f"x must be the block's tokens {layout} with D={self.pim.dim}, got "
                             f"shape {tuple(x.shape)}")
        p = self.prompts_for(z) if p is None else broadcast_prompts(p, z)
        shut = self.gates_shut if gates_shut is None else gates_shut
        if shut:
            # A gate bias of -inf gives sigmoid(-inf) = 0 exactly, hence z_out = z exactly.
            params = self.pim.params()
            params = params._replace(gate_b2=torch.full_like(params.gate_b2, float("-inf")))
            z_out, p_tilde, attn = self.pim.forward_with(params, z, p, return_attn=True)
        elif return_attn:
            z_out, p_tilde, attn = self.pim(z, p, return_attn=True)
        else:
            (z_out, p_tilde), attn = self.pim(z, p), None
        if not return_attn:
            attn = None
        return (z_out if self.batch_first else z_out.transpose(0, 1)), p_tilde, attn

    def run(self, x: Tensor, p: Optional[Tensor] = None, *args, return_attn: bool = False,
            gates_shut: Optional[bool] = None, **kwargs):
        """PIM then the block: -> ``(block output, p_tilde [B, K, D], attn or None)``; ``p``
        as in ``interact``, further arguments to the block."""
        x, p_tilde, attn = self.interact(x, p, return_attn=return_attn, gates_shut=gates_shut)
        return self.block(x, *args, **kwargs), p_tilde, attn

    def forward(self, x: Tensor, *args, **kwargs):
        """Tokens in the block's layout -> the block's output, with the PIM before the block
        (the plain block when this PIMBlock has no prompts of its own)."""
        if self.has_prompts:
            x = self.interact(x)[0]
        return self.block(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, prompts={self.prompt_kind!r}, "
                f"batch_first={self.batch_first}")

    def config(self) -> Dict:
        """What a matching PIMBlock is built from (stored with ``pim_state_dict(path=...)``)."""
        m = self.pim
        k = self.prompts.shape[-2] if self.prompt_kind in ("learned", "tensor") else None
        return dict(layer=self.layer, dim=m.dim, num_heads=m.num_heads, head_dim=m.head_dim,
                    gate_hidden=m.gate_hidden, t2p_reduce=m.t2p_reduce, prompts=self.prompt_kind,
                    num_prompts=k)


def _set_prompts(block: PIMBlock, prompts: PromptSpec, num_prompts: int, dim: int, device) -> str:
    if prompts is None:
        return "none"
    if isinstance(prompts, str):
        if prompts != "learned":
            raise ValueError(f"prompts must be 'learned', a tensor [K, D] / [1, K, D], a callable "
                             f"(tokens [B, T, D], layer) -> [B, K, D], or None; got {prompts!r}")
        if not isinstance(num_prompts, int) or isinstance(num_prompts, bool) or num_prompts < 1:
            raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}")
        block.prompts = nn.Parameter(torch.randn(num_prompts, dim, device=device))
        return "learned"
    if isinstance(prompts, Tensor):
        if prompts.dim() not in (2, 3) or prompts.shape[-1] != dim:
            raise ValueError(f"prompts must be [K, D], [1, K, D] or [B, K, D] with D={dim}, got "
                             f"shape {tuple(prompts.shape)}")
        if isinstance(prompts, nn.Parameter):
            block.prompts = prompts
        else:
            block.register_buffer("prompts", prompts)
        return "tensor"
    if callable(prompts):
        if isinstance(prompts, nn.Module):
            block.prompt_fn = prompts  # a submodule: moves, trains and saves with the PIM
        else:
            block._prompt_fn = prompts
        return "callable"
    raise TypeError(f"prompts must be 'learned', a tensor, a callable or None, got "
                    f"{type(prompts).__name__}")


def broadcast_prompts(p: Tensor, z: Tensor) -> Tensor:
    """Prompts [K, D], [1, K, D] or [B, K, D] for batch-first tokens z [B, T, D] -> [B, K, D]
    in the dtype the PIM will compute in (the autocast dtype, else z's): cast while still small,
    then ``expand`` (a view, no copy)."""
    if not isinstance(p, Tensor):
        raise TypeError(f"prompts must be a tensor [B, K, D], [1, K, D] or [K, D], got "
                        f"{type(p).__name__}")
    b, d = z.shape[0], z.shape[-1]
    if p.dim() == 2:
        p = p.unsqueeze(0)
    if p.dim() != 3 or p.shape[-1] != d or p.shape[0] not in (1, b) or p.shape[1] < 1:
        raise ValueError(f"prompts must be [B={b}, K, D={d}], [1, K, {d}] or [K, {d}], got shape "
                         f"{tuple(p.shape)}")
    dtype = autocast_dtype(z.device) or z.dtype
    if p.dtype != dtype and p.is_floating_point():
        p = p.to(dtype)
    return p.expand(b, -1, -1) if p.shape[0] != b else p


# ----------------------------------------------------------------------------------------------
# inject / remove
# ----------------------------------------------------------------------------------------------
def _layer_indices(layers, n: int) -> List[int]:
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return list(range(n))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers or any(
            not isinstance(i, int) or isinstance(i, bool) for i in layers):
        raise ValueError(f"layers must be None/'all', a block index or a list of block indices "
                         f"in [-{n}, {n}), got {layers!r}")
    out = []
    for i in layers:
        if not -n <= i < n:
            raise ValueError(f"layers: block index {i} is out of range for a {n}-block model "
                             f"(expected [-{n}, {n}))")
        out.append(i % n)
    if len(set(out)) != len(out):
        raise ValueError(f"layers must not repeat a block, got {list(layers)!r}")
    return sorted(out)


def make_pim_blocks(model: nn.Module, layers=None, *, num_prompts: int = 6, num_heads: int = 4,
                    head_dim: int = 16, gate_hidden: int = 16, prompts: PromptSpec = "learned",
                    t2p_reduce: str = "mean",
                    pim: Optional[Sequence[PromptTokenInteraction]] = None,
                    backend: Optional[str] = None) -> List[PIMBlock]:
    """The PIMBlocks ``inject_pim`` installs, one per chosen block (ascending), without
    installing them: the model is left as it is. ``pim``: one existing module per chosen block
    (the same module may repeat, to share weights between blocks)."""
    adapter, tower = find_adapter(model)
    container = adapter.blocks(tower)
    indices = _layer_indices(layers, len(container))
    if pim is not None and len(pim) != len(indices):
        raise ValueError(f"pim must give one PromptTokenInteraction per chosen block "
                         f"({len(indices)}), got {len(pim)}")
    layout, dim = adapter.layout(tower), adapter.dim(tower)
    out = []
    for j, i in enumerate(indices):
        if isinstance(container[i], PIMBlock):
            raise ValueError(f"layers: block {i} already has a PIMBlock; remove_pim(model) first")
        out.append(PIMBlock(container[i], dim, num_prompts=num_prompts, num_heads=num_heads,
                            head_dim=head_dim, gate_hidden=gate_hidden, prompts=prompts,
                            t2p_reduce=t2p_reduce, batch_first=layout.batch_first, layer=i,
                            pim=None if pim is None else pim[j], backend=backend))
    return out


def inject_pim(model: nn.Module, layers=None, *, num_prompts: int = 6, num_heads: int = 4,
               head_dim: int = 16, gate_hidden: int = 16, prompts: PromptSpec = "learned",
               t2p_reduce: str = "mean", pim: Optional[Sequence[PromptTokenInteraction]] = None,
               freeze_base: bool = False, backend: Optional[str] = None) -> nn.Module:
    """Put a ``PIMBlock`` around blocks ``layers`` (None or "all": every block; indices may be
    negative) of ``model`` — an open_clip visual tower or CLIP model, a timm
    ``VisionTransformer``, a Hugging Face ``ViTModel`` / ``CLIPVisionModel`` (or a model holding
    one as ``.visual`` / ``.vision_model`` / ``.vit``) — and return the same object.

    Each PIMBlock gets a new ``PromptTokenInteraction(D, num_heads, head_dim, gate_hidden,
    t2p_reduce)`` (or ``pim[j]``) on the block's device, fp32, and ``prompts`` ("learned": a
    parameter [num_prompts, D] per block; see the module docstring). The model's forward and
    outputs keep their structure; at initialisation they are unchanged (``p2t_o`` = 0). Nothing
    is frozen unless ``freeze_base=True`` (then every parameter that was in the model before is,
    and only the added ones train)."""
    adapter, tower = find_adapter(model)
    container = adapter.blocks(tower)
    wrapped = make_pim_blocks(model, layers, num_prompts=num_prompts, num_heads=num_heads,
                              head_dim=head_dim, gate_hidden=gate_hidden, prompts=prompts,
                              t2p_reduce=t2p_reduce, pim=pim, backend=backend)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for blk in wrapped:
        container[blk.layer] = blk
    return model


def _pim_blocks(model: nn.Module) -> List[Tuple[str, PIMBlock]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PIMBlock)]


def remove_pim(model: nn.Module) -> nn.Module:
    """Put the original blocks back in place of every PIMBlock of ``model``; the same object."""
    found = _pim_blocks(model)
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no PIMBlock: nothing to remove")
    for name, blk in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, blk.block)
    return model


@contextlib.contextmanager
def pim_gates_shut(model: nn.Module) -> Iterator[nn.Module]:
    """``with pim_gates_shut(model): ...`` forces alpha = 0 in every PIMBlock of ``model``
    (z_out = z exactly: the model computes as without PIM); restored on exit."""
    blocks = [m for _, m in _pim_blocks(model)]
    previous = [b.gates_shut for b in blocks]
    for b in blocks:
        b.gates_shut = True
    try:
        yield model
    finally:
        for b, was in zip(blocks, previous):
            b.gates_shut = was


# ----------------------------------------------------------------------------------------------
# Saving and loading the added weights
# ----------------------------------------------------------------------------------------------
def _added(model: nn.Module) -> Dict[str, Tensor]:
    """Name -> tensor of what the PIMBlocks added (PIM weights, prompts, a prompt module's
    state), each tensor once (shared modules under their first name)."""
    found = _pim_blocks(model)
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no PIMBlock: call inject_pim first")
    out, seen = {}, set()
    for name, blk in found:
        for key, t in blk.state_dict(keep_vars=True).items():
            if key.startswith("block.") or id(t) in seen:
                continue
            seen.add(id(t))
            out[f"{name}.{key}" if name else key] = t
    return out


def pim_state_dict(model: nn.Module, path: Optional[Union[str, os.PathLike]] = None
                   ) -> Dict[str, Tensor]:
    """The added weights only (detached): ``{"<block path>.pim.packed": [N], "<block
    path>.prompts": [K, D], ...}``. With ``path``, also written there as safetensors, with
    each block's settings in the metadata."""
    state = {k: t.detach() for k, t in _added(model).items()}
    if path is not None:
        from safetensors.torch import save_file

        blocks = {n: b.config() for n, b in _pim_blocks(model)}
        meta = {"format": _FORMAT, "blocks": json.dumps(blocks)}
        save_file({k: t.cpu().contiguous() for k, t in state.items()}, os.fspath(path),
                  metadata=meta)
    return state


def load_pim_state_dict(model: nn.Module,
                        state: Union[Dict[str, Tensor], str, os.PathLike]) -> nn.Module:
    """Load ``pim_state_dict`` output (a dict, or the path of the safetensors file) into a model
    injected the same way: the same keys and shapes, else a ValueError naming them. Returns
    the model."""
    meta = None
    if isinstance(state, (str, os.PathLike)):
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = os.fspath(state)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"state: {path!r} is not a file (a pim_state_dict "
                                    f"safetensors file)")
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"state: {path!r} is not a pim_state_dict file (metadata format "
                             f"{meta.get('format')!r}, expected {_FORMAT!r})")
        state = load_file(path)
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of tensors or a safetensors path, got "
                        f"{type(state).__name__}")
    target = _added(model)
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    if missing or unexpected:
        raise ValueError(f"state does not match the model's PIMBlocks: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]} (inject_pim with the same layers first)")
    if meta is not None:
        saved = json.loads(meta.get("blocks", "{}"))
        for name, blk in _pim_blocks(model):
            if name in saved and saved[name] != blk.config():
                raise ValueError(f"state: block {name!r} was saved with {saved[name]}, the model "
                                 f"has {blk.config()}")
    for key, t in target.items():
        if tuple(state[key].shape) != tuple(t.shape):
            raise ValueError(f"state[{key!r}] has shape {tuple(state[key].shape)}, the model's "
                             f"is {tuple(t.shape)}")
    with torch.no_grad():
        for key, t in target.items():
            t.copy_(state[key])
    return model
