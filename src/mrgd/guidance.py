"""Multi-region guidance (method.md §6, the paper's Eqs. 2-4 and Alg. 1).

A segmentation model Φ (CLIPSeg) looks at the decoded x̂0 of source and target; three losses ask that each
region's object stays inside its box (L_RS), that source and target agree region by region (L_IS, InfoNCE),
and that nothing outside the edited boxes changes (L_IP). Their gradient with respect to x̂0 re-steps DDIM
(`ddim.ddim_restep`). The losses are pure functions of tensors; `Guide` ties them to a model and an edit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn.functional as F

from .fusion import LatentBox, feather_mask, grow_box, pad_box
from .runtime import device_constant

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------- pure losses

def region_specific_loss(maps: torch.Tensor, box_masks: torch.Tensor) -> torch.Tensor:
    """L_RS for one image (Eq. 2): Σ_i mean((M_i − M_i ⊙ m_i)²), the part of each map outside its box.

    maps, box_masks: [R, h, w]; background regions are simply left out by the caller (they add 0).
    """
    if maps.shape[0] == 0:
        return maps.sum() * 0
    return ((maps - maps * box_masks) ** 2).mean(dim=(1, 2)).sum()


def infonce_loss(source_maps: torch.Tensor, target_maps: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """L_IS (Eq. 3): InfoNCE between the maps of regions present in both images, matched by index.

    Maps are flattened and L2-normalised, so logits are cosine similarities over the temperature (the research
    code L1-normalised rows, which cancelled the temperature).
    """
    if source_maps.shape[0] == 0:
        return source_maps.sum() * 0
    s = F.normalize(source_maps.flatten(1), dim=1)
    t = F.normalize(target_maps.flatten(1), dim=1)
    logits = s @ t.T / temperature
    return F.cross_entropy(logits, torch.arange(len(s), device=s.device))


def inherent_preservation_loss(image_s: torch.Tensor | None, image_t: torch.Tensor | None, latent_s: torch.Tensor,
                               latent_t: torch.Tensor, pixel_mask: torch.Tensor | None,
                               latent_mask: torch.Tensor) -> torch.Tensor:
    """L_IP (Eq. 4): mean((ℳ ⊙ (I^S − I^T))²) + mean((ℳ ⊙ (z^S − z^T))²), ℳ the soft inherent mask.
    Images of None: the latent term alone (`Settings.ip_pixels` false)."""
    latent = ((latent_mask * (latent_s - latent_t)) ** 2).mean()
    if image_s is None or image_t is None:
        return latent
    return ((pixel_mask * (image_s - image_t)) ** 2).mean() + latent


def inherent_mask(edited: list[LatentBox], hw: tuple[int, int], feather: float = 0.2) -> torch.Tensor:
    """ℳ: 1 everywhere, minus a feathered hole over each added, removed or modified box. [h, w]"""
    mask = torch.ones(hw)
    for box in edited:
        hole = feather_mask(box.h, box.w, feather)
        mask[box.slices] = torch.minimum(mask[box.slices], 1 - hole)
    return mask


def box_mask(box: LatentBox, hw: tuple[int, int]) -> torch.Tensor:
    """The hard mask m_i of a box. [h, w]"""
    mask = torch.zeros(hw)
    mask[box.slices] = 1
    return mask


def scale_boxes(boxes: list[LatentBox], factor: int) -> list[LatentBox]:
    """Latent boxes in pixels (for the pixel-resolution inherent mask)."""
    return [LatentBox(b.y0 * factor, b.y1 * factor, b.x0 * factor, b.x1 * factor) for b in boxes]


@dataclass
class LossWeights:
    """λ's of one step after the schedule of §6 (0 where a loss is not active yet)."""

    rs: float
    is_: float
    ip: float

    @property
    def any(self) -> bool:
        return self.rs > 0 or self.is_ > 0 or self.ip > 0


def ip_step_scale(alpha: torch.Tensor | float) -> float:
    """√ᾱ_t / (1 − ᾱ_t): undoes the re-step's scaling of a gradient into x̂0 (`Settings.ip_step` "x0", ours).

    §6's re-step moves x̂0 by (1 − ᾱ_t)/√ᾱ_t·g: 5.0·g at k = 3 of 20 steps, where L_IP (λ 300, its latent term
    alone) then pulls the target's x̂0 three times past the source's, and 0.11·g at k = 17, where it barely pulls.
    """
    alpha = float(alpha)
    return alpha**0.5 / max(1 - alpha, 1e-6)


def limit_step(grad: torch.Tensor, alpha: torch.Tensor | float, max_step: float | None) -> torch.Tensor:
    """The gradient scaled down so that the re-step moves x̂0 by at most `max_step` RMS (latent units; ours,
    `Settings.guidance_max_step`): the re-step moves x̂0 by (1 − ᾱ_t)/√ᾱ_t·g, which on shapes-v3 reached 1-2 RMS per
    step at k = 3-9, as much as x̂0's own RMS (~1.7). None: no limit."""
    if max_step is None:
        return grad
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device="cpu")  # the scheduler's table lives on the CPU
    factor = ((1 - alpha) / alpha.sqrt()).item()  # a float32 value, passed to the device with the kernel
    rms = factor * grad.float().pow(2).mean().sqrt()
    return grad * (max_step / rms.clamp_min(max_step)).to(grad.dtype)  # on the device: no host sync


def loss_weights(step: int, steps: int, lambda_rs: float, lambda_is: float, lambda_ip: float) -> LossWeights:
    """The §6 schedule: RS from k ≥ 0, IS from k ≥ 0.25N, IP from k ≥ 0.15N, λ_ip halved in the second half."""
    ip = lambda_ip if step < steps / 2 else lambda_ip / 2
    return LossWeights(lambda_rs, lambda_is if step >= 0.25 * steps else 0.0, ip if step >= 0.15 * steps else 0.0)


# ---------------------------------------------------------------- the guidance model

@cache
def _resize_matrix(n_in: int, n_out: int, antialias: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[n_in, n_out]: bilinear resampling of one axis as a matrix (`F.interpolate` of the identity)."""
    eye = torch.eye(n_in, dtype=torch.float64)[None, None]
    matrix = F.interpolate(eye, size=(n_in, n_out), mode="bilinear", align_corners=False, antialias=antialias)[0, 0]
    return matrix.to(device, dtype)


def resize(x: torch.Tensor, hw: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of [..., H, W] as two matrix products: what `F.interpolate` computes (its kernel is
    separable), but differentiable with deterministic kernels on CUDA too, where interpolate's backward has none
    (`--deterministic` would refuse guidance)."""
    rows = _resize_matrix(x.shape[-2], hw[0], antialias, x.device, x.dtype)
    cols = _resize_matrix(x.shape[-1], hw[1], antialias, x.device, x.dtype)
    return rows.transpose(0, 1) @ x @ cols


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """[-1, 1] images -> CLIP-normalised pixels at Φ's input size (differentiable)."""
    x = resize((images + 1) / 2, (size, size), antialias=True)
    # CLIP's mean and std made once where the pixels are (a host-to-device copy per query waits on the GPU)
    mean, std = (device_constant(v, x.device, x.dtype).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (x - mean) / std


def clipseg_logits(model, pixels: torch.Tensor, input_ids: torch.Tensor | None = None, train_text: bool = False,
                   conditional: torch.Tensor | None = None) -> torch.Tensor:
    """CLIPSeg's forward, with gradients through its vision tower.

    transformers' `CLIPSegForImageSegmentation.forward` runs the CLIP vision encoder under `torch.no_grad()`,
    which would make L_RS and L_IS blind to the image (and keeps training from tuning the backbone); the same
    computation here keeps the graph. The text side stays gradient-free unless `train_text`.

    `pixels` holds one image per query, or a single image for all of them: its vision features are then computed
    once and shared by every query (the decoder alone reads the text), which is what makes a query per region cheap.
    `conditional` (from `text_conditionals`) stands in for `input_ids` when the queries' text features are known.
    """
    vision = model.clip.vision_model(pixel_values=pixels, output_hidden_states=True,
                                     interpolate_pos_encoding=pixels.shape[-1] != model.config.vision_config.image_size)
    if conditional is None:
        conditional = text_conditionals(model, input_ids, train_text)
    activations = [vision.hidden_states[i + 1].expand(conditional.shape[0], -1, -1) for i in model.extract_layers]
    return model.decoder(activations, conditional).logits


def text_conditionals(model, input_ids: torch.Tensor, train_text: bool = False) -> torch.Tensor:
    """CLIPSeg's text features of the queries (gradient-free unless `train_text`)."""
    with torch.set_grad_enabled(train_text and torch.is_grad_enabled()):
        return model.get_conditional_embeddings(batch_size=input_ids.shape[0], input_ids=input_ids)


class Segmenter:
    """Φ: CLIPSeg maps M = sigmoid(logits) of text queries on images, resized to a target resolution."""

    def __init__(self, model, tokenizer, size: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.size = size or model.config.vision_config.image_size
        # The queries of an edit stay the same from step to step (until keyword selection changes them), and the
        # text tower costs more than the vision tower at Φ's small sizes: their features are computed once.
        self._conditionals: dict[tuple[str, ...], torch.Tensor] = {}

    def _input_ids(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer
        out = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return out.input_ids.to(self.model.device)

    def __call__(self, image: torch.Tensor, texts: list[str], hw: tuple[int, int]) -> torch.Tensor:
        """Maps [len(texts), h, w] for one image [1, 3, H, W] in [-1, 1]."""
        if not texts:
            return image.new_zeros((0, *hw))
        key = tuple(texts)
        if key not in self._conditionals:
            with torch.no_grad():
                self._conditionals[key] = text_conditionals(self.model, self._input_ids(texts))
        pixels = clip_pixels(image, self.size).to(self.model.dtype)
        logits = clipseg_logits(self.model, pixels, conditional=self._conditionals[key])
        logits = logits.reshape(len(texts), 1, *logits.shape[-2:]).float()
        return resize(logits.sigmoid(), hw)[:, 0]


# ---------------------------------------------------------------- guidance of one edit

SOURCE, TARGET = 0, 1


def query_text(region_prompt: str, selected: list[str], user: list[str]) -> str:
    """Φ's text for a region: its keywords joined by ", " (selected, then the user's); its prompt before any."""
    words = list(dict.fromkeys(selected + user))
    return ", ".join(words) if words else region_prompt


@dataclass
class Guide:
    """Guidance for one edit: which regions Φ looks for in which image, masks, schedule (method.md §6)."""

    segmenter: Segmenter
    settings: object  # layout.Settings
    steps: int
    factor: int
    hw: tuple[int, int]
    regions: dict[int, list[tuple[str, LatentBox]]]  # image -> foreground regions (id, box)
    prompts: dict[tuple[int, str], str]  # (image, id) -> region prompt
    user_keywords: dict[str, list[str]]
    common: list[str]  # foreground ids present in both images, for L_IS
    edited: list[LatentBox]
    update_source: bool  # a removal with settings.guide_source_on_removal: the source is guided too
    decode: Callable[[torch.Tensor], torch.Tensor]  # latents -> [-1, 1] float images: what Φ and L_IP look at
    rs_keys: frozenset[str] | None = None  # regions L_RS pulls (Settings.rs_regions "edited"); None: every one
    added: list[LatentBox] = field(default_factory=list)  # boxes of added regions (ip_reach "added")
    selected: dict[tuple[int, str], list[str]] | None = None  # keyword selection fills this in
    last_maps: dict[int, torch.Tensor] | None = None
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)  # `_mask`'s, made once per edit
    terms: tuple[torch.Tensor, torch.Tensor] | None = None  # the last loss's (λ_rs·L_RS + λ_is·L_IS, λ_ip·L_IP)

    @classmethod
    def for_edit(cls, edit, plans, segmenter: Segmenter, factor: int, decode: Callable[[torch.Tensor], torch.Tensor]) -> Guide:
        hw = (edit.size[1] // factor, edit.size[0] // factor)
        layouts = {SOURCE: edit.source(), TARGET: edit.target()}
        regions, prompts = {}, {}
        for image in (SOURCE, TARGET):
            by_id = layouts[image].regions_by_id()
            regions[image] = [(p.key, p.box) for p in plans[image] if p.key in by_id and p.layer == "foreground"]
            prompts.update({(image, key): by_id[key].prompt for key, _ in regions[image]})
        ids_t = {key for key, _ in regions[TARGET]}
        common = [key for key, _ in regions[SOURCE] if key in ids_t]
        boxes = {p.key: p.box for image in (SOURCE, TARGET) for p in plans[image]}
        # a removed object may reach past its box: L_IP's hole over it grows by Settings.removal_margin
        edited = [grow_box(boxes[r.id], edit.mrgd.removal_margin, hw) if r.role == "removed" else boxes[r.id]
                  for r in edit.regions if r.role != "inherent"]
        rs_keys = (frozenset(r.id for r in edit.regions if r.role != "inherent")
                   if edit.mrgd.rs_regions == "edited" else None)
        return cls(segmenter, edit.mrgd, edit.steps, factor, hw, regions, prompts,
                   {r.id: list(r.keywords) for r in edit.regions}, common, edited,
                   edit.mrgd.guide_source_on_removal and any(r.role == "removed" for r in edit.regions), decode,
                   rs_keys, added=[boxes[r.id] for r in edit.regions if r.role == "added"])

    def _mask(self, kind: str, like: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """A mask of the edit, made once and kept where `like` is (the boxes do not change during a run, and a
        host-to-device copy per step waits on CUDA): "latent" ℳ at the latent's size; "pixel" ℳ at the decoded
        picture's size `hw`; "added" ℳ of the added boxes alone (ip_reach "added"); "boxes-S" / "boxes-T" each
        foreground region's box in the source / target, for L_RS."""
        key = (kind, hw, like.device, like.dtype)
        if key not in self._masks:
            if kind == "latent":
                mask = inherent_mask(self.edited, self.hw)
            elif kind == "pixel":
                holes = self.edited
                if self.settings.ip_reach == "ring":  # a ring around added boxes is left to the latent term
                    holes = holes + [pad_box(box, self.settings.ip_ring, self.hw) for box in self.added]
                mask = inherent_mask(scale_boxes(holes, self.factor), hw)
            elif kind == "added":
                mask = inherent_mask(self.added, self.hw)
            else:
                boxes = [box_mask(box, self.hw) for _, box in self.regions[SOURCE if kind == "boxes-S" else TARGET]]
                mask = torch.stack(boxes) if boxes else torch.zeros((0, *self.hw))
            self._masks[key] = mask.to(like)
        return self._masks[key]

    def weights(self, step: int) -> LossWeights:
        """λ's of a step. With `guidance_every` k, L_IP weighs k·λ_ip on the steps it runs (ours): it holds inherent
        regions against a drift that acts at every step, so its pull over the run stays the same. L_RS and L_IS steer
        the edit and keep their λ's: scaled as well, they cost attribute edits CLIP. k = 2 on shapes-tune-60, SSIM-i
        add / remove / attribute against guiding every step: −0.014 / −0.020 / −0.026 without the factor, +0.000 /
        +0.008 / −0.001 with it (and the tiny decoder; benchmarks/results/tuning-guidance-cost.md)."""
        s = self.settings
        return loss_weights(step, self.steps, s.lambda_rs, s.lambda_is, s.lambda_ip * s.guidance_every)

    def active(self, step: int) -> bool:
        s = self.settings
        return step % s.guidance_every == 0 and step < s.guidance_until * self.steps and self.weights(step).any

    def texts(self, image: int) -> list[str]:
        selected = self.selected or {}
        return [query_text(self.prompts[(image, key)], selected.get((image, key), []), self.user_keywords.get(key, []))
                for key, _ in self.regions[image]]

    def _rs_rows(self, image: int) -> list[int]:
        """Rows of an image's maps that L_RS pulls: every foreground region, or only edited ones (rs_regions)."""
        return [n for n, (key, _) in enumerate(self.regions[image]) if self.rs_keys is None or key in self.rs_keys]

    def guided(self) -> list[int]:
        """The images whose x̂0 guidance moves: the target, and the source too for a guided removal."""
        return [TARGET, SOURCE] if self.update_source else [TARGET]

    def loss(self, decode, x0: dict[int, torch.Tensor], step: int,
             alpha: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """L = λ_rs·L_RS + λ_is·L_IS + λ_ip·L_IP on the fused x̂0 of both images.

        With `Settings.ip_step` "x0" and the step's ᾱ_t given, the L_IP term is divided by (1 − ᾱ_t)/√ᾱ_t, the factor
        by which the §6 re-step (`ddim.ddim_restep`) scales a gradient into x̂0: x̂0 then moves by λ_ip·∇L_IP itself at
        every noise level (see `ip_step_scale`).
        """
        w = self.weights(step)
        if alpha is not None and self.settings.ip_step == "x0":
            w = LossWeights(w.rs, w.is_, w.ip * ip_step_scale(alpha))
        # An image that is not guided is only a reference: no graph through its decoder and Φ, and no Φ at all on it
        # while neither L_IS nor its own L_RS can move anything (its L_RS has no gradient then; it is not logged),
        # except at the last guided step, whose maps `EditResult.explain` shows.
        guided = self.guided()
        images, maps = {}, {}
        last = not any(self.active(k) for k in range(step + 1, self.steps))  # Φ's last maps explain the run
        seen = [i for i in (SOURCE, TARGET) if i in guided or (w.is_ and self.common) or last]
        # L_IP before its first step (§6: from 0.15N) weighs 0: neither its pixels nor its backward pass are paid
        holds = w.ip > 0
        for i in (SOURCE, TARGET):
            if i not in seen and not (holds and self.settings.ip_pixels):
                continue
            with torch.set_grad_enabled(i in guided and torch.is_grad_enabled()):
                images[i] = decode(x0[i])
                if i in seen:
                    maps[i] = self.segmenter(images[i], self.texts(i), self.hw)
        self.last_maps = {**(self.last_maps or {}), **{i: m.detach() for i, m in maps.items()}}  # to the host after the run
        rs = sum(region_specific_loss(maps[i][keep], self._mask(("boxes-S", "boxes-T")[i], maps[i])[keep])
                 for i in seen for keep in [device_constant(tuple(self._rs_rows(i)), maps[i].device)])
        if len(seen) == 2:
            index = {i: [key for key, _ in self.regions[i]] for i in (SOURCE, TARGET)}
            pick = {i: [index[i].index(key) for key in self.common] for i in (SOURCE, TARGET)}
            rows = {i: device_constant(tuple(pick[i]), maps[i].device) for i in (SOURCE, TARGET)}
            is_ = infonce_loss(maps[SOURCE][rows[SOURCE]], maps[TARGET][rows[TARGET]])
        else:
            is_ = x0[TARGET].new_zeros(())
        latent_mask = self._mask("latent", x0[TARGET])
        if not holds:
            ip = x0[TARGET].new_zeros(())  # logged as 0 and no gradient: `_gradients` then runs one backward pass
        elif self.settings.ip_pixels:
            pixel_mask = self._mask("pixel", x0[TARGET], tuple(images[TARGET].shape[-2:]))
            ip = inherent_preservation_loss(images[SOURCE], images[TARGET], x0[SOURCE], x0[TARGET], pixel_mask,
                                            latent_mask)
        else:
            ip = inherent_preservation_loss(None, None, x0[SOURCE], x0[TARGET], None, latent_mask)
        self.terms = (w.rs * rs + w.is_ * is_, w.ip * ip)  # `_gradients` may confine the second's gradient
        total = self.terms[0] + self.terms[1]
        # detached tensors, not floats: reading a value back would wait for the GPU at every step (see `finish`)
        return total, {name: torch.as_tensor(value).detach() for name, value in
                       (("rs", rs), ("is", is_), ("ip", ip), ("total", total))}

    def _gradients(self, loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """∇L for the guided x̂0's, in one backward pass unless `ip_reach` confines L_IP's share in latent space:
        with "added" it reaches only the latents outside the added boxes, with "inherent" only those outside every
        edited box (weighted by ℳ), at the cost of a second backward pass through the decoder. (Through the decoder
        its pixel term otherwise also moved a box's latents, so that the pixels around the box match the source,
        which drew the new object back toward the old picture; "ring", the default, leaves those pixels out of the
        loss instead, see `_mask`.)"""
        terms, self.terms = self.terms, None  # the graph is not kept past its step
        if not loss.requires_grad:  # no L_IP yet and no row for L_RS (a removal's target): nothing moves
            return [torch.zeros_like(x) for x in inputs]
        reach = self.settings.ip_reach
        confined = reach == "inherent" or (reach == "added" and self.added)
        if not confined or terms is None or not terms[1].requires_grad:
            return list(torch.autograd.grad(loss, inputs))
        steer, keep = terms
        mask = self._mask("latent" if reach == "inherent" else "added", inputs[0])
        from_keep = torch.autograd.grad(keep, inputs, retain_graph=steer.requires_grad)
        from_steer = (torch.autograd.grad(steer, inputs, allow_unused=True) if steer.requires_grad
                      else [None] * len(inputs))
        return [mask * g_keep + (0 if g is None else g) for g_keep, g in zip(from_keep, from_steer)]

    def step(self, pipe, step: int, latents_t, fused, alpha, alpha_prev, info) -> dict:
        """Re-step DDIM from the guided x̂0 of the target (and of the source for a removal)."""
        from .ddim import ddim_restep

        guided = self.guided()
        x0 = {i: fused[i][1].detach().float().requires_grad_(i in guided) for i in (SOURCE, TARGET)}
        with torch.enable_grad():
            loss, parts = self.loss(self.decode, x0, step, alpha)
            grads = self._gradients(loss, [x0[i] for i in guided])
        # A non-finite gradient leaves the step unguided (g = 0 re-steps to the fused latent), decided on the device
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        info.setdefault("guidance_losses", []).append({"step": step, **parts, "finite": finite})
        out = dict(fused)
        for i, grad in zip(guided, grads):
            grad = torch.where(finite, grad, torch.zeros_like(grad))
            grad = limit_step(grad, alpha, self.settings.guidance_max_step)
            x_prev, x0_new = ddim_restep(latents_t[i].float(), x0[i].detach(), grad, alpha, alpha_prev)
            out[i] = (x_prev.to(fused[i][0].dtype), x0_new.to(fused[i][1].dtype))
        return out

    @staticmethod
    def finish(info) -> None:
        """After the loop: the logged losses as numbers (read back in one copy), and a note for every step whose
        gradient was not finite."""
        entries = info.get("guidance_losses", [])
        if not entries:
            return
        keys = [k for k in entries[0] if k != "step"]
        tensors = [torch.as_tensor(e[k]) for e in entries for k in keys]
        device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
        values = iter(torch.stack([t.to(device, torch.float64) for t in tensors]).tolist())
        for entry in entries:
            entry.update({k: next(values) for k in keys})
            if not entry.pop("finite", 1.0):
                info.setdefault("notes", []).append(f"step {entry['step']}: guidance gradient not finite; step left unguided")
