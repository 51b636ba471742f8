"""A-VPT (Anatomy-guided Visual Prompt Tuning) on a frozen open_clip ViT.

Forward, for images [B, 3, H, W]:
  1. region maps [B, R, h, w]: given, classical tissue priors, or a learned extractor (anatomy.py);
  2. ARE: Eq. 2 pooling of the frozen Eq. 1 patch features (``region_pool``), Anatomy MLP (Eq. 3)
     -> region embeddings E [B, R, D];
  3. prompt bank (Eq. 4): E -> prompts P [L_inj, B, K, D] for every injected layer in one call;
  4. the frozen blocks, with a PIM (Eqs. 5-10) before each injected block: the drop-in API's
     ``avpt_kernels.PIMBlock`` wrappers (``make_pim_blocks``, what ``inject_pim`` installs), kept
     beside the frozen backbone rather than swapped into it, so that ``backbone.encode_image``
     stays the unchanged reference and the parameter names stay as they were; the model hands
     each wrapper its prompts (``PIMBlock.run``);
  5. heads: classification on the final class token (Eq. 14), segmentation decoder (Eq. 15).

Injection schedules (Table 8) on a backbone of L blocks split into three contiguous stages
(for L = 12: blocks 1-4, 5-8, 9-12): ``early`` / ``middle`` / ``late`` inject before the blocks of
one stage, ``all`` before every block with one shared prompt map, ``hierarchical`` before every
block with a stage-specific prompt map (U, V per stage) and the refined prompts carried from
layer to layer: the prompts entering layer l are ``P[l] + sum_{j<l} (p_tilde[j] - p_in[j])``,
the fresh anatomy prompt plus everything the earlier PIMs gathered from the tokens.

Parameter budget: the PIM projections are shared by the layers of a stage (``pim_sharing="stage"``,
the default; ``"layer"`` gives every injected layer its own). ``avpt.params`` prints the breakdown.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from torch import Tensor, nn

import avpt_kernels as ak
from avpt.recipes import AVPT_PAPER

from ... import vit
from ...data.tissue_priors import tissue_prior_maps
from ..base import Method, register
from .anatomy import (REGION_SOURCES, AnatomyMLP, LearnedRegionExtractor, check_maps,
                      per_image_modalities)
from .config import BUDGET_PERCENT, NUM_STAGES, SCHEDULES, AVPTConfig
from .loss import AVPTLoss
from .rollout import rollout_and_prompt_types


def injection_plan(schedule: str, num_layers: int) -> Tuple[List[int], List[int], List[int]]:
    """(injected block indices, prompt-map stage of each, PIM-group stage of each) for a schedule."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    stages = ak.contiguous_stages(num_layers, NUM_STAGES)  # 12 blocks: 0,0,0,0,1,1,1,1,2,2,2,2
    if schedule in ("early", "middle", "late"):
        wanted = SCHEDULES.index(schedule)
        layers = [i for i, s in enumerate(stages) if s == wanted]
        if not layers:
            raise ValueError(f"schedule {schedule!r} selects no block of a {num_layers}-block backbone")
    else:
        layers = list(range(num_layers))
    used = sorted({stages[i] for i in layers})
    group = [used.index(stages[i]) for i in layers]
    bank_stage = group if schedule == "hierarchical" else [0] * len(layers)
    return layers, bank_stage, group


@register("avpt")
class AVPT(Method):
    """A-VPT: anatomy-guided prompts and a PIM before each injected frozen block."""

    display_name = "A-VPT"
    config_class = AVPTConfig
    reference_recipe = AVPT_PAPER  # the authors' own protocol
    has_report_sections = True
    param_breakdown_title = "A-VPT trainable breakdown"
    param_budget_percent = BUDGET_PERCENT

    def __init__(self, config: AVPTConfig):
        super().__init__(config)
        c = config
        if c.region_source not in REGION_SOURCES:
            raise ValueError(f"region_source must be one of {REGION_SOURCES}, got {c.region_source!r}")
        if c.pim_sharing not in ("stage", "layer"):
            raise ValueError(f"pim_sharing must be 'stage' or 'layer', got {c.pim_sharing!r}")
        if c.num_prompts % c.num_regions:
            raise ValueError(f"num_prompts={c.num_prompts} must be a multiple of num_regions="
                             f"{c.num_regions} (each region expands to K/R prompt tokens)")
        if len(c.text_phrases) != c.num_regions or len(c.region_names) != c.num_regions:
            raise ValueError(f"text_phrases and region_names need one entry per region "
                             f"({c.num_regions})")
        if c.region_source == "prior" and c.num_regions != 3:
            raise ValueError("region_source='prior' computes 3 maps (glandular, fatty, ductal); "
                             f"num_regions must be 3, got {c.num_regions}")
        dim = vit.width(self.visual)
        num_layers = vit.num_layers(self.visual)
        self.layers, bank_stage, group = injection_plan(c.schedule, num_layers)
        self.group = group if c.pim_sharing == "stage" else list(range(len(self.layers)))

        self.extractor = (LearnedRegionExtractor(c.num_regions, hidden=c.extractor_hidden)
                          if c.region_source == "learned" else None)
        self.region_pool = ak.RegionPool(backend=c.backend)
        self.anatomy_mlp = AnatomyMLP(dim, c.anatomy_hidden)
        self.prompt_bank = ak.LowRankPromptBank(
            dim, c.num_regions, c.num_prompts // c.num_regions, c.rank, num_layers=len(self.layers),
            num_stages=max(bank_stage) + 1, layer_stage=bank_stage, backend=c.backend)
        self.pims = nn.ModuleList(
            ak.PromptTokenInteraction(dim, c.pim_heads, c.pim_head_dim, c.gate_hidden,
                                      t2p_reduce=c.t2p_reduce, backend=c.backend)
            for _ in range(max(self.group) + 1))
        # One PIMBlock per injected block, sharing the stage's PIM; prompts=None: the prompts
        # come from the bank in encode. Kept beside the backbone (not swapped into it), so that
        # backbone.encode_image stays the unchanged reference and parameter names stay as they were.
        self.pim_blocks = SharedModules(ak.make_pim_blocks(
            self.visual, self.layers, prompts=None, pim=[self.pims[g] for g in self.group]))
        self.contrast_proj = nn.Linear(dim, c.contrast_dim)  # h_phi of Eq. 11

    # -- region maps ---------------------------------------------------------------------------
    def region_maps(self, images: Tensor, maps: Optional[Tensor], modality) -> Tensor:
        c, visual = self.config, self.visual
        b = images.shape[0]
        if c.region_source == "learned":
            if maps is not None:
                raise ValueError("maps were given but region_source='learned' computes its own; "
                                 "use region_source='given' to supply maps")
            return self.extractor(images, visual.grid_size)
        if maps is None:
            if c.region_source == "given":
                raise ValueError(
                    f"maps is required with region_source='given': expected [B={b}, "
                    f"R={c.num_regions}, {visual.image_size[0]}, {visual.image_size[1]}] region "
                    f"confidences in [0, 1] ({', '.join(c.region_names)}); or use "
                    f"region_source='prior' / 'learned'")
            names = per_image_modalities(modality, b, c.prior_modality)
            maps = tissue_prior_maps(images, names)
        check_maps(maps, b, c.num_regions, visual.image_size, visual.grid_size)
        return maps.to(images.dtype)

    # -- gates ---------------------------------------------------------------------------------
    def gates_shut(self):
        """``with model.gates_shut(): ...`` forces alpha = 0 in every PIM (Eq. 10 -> z_out = z):
        ``avpt_kernels.pim_gates_shut`` on the model's PIMBlocks."""
        return ak.pim_gates_shut(self.pim_blocks)

    # -- forward -------------------------------------------------------------------------------
    def encode(self, images: Tensor, maps=None, modality=None, return_attn: bool = False) -> Dict:
        visual = self.visual
        region_maps = self.region_maps(images, maps, modality)
        patches = vit.patch_embed(visual, images)
        pooled_regions = self.region_pool(vit.eq1_patch_features(visual, patches), region_maps)
        region_emb = self.anatomy_mlp(pooled_regions)          # E, Eq. 3   [B, R, D]
        prompts = self.prompt_bank(region_emb)                 # P, Eq. 4   [L_inj, B, K, D]
        hierarchical = self.config.schedule == "hierarchical"
        shut = True if self.config.gate_shut else None  # None: each PIMBlock's gates_shut flag
        batch_first = visual.transformer.batch_first
        z = vit.embed(visual, patches)
        x = z if batch_first else z.transpose(0, 1)  # the blocks' layout (a view)
        attns, carry, j = [], None, 0
        for layer, blk in enumerate(visual.transformer.resblocks):
            if j < len(self.layers) and self.layers[j] == layer:
                p_in = prompts[j] if carry is None else prompts[j] + carry
                x, p_tilde, attn = self.pim_blocks[j].run(x, p_in, return_attn=return_attn,
                                                          gates_shut=shut)
                if hierarchical:
                    carry = p_tilde - prompts[j]
                if return_attn:
                    attns.append(attn)
                j += 1
            else:
                x = blk(x)
        z = x if batch_first else x.transpose(0, 1)
        c = self.config
        # what Eq. 17's RCL / TXT terms read (the loss owns no model): only when they are on
        contrast = self.region_contrast(region_emb) if c.lambda_rcl or c.lambda_txt else None
        text_space = self.region_text_space(region_emb) if c.lambda_txt else None
        return dict(z=z, region_emb=region_emb, prompts=prompts, maps=region_maps,
                    attn=attns if return_attn else None, region_contrast=contrast,
                    region_text=text_space)

    def region_contrast(self, region_emb: Tensor) -> Tensor:
        """Eq. 11: r = h_phi(E) / ||h_phi(E)||, [B, R, D] -> [B, R, d_c]."""
        return nn.functional.normalize(self.contrast_proj(region_emb), dim=-1)

    def region_text_space(self, region_emb: Tensor) -> Tensor:
        """Region embeddings in the frozen CLIP image-text space (ln_post, proj), normalised:
        [B, R, D] -> [B, R, E]; the t_k of Eq. 13, with no extra parameters."""
        v = self.visual
        return nn.functional.normalize(v.ln_post(region_emb) @ v.proj, dim=-1)

    # -- what differs from the other methods (hooks of ``Method``) ------------------------------
    def forward_maps(self, batch: Dict[str, Tensor]) -> Optional[Tensor]:
        """The data set's region maps [B, R, H, W] with ``region_source="given"``; None for the
        sources that compute their own."""
        return batch["maps"] if self.config.region_source == "given" else None

    def make_loss(self, rcl_positives: str = "cross_modal", text_tokenizer=None,
                  **options) -> nn.Module:
        """Eq. 17 (``AVPTLoss``, loss.py): CLS + SEG + RCL + TXT + LAP, weighted by the config.
        ``rcl_positives``: "cross_modal" | "within_modality" (Eq. 12's positives)."""
        return AVPTLoss(self, text_tokenizer=text_tokenizer, rcl_positives=rcl_positives)

    def report_sections(self, dataset, indices: List[int], device, fig_dir: str
                        ) -> Dict[str, Optional[str]]:
        """Rollout relevance (Eq. 18) and attention by prompt type (Figs. 7-8) of ``indices``."""
        roll, types = rollout_and_prompt_types(self, dataset, indices, device, fig_dir)
        return {"rollout overlays (Eq. 18)": roll,
                "attention by prompt type: random / static / anatomy (Figs. 7-8)": types}


class SharedModules(nn.ModuleList):
    """A list of modules whose parameters and buffers all belong to other submodules of the same
    owner (A-VPT's PIMBlocks: the backbone's frozen blocks and the ``pims``). Registered, so
    ``.modules()``, ``.to()`` and hooks see them; left out of ``state_dict()`` (those tensors are
    saved once, under their owners' names, which safetensors requires), and on load given the
    tensors their owners have just loaded, so that a state dict without them loads strictly."""

    def __init__(self, modules):
        super().__init__(modules)
        self.register_state_dict_post_hook(SharedModules._drop_own_keys)
        self.register_load_state_dict_pre_hook(SharedModules._fill_own_keys)

    @staticmethod
    def _drop_own_keys(module, state_dict, prefix, local_metadata) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]

    @staticmethod
    def _fill_own_keys(module, state_dict, prefix, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
        for index, child in enumerate(module):  # the children's own state dicts: what they load
            for name, tensor in child.state_dict(keep_vars=True).items():
                state_dict.setdefault(f"{prefix}{index}.{name}", tensor.detach())
