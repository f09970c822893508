"""MRGDPipeline: multi-region generation and editing, read top to bottom.

`edit()` follows one edit from the layout to the pictures: 1. resolve regions and controls, 2. encode prompts,
3. prepare timesteps and the shared initial noise, 4. the denoising loop (crops -> batched UNet calls under
attention control -> DDIM per crop -> layered composite -> optional guidance), 5. decode. Each step calls into the
module that owns its concept; this file only knows the order of things.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import fusion
from .attention import (AttentionState, Follow, controlled_attention, cross_alpha, map_level, refine_mapping,
                        self_replace_active, self_replace_levels)
from .ddim import alphas_at, ddim_step, set_timesteps, to_epsilon
from .guidance import Segmenter
from .inversion import follow_pivot
from .keywords import KeywordTracker, word_positions
from .errors import InputError
from .layout import Edit, Layout, LayoutRegion, Settings
from .prompts import EncodedPrompt, PromptEncoder
from .runtime import device_constant

SOURCE, TARGET = 0, 1
TOTAL, CANVAS = "__total__", "__canvas__"  # keys of the derived regions r_total and the uncovered-pixel fallback
CHECKPOINT_FROM_PIXELS = 512 * 512  # Settings.guidance_checkpoint None: the VAE's guidance decode is checkpointed from here


@dataclass
class Job:
    """One crop of one image, denoised with one prompt at one step."""

    key: str  # region id, TOTAL or CANVAS
    image: int  # SOURCE or TARGET
    box: fusion.LatentBox
    layer: str  # "background" or "foreground" in the composite
    cond: EncodedPrompt
    uncond: EncodedPrompt
    mask: torch.Tensor | None = None  # feather mask (foreground layer)
    tight: bool = False  # an added region: its crop gets no context window (see _predict)
    weight: torch.Tensor | None = None  # composite weight of the crop (fusion.composite), None: 1


@dataclass
class RegionPlan:
    """A region as the sampler sees it in one image."""

    key: str
    layer: str
    box: fusion.LatentBox
    prompt: str
    negative: str
    mask: torch.Tensor | None
    control: str  # background | inherent | modified | added | removed | total
    first_step: int = 0
    parts: list[tuple[str | None, str]] | None = None  # r_total: named parts, so tokens know their region
    layer_rank: int = 0  # composite: 2 edited, composited over 1 inherent (Settings.edited_on_top); 0 never
    weight: torch.Tensor | None = None  # composite weight (Settings.total_clears_removed), None: 1


@dataclass
class EditResult:
    source: Image.Image
    target: Image.Image | None
    info: dict[str, Any]
    latents: dict[str, torch.Tensor] = field(default_factory=dict)
    # For pictures that explain the run: keyword maps per image and region, Φ's last masks.
    explain: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerateResult:
    image: Image.Image
    info: dict[str, Any]


def encode_plans(encoder: PromptEncoder, plans: dict[int, list[RegionPlan]]) -> dict[tuple[int, str], tuple]:
    """(image, region key) -> (cond, uncond) prompts, all padded to one chunk count so any rows batch together
    (prompts longer than 75 tokens have more chunks). Inversion uses it too, so its null embeddings fit the edit."""
    encoded = {(i, p.key): (encoder.encode_parts(p.parts) if p.parts else encoder.encode(p.prompt),
                            encoder.encode_negative(p.negative)) for i, image_plans in plans.items() for p in image_plans}
    flat = encoder.pad_to_same_length([e for pair in encoded.values() for e in pair])
    return {key: (flat[2 * n], flat[2 * n + 1]) for n, key in enumerate(encoded)}


class MRGDPipeline:
    """Multi-region generation and editing on SD 1.x, SD 2.x and SDXL model families.

    Components are the diffusers ones (`unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`, and SDXL's
    `text_encoder_2`, `tokenizer_2`) and are swappable like in diffusers. `guidance_model` (CLIPSeg) and `scorer`
    (CLIP) are optional. What differs between families sits in `family` (`mrgd.families`), chosen from the UNet.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, guidance_model=None, guidance_tokenizer=None,
                 scorer=None, scorer_tokenizer=None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 name: str = "custom", text_encoder_2=None, tokenizer_2=None, force_zeros_for_empty_prompt: bool = True,
                 guidance_vae=None):
        from .families import family_for

        self.unet, self.vae, self.text_encoder, self.tokenizer, self.scheduler = unet, vae, text_encoder, tokenizer, scheduler
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.guidance_model, self.guidance_tokenizer = guidance_model, guidance_tokenizer
        self.guidance_vae = guidance_vae  # a tiny decoder (AutoencoderTiny) for guidance, or None: the VAE
        self._tiny_decoders: dict[str, Any] = {}  # tiny decoders an edit named by folder, loaded once
        self.scorer, self.scorer_tokenizer = scorer, scorer_tokenizer
        self.device, self.dtype, self.name = torch.device(device), dtype, name
        self.family = family_for(unet, text_encoder, tokenizer, text_encoder_2, tokenizer_2, force_zeros_for_empty_prompt)
        # A VAE that asks for force_upcast (SDXL's overflows in fp16) runs in fp32 whenever the rest runs in fp16,
        # in decoding, encoding, guidance and inversion alike: diffusers' SDXL pipeline does the same per decode.
        vae_dtype = torch.float32 if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else dtype
        for module, module_dtype in ((unet, dtype), (vae, vae_dtype), (text_encoder, dtype), (text_encoder_2, dtype),
                                     (guidance_vae, dtype)):
            if module is not None:
                _place(module, self.device, module_dtype)
        # The guidance model takes gradients with λ's in the thousands: fp16 would overflow. Keep it, and the
        # scorer, in fp32.
        for module in (guidance_model, scorer):
            if module is not None:
                _place(module, self.device, torch.float32)
        self.guidance_size: int | None = None  # Φ's input size, when its processor says (352 for CLIPSeg rd64)
        self.load_notes: list[str] = []  # what loading detected and decided (single files), for info.json
        self.compiled: str | None = None  # torch.compile mode of the UNet's blocks, once `compile()` ran

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> MRGDPipeline:
        """Load from a diffusers folder, a hub id or a single-file checkpoint (see `mrgd.models`)."""
        from .models import load_pipeline

        return load_pipeline(path, **kwargs)

    @classmethod
    def default(cls, **kwargs) -> MRGDPipeline:
        """The embedded shapes-world model family."""
        from .models import DEFAULT_MODEL, load_pipeline

        return load_pipeline(str(DEFAULT_MODEL), **kwargs)

    def prompt_encoder(self) -> PromptEncoder:
        """A prompt encoder for this family's text towers (one per run: it caches encodings)."""
        return PromptEncoder(None, None, self.device, self.dtype, towers=self.family.towers,
                             zero_empty_negative=self.family.zero_empty_negative)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_multiple(self) -> int:
        # Each UNet level halves the crop; sizes must divide evenly to come back up to the same size.
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def compile(self, mode: str | None = None) -> int:
        """torch.compile the UNet's ResNet, feed-forward and resampling blocks in place; returns how many.

        Not the whole UNet: its attention processors hold the run's per-row state (which rows follow which, KSSA,
        maps to record), which changes between calls and would recompile the graph each time until torch gives
        up. The blocks compiled here are pure tensor code, with dynamic shapes, since region crops differ in
        size. The first edits after this pay the compilation; numbers change within float rounding.
        """
        from diffusers.models.attention import FeedForward
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

        blocks = [m for m in self.unet.modules() if isinstance(m, (ResnetBlock2D, FeedForward, Downsample2D, Upsample2D))]
        for block in blocks:
            block.compile(mode=mode, dynamic=True)
        self.compiled = mode or "default"
        return len(blocks)

    # ------------------------------------------------------------------ public API
    def generate(self, layout: Layout, callback: Callable[[dict], None] | None = None) -> GenerateResult:
        """Generate one image from a layout (MultiDiffusion over its regions, method.md §2)."""
        edit = Edit.from_layout(layout, Settings(method="multidiffusion"))
        result = self.edit(edit, callback=callback, images=(SOURCE,))
        return GenerateResult(result.source, result.info)

    def edit(self, edit: Edit, callback: Callable[[dict], None] | None = None, images: tuple[int, ...] = (SOURCE, TARGET),
             start_latents: torch.Tensor | None = None, null_embeds: dict | None = None,
             source_pivots: torch.Tensor | None = None) -> EditResult:
        """Denoise the source and target of an edit side by side and return both pictures.

        A real photo (`mrgd.inversion`) comes in as `start_latents` plus either `null_embeds` (null-text or
        negative-prompt inversion) or `source_pivots` (direct inversion: the source follows the pivots exactly).
        """
        timer = _Timer(self.device)
        settings = edit.mrgd
        steps = edit.steps
        layouts = {SOURCE: edit.source(), TARGET: edit.target()}
        encoder = self.prompt_encoder()

        # 1. Regions of each image, with their control kinds (method.md §1, §3).
        plans = {i: self._plan_regions(edit, layouts[i], i, steps) for i in images}
        # masks and weights on the run's device once, not copied from the host at every step (each copy waits on CUDA)
        plans = {i: [dataclasses.replace(p, mask=_to(p.mask, self.device), weight=_to(p.weight, self.device))
                     for p in plans[i]] for i in images}
        state = AttentionState(low_levels=self_replace_levels(self.unet))
        info: dict[str, Any] = {"unet_calls": 0, "unet_batch_sizes": [], "notes": []}

        # 2. Prompts; the empty negative of a region may be replaced by an inverted null embedding (§7).
        with timer("encode"):
            encoded = encode_plans(encoder, {i: plans[i] for i in images})
            follows_setup = self._control_setup(edit, plans, encoded, info) if len(images) == 2 else {}

        guide = self._guide(edit, plans, info) if len(images) == 2 else None
        tracker = self._keyword_tracker(edit, plans, encoded, images)
        state.kssa_scale = settings.kssa_scale

        # 3. Timesteps and the initial noise, shared by source and target.
        timesteps = set_timesteps(self.scheduler, steps)
        h, w = edit.size[1] // self.latent_factor, edit.size[0] // self.latent_factor
        seeded = [(fusion.latent_box(r.box, edit.size, self.latent_factor), r.seed)
                  for r in edit.regions if r.seed is not None]
        if start_latents is None:
            generator = torch.Generator("cpu").manual_seed(edit.seed)
            noise = fusion.initial_noise((1, self.unet.config.in_channels, h, w), generator, seeded)
            noise = noise * self.scheduler.init_noise_sigma
        else:
            noise = start_latents
        latents = {i: noise.to(self.device, self.dtype) for i in images}
        # direct inversion corrects the target only outside the edited boxes: those follow their own prompts
        keep = self._inherent_mask(edit, (h, w)) if source_pivots is not None else None

        # 4. The denoising loop.
        with controlled_attention(self.unet, state), torch.no_grad():
            for k, t in enumerate(timesteps):
                alpha, alpha_prev = alphas_at(self.scheduler, t)
                jobs = [self._job(i, p, encoded, null_embeds, k) for i in images for p in plans[i] if k >= p.first_step]
                with timer("unet"):
                    eps = self._predict(jobs, latents, t, edit.guidance_scale, state, follows_setup, k, steps,
                                        settings.schedule, info, tracker, edit.region_context)
                    outputs = [ddim_step(latents[j.image][j.box.slices], e, alpha, alpha_prev) for j, e in zip(jobs, eps)]
                with timer("fusion"):
                    fused = {i: self._fuse(jobs, outputs, i, latents[i]) for i in images}
                if tracker is not None and tracker.after_step(k):
                    self._use_keywords(tracker, guide, state, settings, info)
                if guide is not None and guide.active(k):
                    with timer("guidance"), self._vae_checkpointing(info["guidance_checkpoint"]):
                        fused = guide.step(self, k, latents, fused, alpha, alpha_prev, info)
                latents = {i: fused[i][0] for i in images}
                if source_pivots is not None:
                    latents = follow_pivot(latents, source_pivots[steps - 1 - k : steps - k], SOURCE, keep)
                if callback is not None:
                    callback({"step": k, "steps": steps, "timestep": t, "latents": latents,
                              "x0": {i: fused[i][1] for i in images}})

        info["attention_rows"] = {f"{kind}@{level}": n for (kind, level), n in sorted(state.fired.items())}
        if guide is not None:
            guide.finish(info)

        # 5. Decode.
        with timer("decode"):
            pictures = {i: self.decode(latents[i]) for i in images}
        info.update(self._describe(edit, images, timer))
        explain = {}
        if tracker is not None:
            explain["keyword_maps"] = {("source", "target")[i]: tracker.word_maps(i) for i in tracker.selected}
            explain["keyword_hw"] = tracker.hw
        if guide is not None and guide.last_maps is not None:
            explain["masks"] = {("source", "target")[i]: list(zip([k for k, _ in guide.regions[i]], guide.texts(i),
                                                                   guide.last_maps[i].cpu())) for i in guide.last_maps}
        return EditResult(pictures[SOURCE] if SOURCE in pictures else None, pictures.get(TARGET), info,
                          {("source", "target")[i]: latents[i].cpu() for i in images}, explain)

    # ------------------------------------------------------------------ steps of the loop
    def _plan_regions(self, edit: Edit, layout: Layout, image: int, steps: int) -> list[RegionPlan]:
        settings = edit.mrgd
        by_id = edit.regions_by_id()
        plans = []
        for region in layout.regions:
            plans.append(self._region_plan(layout, region, edit.size, by_id[region.id].control))
        if image == SOURCE and settings.add_in_source:
            # research-code option: added boxes are also denoised in the source, with the global prompt only
            for region in edit.regions:
                if region.role == "added":
                    plan = self._region_plan(layout, LayoutRegion(**region.model_dump(exclude={"prompt", "target_prompt"}),
                                                                  prompt=""), edit.size, "added")
                    plan.prompt = layout.prompt
                    plans.append(plan)
        full = fusion.LatentBox(0, edit.size[1] // self.latent_factor, 0, edit.size[0] // self.latent_factor)
        if settings.method != "multidiffusion" and settings.use_total and layout.regions:
            # r_total joins for the last floor(T*N) + 1 steps (method.md §1)
            first = max(0, steps - (int(edit.total_fraction * steps) + 1))
            parts = [(None, layout.prompt)] + [(r.id, r.prompt) for r in layout.regions]
            total = RegionPlan(TOTAL, "foreground", full, layout.total_prompt(), layout.negative_prompt,
                               torch.ones(full.size), "total", first, parts)
            removed = [r for r in edit.regions if r.role == "removed"] if settings.total_clears_removed else []
            added = [r for r in edit.regions if r.role in settings.total_clears_edited]
            if image == TARGET and settings.method == "mrgd" and (removed or added):
                # r_total knows every object of the target but not where: over a removed box it drew one of them,
                # and over an added or modified box it blends them into the new object
                boxes = [fusion.grow_box(fusion.latent_box(r.box, edit.size, self.latent_factor),
                                         settings.removal_margin, full.size) for r in removed]
                boxes += [fusion.latent_box(r.box, edit.size, self.latent_factor) for r in added]
                total.weight = fusion.clear_mask(full.size, boxes, (removed + added)[0].feather)
            if settings.method == "mrgd" and settings.total_within == "objects":
                # ... and anywhere on the canvas it drew them again where the layout has only background
                objects = [(p.box, p.mask) for p in plans if p.layer == "foreground"]
                within = fusion.cover_mask(full.size, objects)
                total.weight = within if total.weight is None else total.weight * within
            plans.append(total)
        # MRGD's composite (the baselines keep §2's); the source stays what `generate` draws of its layout
        if settings.method == "mrgd" and settings.edited_on_top and image == TARGET:
            for plan in plans:
                if plan.layer == "foreground" and plan.key != TOTAL:
                    plan.layer_rank = 2 if plan.control in settings.edited_on_top else 1
            below = [p for p in plans if p.layer_rank == 1]
            removed = [r for r in edit.regions if r.role == "removed"] if "removed" in settings.edited_on_top else []
            boxes = [fusion.grow_box(fusion.latent_box(r.box, edit.size, self.latent_factor),
                                     settings.removal_margin, full.size) for r in removed]
            # a removed box has no crop in the target: it clears the inherent crops it lies over; an edited crop
            # covers them with its feather mask. Boxes and masks are fixed for the run: weigh once, here.
            for covers in ([(box, fusion.feather_mask(box.h, box.w, r.feather)) for box, r in zip(boxes, removed)],
                           [(p.box, p.mask) for p in plans if p.layer_rank == 2]):
                if covers and below:
                    for plan, weight in zip(below, fusion.under_weights(full.size, covers, [p.box for p in below])):
                        plan.weight = weight if plan.weight is None else plan.weight * weight
        backgrounds = [p.box for p in plans if p.layer == "background"]
        if fusion.needs_canvas_fallback(full.size, backgrounds):
            plans.insert(0, RegionPlan(CANVAS, "canvas", full, layout.prompt, layout.negative_prompt, None, "background"))
        return plans

    def _inherent_mask(self, edit: Edit, hw: tuple[int, int]) -> torch.Tensor:
        """1 outside the added, removed and modified boxes, with a soft edge (ℳ of method.md §6), at latent size."""
        from .guidance import inherent_mask

        edited = [fusion.latent_box(r.box, edit.size, self.latent_factor) for r in edit.regions if r.role != "inherent"]
        return inherent_mask(edited, hw).to(self.device)

    def _region_plan(self, layout: Layout, region: LayoutRegion, size, control: str) -> RegionPlan:
        box = fusion.latent_box(region.box, size, self.latent_factor)
        mask = None if region.kind == "background" else fusion.feather_mask(box.h, box.w, region.feather)
        return RegionPlan(region.id, region.kind, box, layout.region_prompt(region), layout.region_negative(region),
                          mask, control)

    def _control_setup(self, edit: Edit, plans, encoded, info) -> dict[str, dict]:
        """Per region present in both images: how its target rows follow its source rows (method.md §3)."""
        settings = edit.mrgd
        if settings.method == "multidiffusion":
            return {}
        setup = {}
        source_plans = {p.key: p for p in plans[SOURCE]}
        spared = []  # (key, latent box) of the regions whose pixels keep their own attention in other rows
        if settings.method == "mrgd":
            roles = {r.id: r.role for r in edit.regions}
            spared = [(key, p.box) for key, p in {**source_plans, **{p.key: p for p in plans[TARGET]}}.items()
                      if roles.get(key) in settings.own_attention_in]
        for plan in plans[TARGET]:
            if plan.key not in source_plans or plan.control in ("added", "removed"):
                continue
            kind = "background" if plan.key == CANVAS else plan.control
            cross, self_ = settings.replace_fractions(kind)
            src, tgt = encoded[(SOURCE, plan.key)][0], encoded[(TARGET, plan.key)][0]
            mapper = alpha = None
            if kind == "total" or (kind == "modified" and src.length != tgt.length):
                if kind == "modified":
                    info["notes"].append(f"region {plan.key!r}: source and target prompts differ in token length "
                                         f"({src.length} vs {tgt.length}); word swap fell back to refine")
                mapper, alpha = refine_mapping(src.token_ids, tgt.token_ids)
                mapper, alpha = mapper.to(self.device), alpha.to(self.device, self.dtype)
            setup[plan.key] = {"cross": cross, "self": self_, "mapper": mapper, "alpha": alpha,
                               "first": plan.first_step, "spared": [box for key, box in spared if key != plan.key]}
        return setup

    def _guide(self, edit: Edit, plans, info):
        """The multi-region guidance of this edit, or None when the method or settings leave it off (§6)."""
        settings = edit.mrgd
        if settings.method != "mrgd" or not settings.guidance:
            return None
        if not (settings.lambda_rs or settings.lambda_is or settings.lambda_ip):
            return None
        if self.guidance_model is None:
            info["notes"].append("no guidance model (CLIPSeg) loaded: guidance skipped; pass --guidance-model")
            return None
        from .guidance import Guide

        # Φ reads its processor's size (352 for CLIPSeg rd64), but never more pixels than the picture has: an
        # upsampled 256² canvas shows it nothing new, and its vision tower's cost grows with the pixel count.
        native = self.guidance_size or self.guidance_model.config.vision_config.image_size
        segmenter = Segmenter(self.guidance_model, self.guidance_tokenizer,
                              settings.guidance_size or min(native, max(edit.size)))
        name, decode = self.guidance_decoder(settings.guidance_vae, settings.guidance_precision,
                                             settings.guidance_picture)
        info["guidance_decoder"] = name
        info["guidance_picture"] = self._guidance_picture(name, settings.guidance_picture)
        info["guidance_precision"] = self._guidance_precision(
            "vae" if info["guidance_picture"] == "vae" else name, settings.guidance_precision)
        checkpoint = settings.guidance_checkpoint
        if checkpoint is None:
            checkpoint = edit.size[0] * edit.size[1] >= CHECKPOINT_FROM_PIXELS
        info["guidance_checkpoint"] = bool(checkpoint and name == "vae"
                                           and getattr(self.vae, "_supports_gradient_checkpointing", False))
        return Guide.for_edit(edit, plans, segmenter, self.latent_factor, decode)

    def guidance_decoder(self, choice: str = "auto", precision: str = "decoder", picture: str = "decoder"
                         ) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
        """What guidance sees x̂0 through (method.md §6 decodes with the VAE; a tiny decoder costs a fraction):
        (its name, latents -> [-1, 1] float images, differentiable). `choice` is `Settings.guidance_vae`,
        `precision` `Settings.guidance_precision`, `picture` `Settings.guidance_picture`."""
        full = self._in_precision("vae", precision, lambda z: self.decode_tensor(z).float())
        if choice == "full" or (choice == "auto" and self.guidance_vae is None):
            return "vae", full
        if choice in ("auto", "tiny"):
            if self.guidance_vae is None:
                raise InputError("mrgd.guidance_vae: 'tiny' asked for, but this model has no tiny decoder; pass "
                                 "--guidance-vae FOLDER (an AutoencoderTiny such as madebyollin/taesd) or 'full'")
            tiny, name = self.guidance_vae, "tiny"
        else:
            from .models import load_tiny_decoder

            if choice not in self._tiny_decoders:
                self._tiny_decoders[choice] = load_tiny_decoder(choice, self.device, self.dtype)
            tiny, name = self._tiny_decoders[choice], choice

        # AutoencoderTiny decodes the latents the UNet sees (its scaling factor is 1 for the TAESD family)
        def decode(z, tiny=tiny):
            return tiny.decode((z / tiny.config.scaling_factor).to(tiny.dtype)).sample.float()

        decode = self._in_precision(name, precision, decode)
        if self._guidance_picture(name, picture) == "decoder":
            return name, decode

        def vae_picture(z):
            # the VAE's picture, the tiny decoder's gradient: seen + (approx − approx) is `seen` in value
            with torch.no_grad():
                seen = full(z)
            if not (torch.is_grad_enabled() and z.requires_grad):
                return seen
            approx = decode(z)
            return seen + (approx - approx.detach())

        return name, vae_picture

    def _in_precision(self, name: str, precision: str, decode: Callable[[torch.Tensor], torch.Tensor]
                      ) -> Callable[[torch.Tensor], torch.Tensor]:
        """`decode` as `Settings.guidance_precision` asks: as it is, or under bfloat16 autocast."""
        if self._guidance_precision(name, precision) == "decoder":
            return decode
        device_type = self.device.type

        def decode_bf16(z):
            with torch.autocast(device_type, dtype=torch.bfloat16):
                return decode(z)

        return decode_bf16

    def _guidance_precision(self, name: str, precision: str) -> str:
        """`Settings.guidance_precision` resolved: "bfloat16" or "decoder" (see there)."""
        if precision != "auto":
            return precision
        native = _bfloat16_native(self.device)
        return "bfloat16" if name == "vae" and native and self.vae.dtype == torch.float32 else "decoder"

    @staticmethod
    def _guidance_picture(name: str, picture: str) -> str:
        """`Settings.guidance_picture` as it applies: "decoder" where guidance decodes with the VAE itself."""
        return "decoder" if name == "vae" else picture

    def _job(self, image: int, plan: RegionPlan, encoded, null_embeds, step: int) -> Job:
        cond, uncond = encoded[(image, plan.key)]
        if null_embeds is not None and (image, plan.key) in null_embeds:
            null = null_embeds[(image, plan.key)][step][None].to(uncond.embeds)
            if null.shape != uncond.embeds.shape:
                raise InputError(f"--from-inversion: region {plan.key!r} was inverted with a prompt of another "
                                 "chunk count; invert again with this edit's source prompts")
            uncond = dataclasses.replace(uncond, embeds=null)
        return Job(plan.key, image, plan.box, plan.layer, cond, uncond, plan.mask, tight=plan.control == "added",
                   weight=plan.weight)

    def _predict(self, jobs: list[Job], latents, t, scale: float, state: AttentionState, setup, step: int,
                 steps: int, schedule: str, info, tracker=None, context: float = 0.0) -> list[torch.Tensor]:
        """ε̂ of every crop. Equal padded sizes share one UNet call, rows [uncond..., cond...] (cond only when
        scale <= 1, as diffusers skips classifier-free guidance there)."""
        eps: list[Any] = [None] * len(jobs)
        cfg = scale > 1
        # v-prediction's ε̂ needs ᾱ_t on the device; an ε model does not (a copy per call waits on CUDA)
        v_model = self.scheduler.config.prediction_type == "v_prediction"
        alpha_t = self.scheduler.alphas_cumprod[t].to(self.device, self.dtype) if v_model else None
        # Each crop is denoised inside a window of real canvas around its box (fusion.context_window); windows
        # of equal (padded) size share a call. An added object must fit its box (everything around it is kept),
        # and a region prompt draws its object to fill its window, so added regions get no extra context.
        windows = [fusion.context_window(j.box, tuple(latents[j.image].shape[-2:]), self.unet_multiple,
                                         0.0 if j.tight else context) for j in jobs]
        padded = [fusion.pad_to_multiple(latents[j.image][win.slices], self.unet_multiple)[0]
                  for j, win in zip(jobs, windows)]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, crop in enumerate(padded):
            groups[tuple(crop.shape[-2:])].append(i)
        factor = self.latent_factor
        canvas = tuple(factor * n for n in next(iter(latents.values())).shape[-2:])
        for indices in groups.values():
            group = [jobs[i] for i in indices]
            batch = torch.cat([padded[i] for i in indices])
            rows = ([j.uncond for j in group] if cfg else []) + [j.cond for j in group]
            offsets = [(factor * windows[i].y0, factor * windows[i].x0) for i in indices] * (2 if cfg else 1)
            extra = self.family.unet_kwargs([r.pooled for r in rows], offsets, canvas)
            state.reset_call()
            state.follows = self._follows(group, setup, step, steps, schedule, len(group) if cfg else 0,
                                          [windows[i] for i in indices], tuple(batch.shape[-2:]))
            self._prepare_call(state, group, len(group) if cfg else 0, tracker)
            model_in = torch.cat([batch, batch]) if cfg else batch
            # the timestep as the tensor diffusers would make of it, on the device once rather than per call
            out = self.unet(model_in, device_constant((t,), self.device), encoder_hidden_states=torch.cat([r.embeds for r in rows]), **extra).sample
            info["unet_calls"] += 1
            info["unet_batch_sizes"].append(model_in.shape[0])
            # the UNet's work grows with rows × latent pixels: what region fusion costs against a plain pass
            info["unet_pixel_rows"] = info.get("unet_pixel_rows", 0) + model_in.shape[0] * model_in.shape[-2] * model_in.shape[-1]
            if cfg:
                out_uncond, out_cond = out.chunk(2)
                out = out_uncond + scale * (out_cond - out_uncond)
            for n, (i, job) in enumerate(zip(indices, group)):
                crop = latents[job.image][job.box.slices]
                window_out = fusion.unpad(out[n : n + 1], windows[i].size)[fusion.within(job.box, windows[i])]
                eps[i] = to_epsilon(window_out, crop,
                                    alpha_t, self.scheduler.config.prediction_type)
        return eps

    def _prepare_call(self, state: AttentionState, group: list[Job], cond_offset: int, tracker) -> None:
        """Mark r_total's conditional rows of this call for keyword maps (§4) and, once chosen, KSSA (§5)."""
        if tracker is None:
            return
        totals = [(cond_offset + n, job.image) for n, job in enumerate(group) if job.key == TOTAL]
        state.recorder, state.record_level = tracker.record, tracker.level
        state.record_rows = [row for row, _ in totals]
        tracker.row_images = [image for _, image in totals]
        if state.kssa_levels:
            for row, image in totals:
                if image != TARGET:
                    continue  # control never changes the source (§3), KSSA included
                positions = tracker.positions(image)
                if positions:
                    state.kssa_rows.append(row)
                    state.kssa_tokens[row] = device_constant(tuple(positions), self.device)

    def _keyword_tracker(self, edit: Edit, plans, encoded, images):
        """Keyword selection of method `mrgd` (§4), or None when off (no r_total, every N_k = 0, other method)."""
        from .prompts import positions_of

        settings = edit.mrgd
        totals = {i: p for i in images for p in plans[i] if p.key == TOTAL}
        layouts = (edit.source(), edit.target())
        counts = {i: {r.id: settings.keywords if r.keyword_count is None else r.keyword_count for r in layouts[i].regions}
                  for i in totals}
        level = map_level(self.unet)  # maps at a quarter of the latent's side: 16x16 for SD at 512², 32x32 for SDXL
        if settings.method != "mrgd" or not any(n for c in counts.values() for n in c.values()) or level is None:
            return None
        first = min(p.first_step for p in totals.values())
        select_at = sorted({max(first, edit.steps - d) for d in settings.keyword_steps if edit.steps - d < edit.steps})
        h, w = (edit.size[1] // self.latent_factor, edit.size[0] // self.latent_factor)
        size = -(-h // self.unet_multiple) * self.unet_multiple, -(-w // self.unet_multiple) * self.unet_multiple
        hw = (-(-size[0] // 2**level), -(-size[1] // 2**level))
        total_prompts = {i: encoded[(i, TOTAL)][0] for i in totals}
        candidates = {i: {r.id: word_positions(total_prompts[i], positions_of(total_prompts[i], r.id))
                          for r in layouts[i].regions} for i in totals}
        return KeywordTracker(level, hw, select_at, counts, total_prompts, candidates, settings.keyword_entropy,
                              settings.keyword_unit)

    def _use_keywords(self, tracker, guide, state: AttentionState, settings: Settings, info) -> None:
        """After a selection: keywords become Φ's queries and, with KSSA on, drive r_total's self-attention."""
        if guide is not None:
            guide.selected = {(i, rid): [w["word"] for w in words] for i in tracker.selected
                              for rid, words in tracker.words(i).items()}
        if settings.kssa:
            state.kssa_levels = frozenset(range(8))  # every down-block level; the processor checks the block
        info["keywords"] = {("source", "target")[i]: tracker.words(i) for i in tracker.selected}

    def _follows(self, group: list[Job], setup, step: int, steps: int, schedule: str, cond_offset: int,
                 windows: list[fusion.LatentBox], padded: tuple[int, int]) -> list[Follow]:
        """Target cond rows that follow their source cond rows in this call; only cond rows are edited."""
        follows = []
        rows = {(j.key, j.image): cond_offset + n for n, j in enumerate(group)}
        window = {(j.key, j.image): win for j, win in zip(group, windows)}
        for key, params in setup.items():
            if (key, SOURCE) not in rows or (key, TARGET) not in rows:
                continue
            call = step - params["first"]
            follows.append(Follow(rows[(key, SOURCE)], rows[(key, TARGET)],
                                  cross_alpha(call, params["cross"], steps, schedule),
                                  self_replace_active(call, params["self"], steps), params["mapper"], params["alpha"],
                                  fusion.spared_mask(params["spared"], window[(key, TARGET)], padded, self.device)))
        return follows

    def _fuse(self, jobs: list[Job], outputs, image: int, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layered composite (method.md §2) of x_{t−1} and of x̂0 for one image."""
        fused = []
        for which in (0, 1):
            canvas = torch.zeros_like(current)
            backgrounds, foregrounds = [], []
            for job, out in zip(jobs, outputs):
                if job.image != image:
                    continue
                if job.layer == "canvas":
                    canvas = out[which]
                elif job.layer == "background":
                    backgrounds.append((job.box, out[which]))
                else:
                    foregrounds.append((job.box, out[which], job.mask.to(current), job.weight))
            fused.append(fusion.composite(canvas, backgrounds, foregrounds))
        return fused[0], fused[1]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Image.Image:
        """Latents -> PIL, as diffusers' image processor does (round half to even at 255)."""
        image = self.decode_tensor(latents)
        array = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        return Image.fromarray((array[0] * 255).round().astype(np.uint8))

    @contextmanager
    def _vae_checkpointing(self, enabled: bool) -> Iterator[None]:
        """The VAE's gradient checkpointing on for one guided step, its decode and its backward pass alike: a block
        recomputed in the backward must run as it ran forward (diffusers' mid block nests checkpoints only while
        the flag is on; switched off before the backward, CUDA's bf16 recompute failed). The user's VAE is left
        as it was, also on error. SD 1.5's VAE at 512², decode + backward on CPU: 6.1 GB above the model's own
        memory without it, 3.4 GB with it, for 3 % more time."""
        if not enabled or self.vae.is_gradient_checkpointing:
            yield
            return
        self.vae.enable_gradient_checkpointing()
        try:
            yield
        finally:
            self.vae.disable_gradient_checkpointing()

    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> image tensor in [-1, 1], in the VAE's dtype (differentiable, for guidance)."""
        config = self.vae.config
        scaled = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        return self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0]

    def _describe(self, edit: Edit, images, timer: _Timer) -> dict[str, Any]:
        import diffusers
        import transformers

        return {
            "model": self.name, "family": self.family.name, "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""), "vae_dtype": str(self.vae.dtype).replace("torch.", ""),
            "prediction_type": self.scheduler.config.prediction_type, "model_notes": self.load_notes,
            "method": edit.mrgd.method, "size": list(edit.size), "steps": edit.steps, "images": len(images),
            "compiled": self.compiled,
            "seconds": timer.seconds, "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                                   "transformers": transformers.__version__},
        }


def _bfloat16_native(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware (where autocast to it pays rather than costs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":  # torch's own checks (private: a torch without them reads as no)
        checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(check() for check in checks if check is not None)
    return False


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def _place(module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen module to the run's device and dtype; cast only when needed (diffusers warns on a cast).

    Weights memory-mapped from a safetensors file sit wherever the file put them, and CPU matrix kernels round
    differently on unaligned memory: the same weights saved as a folder or as one file gave pixels one apart.
    Such tensors are copied into fresh (aligned) memory, which also lets go of the file.
    """
    needs_cast = any(p.dtype != dtype for p in module.parameters())
    module.to(device, dtype) if needs_cast else module.to(device)
    module.eval().requires_grad_(False)
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()


class _Timer:
    """Wall time per phase, summed over the run. On CUDA each phase waits for its kernels (launches return at
    once); that costs one launch latency per phase, a few per step."""

    def __init__(self, device: torch.device | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self._start = time.perf_counter()
        self.sync = device is not None and device.type == "cuda"

    def __call__(self, phase: str):
        timer = self

        class _Phase:
            def __enter__(self):
                if timer.sync:
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if timer.sync:
                    torch.cuda.synchronize()
                timer.seconds[phase] = round(timer.seconds[phase] + time.perf_counter() - self.t0, 4)

        return _Phase()
