"""Real images: DDIM inversion with the fused multi-region prediction, and per-region null-text optimisation
(method.md §7; null-text inversion after Mokady et al. 2023, made multi-region).

1. `ddim_invert`: encode, then walk DDIM backwards (CFG 1, the fused prediction of the source layout), keeping
   the pivot trajectory z*_0 … z*_N.
2. `optimise_null_text`: from ẑ_N = z*_N, for every step optimise each region's unconditional embedding ∅_k^i so
   that the fused CFG step lands on the pivot z*_{k+1 toward clean}; fp32.
3. The edit then starts from ẑ_N with those embeddings (`MRGDPipeline.edit(start_latents=, null_embeds=)`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .attention import AttentionState, controlled_attention
from .ddim import ddim_invert_step, ddim_step, set_timesteps
from .errors import InputError
from .layout import Edit

SOURCE = 0


METHODS = ("direct", "negative-prompt", "null-text")


@dataclass
class Inversion:
    """What an edit of a real image needs: the inverted noise and, per method, how the source is kept on it.

    - null-text (§7): each region's optimised null embedding per step;
    - negative-prompt: each region's own prompt as its null embedding (Miyake et al. 2023): no optimisation;
    - direct: negative-prompt inversion made exact: the DDIM pivots are kept too, and the edit puts the source back
      on its pivot after every step and moves the target by the same correction outside the edited boxes (after Ju
      et al.'s "direct inversion"): no optimisation. The null embeddings matter for the target: with the empty
      prompt's, its CFG steps drift from the corrected source (SSIM-i 0.78 against null-text's 0.93 on
      benchmarks/inversion.py); inside edited boxes the correction would pull the edit back to the photo.
    """

    z_T: torch.Tensor  # [1, C, h, w]
    null_embeds: dict[str, torch.Tensor]  # region key -> [steps, L, D] (null-text, negative-prompt)
    losses: list[float]  # final null-text loss per step
    size: tuple[int, int] | None = None  # the edit's (W, H) it was inverted for
    region_context: float | None = None  # the edit's region_context it was inverted with (None: older files)
    method: str = "null-text"
    pivots: torch.Tensor | None = None  # [steps + 1, C, h, w]: z*_0 (clean) ... z*_N (direct)

    @property
    def steps(self) -> int:
        if self.pivots is not None:
            return self.pivots.shape[0] - 1
        return next(iter(self.null_embeds.values())).shape[0] if self.null_embeds else 0

    def check(self, edit: Edit) -> None:
        """Refuse an edit this inversion cannot serve: another size or another number of steps."""
        if self.size is not None and tuple(edit.size) != tuple(self.size):
            raise InputError(f"--from-inversion: inverted at size {list(self.size)}, the edit has size "
                             f"{list(edit.size)}; use the same size or invert again")
        if self.steps != edit.steps:
            raise InputError(f"--from-inversion: inverted with {self.steps} steps, the edit has {edit.steps}; "
                             f"pass --steps {self.steps} or invert again")
        if self.region_context is not None and self.region_context != edit.region_context:
            raise InputError(f"--from-inversion: inverted with region_context {self.region_context}, the edit has "
                             f"{edit.region_context}; set region_context to {self.region_context} or invert again")

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {"z_T": self.z_T.contiguous()}
        tensors.update({f"null/{k}": v.contiguous() for k, v in self.null_embeds.items()})
        if self.pivots is not None:
            tensors["pivots"] = self.pivots.contiguous()
        metadata = {"losses": ",".join(f"{x:.3e}" for x in self.losses), "method": self.method}
        if self.size is not None:
            metadata["size"] = f"{self.size[0]}x{self.size[1]}"
        if self.region_context is not None:
            metadata["region_context"] = str(self.region_context)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> Inversion:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata() or {}
                losses = [float(x) for x in metadata.get("losses", "").split(",") if x]
                size = tuple(int(v) for v in metadata["size"].split("x")) if "size" in metadata else None
            context = float(metadata["region_context"]) if "region_context" in metadata else None
            method = metadata.get("method", "null-text")
        except Exception as err:  # corrupt or foreign file
            raise InputError(f"--from-inversion: cannot read {path} ({type(err).__name__}); "
                             "give an inversion.safetensors written by `mrgd invert`") from None
        if "z_T" not in tensors:
            raise InputError(f"--from-inversion: {path} has no z_T; give a file written by `mrgd invert`")
        if method not in METHODS or (method == "direct") != ("pivots" in tensors):
            raise InputError(f"--from-inversion: {path} says method {method!r} but holds "
                             f"{'pivots' if 'pivots' in tensors else 'no pivots'}; invert the image again")
        nulls = {k[5:]: v for k, v in tensors.items() if k.startswith("null/")}
        return cls(tensors["z_T"], nulls, losses, size, context, method, tensors.get("pivots"))

    def edit_kwargs(self, images=(0, 1)) -> dict:
        """What `MRGDPipeline.edit` needs to edit this image: `pipe.edit(edit, **inversion.edit_kwargs())`."""
        kwargs = {"start_latents": self.z_T}
        if self.null_embeds:
            kwargs["null_embeds"] = self.null_embeds_for(images)
        if self.pivots is not None:
            kwargs["source_pivots"] = self.pivots
        return kwargs

    def null_embeds_for(self, images=(0, 1)) -> dict[tuple[int, str], torch.Tensor]:
        """The pipeline's `null_embeds`: the same region's ∅ in source and target (additions keep the empty prompt)."""
        return {(i, key): value for i in images for key, value in self.null_embeds.items()}


MAX_ENLARGEMENT = 4  # per side: an image enlarged more than this is mostly interpolation, and inverts as a blur


def load_image(path: str | Path, size: tuple[int, int]) -> tuple[Image.Image, str | None]:
    """Open an image and fit it to the layout's (W, H): centre-crop to the aspect ratio, then resize.

    Returns the RGB picture and a note for the user (None when nothing had to change): turned upright by its EXIF
    orientation, converted to RGB (CMYK, 16-bit, alpha, palette, greyscale), cropped and resized. An image under a
    quarter of the layout's width or height is refused, naming both sizes.
    """
    from PIL import ExifTags, ImageOps

    name = Path(path).name
    try:
        with Image.open(path) as opened:
            frames = getattr(opened, "n_frames", 1)
            turned = opened.getexif().get(ExifTags.Base.Orientation, 1) != 1  # a phone photo stores its rotation
            image = ImageOps.exif_transpose(opened)  # a loaded copy, upright
    except FileNotFoundError:
        raise InputError(f"IMAGE: {path} not found; check the path") from None
    except Image.DecompressionBombError:
        raise InputError(f"IMAGE: {path} has too many pixels for a safe decode; give a smaller image") from None
    except Exception:
        raise InputError(f"IMAGE: {path} is not an image PIL can read; give a PNG or JPEG") from None
    notes = [f"first of its {frames} frames used"] if frames > 1 else []
    if turned:
        notes.append("turned upright as its EXIF orientation says")
    image, converted = _to_rgb(image, path)
    notes += [converted] if converted else []
    w, h = image.size
    if w * MAX_ENLARGEMENT < size[0] or h * MAX_ENLARGEMENT < size[1]:
        raise InputError(f"IMAGE: {path} is {w}x{h}, far smaller than the edit's size {size[0]}x{size[1]}; give an "
                         f"image of at least {-(-size[0] // MAX_ENLARGEMENT)}x{-(-size[1] // MAX_ENLARGEMENT)} "
                         "or make the edit's size smaller")
    if image.size != tuple(size):
        target = size[0] / size[1]
        if w / h > target:
            nw = round(h * target)
            image = image.crop(((w - nw) // 2, 0, (w - nw) // 2 + nw, h))
        elif w / h < target:
            nh = round(w / target)
            image = image.crop((0, (h - nh) // 2, w, (h - nh) // 2 + nh))
        notes.append(f"image {w}x{h} centre-cropped and resized to the layout size {size[0]}x{size[1]}")
        image = image.resize(tuple(size), Image.BICUBIC)
    return image, (f"{name}: " + "; ".join(notes)) if notes else None


def _to_rgb(image: Image.Image, path) -> tuple[Image.Image, str | None]:
    """8-bit RGB, and what was converted. PIL's own convert("RGB") clips 16-bit greyscale to white and drops
    alpha, keeping whatever colour the transparent pixels happen to store; both would invert a wrong picture."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("I", "F") or mode.startswith("I;16"):
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        wide = mode.startswith("I;16") or values.max(initial=0) > 255
        top = 65535 if wide else 1.0 if mode == "F" and values.max(initial=0) <= 1 else 255
        grey = np.clip(values * (255 / top) + 0.5, 0, 255).astype(np.uint8)
        what = "16-bit greyscale" if wide else "greyscale"
        return Image.fromarray(grey).convert("RGB"), f"{what} ({mode}) converted to 8-bit RGB"
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:  # some pixel is see-through
            white = Image.new("RGBA", image.size, "white")
            return Image.alpha_composite(white, rgba).convert("RGB"), f"transparency ({mode}) composited over white"
        if mode == "RGBA":
            return rgba.convert("RGB"), None  # an alpha channel that hides nothing
    described = {"P": "palette", "PA": "palette", "L": "greyscale", "LA": "greyscale", "1": "black-and-white"}.get(mode)
    note = f"{described} ({mode}) converted to RGB" if described else f"{mode} converted to RGB"
    try:
        if mode == "LAB":  # convert() would take the L, a, b channels for R, G, B; a colour transform is right
            from PIL import ImageCms

            transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                                "LAB", "RGB")
            return ImageCms.applyTransform(image, transform), note
        return image.convert("RGB"), note
    except (ValueError, ImportError, OSError):
        raise InputError(f"IMAGE: {path} has colour mode {mode}, which PIL cannot turn into RGB; "
                         "save it as an RGB PNG or JPEG") from None


@torch.no_grad()
def encode_image(pipe, image: Image.Image) -> torch.Tensor:
    """VAE posterior mean, scaled as the UNet expects."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    x = x.to(pipe.device, pipe.vae.dtype)  # fp32 for a VAE that asks for force_upcast
    config = pipe.vae.config
    z = pipe.vae.encode(x).latent_dist.mean
    return ((z - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor).to(pipe.dtype)


class _SourceSampler:
    """The source layout's regions, prompts and fused prediction, shared by inversion and null-text steps."""

    def __init__(self, pipe, edit: Edit):
        self.pipe, self.edit = pipe, edit
        # the same plans the edit will use for the source (r_total included), so ∅ keys match
        self.plans = pipe._plan_regions(edit, edit.source(), SOURCE, edit.steps)
        target_plans = pipe._plan_regions(edit, edit.target(), 1, edit.steps)
        encoder = pipe.prompt_encoder()
        # pad over both images' prompts, as the edit does, so the null embeddings have the edit's length
        from .pipeline import encode_plans

        encoded = encode_plans(encoder, {SOURCE: self.plans, 1: target_plans})
        self.encoded = {key: pair for (i, key), pair in encoded.items() if i == SOURCE}
        self.info = {"unet_calls": 0, "unet_batch_sizes": []}
        self.state = AttentionState()

    def jobs(self, step: int, nulls: dict[str, torch.Tensor] | None = None):
        from .pipeline import Job

        out = []
        for p in self.plans:
            if step < p.first_step:
                continue
            cond, uncond = self.encoded[p.key]
            if nulls is not None:
                uncond = dataclasses.replace(uncond, embeds=nulls[p.key])
            out.append(Job(p.key, SOURCE, p.box, p.layer, cond, uncond, p.mask))
        return out

    def eps(self, jobs, latent: torch.Tensor, t: int, scale: float) -> list[torch.Tensor]:
        return self.pipe._predict(jobs, {SOURCE: latent}, t, scale, self.state, {}, 0, self.edit.steps, "linear", self.info,
                               context=self.edit.region_context)

    def fuse(self, jobs, crops: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        return self.pipe._fuse(jobs, [(c, c) for c in crops], SOURCE, like)[0]


def ddim_invert(pipe, edit: Edit, z0: torch.Tensor) -> list[torch.Tensor]:
    """Deterministic DDIM inversion with the fused multi-region prediction at CFG 1 (§7.1).

    Follows diffusers' DDIMInverseScheduler: at each ascending timestep t, ε̂ = ε(x, t) and x moves from
    ᾱ_{t−Δ} (or the initial ᾱ) to ᾱ_t. Returns the pivots [z*_0 (clean), …, z*_N (noisiest)].
    """
    sampler = _SourceSampler(pipe, edit)
    scheduler = pipe.scheduler
    forward = set_timesteps(scheduler, edit.steps)
    delta = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    initial = torch.tensor(1.0) if scheduler.config.set_alpha_to_one else scheduler.alphas_cumprod[0]
    pivots = [z0]
    x = z0
    with controlled_attention(pipe.unet, sampler.state), torch.no_grad():
        for n, t in enumerate(reversed(forward)):
            step = len(forward) - 1 - n  # the forward step index that will undo this one
            prev_t = min(t - delta, scheduler.config.num_train_timesteps - 1)
            alpha = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else initial
            alpha_next = scheduler.alphas_cumprod[t]
            jobs = sampler.jobs(step)
            eps = sampler.eps(jobs, x, t, 1.0)
            crops = [ddim_invert_step(x[j.box.slices], e, alpha, alpha_next) for j, e in zip(jobs, eps)]
            x = sampler.fuse(jobs, crops, x)
            pivots.append(x)
    return pivots


def optimise_null_text(pipe, edit: Edit, pivots: list[torch.Tensor], inner_steps: int = 10,
                       callback=None) -> Inversion:
    """Per-region null-text optimisation (§7.2): Adam on each active region's ∅_k, lr 1e-2·(1 − k/100), up to
    `inner_steps` steps, early stop below 1e-5 + 2e-5·k, so the fused CFG step from ẑ_k lands on the pivot."""
    if pipe.dtype != torch.float32:
        raise InputError("--dtype: null-text inversion runs in float32 only; pass --dtype float32")
    from .ddim import alphas_at

    sampler = _SourceSampler(pipe, edit)
    scheduler = pipe.scheduler
    timesteps = set_timesteps(scheduler, edit.steps)
    nulls = {key: [] for key in sampler.encoded}
    current = {key: uncond.embeds.detach().clone() for key, (_, uncond) in sampler.encoded.items()}
    x = pivots[-1]
    losses = []
    with controlled_attention(pipe.unet, sampler.state):
        for k, t in enumerate(timesteps):
            alpha, alpha_prev = alphas_at(scheduler, t)
            target = pivots[len(pivots) - 2 - k]
            jobs_keys = [j.key for j in sampler.jobs(k)]
            params = {key: current[key].clone().requires_grad_(True) for key in jobs_keys}
            optimiser = torch.optim.Adam(params.values(), lr=1e-2 * (1 - k / 100))
            threshold = 1e-5 + 2e-5 * k
            loss_value = float("inf")
            for _ in range(inner_steps):
                with torch.enable_grad():
                    jobs = sampler.jobs(k, {**current, **params})
                    eps = sampler.eps(jobs, x, t, edit.guidance_scale)
                    crops = [ddim_step(x[j.box.slices], e, alpha, alpha_prev)[0] for j, e in zip(jobs, eps)]
                    loss = F.mse_loss(sampler.fuse(jobs, crops, x), target)
                    loss_value = loss.item()
                    if loss_value < threshold:
                        break
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
            for key in jobs_keys:
                current[key] = params[key].detach()
            for key in nulls:
                nulls[key].append(current[key][0].clone())
            with torch.no_grad():
                jobs = sampler.jobs(k, current)
                eps = sampler.eps(jobs, x, t, edit.guidance_scale)
                crops = [ddim_step(x[j.box.slices], e, alpha, alpha_prev)[0] for j, e in zip(jobs, eps)]
                x = sampler.fuse(jobs, crops, x)
                losses.append(F.mse_loss(x, target).item())
            if callback is not None:
                callback({"step": k, "loss": losses[-1]})
    return Inversion(pivots[-1].detach().cpu(), {k: torch.stack(v).cpu() for k, v in nulls.items()}, losses,
                     tuple(edit.size), edit.region_context)


def negative_prompt_nulls(pipe, edit: Edit) -> dict[str, torch.Tensor]:
    """Negative-prompt inversion (Miyake et al. 2023), per region: each region's null embedding is its own source
    prompt at every step, so the source's CFG step is its conditional step, which DDIM inversion undoes."""
    sampler = _SourceSampler(pipe, edit)
    return {key: cond.embeds[0].detach().expand(edit.steps, -1, -1).clone() for key, (cond, _) in sampler.encoded.items()}


def follow_pivot(latents: dict[int, torch.Tensor], pivot: torch.Tensor, source: int = 0,
                 keep: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Direct inversion's correction after a step: the source lands exactly on its pivot, and every other image
    moves by the same offset where `keep` (the inherent mask, 1 outside the edited boxes) says, so what the edit
    keeps of the source keeps the photo's own detail while edited boxes follow their own prompts."""
    offset = pivot.to(latents[source]) - latents[source]
    if keep is not None:
        offset = offset * keep.to(offset)
    return {i: (pivot.to(z) if i == source else z + offset.to(z)) for i, z in latents.items()}


def invert(pipe, image: Image.Image, edit: Edit, inner_steps: int = 10, callback=None,
           method: str = "direct") -> tuple[Inversion, list[torch.Tensor]]:
    """Encode and DDIM-invert a photo with the edit's source layout, then make its source reproducible by `method`
    (see `Inversion`); also returns the DDIM pivots. Null-text runs in float32 only."""
    if method not in METHODS:
        raise InputError(f"--inversion: unknown method {method!r}; use {', '.join(METHODS)}")
    if method == "null-text" and pipe.dtype != torch.float32:
        raise InputError("--dtype: null-text inversion runs in float32 only; pass --dtype float32")
    z0 = encode_image(pipe, image)
    pivots = ddim_invert(pipe, edit, z0)
    if method == "null-text":
        return optimise_null_text(pipe, edit, pivots, inner_steps, callback), pivots
    nulls = {k: v.cpu() for k, v in negative_prompt_nulls(pipe, edit).items()}
    kept = torch.cat([p.detach().cpu() for p in pivots]) if method == "direct" else None
    return Inversion(pivots[-1].detach().cpu(), nulls, [], tuple(edit.size), edit.region_context, method, kept), pivots

