"""Regions, layouts and edits: the edit file of design.md, validated and paired by region id (method.md §1).

One edit file lists each region once; its ``prompt`` is the region in the source image and its ``target_prompt``
the region in the target image (absent: unchanged; null: removed; only ``target_prompt``: added).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from .errors import InputError, describe_validation_error

Kind = Literal["background", "foreground"]
Role = Literal["inherent", "added", "removed", "modified"]
Control = Literal["background", "inherent", "modified", "added", "removed", "total"]

MAX_SIDE = 8192  # pixels; far beyond what the models handle, only there to stop absurd sizes early
MAX_SEED = 2**63 - 1  # fits torch.Generator.manual_seed


def _check_id(region_id: str) -> str:
    if not region_id.strip():
        raise ValueError('must not be empty; name the region, e.g. "ball"')
    return region_id


def _check_box(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    x, y, w, h = box
    for name, value in (("width", w), ("height", h)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0; give [x, y, w, h] fractions with w, h in (0, 1]")
    for name, value in (("x", x), ("y", y)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1); give [x, y, w, h] fractions of the canvas, top-left origin")
    return box  # a box reaching past the canvas is fine: it is clamped when mapped to latents


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    for name, value in zip(("width", "height"), size):
        if value <= 0 or value % 8:
            raise ValueError(f"{name} {value} is not a positive multiple of 8; use a multiple of 8, e.g. 128")
        if value > MAX_SIDE:
            raise ValueError(f"{name} {value} is too large; use at most {MAX_SIDE}")
    return size


def _count(expected: int, what: str) -> Callable[[Any], Any]:
    """A before-validator naming what a fixed-length list must hold, instead of pydantic's item-by-item complaint."""

    def check(value: Any) -> Any:
        if isinstance(value, (list, tuple)) and len(value) != expected:
            raise ValueError(f"got {len(value)} values; give {expected}: {what}")
        return value

    return check


def _check_unique_ids(regions: list) -> list:
    first_index: dict[str, int] = {}
    for i, region in enumerate(regions):
        if region.id in first_index:
            raise ValueError(
                f"duplicate id {region.id!r} at [{first_index[region.id]}] and [{i}]; give every region its own id"
            )
        first_index[region.id] = i
    return regions


RegionId = Annotated[str, AfterValidator(_check_id)]
Box = Annotated[
    tuple[float, float, float, float],
    BeforeValidator(_count(4, "[x, y, w, h] fractions of the canvas")),
    AfterValidator(_check_box),
]
Size = Annotated[
    tuple[int, int],
    BeforeValidator(_count(2, "[width, height] in pixels, e.g. [128, 128]")),
    AfterValidator(_check_size),
]
Fraction = Annotated[float, Field(ge=0, le=1)]
# Feather ratio ρ of a foreground box (method.md §2). The research code's 0.2 leaves a box of fewer than 10 latent
# pixels unfeathered, and its region prompt then paints its own backdrop up to the box's edge: a visible rectangle,
# read as a square (text control on shapes-v3: shape right 0.73). 0.4 hands the box's rim to the background path
# and the object keeps its shape (0.83, colour 1.00; 0.6: 0.77; 1.0 fades the object away). See
# benchmarks/results/feather.md.
DEFAULT_FEATHER = 0.4
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class _Model(BaseModel):
    # Unknown fields are errors so that a typo ("promt") never silently falls back to a default.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------------------------
# Method settings: every default of the method lives here (method.md §2-§6; italic research-code values).


class CrossReplace(_Model):
    """Fraction of the steps in which the target copies the source's cross-attention, per control kind (§3)."""

    background: Fraction = 1.0
    inherent: Fraction = 1.0  # unchanged foreground regions
    modified: Fraction = 0.6  # word swap
    total: Fraction = 0.5  # r_total, refine


class SelfReplace(_Model):
    """Fraction of the steps in which the target copies the source's self-attention, per control kind (§3)."""

    background: Fraction = 0.5
    inherent: Fraction = 0.7
    modified: Fraction = 0.3
    total: Fraction = 0.2


class Settings(_Model):
    """The ``mrgd`` block of an edit file: the method's settings, all defaults in one place."""

    method: Literal["multidiffusion", "p2p", "mrgd"] = "mrgd"  # fusion only | + attention control | full method
    use_total: bool = True  # add the full-canvas r_total region late in sampling (§1)
    total_fraction_attribute: Fraction = 0.5  # r_total runs the last floor(T*N)+1 steps, attribute-only edits
    total_fraction_structural: Fraction = 0.6  # ... and when a region is added or removed
    schedule: Literal["linear", "step"] = "linear"  # cross-attention replacement: linear decay or hard cut (§3)
    cross_replace: CrossReplace = Field(default_factory=CrossReplace)
    self_replace: SelfReplace = Field(default_factory=SelfReplace)
    keywords: int = Field(15, ge=0)  # N_k: keywords kept per region (§4)
    kssa: bool = True  # keyword-selected self-attention (§5)
    kssa_scale: float = Field(1.5, gt=0)  # logit scale of the selected key columns
    keyword_steps: tuple[Annotated[int, Field(ge=1)], ...] = (10, 5)  # select keywords at steps k = N-10, N-5
    # How a keyword map is scored (keywords.py): entropy over pixels (ours, the default) or §4's 256-level histogram,
    # which scores a uniform map ~0 bits, as if it marked one object: on shapes-v3, whose filler words attend
    # uniformly as SD's do, histogram precision is 0.77 and spatial 1.00 (benchmarks/results/keywords*.md).
    keyword_entropy: Literal["histogram", "spatial"] = "spatial"
    # What is selected (ours: "word"): whole words, each scored by its least focused piece, or §4's single tokens, by
    # which a word split into untrained byte pieces got picked through one piece's chance focus (keywords.py).
    keyword_unit: Literal["word", "token"] = "word"
    guidance: bool = True  # multi-region guidance (§6)
    # Re-tuned for our gradient (w.r.t. x̂0, Φ differentiable): the research code's 1000 / 2000 for L_RS / L_IS
    # wrecked pictures on shapes-v1; see benchmarks/results/guidance_tuning_rs_is.md.
    lambda_rs: float = Field(3.0, ge=0)  # weight of L_RS, region segmentation
    # L_IS, InfoNCE between source and target maps: 6 on shapes-v1; on shapes-v3 with the new fusion 2 beats 6 on
    # every task and matches 0 (benchmarks/results/lambda-is.md, 12 pairs)
    lambda_is: float = Field(2.0, ge=0)
    lambda_ip: float = Field(300.0, ge=0)  # weight of L_IP, inherent preservation (halved in the second half)
    # Guide every k-th step only (ours; §6 guides every step), L_IP weighing k·λ_ip there. 2 halves guidance's cost and
    # stays within 1 CLIP point and 0.005 SSIM of every step on the tuning suites (136 pairs, pair by pair): CLIP add /
    # remove / attribute −0.9 / +0.3 / −0.9, SSIM-e +0.006 / +0.003 / +0.003, SSIM-i +0.003 / +0.004 / +0.000
    # (benchmarks/results/tuning-guidance-cost.md).
    guidance_every: int = Field(2, ge=1)
    guidance_until: Fraction = 1.0  # guide only while k < guidance_until·N: the late steps refine what is there
    # The decoder Φ and L_IP's pixel term see x̂0 through: "auto" (the family's tiny decoder when it ships one, else
    # its VAE), "full" (the VAE, as §6), "tiny", or a folder holding a diffusers AutoencoderTiny (TAESD family). On the
    # tuning suites (161 pairs) the embedded family's tiny decoder stayed within 0.5 CLIP and 0.005 SSIM of its VAE
    # per task, at 0.85x the edit's time (benchmarks/results/tuning-tiny-decoder.md).
    guidance_vae: str = Field("auto", min_length=1)
    # The precision of the VAE's guided decode and its backward pass (ours; §6 runs it in the VAE's dtype): "auto"
    # is bfloat16 autocast where the device computes it natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX) and
    # the VAE's weights are float32 (SD's VAE is kept in float32 beside a float16 UNet), else "decoder", the decoder's
    # own dtype. bfloat16 has float32's range, so it does not overflow where float16 does (why SD's VAE is upcast).
    # Φ stays in float32: it is a small part of the cost and its gradient keeps less of its direction in bfloat16.
    # Tiny decoders cost little and are left as they are unless "bfloat16" is asked for. On the tuning suites (161
    # pairs, full VAE) bfloat16 minus float32 was CLIP +1.18 / −0.10 / +0.25, SSIM-e +0.005 / +0.000 / +0.001 (add /
    # remove / attribute), of the order of float rounding alone (benchmarks/results/tuning-guidance-precision.md).
    guidance_precision: Literal["auto", "decoder", "bfloat16"] = "auto"
    # What Φ and L_IP look at when guidance differentiates through a tiny decoder (ours): "decoder", the tiny
    # decoder's own picture; "vae", the VAE's decode of x̂0 (made without a graph, in guidance_precision), with the
    # gradient taken through the tiny decoder (a straight-through estimate: the VAE's picture, the tiny decoder's
    # Jacobian). The losses then judge the picture the edit will show, and the VAE's backward pass, the largest
    # part of full-VAE guidance on SD's VAE, is not paid. On the tuning suites (161 pairs) it came closer to the VAE's
    # guidance than the tiny decoder's own picture on 7 of 9 task means (CLIP attribute −0.34 against −0.95), but on
    # the embedded model it costs what the VAE does, so it is an option (benchmarks/results/tuning-guidance-picture.md).
    guidance_picture: Literal["decoder", "vae"] = "decoder"
    # Guidance's VAE decode recomputes its blocks in the backward pass instead of keeping them (ours): SD 1.5 at 512²
    # peaked at 1.63x the plain pair's memory with them kept (benchmarks/results/speed.md); it costs ~3 % of an edit's
    # time there and ~7 % on the embedded model at 128², where memory is no concern. None: from 512² pixels up.
    guidance_checkpoint: bool | None = None
    guidance_size: int | None = Field(None, ge=16, le=1024)  # Φ's input side in pixels; None: its processor's
    # How L_IP's gradient moves x̂0 (ours: "x0"). §6's re-step ("epsilon") scales every gradient by (1 − ᾱ_t)/√ᾱ_t
    # on its way into x̂0: from 5.0 at k = 3 of 20 (L_IP's latent term then pulls the target's x̂0 three times past
    # the source's, amplifying their difference) to 0.11 at k = 17 (where r_total repaints and L_IP barely pulls).
    # "x0" moves x̂0 by λ_ip·∇L_IP itself at every step (guidance.ip_step_scale); L_RS and L_IS keep §6's rule.
    # On the tuning suite (shapes-61, 36 pairs) "x0" lifted SSIM-i from 0.945 / 0.942 / 0.971 to 0.993 / 0.989 / 0.994
    # (add / remove / attribute) at CLIP within 1.4 points (benchmarks/results/overlap-tuning.md).
    ip_step: Literal["epsilon", "x0"] = "x0"
    ip_pixels: bool = True  # L_IP's pixel term (Eq. 4); false: its latent term alone
    # Which latents L_IP's gradient may move (ours; §6: "image", all of them): "added" keeps it out of added boxes,
    # "inherent" out of every edited box (weighed by ℳ), so the pixel term does not hold a new object back through
    # the decoder's reach (guidance.Guide._gradients); both cost a second backward pass through the decoder. "ring"
    # (the default) takes one: L_IP's pixel term leaves out a ring of `ip_ring` latent pixels around each added box,
    # the pixels that pulled it back, and its latent term still holds them. On the 65 additions of the tuning suites
    # "added" lifted CLIP +1.24 [+0.47, +2.20] over "image" for SSIM-e −0.012 (tuning-ip-reach.md); "ring" against
    # "added" was within 0.3 CLIP and 0.003 SSIM with the tiny decoder and the VAE, a 2-pixel ring cost SSIM-e 0.0065
    # (tuning-ip-ring.md). Other edits are unchanged by it. "inherent" cost attribute edits 1.9 CLIP (tuning-separate.md).
    ip_reach: Literal["image", "inherent", "added", "ring"] = "ring"
    ip_ring: int = Field(1, ge=0)  # latent pixels around an added box that L_IP's pixel term leaves out (ip_reach "ring")
    # The most a guided re-step may move x̂0, as an RMS over the latent (ours; §6 has no limit): the gradient is
    # scaled down to it (guidance.limit_step). None: no limit. Φ's backward spikes now and then: at one step the
    # gradient reaching the decoded image grows ~100x while the one reaching Φ's maps stays as before, and the re-step
    # moved x̂0 by up to 30 RMS (typical moves are 0.02-0.6; x̂0 itself is ~1.7): 3 of 15 tuning edits run with the
    # defaults passed 1, and under another r_total rule one target was repainted whole (SSIM-i 0.45). 1.0 clips only
    # such spikes: on shapes-tune-60 CLIP add / remove / attribute 47.9 / 56.2 / 41.7 -> 47.7 / 57.6 / 43.1, SSIM
    # within 0.001 or higher (benchmarks/results/tuning-guidance-cost.md).
    guidance_max_step: float | None = Field(1.0, gt=0)
    # §6 (the research code) guides the source too when a region is removed. Off by default: on shapes-v3 the pull of
    # L_IP on both images wrecked removals (10 pairs: CLIP 34.4 / SSIM-e 0.794 / SSIM-i 0.752, target-only 46.5 /
    # 0.865 / 0.942), and a removal's source is what the user asked to keep. benchmarks/results/removal-guidance.md
    guide_source_on_removal: bool = False
    add_in_source: bool = False  # also write added boxes into the source, global prompt only (§2)
    # Composite order in the target, method mrgd (ours; §2 averages every foreground crop covering a pixel): regions of these roles
    # are composited over the inherent foreground boxes they overlap (those crops weigh 1 − the edited box's feather
    # mask there; fusion.under_weights) instead of averaged with them; a removed box, which has no crop in the
    # target, clears the inherent crops under it, so the background shows there. The source is never changed.
    # ("added", "removed") on the tuning suite: added objects drawn whole where they overlap an inherent box (add CLIP
    # 57.1 -> 66.0 at SSIM-i 0.990); "modified" cost recolourings 0.03 SSIM-e and is left out.
    edited_on_top: tuple[Literal["added", "removed", "modified"], ...] = ("added", "removed")
    # r_total in the target over a removed box, method mrgd (ours; §2 lets it cover the whole canvas): it weighs 1 − the box's
    # feather mask there (fusion.clear_mask), so what the removed object leaves is the background's.
    # On the tuning suite removals overlapping an inherent box went from CLIP 42.4 to 56.1 (60.0 with edited_on_top).
    total_clears_removed: bool = True
    # ... and over the boxes of these roles (ours): the region's own crop alone draws its object there, as in
    # MultiDiffusion, which has no r_total; r_total had blended the other objects of its prompt into it.
    # Chosen with total_within and own_attention_in below on both tuning suites (shapes-61 36 pairs + shapes-tune-60,
    # 92 pairs; benchmarks/results/tuning-r-total.md): CLIP add / remove / attribute 51.1 / 52.9 / 46.8 -> 53.7 / 61.8 /
    # 48.5, SSIM-e add 0.907 -> 0.892 (remove and attribute up).
    total_clears_edited: tuple[Literal["added", "modified"], ...] = ("added", "modified")
    # Where r_total may draw, method mrgd, both images (ours; §2: "canvas", the whole picture). Its prompt names every
    # object but not where: outside the boxes it drew them again on the background (stray objects in the source that
    # the target then keeps, also inside a removed box). "objects": only under the image's foreground boxes, weighted
    # by their feather masks (fusion.cover_mask); elsewhere the background region alone draws the background.
    total_within: Literal["canvas", "objects"] = "objects"
    # A removed object may have reached past its box in the source: L_IP's hole over a removed box, and r_total's
    # (total_clears_removed), grow by this fraction of the box's larger side (ours; fusion.grow_box).
    removal_margin: float = Field(0.0, ge=0, le=1)
    # Query pixels inside boxes of these roles keep the target's own attention in every other region's rows that
    # follow the source (background, r_total, inherent crops), method mrgd (ours; §3 replaces whole rows: the
    # background crop copied the source's self-attention into an added or removed box, so its structure, the old
    # object or the empty ground, was drawn again there). A region's own rows are never spared.
    own_attention_in: tuple[Literal["added", "removed", "modified"], ...] = ("added", "removed", "modified")
    # Which target regions L_RS pulls towards their box (ours: "edited"; §6: "all" foreground regions): an inherent
    # region's reference is the source, which L_IP keeps; L_RS on it chased its prompt instead.
    rs_regions: Literal["all", "edited"] = "all"

    def replace_fractions(self, control: Control) -> tuple[float, float]:
        """(cross, self) replacement fractions for a control kind; added and removed regions get no control."""
        if control in ("added", "removed"):
            return 0.0, 0.0
        return getattr(self.cross_replace, control), getattr(self.self_replace, control)


# The settings of ours that change where and how the edited and inherent boxes are drawn and guided, at the values
# that give method.md's (the research code's) behaviour.
PAPERS_RULES: dict[str, Any] = {"ip_step": "epsilon", "ip_pixels": True, "edited_on_top": (), "total_clears_removed": False,
                                "total_clears_edited": (), "total_within": "canvas", "own_attention_in": (),
                                "removal_margin": 0.0, "rs_regions": "all", "guidance_max_step": None,
                                "guidance_every": 1, "ip_reach": "image", "guidance_vae": "full",
                                "guidance_precision": "decoder"}


# ---------------------------------------------------------------------------------------------------------------
# Regions


class Region(_Model):
    """A region of an edit, as written in the edit file.

    ``target_prompt`` absent means "same as prompt" (inherent); ``null`` removes the region from the target;
    a ``target_prompt`` without ``prompt`` adds it. After validation ``target_prompt`` always holds the resolved
    target prompt, so equal regions compare equal however they were written.
    """

    id: RegionId
    kind: Kind = "foreground"
    box: Box  # [x, y, w, h] fractions of the canvas, top-left origin
    prompt: str | None = None
    target_prompt: str | None = None
    negative_prompt: str = ""
    keywords: list[str] = Field(default_factory=list)  # user keywords, added to the selected ones for guidance
    keyword_count: int | None = Field(None, ge=0)  # N_k for this region; None: the edit's mrgd.keywords
    feather: Fraction = DEFAULT_FEATHER
    seed: Seed | None = None  # own noise for the box; None: the global noise

    @model_validator(mode="after")
    def _resolve_target(self) -> Region:
        if "target_prompt" not in self.model_fields_set:
            self.target_prompt = self.prompt
        if self.prompt is None and self.target_prompt is None:
            raise ValueError("needs a prompt (source image), a target_prompt (target image) or both")
        return self

    @property
    def role(self) -> Role:
        """How the edit changes this region."""
        if self.prompt is None:
            return "added"
        if self.target_prompt is None:
            return "removed"
        return "inherent" if self.prompt == self.target_prompt else "modified"

    @property
    def control(self) -> Control:
        """Which attention-control row of method.md §3 applies to this region."""
        return "background" if self.kind == "background" and self.role == "inherent" else self.role

    @property
    def source_prompt(self) -> str | None:
        """The prompt in the source image; None when the region is absent there."""
        return self.prompt

    @property
    def resolved_target_prompt(self) -> str | None:
        """The prompt in the target image; None when the region is absent there."""
        return self.target_prompt


class LayoutRegion(_Model):
    """A region as it appears in one image."""

    id: RegionId
    kind: Kind = "foreground"
    box: Box
    prompt: str
    negative_prompt: str = ""
    keywords: list[str] = Field(default_factory=list)
    keyword_count: int | None = Field(None, ge=0)
    feather: Fraction = DEFAULT_FEATHER
    seed: Seed | None = None


# ---------------------------------------------------------------------------------------------------------------
# Layouts and edits


class _Canvas(_Model):
    size: Size = (128, 128)  # [W, H] in pixels
    prompt: str = ""  # global prompt: quality words, style
    negative_prompt: str = ""
    seed: Seed = 0
    steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float = Field(7.0, ge=0)  # classifier-free guidance
    # Real canvas each region's crop is denoised with around its box, per side as a fraction of the box's length
    # (fusion.context_window). 0 still grows a crop to the UNet's multiple with real canvas, not a replicated
    # border; wider windows remove backdrop rectangles but let objects outgrow their boxes
    # (benchmarks/results/region-context.md).
    region_context: float = Field(0.0, ge=0, le=2)

    def _canvas(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _Canvas.model_fields}

    def regions_by_id(self) -> dict:
        """The regions keyed by id, in file order."""
        return {region.id: region for region in self.regions}

    def to_dict(self) -> dict[str, Any]:
        """The resolved config: every default filled in, JSON types only."""
        return self.model_dump(mode="json")

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON or YAML, chosen by the file suffix."""
        write_config_file(path, self.to_dict())


class Layout(_Canvas):
    """One image: canvas, global prompt and the regions present in it."""

    regions: Annotated[list[LayoutRegion], AfterValidator(_check_unique_ids)] = Field(default_factory=list)

    def total_prompt(self) -> str:
        """The prompt of r_total: the global prompt, then every region prompt in region order."""
        return _join(self.prompt, *(region.prompt for region in self.regions))

    def region_prompt(self, region: LayoutRegion) -> str:
        """The prompt a region is denoised with: global prompt, then the region's."""
        return _join(self.prompt, region.prompt)

    def region_negative(self, region: LayoutRegion) -> str:
        """The negative prompt a region is denoised with: global negative, then the region's."""
        return _join(self.negative_prompt, region.negative_prompt)

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> Layout:
        """Validate a plain layout (an edit file with no edit in it); errors are :class:`InputError` one-liners."""
        edit = Edit.from_dict(data, source)
        changed = [i for i, region in enumerate(edit.regions) if region.role != "inherent"]
        if changed:
            where = f"{source}: " if source else ""
            raise InputError(
                f"{where}regions[{changed[0]}].target_prompt: this file is an edit, not a plain layout; "
                "run `mrgd edit` on it, or remove target_prompt"
            )
        return edit.source()

    @classmethod
    def load(cls, path: str | Path) -> Layout:
        """Read a plain layout from a .json, .yaml or .yml file."""
        return cls.from_dict(read_config_file(path), source=str(path))


class Edit(_Canvas):
    """A source and a target image over one canvas, their regions paired by id (method.md §1)."""

    regions: Annotated[list[Region], AfterValidator(_check_unique_ids)] = Field(default_factory=list)
    mrgd: Settings = Field(default_factory=Settings)

    def source(self) -> Layout:
        """The source image: regions with a source prompt, in file order."""
        return self._image(lambda region: region.source_prompt)

    def target(self) -> Layout:
        """The target image: regions with a target prompt (modified ones carry it), in file order."""
        return self._image(lambda region: region.resolved_target_prompt)

    def _image(self, prompt_of: Callable[[Region], str | None]) -> Layout:
        regions = [
            LayoutRegion(**region.model_dump(exclude={"prompt", "target_prompt"}), prompt=prompt)
            for region in self.regions
            if (prompt := prompt_of(region)) is not None
        ]
        return Layout(**self._canvas(), regions=regions)

    def roles(self) -> dict[str, Role]:
        """Region id -> role, in file order."""
        return {region.id: region.role for region in self.regions}

    @property
    def is_edit(self) -> bool:
        """Whether any region differs between source and target."""
        return any(region.role != "inherent" for region in self.regions)

    @property
    def has_structural_change(self) -> bool:
        """Whether a region is added or removed."""
        return any(region.role in ("added", "removed") for region in self.regions)

    @property
    def total_fraction(self) -> float:
        """T_total for this edit: the structural value when a region is added or removed (§1)."""
        settings = self.mrgd
        return settings.total_fraction_structural if self.has_structural_change else settings.total_fraction_attribute

    @classmethod
    def from_layout(cls, layout: Layout, settings: Settings | None = None) -> Edit:
        """An edit that changes nothing: every region of ``layout`` inherent."""
        regions = [Region(**region.model_dump()) for region in layout.regions]
        return cls(**layout._canvas(), regions=regions, mrgd=settings or Settings())

    @classmethod
    def from_layouts(cls, source: Layout, target: Layout, settings: Settings | None = None) -> Edit:
        """Pair two layouts by region id (never by position).

        Regions keep the source's order; target-only regions follow in the target's order. A region in both
        images must agree on everything but its prompt.
        """
        for name, value in source._canvas().items():
            if getattr(target, name) != value:
                raise InputError(f"target.{name}: differs from the source's; source and target share the canvas")
        in_target = target.regions_by_id()
        regions = []
        for region in source.regions:
            other = in_target.get(region.id)
            if other is None:
                regions.append(Region(**region.model_dump(), target_prompt=None))
                continue
            for name in LayoutRegion.model_fields:
                if name != "prompt" and getattr(other, name) != getattr(region, name):
                    raise InputError(
                        f"target.regions[{target.regions.index(other)}].{name}: differs from source region "
                        f"{region.id!r}; a paired region may change its prompt only"
                    )
            regions.append(Region(**region.model_dump(), target_prompt=other.prompt))
        in_source = source.regions_by_id()
        regions += [Region(**r.model_dump(exclude={"prompt"}), target_prompt=r.prompt)
                    for r in target.regions if r.id not in in_source]
        return cls(**source._canvas(), regions=regions, mrgd=settings or Settings())

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> Edit:
        """Validate an edit (or plain layout) given as a dict; errors are :class:`InputError` one-liners."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise InputError(describe_validation_error(err, source)) from None

    @classmethod
    def load(cls, path: str | Path) -> Edit:
        """Read an edit, or a plain layout as an edit that changes nothing, from a .json, .yaml or .yml file."""
        return cls.from_dict(read_config_file(path), source=str(path))


def _join(*parts: str) -> str:
    return ", ".join(part for part in parts if part)


# ---------------------------------------------------------------------------------------------------------------
# Files

_SUFFIXES = (".json", ".yaml", ".yml")


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise InputError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .json, .yaml or .yml")
    return suffix


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML file holding a mapping; every failure is an :class:`InputError` naming the file."""
    path = Path(path)
    suffix = _suffix(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found; check the path") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({err.strerror}); check the path and permissions") from None
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise InputError(f"{path}: {where}: invalid JSON ({err.msg}); fix the syntax") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or err
        raise InputError(f"{path}: {where}invalid YAML ({problem}); fix the syntax") from None
    except (ValueError, RecursionError) as err:  # e.g. an integer with too many digits, absurd nesting
        raise InputError(f"{path}: cannot parse it ({type(err).__name__}: {err}); fix the value") from None
    if not isinstance(data, dict):
        raise InputError(f'{path}: expected a mapping of fields at the top level, e.g. {{"regions": [...]}}')
    return data


def write_config_file(path: str | Path, data: dict[str, Any]) -> None:
    """Write a mapping as JSON or YAML, chosen by the file suffix."""
    path = Path(path)
    if _suffix(path) == ".json":
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        if yaml.safe_load(text) != data:  # PyYAML mangles a few raw characters (U+0085); escape them all then
            text = yaml.safe_dump(data, sort_keys=False)
    path.write_text(text, encoding="utf-8")
