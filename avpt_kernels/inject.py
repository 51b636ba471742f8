"""Drop-in PIM: add prompt-token interaction (Eqs. 5-10) to the blocks of any ViT in one call.

``inject_pim(model, layers=[0, 4, 8], num_prompts=6)`` finds the transformer blocks of an
open_clip visual tower, a timm ``VisionTransformer`` or a Hugging Face ``ViTModel`` /
``CLIPVisionModel`` (a small registry of adapters: block list, width, token layout), and
replaces each chosen block by a ``PIMBlock``: tokens in, tokens out, a PIM before the block,
with its own prompt state. The model object, its forward signature and its outputs' structure
stay as they were; ``remove_pim`` undoes everything ``inject_pim`` did (the original blocks,
``freeze_base``'s trainability, the guards below); ``pim_state_dict`` / ``load_pim_state_dict``
save and load only the added weights (safetensors, PEFT style; ``avpt_kernels.inject_io``).

Round trips: a full ``state_dict`` loads into a model injected alike (a PIM of other settings,
``t2p_reduce`` included, is refused by name); a Hugging Face model's ``save_pretrained`` is
refused while PIM blocks are in it: ``save_pim_pretrained`` / ``load_pim_pretrained``.

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
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._autocast import autocast_dtype
from .modules import PromptTokenInteraction
from .vit_adapters import (ADAPTERS, TokenLayout, ViTAdapter, _TOWER_ATTRS,  # noqa: F401
                           find_adapter, register_adapter)

__all__ = ["PIMBlock", "TokenLayout", "ViTAdapter", "inject_pim", "make_pim_blocks", "remove_pim",
           "pim_gates_shut", "find_adapter", "register_adapter", "ADAPTERS"]

PromptSpec = Union[str, Tensor, Callable[[Tensor, Optional[int]], Tensor], None]


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
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be True or False, got {batch_first!r}")
        declared = _declared_batch_first(block)
        if declared is not None and declared != batch_first:
            raise ValueError(f"batch_first={batch_first} but the block's attention is "
                             f"{'batch-first [B, T, D]' if declared else 'sequence-first [T, B, D]'}"
                             f": give batch_first={declared}")
        self.block, self.pim = block, pim
        self.batch_first, self.layer, self.gates_shut = batch_first, layer, False
        # The PIM's settings as a tensor, so a full state dict carries them and a load of one
        # made with other settings (t2p_reduce above all: same shapes) is refused by name.
        self.register_buffer("pim_settings", _settings_code(pim).to(device))
        self.register_load_state_dict_pre_hook(_check_loaded_state)
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


_REDUCE_CODES = ("mean", "sum")
_SETTINGS = ("dim", "num_heads", "head_dim", "gate_hidden", "t2p_reduce")


def _settings_code(pim: PromptTokenInteraction) -> Tensor:
    """[5] int64: dim, num_heads, head_dim, gate_hidden, t2p_reduce (0 mean, 1 sum)."""
    return torch.tensor([pim.dim, pim.num_heads, pim.head_dim, pim.gate_hidden,
                         _REDUCE_CODES.index(pim.t2p_reduce)], dtype=torch.int64)


def _settings_text(code) -> str:
    vals = [int(v) for v in code]
    vals[4] = repr(_REDUCE_CODES[vals[4]]) if 0 <= vals[4] < 2 else vals[4]
    return ", ".join(f"{k}={v}" for k, v in zip(_SETTINGS, vals))


def _declared_batch_first(block: nn.Module) -> Optional[bool]:
    """The token layout the block's own attention declares (``batch_first`` of the block or of
    its first ``nn.MultiheadAttention``), or None when it declares none (timm, Hugging Face)."""
    flag = getattr(block, "batch_first", None)
    if isinstance(flag, bool):
        return flag
    for m in block.modules():
        if isinstance(m, nn.MultiheadAttention):
            return bool(m.batch_first)
    return None


def _check_loaded_state(module: "PIMBlock", state_dict, prefix, local_metadata, strict,
                        missing_keys, unexpected_keys, error_msgs) -> None:
    """Before a PIMBlock loads its part of a full state dict: (1) the block's keys of the model
    without PIM (right under ``prefix``) go to the wrapped block (with ``strict=False`` the base
    weights load and the PIM keeps its own; a strict load of such a state dict into the model
    ``inject_pim`` returned is refused in one line first, ``_GuardedLoad``); (2) a PIM saved with
    other settings (e.g. ``t2p_reduce``) is refused by name; state dicts saved before the
    settings were kept load as before. (torch passes strict=True to every hook, whatever the
    caller's flag.)"""
    own = [k for k in state_dict if k.startswith(prefix)]
    plain = _plain_keys(module, state_dict, prefix)
    for k in plain:
        state_dict[prefix + "block." + k[len(prefix):]] = state_dict.pop(k)
    key = prefix + "pim_settings"
    if key in state_dict:
        saved = state_dict[key]
        if tuple(saved.shape) == (5,) and saved.tolist() != module.pim_settings.tolist():
            raise ValueError(f"{prefix.rstrip('.') or 'the block'}: the state dict's PIM was made "
                             f"with {_settings_text(saved.tolist())}, this model's with "
                             f"{_settings_text(module.pim_settings.tolist())}: inject_pim with "
                             f"the saved settings before loading")
    elif any(k.startswith(prefix + "pim.") for k in own):  # saved before the settings were kept
        state_dict[key] = module.pim_settings


def _plain_keys(block: "PIMBlock", state_dict, prefix: str) -> List[str]:
    """The keys of ``state_dict`` that name the wrapped block's tensors the way the model
    without PIM does (``prefix + name``, no ``block.``); [] when it has the injected names."""
    own = [k for k in state_dict if k.startswith(prefix)]
    if any(k.startswith(prefix + "block.") for k in own):
        return []
    names = set(block.block.state_dict().keys())
    return [k for k in own if k[len(prefix):] in names]


class _GuardedLoad:
    """``load_state_dict`` of a model ``inject_pim`` returned: a strict load of the state dict
    of the model without PIM is one line saying how, instead of torch's list of missing keys.
    An object (not a closure) so that ``copy.deepcopy`` of the model guards the copy."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, state_dict, strict: bool = True, assign: bool = False):
        if strict:
            for name, blk in _pim_blocks(self.model):
                prefix = f"{name}." if name else ""
                plain = _plain_keys(blk, state_dict, prefix)
                if plain and not any(k.startswith(prefix + "pim.") for k in state_dict):
                    raise ValueError(
                        f"the state dict is of the model without PIM ({plain[0]!r} where the "
                        f"injected model has {prefix + 'block.' + plain[0][len(prefix):]!r}): load "
                        f"it before inject_pim, or with load_state_dict(state, strict=False) (the "
                        f"base weights load, the PIM weights stay)")
        return type(self.model).load_state_dict(self.model, state_dict, strict=strict,
                                                assign=assign)


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
    and only the added ones train); ``remove_pim`` undoes all of it, trainability included.

    A Hugging Face model's ``save_pretrained`` is refused while PIM blocks are in it (its
    ``from_pretrained`` would rebuild the model without them): ``save_pim_pretrained`` /
    ``load_pim_pretrained`` round-trip it."""
    _check_inject_args(num_prompts=num_prompts, num_heads=num_heads, head_dim=head_dim,
                       gate_hidden=gate_hidden)
    if not isinstance(freeze_base, bool):
        raise TypeError(f"freeze_base must be True or False, got {freeze_base!r}")
    if t2p_reduce not in _REDUCE_CODES:
        raise ValueError(f"t2p_reduce must be 'mean' or 'sum', got {t2p_reduce!r}")
    adapter, tower = find_adapter(model)
    container = adapter.blocks(tower)
    wrapped = make_pim_blocks(model, layers, num_prompts=num_prompts, num_heads=num_heads,
                              head_dim=head_dim, gate_hidden=gate_hidden, prompts=prompts,
                              t2p_reduce=t2p_reduce, pim=pim, backend=backend)
    record = _InjectRecord()
    if freeze_base:
        for p in model.parameters():
            record.trainable.append((p, p.requires_grad))
            p.requires_grad_(False)
    for blk in wrapped:
        blk._inject_record = record
        container[blk.layer] = blk
    record.guarded = _guard_save_pretrained(model)
    if "load_state_dict" not in model.__dict__:
        object.__setattr__(model, "load_state_dict", _GuardedLoad(model))
        record.guarded.append(model)
    return model


class _InjectRecord:
    """What ``inject_pim`` changed besides the blocks, for ``remove_pim``: ``requires_grad``
    before ``freeze_base``, the modules whose methods it guarded."""

    def __init__(self):
        self.trainable: List[Tuple[nn.Parameter, bool]] = []
        self.guarded: List[nn.Module] = []


def _check_inject_args(**ints) -> None:
    for name, value in ints.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _refuse_save_pretrained(*args, **kwargs):
    raise ValueError("save_pretrained would drop the PIM blocks (from_pretrained rebuilds the "
                     "model without them, initialised at random): use "
                     "avpt_kernels.save_pim_pretrained(model, DIR) and "
                     "load_pim_pretrained(ModelClass, DIR), or remove_pim(model) first")


def _guard_save_pretrained(model: nn.Module) -> List[nn.Module]:
    """Shadow ``save_pretrained`` of every Hugging Face model in ``model`` by a refusal."""
    guarded = []
    for m in model.modules():
        if callable(getattr(type(m), "save_pretrained", None)) and \
                "save_pretrained" not in m.__dict__:
            object.__setattr__(m, "save_pretrained", _refuse_save_pretrained)
            guarded.append(m)
    return guarded


def _pim_blocks(model: nn.Module) -> List[Tuple[str, PIMBlock]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PIMBlock)]


def remove_pim(model: nn.Module) -> nn.Module:
    """Put the original blocks back in place of every PIMBlock of ``model``; the same object."""
    found = _pim_blocks(model)
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no PIMBlock: nothing to remove")
    records = []
    for name, blk in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, blk.block)
        record = getattr(blk, "_inject_record", None)
        if record is not None and all(record is not r for r in records):
            records.append(record)
    for record in records:  # what freeze_base froze thaws; the save guard goes
        for p, was in record.trainable:
            p.requires_grad_(was)
        for m in record.guarded:
            if m.__dict__.get("save_pretrained") is _refuse_save_pretrained:
                del m.__dict__["save_pretrained"]
            if isinstance(m.__dict__.get("load_state_dict"), _GuardedLoad):
                del m.__dict__["load_state_dict"]
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
