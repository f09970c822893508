"""Train the embedded shapes-world model family, stage by stage, resumably.

Stages, in order: data (sample pools), tokenizer, clip, vae, unet, clipseg, assemble. Each stage writes its
result under OUT/<stage>/ and keeps a resumable state (model, optimizer, EMA, step) in OUT/<stage>/state.pt,
so `mrgd train-toy -o OUT` picks up where an interrupted run stopped. Step counts fix the result; a minutes
budget only decides when to pause. Seeds are fixed per stage.
"""

from __future__ import annotations

import copy
import shutil
import zlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as D
from . import grounding
from .models import (CLIP_SIZE, CLIPSEG_SIZE, IMAGE_SIZE, VISION, make_clip, make_clipseg, make_noise_scheduler,
                     make_tiny_vae, make_unet, make_vae)
from .fillers import pad_with_random
from .world import BACKGROUNDS, COLORS, SHAPES
from ..guidance import CLIP_MEAN, CLIP_STD


@dataclass
class TrainConfig:
    out: str
    seed: int = 0
    threads: int = 2
    scenes: int = 24000
    crops: int = 16000
    clip_steps: int = 2200
    clip_batch: int = 128
    clip_phrase_weight: float = 1.0  # crops against every canonical phrase too: the scorer's own task
    clip_phrase_from: int = 700  # the step it was switched on in the committed run (v1 trained without it)
    vae_steps: int = 2200
    vae_batch: int = 32
    taesd_steps: int = 4000
    taesd_batch: int = 32
    taesd_noise: float = 0.6  # latents the student sees are perturbed up to this std: guidance decodes x̂0 guesses
    # Guidance reads the decoder's gradients, not only its pictures: L_IP's pixel term moves z by Jᵀ(I^S − I^T). This
    # weighs a loss that asks the student's Jᵀv to match the VAE's for v the difference of two nearby decodings (0:
    # pictures only, as the first vae_tiny was trained; its L_IP gradients agreed with the VAE's at cosine 0.63 on
    # tuning-suite x̂0 guesses; the shipped one, 1.0 and 4000 steps: 0.67, and 0.4 dB less PSNR, benchmarks/results/
    # tiny-decoder.md).
    taesd_grad_weight: float = 1.0
    taesd_grad_batch: int = 8  # crops of each batch it is measured on (it costs three decoder passes and a double backward)
    unet_steps: int = 17100
    unet_batch: int = 32
    unet_crop_fraction: float = 0.4  # share of UNet steps on region-level crops (MultiDiffusion denoises crops)
    cfg_dropout: float = 0.1
    unet_grounding_weight: float = 0.01  # token-grounding loss on cross-attention (grounding.py), scenes only
    unet_grounding_from: int = 4600  # the step it was switched on in the committed run (v1 trained without it)
    # From this step on (v3): grounding weighs unet_grounding_weight_late and is relative to a uniform map (so
    # background words count as much as object words), words that name nothing are pushed towards uniform maps
    # (grounding.diffuse_loss), and some scene captions are written as r_total writes a layout.
    unet_keywords_from: int = 12600
    unet_grounding_weight_late: float = 0.05
    unet_diffuse_weight: float = 0.5
    unet_layout_captions: float = 0.3
    # From this step on (v4) this share of captions, scenes and crops alike, is padded with random vocabulary
    # (fillers.py), whose maps the diffuse loss spreads: unknown filler words then attend evenly too.
    unet_fillers_from: int = 15600
    unet_random_fillers: float = 0.5
    # Start the UNet stage from an assembled model folder (its unet/, text_encoder/, vae/, tokenizer/) as if this run
    # had finished the stage at unet_init_step; unet_steps beyond it extend it like any finished stage (a warm
    # restart at half the peak rate), with a fresh optimizer. shapes-v4 = shapes-v3 extended so.
    unet_init: str | None = None
    unet_init_step: int = 15600
    clipseg_steps: int = 2500
    clipseg_batch: int = 64
    clipseg_dice: float = 1.0  # soft Dice beside BCE: BCE alone left masks under-confident (IoU best at p > 0.2)
    clipseg_backbone_lr: float = 0.1  # the vision tower is tuned too, at this fraction of the decoder's rate
    stages: list[str] = field(default_factory=lambda: ["data", "tokenizer", "clip", "vae", "taesd", "unet", "clipseg",
                                                        "assemble"])
    minutes: float | None = None  # pause (resumably) after this much wall time in this invocation


class Budget:
    def __init__(self, minutes: float | None):
        self.deadline = None if minutes is None else time.time() + 60 * minutes

    def exhausted(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline


def _log(cfg: TrainConfig, stage: str, **values) -> None:
    with open(Path(cfg.out) / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"stage": stage, "time": round(time.time(), 1), **values}) + "\n")


EXTEND_PEAK = 0.5  # an extension restarts the cosine at half the stage's peak: enough to move, not to undo


def _lr(step: int, segments: list[tuple[int, int]], peak: float, warmup: int = 200) -> float:
    """Warmup + cosine within the schedule segment holding `step`.

    A stage trained to N steps and later extended to M has segments [(0, N), (N, M)]: the extension is a warm
    restart (shorter warmup, lower peak) rather than a jump into the middle of a longer cosine.
    """
    index = next(i for i, (start, end) in enumerate(segments) if start <= step < end)
    start, end = segments[index]
    if index:
        peak, warmup = peak * EXTEND_PEAK, 100
    step, total = step - start, end - start
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _finished(cfg: TrainConfig, stage: str, total: int) -> bool:
    """A stage is finished when its final weights exist and its state has reached `total` steps."""
    if not (Path(cfg.out) / stage / "final").exists():
        return False
    state = Checkpoint(Path(cfg.out) / stage / "state.pt").load()
    return state is None or state["step"] >= total  # no state: weights placed by hand, take them as they are


class Checkpoint:
    """Resumable state of one stage: models, optimizer, EMA, step, RNG."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=False)  # our own file, written below

    def save(self, **state) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)


def _loop(cfg: TrainConfig, stage: str, total: int, models: dict, optimizer, peak_lr: float, step_fn, budget: Budget,
          ema: torch.nn.Module | None = None, ema_source: torch.nn.Module | None = None, save_every: int = 250):
    """The shared training loop: resume, step with a cosine LR, EMA, checkpoint, log. Returns True when done."""
    ckpt = Checkpoint(Path(cfg.out) / stage / "state.pt")
    state = ckpt.load()
    step = 0
    rng = np.random.default_rng([cfg.seed, zlib.crc32(stage.encode())])
    torch.manual_seed(cfg.seed)
    segments = [(0, total)]
    if state:
        for name, m in models.items():
            m.load_state_dict(state["models"][name])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step, rng = state["step"], state["rng"]
        torch.set_rng_state(state["torch_rng"])
        segments = [tuple(s) for s in state.get("segments", [(0, step)])]
        if step < segments[-1][1]:  # paused inside a segment: it now ends at the requested count
            segments[-1] = (segments[-1][0], max(total, step))
        elif step < total:  # finished and extended: a new segment
            segments.append((segments[-1][1], total))
        _log(cfg, stage, event="resume", step=step, segments=segments)

    def save():
        ckpt.save(models={k: m.state_dict() for k, m in models.items()}, optimizer=optimizer.state_dict(),
                  ema=ema.state_dict() if ema is not None else None, step=step, rng=rng, torch_rng=torch.get_rng_state(),
                  segments=segments)

    bar = tqdm(total=total, initial=step, desc=stage, mininterval=5)
    running, extras = [], {}
    while step < total:
        if budget.exhausted():
            save()
            bar.close()
            return False
        for g in optimizer.param_groups:
            g["lr"] = _lr(step, segments, peak_lr) * g.get("lr_scale", 1.0)
        loss, extra = step_fn(rng, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        if ema is not None:
            decay = min(0.999, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), ema_source.parameters()):
                    pe.lerp_(p, 1 - decay)
        step += 1
        running.append(loss.item())
        for name, value in extra.items():
            extras.setdefault(name, []).append(value)
        bar.update(1)
        if step % 50 == 0:
            summary = {k: (round(float(np.mean(v)), 4) if isinstance(v[0], float) else v[-1]) for k, v in extras.items()}
            _log(cfg, stage, step=step, loss=float(np.mean(running)), **summary)
            bar.set_postfix(loss=f"{np.mean(running):.4f}")
            running, extras = [], {}
        if step % save_every == 0:
            save()
    save()
    bar.close()
    return True


# ---------------------------------------------------------------- stages

def stage_data(cfg: TrainConfig, budget: Budget) -> bool:
    out = Path(cfg.out) / "data"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "scenes.npz").exists():
        D.save_pool(D.make_scene_pool(cfg.scenes, cfg.seed), out / "scenes.npz")
    if not (out / "crops.npz").exists():
        D.save_pool(D.make_crop_pool(cfg.crops, cfg.seed + 1), out / "crops.npz")
    if not (out / "heldout.npz").exists():  # never trained on: for the acceptance measurements
        D.save_pool(D.make_scene_pool(512, cfg.seed + 99), out / "heldout.npz")
    return True


def stage_tokenizer(cfg: TrainConfig, budget: Budget) -> bool:
    from .tokenizer import build_tokenizer

    build_tokenizer(Path(cfg.out) / "tokenizer")
    return True


def _tokenizer(cfg, folder: Path | None = None):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder or Path(cfg.out) / "tokenizer"))


def _pools(cfg):
    d = Path(cfg.out) / "data"
    return D.load_pool(D.ScenePool, d / "scenes.npz"), D.load_pool(D.CropPool, d / "crops.npz")


def _tokens(tok, texts: list[str], padding: str = "max_length") -> torch.Tensor:
    """Token ids; `padding="longest"` where only the pooled EOS output counts (CLIP, CLIPSeg queries): the text
    tower is causal, so padding after the EOS cannot change it, and short batches run several times faster."""
    return tok(texts, padding=padding, max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids


def canonical_phrases() -> tuple[list[str], dict[tuple[int, int], int]]:
    """Every object phrase and background name, and the index of each (colour, shape) label; (-1, -1 - b) for b."""
    phrases, index = [], {}
    for c, color in enumerate(COLORS):
        for s, shape in enumerate(SHAPES):
            index[(c, s)] = len(phrases)
            phrases.append(f"a {color} {shape}")
    for b, name in enumerate(BACKGROUNDS):
        index[(-1, -1 - b)] = len(phrases)
        phrases.append(name)
    return phrases, index


def stage_clip(cfg: TrainConfig, budget: Budget) -> bool:
    """Contrastive CLIP on whole scenes with captions and object crops with their phrases."""
    final = Path(cfg.out) / "clip" / "final"
    if _finished(cfg, "clip", cfg.clip_steps):
        return True
    tok = _tokenizer(cfg)
    scenes, crops = _pools(cfg)
    torch.manual_seed(cfg.seed)
    model = make_clip(len(tok), tok.bos_token_id, tok.eos_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    phrases, phrase_index = canonical_phrases()
    phrase_ids = _tokens(tok, phrases, "longest")

    def step_fn(rng, step):
        half = cfg.clip_batch // 2
        si = rng.integers(0, len(scenes.images), half)
        ci = rng.integers(0, len(crops.images), cfg.clip_batch - half)
        images = torch.cat([D.to_tensor(scenes.images[si], CLIP_SIZE), D.to_tensor(crops.images[ci], CLIP_SIZE)])
        texts = [scenes.caption(i, rng) for i in si] + [crops.caption(i, rng) for i in ci]
        out = model(input_ids=_tokens(tok, texts, "longest"), pixel_values=images, return_loss=True)
        if not cfg.clip_phrase_weight or step < cfg.clip_phrase_from:
            return out.loss, {}
        # In-batch negatives rarely pit a red circle against a red star; the whole phrase set always does.
        labels = torch.tensor([phrase_index[(c, s) if c >= 0 else (-1, -1 - crops.backgrounds[i])]
                               for i, (c, s) in zip(ci, crops.labels[ci])])
        text = F.normalize(model.get_text_features(input_ids=phrase_ids).pooler_output, dim=-1)
        crop_embeds = out.image_embeds[half:]
        logits = model.logit_scale.exp() * crop_embeds @ text.T
        phrase_loss = F.cross_entropy(logits, labels)
        return out.loss + cfg.clip_phrase_weight * phrase_loss, {"phrase_loss": round(phrase_loss.item(), 4)}

    (Path(cfg.out) / "clip").mkdir(parents=True, exist_ok=True)
    if not _loop(cfg, "clip", cfg.clip_steps, {"clip": model}, opt, 5e-4, step_fn, budget):
        return False
    model.save_pretrained(final)
    tok.save_pretrained(final)
    return True


def _scene_crops(rng, scenes: D.ScenePool, batch: int, side: int = 64) -> np.ndarray:
    """Random side x side crops of random scenes, on the latent grid (the autoencoders are fully convolutional)."""
    idx = rng.integers(0, len(scenes.images), batch)
    ys, xs = rng.integers(0, IMAGE_SIZE - side + 1, (2, batch)) // 8 * 8
    return np.stack([scenes.images[i, y:y + side, x:x + side] for i, y, x in zip(idx, ys, xs)])


def stage_vae(cfg: TrainConfig, budget: Budget) -> bool:
    """AutoencoderKL on 64 x 64 crops of scenes (it is fully convolutional); L1 + MSE + a small KL."""
    final = Path(cfg.out) / "vae" / "final"
    if _finished(cfg, "vae", cfg.vae_steps):
        return True
    scenes, crops = _pools(cfg)
    torch.manual_seed(cfg.seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)

    def step_fn(rng, step):
        x = D.to_tensor(_scene_crops(rng, scenes, cfg.vae_batch))
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        l1, mse = (rec - x).abs().mean(), (rec - x).pow(2).mean()
        kl = posterior.kl().mean() / (64 * 64 * 3)
        psnr = 10 * math.log10(4 / max(mse.item(), 1e-10))
        return l1 + mse + 1e-4 * kl, {"psnr": round(psnr, 2)}

    (Path(cfg.out) / "vae").mkdir(parents=True, exist_ok=True)
    if not _loop(cfg, "vae", cfg.vae_steps, {"vae": vae}, opt, 1e-3, step_fn, budget):
        return False
    # SD scales latents to unit variance; we measure the factor from our own data.
    with torch.no_grad():
        lat = vae.encode(D.to_tensor(scenes.images[:512])).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    vae.save_pretrained(final)
    return True


def stage_taesd(cfg: TrainConfig, budget: Budget) -> bool:
    """A tiny decoder (diffusers' AutoencoderTiny, TAESD's architecture) distilled from the VAE: guidance looks at
    every step's x̂0 through a decoder, and the VAE's backward pass cost as much as all the UNet work.

    The student learns to reproduce the VAE's decoding of scaled latents (what the UNet sees), also of latents
    perturbed by noise, because guidance decodes x̂0 guesses that are not clean posterior means; its encoder
    learns the VAE's posterior mean. L1 + MSE on 64 x 64 crops, like the VAE stage.
    """
    from diffusers import AutoencoderKL

    final = Path(cfg.out) / "taesd" / "final"
    if _finished(cfg, "taesd", cfg.taesd_steps):
        return True
    vae = AutoencoderKL.from_pretrained(Path(cfg.out) / "vae" / "final").eval().requires_grad_(False)
    scale = vae.config.scaling_factor
    scenes, _ = _pools(cfg)
    torch.manual_seed(cfg.seed)
    tiny = make_tiny_vae()
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-3, weight_decay=0.0)

    def step_fn(rng, step):
        x = D.to_tensor(_scene_crops(rng, scenes, cfg.taesd_batch))
        noise = torch.from_numpy(rng.standard_normal((cfg.taesd_batch, 4, 8, 8))).float()
        level = torch.from_numpy(rng.uniform(0, cfg.taesd_noise, (cfg.taesd_batch, 1, 1, 1))).float()
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean * scale
            z_in = z + level * noise
            teacher = vae.decode(z_in / scale).sample.clamp(-1, 1)
        rec = tiny.decode(z_in).sample
        enc = tiny.encode(x).latents
        dec_loss = (rec - teacher).abs().mean() + (rec - teacher).pow(2).mean()
        enc_loss = (enc - z).abs().mean()
        psnr = 10 * math.log10(4 / max((rec - teacher).pow(2).mean().item(), 1e-10))
        logs = {"psnr_vs_vae": round(psnr, 2), "enc_l1": round(enc_loss.item(), 4)}
        loss = dec_loss + 0.1 * enc_loss
        if cfg.taesd_grad_weight:
            n = min(cfg.taesd_grad_batch, cfg.taesd_batch)
            nudge = torch.from_numpy(rng.standard_normal((n, 4, 8, 8))).float()
            nudge *= torch.from_numpy(rng.uniform(0.05, 0.5, (n, 1, 1, 1))).float()
            grad_loss, cosine = gradient_agreement(tiny, lambda z_: vae.decode(z_ / scale).sample, z_in[:n], nudge)
            loss = loss + cfg.taesd_grad_weight * grad_loss
            logs["grad_cos"] = round(cosine, 3)
        return loss, logs

    (Path(cfg.out) / "taesd").mkdir(parents=True, exist_ok=True)
    if not _loop(cfg, "taesd", cfg.taesd_steps, {"taesd": tiny}, opt, 1e-3, step_fn, budget):
        return False
    save_tiny_vae(tiny, final)
    return True


def gradient_agreement(tiny, teacher_decode, z: torch.Tensor, nudge: torch.Tensor) -> tuple[torch.Tensor, float]:
    """How far the student's vector-Jacobian products are from the teacher's, for v = teacher(z + nudge) −
    teacher(z), the kind of pixel difference L_IP back-propagates: ‖J_sᵀv − J_tᵀv‖² / ‖J_tᵀv‖² per sample, averaged
    (differentiable in the student), and the mean cosine between the two for the log."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        out = teacher_decode(z)
        with torch.no_grad():
            v = teacher_decode(z + nudge) - out
        want = torch.autograd.grad(out, z, v)[0].detach()
        z_s = z.detach().requires_grad_(True)
        got = torch.autograd.grad(tiny.decode(z_s).sample, z_s, v, create_graph=True)[0]
    want, got = want.flatten(1), got.flatten(1)
    loss = ((got - want).pow(2).sum(1) / want.pow(2).sum(1).clamp_min(1e-12)).mean()
    return loss, torch.nn.functional.cosine_similarity(got.detach(), want, dim=1).mean().item()


def save_tiny_vae(tiny, folder: Path) -> None:
    """save_pretrained, without the `block_out_channels` AutoencoderTiny registers but warns about when loading."""
    tiny.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("block_out_channels", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _encode_pool(vae, images: np.ndarray, size: int | None = None, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            dist = vae.encode(D.to_tensor(images[i:i + batch], size)).latent_dist
            means.append(dist.mean.half())
            stds.append(dist.std.half())
    return torch.cat(means), torch.cat(stds)


def stage_unet(cfg: TrainConfig, budget: Budget) -> bool:
    """UNet + a fine-tuned copy of the CLIP text tower, on whole scenes and on region-level crops."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    final = Path(cfg.out) / "unet" / "final"
    if _finished(cfg, "unet", cfg.unet_steps):
        return True
    out = Path(cfg.out) / "unet"
    out.mkdir(parents=True, exist_ok=True)
    init = Path(cfg.unet_init) if cfg.unet_init else None
    tok = _tokenizer(cfg) if init is None else _tokenizer(cfg, init / "tokenizer")
    vae = AutoencoderKL.from_pretrained(Path(cfg.out) / "vae" / "final" if init is None else init / "vae")
    cache = out / "latents.pt"
    scenes, crops = _pools(cfg)
    if not cache.exists():
        lat = {"scenes": _encode_pool(vae, scenes.images), "crops96": _encode_pool(vae, crops.images),
               "crops64": _encode_pool(vae, crops.images, 64)}
        torch.save(lat, cache)
    lat = torch.load(cache, weights_only=True)
    scale = vae.config.scaling_factor
    torch.manual_seed(cfg.seed)
    unet = make_unet()
    text = CLIPTextModel.from_pretrained(Path(cfg.out) / "clip" / "final" if init is None else init / "text_encoder").float()
    if init is not None and not (out / "state.pt").exists():
        from diffusers import UNet2DConditionModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(init / "unet").float().state_dict())
    ema = copy.deepcopy(unet).requires_grad_(False)
    maps = grounding.install(unet)
    noise_sched = make_noise_scheduler()
    acp = noise_sched.alphas_cumprod
    opt = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr_scale": 1.0},
        {"params": list(text.parameters()), "lr_scale": 0.3},
    ], lr=5e-4, weight_decay=0.01)
    if init is not None and not (out / "state.pt").exists():  # the stage as if finished at unet_init_step
        Checkpoint(out / "state.pt").save(
            models={"unet": unet.state_dict(), "text": text.state_dict()}, optimizer=opt.state_dict(),
            ema=ema.state_dict(), step=cfg.unet_init_step, torch_rng=torch.get_rng_state(),
            rng=np.random.default_rng([cfg.seed, zlib.crc32(b"unet"), cfg.unet_init_step]),
            segments=[(0, cfg.unet_init_step)])
        _log(cfg, "unet", event="init", source=str(init), step=cfg.unet_init_step)

    def step_fn(rng, step):
        late = step >= cfg.unet_keywords_from
        if rng.random() < cfg.unet_crop_fraction:
            key = "crops96" if rng.random() < 0.5 else "crops64"
            idx = rng.integers(0, len(crops.images), cfg.unet_batch)
            texts = [crops.caption(i, rng) for i in idx]
        else:
            key = "scenes"
            idx = rng.integers(0, len(scenes.images), cfg.unet_batch)
            texts = [scenes.caption(i, rng, cfg.unet_layout_captions if late else 0.0) for i in idx]
        if cfg.unet_random_fillers and step >= cfg.unet_fillers_from:
            texts = [pad_with_random(t, rng, tok, cfg.unet_random_fillers) for t in texts]
        texts = ["" if rng.random() < cfg.cfg_dropout else t for t in texts]
        mean, std = lat[key][0][idx].float(), lat[key][1][idx].float()
        x0 = (mean + std * torch.randn_like(std)) * scale
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (len(idx),))
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = text(_tokens(tok, texts)).last_hidden_state
        maps.clear()
        pred = unet(xt, t, cond).sample
        loss, extras = F.mse_loss(pred, noise), {"kind": key}
        if late and cfg.unet_diffuse_weight:  # crops too: no masks needed to spread a map
            diffuse = grounding.diffuse_loss(maps, [grounding.diffuse_positions(tok, x) for x in texts])
            loss, extras["diffuse"] = loss + cfg.unet_diffuse_weight * diffuse, round(diffuse.item(), 4)
        if key != "scenes" or not cfg.unet_grounding_weight or step < cfg.unet_grounding_from:
            return loss, extras
        ground = grounding.grounding_loss(maps, scenes.labels[idx], [grounding.word_targets(tok, x) for x in texts],
                                          relative=late)
        weight = cfg.unet_grounding_weight_late if late else cfg.unet_grounding_weight
        return loss + weight * ground, extras | {"grounding": round(ground.item(), 4)}

    if not _loop(cfg, "unet", cfg.unet_steps, {"unet": unet, "text": text}, opt, 5e-4, step_fn, budget,
                 ema=ema, ema_source=unet, save_every=200):
        return False
    ema.save_pretrained(final)
    text.save_pretrained(out / "text_final")
    return True


def _clipseg_query(rng, scenes: D.ScenePool, i: int) -> tuple[str, np.ndarray]:
    """A query and its target mask: an object phrase, a colour, a shape, keywords or the background."""
    labels = scenes.labels[i]
    objs = [(j, c, s) for j, (c, s) in enumerate(scenes.objects[i]) if c >= 0]
    r = rng.random()
    colors, shapes = list(COLORS), SHAPES
    if r < 0.1:
        name = BACKGROUNDS[scenes.backgrounds[i]]
        return name, labels == 0
    if r < 0.25:  # an absent object: empty mask
        present = {(c, s) for _, c, s in objs}
        while True:
            c, s = rng.integers(0, len(colors)), rng.integers(0, len(shapes))
            if (c, s) not in present:
                return f"a {colors[c]} {shapes[s]}", np.zeros_like(labels, bool)
    j, c, s = objs[rng.integers(0, len(objs))]
    match = [k for k, cc, ss in objs if cc == c and ss == s]
    form = rng.integers(0, 3)
    text = [f"a {colors[c]} {shapes[s]}", f"{colors[c]}, {shapes[s]}", f"{colors[c]} {shapes[s]}"][form]
    return D.pad_with_quality(text, rng, p=0.2), np.isin(labels, [k + 1 for k in match])


def stage_clipseg(cfg: TrainConfig, budget: Budget) -> bool:
    """CLIPSeg on our CLIP (its own copy, as CIDAS/clipseg-rd64 has), trained on ground-truth masks queried by
    phrases and keywords, with BCE + soft Dice. The vision tower is tuned with the decoder at a lower rate (its
    position embeddings resized if CLIPSEG_SIZE differs from the CLIP's); the text tower stays as the CLIP trained it."""
    from transformers import CLIPModel

    from ..guidance import clipseg_logits

    final = Path(cfg.out) / "clipseg" / "final"
    if _finished(cfg, "clipseg", cfg.clipseg_steps):
        return True
    (Path(cfg.out) / "clipseg").mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(cfg)
    scenes, _ = _pools(cfg)
    torch.manual_seed(cfg.seed)
    model = make_clipseg(len(tok), tok.bos_token_id, tok.eos_token_id)
    clip = CLIPModel.from_pretrained(Path(cfg.out) / "clip" / "final").state_dict()
    key = "vision_model.embeddings.position_embedding.weight"
    clip[key] = resize_position_embedding(clip[key], CLIPSEG_SIZE // VISION["patch_size"])
    model.clip.load_state_dict(clip)
    # The clip stage fed [-1, 1] pixels; fold that in so the segmenter takes CLIP-normalised pixels like any CLIPSeg.
    fold_pixel_range(model.clip.vision_model.embeddings)
    # Start the logits at the mask prior (about 12% of pixels) instead of at random: with the default init the loss
    # sat at the prior for hundreds of steps.
    head = model.decoder.transposed_convolution
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.constant_(head.bias, -2.0)
    model.clip.text_model.requires_grad_(False)
    model.clip.text_projection.requires_grad_(False)
    decoder = [p for n, p in model.named_parameters() if not n.startswith("clip.")]
    backbone = list(model.clip.vision_model.parameters())
    opt = torch.optim.AdamW([{"params": decoder, "lr_scale": 1.0},
                             {"params": backbone, "lr_scale": cfg.clipseg_backbone_lr}], lr=1e-3)

    def step_fn(rng, step):
        idx = rng.integers(0, len(scenes.images), cfg.clipseg_batch)
        queries = [_clipseg_query(rng, scenes, i) for i in idx]
        masks = torch.from_numpy(np.stack([m for _, m in queries])).float()[:, None]
        masks = F.interpolate(masks, size=(CLIPSEG_SIZE, CLIPSEG_SIZE), mode="area")[:, 0]
        pixels = normalize_for_clip(D.to_tensor(scenes.images[idx], CLIPSEG_SIZE))
        logits = clipseg_logits(model, pixels, _tokens(tok, [q for q, _ in queries], "longest"))
        bce = F.binary_cross_entropy_with_logits(logits, masks)
        probs = logits.sigmoid().flatten(1)
        overlap = (probs * masks.flatten(1)).sum(1)
        # an empty query (absent object, target all zeros) scores 1 when the prediction is empty too
        dice = 1 - (2 * overlap + 1) / (probs.sum(1) + masks.flatten(1).sum(1) + 1)
        return bce + cfg.clipseg_dice * dice.mean(), {"bce": round(bce.item(), 4)}

    if not _loop(cfg, "clipseg", cfg.clipseg_steps, {"clipseg": model}, opt, 1e-3, step_fn, budget):
        return False
    model.save_pretrained(final)
    return True


def resize_position_embedding(weight: torch.Tensor, grid: int) -> torch.Tensor:
    """A ViT's [1 + g*g, d] position embeddings (class token first) resized to a grid x grid patch grid, bicubic."""
    cls, patches = weight[:1], weight[1:]
    old = int(round(patches.shape[0] ** 0.5))
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(weight.dtype)])


def normalize_for_clip(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> CLIP-normalised pixels (the mean/std every CLIP image processor uses)."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


@torch.no_grad()
def fold_pixel_range(vision_embeddings) -> None:
    """Make a CLIP vision tower trained on [-1, 1] pixels take standard CLIP-normalised pixels, exactly.

    x_in = 2u − 1 and x_clip = (u − m)/s, so x_in = 2s·x_clip + (2m − 1): scale the patch convolution by 2s per
    input channel, and add its response to the constant (2m − 1) to every patch position's embedding.
    """
    conv = vision_embeddings.patch_embedding
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    constant = (conv.weight.float() * (2 * mean - 1)).sum(dim=(1, 2, 3))  # [hidden]
    conv.weight.mul_((2 * std).to(conv.weight.dtype))
    vision_embeddings.position_embedding.weight[1:] += constant.to(vision_embeddings.position_embedding.weight.dtype)


def image_processor(size: int):
    """The CLIP image processor of a model reading size x size pixels."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def stage_assemble(cfg: TrainConfig, budget: Budget) -> bool:
    """A StableDiffusionPipeline folder plus clip/, clipseg/ and vae_tiny/, all safetensors."""
    from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel, CLIPSegForImageSegmentation, CLIPTextModel

    root = Path(cfg.out)
    model_dir = root / "model"
    if cfg.unet_init:
        return _assemble_over(cfg, Path(cfg.unet_init), model_dir)
    tok = _tokenizer(cfg)
    processor = image_processor(CLIP_SIZE)
    scheduler = DDIMScheduler.from_config(make_noise_scheduler().config, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(root / "vae" / "final"),
        text_encoder=CLIPTextModel.from_pretrained(root / "unet" / "text_final"),
        tokenizer=tok, unet=UNet2DConditionModel.from_pretrained(root / "unet" / "final"), scheduler=scheduler,
        safety_checker=None, feature_extractor=processor, requires_safety_checker=False,
    )
    # fp16 on disk keeps the family under 40 MB; the VAE stays fp32, its colours are sensitive to rounding.
    for part in (pipe.unet, pipe.text_encoder):
        part.half()
    pipe.save_pretrained(model_dir)
    clip = CLIPModel.from_pretrained(root / "clip" / "final")
    fold_pixel_range(clip.vision_model.embeddings)  # the clip stage fed [-1, 1] pixels; ship a standard CLIP
    clip.half().save_pretrained(model_dir / "clip")
    tok.save_pretrained(model_dir / "clip")
    processor.save_pretrained(model_dir / "clip")
    save_tiny_vae(AutoencoderTiny.from_pretrained(root / "taesd" / "final"), model_dir / "vae_tiny")
    clipseg = CLIPSegForImageSegmentation.from_pretrained(root / "clipseg" / "final")
    clipseg.half().save_pretrained(model_dir / "clipseg")
    tok.save_pretrained(model_dir / "clipseg")
    image_processor(clipseg.config.vision_config.image_size).save_pretrained(model_dir / "clipseg")
    for folder in ("tokenizer", "clip", "clipseg"):  # keep the readable BPE files beside tokenizer.json
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(root / "tokenizer" / name, model_dir / folder / name)
    (model_dir / "shapes_world.json").write_text(json.dumps({"native_size": IMAGE_SIZE, "train_config": asdict(cfg)}, indent=2))
    return True


def _assemble_over(cfg: TrainConfig, base: Path, model_dir: Path) -> bool:
    """A run that started its UNet stage from an assembled folder (unet_init): that folder, every part kept, with
    this run's UNet and text tower in it (fp16, as assembled)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root = Path(cfg.out)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(base, model_dir)
    for name in ("unet", "text_encoder"):
        shutil.rmtree(model_dir / name)
    UNet2DConditionModel.from_pretrained(root / "unet" / "final").half().save_pretrained(model_dir / "unet")
    CLIPTextModel.from_pretrained(root / "unet" / "text_final").half().save_pretrained(model_dir / "text_encoder")
    info = json.loads((base / "shapes_world.json").read_text())
    history = info.get("history", []) + [{"base_train_config": info.get("train_config")}]
    (model_dir / "shapes_world.json").write_text(json.dumps(
        {**info, "train_config": asdict(cfg), "history": history}, indent=2))
    return True


STAGES = {
    "data": stage_data, "tokenizer": stage_tokenizer, "clip": stage_clip, "vae": stage_vae, "taesd": stage_taesd,
    "unet": stage_unet, "clipseg": stage_clipseg, "assemble": stage_assemble,
}


def train(cfg: TrainConfig) -> bool:
    """Run (or resume) the requested stages in order; returns True when all of them are complete."""
    torch.set_num_threads(cfg.threads)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    budget = Budget(cfg.minutes)
    for name in cfg.stages:
        t0 = time.time()
        done = STAGES[name](cfg, budget)
        _log(cfg, name, event="done" if done else "paused", seconds=round(time.time() - t0, 1))
        if not done:
            return False
    return True


if __name__ == "__main__":
    import sys

    cfg = TrainConfig(out=sys.argv[1])
    if len(sys.argv) > 2:
        cfg.stages = sys.argv[2].split(",")
    if len(sys.argv) > 3:
        cfg.threads = int(sys.argv[3])
    for item in sys.argv[4:]:  # FIELD=VALUE overrides, e.g. unet_init=src/mrgd/assets/shapes-v3 unet_steps=17100
        name, _, value = item.partition("=")
        kind = type(getattr(cfg, name)) if getattr(cfg, name) is not None else str
        setattr(cfg, name, value if kind is str else kind(value))
    train(cfg)
