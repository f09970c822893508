"""Loading model families: a diffusers folder, a hub id, or the embedded shapes-world default.

Weights load through safetensors. Pickle-based files (.ckpt, .bin, .pt) can run code when loaded, so they are
refused unless the caller passes allow_pickle=True (`--allow-pickle` on the command line).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import InputError

DEFAULT_MODEL = Path(__file__).parent / "assets" / "shapes-v3"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """A dtype name; "auto" is float16 on CUDA (the weights SD families ship in) and float32 elsewhere."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"--dtype: unknown dtype {name!r}; use auto, float32, float16 or bfloat16")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    """A device name; "auto" takes the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device: {name} asked for but no CUDA device is available; use --device cpu")
    return device


def _has_pickle_only(folder: Path) -> bool:
    weights = [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES + (".safetensors",)]
    return bool(weights) and not any(p.suffix == ".safetensors" for p in weights)


PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def load_pipeline(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  allow_pickle: bool = False, guidance_model: str | None = None, prediction_type: str | None = None,
                  guidance_vae: str | None = None):
    """Build an MRGDPipeline from a diffusers folder, a hub id or a single-file checkpoint (SD 1.x, SD 2.x, SDXL);
    guidance (CLIPSeg) and scorer (CLIP) when the family ships them or `guidance_model` names one.

    Single files load offline with the configs shipped in the package (`mrgd.checkpoint`). `prediction_type`
    overrides what the model's scheduler config (or, for a single file, the detection) says. `guidance_vae` names a
    tiny decoder (AutoencoderTiny folder) for guidance; by default the family's own `vae_tiny/`, when it has one.
    """
    from .pipeline import MRGDPipeline

    if prediction_type is not None and prediction_type not in ("epsilon", "v_prediction"):
        raise InputError(f"--prediction-type: unknown {prediction_type!r}; use epsilon or v_prediction")
    local = Path(path)
    notes: list[str] = []
    if local.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise InputError(f"--model: {path} is a pickle file, which can run code when loaded; "
                         "convert it to .safetensors or pass --allow-pickle if you trust it")
    if local.suffix == ".safetensors" or local.suffix in PICKLE_SUFFIXES:
        from .checkpoint import load_single_file

        sd, _, notes = load_single_file(local, dtype, allow_pickle, prediction_type)
    elif local.exists():
        if not (local / "model_index.json").exists():
            raise InputError(f"--model: {path} is not a diffusers folder (no model_index.json); "
                             "give a folder saved by save_pretrained, a hub id or a .safetensors file")
        if _has_pickle_only(local) and not allow_pickle:
            raise InputError(f"--model: {path} holds only pickle weights, which can run code when loaded; "
                             "convert them to safetensors or pass --allow-pickle if you trust them")
        sd = _from_pretrained(str(local), _pipeline_class(local / "model_index.json", path), dtype, allow_pickle)
    else:
        try:
            from diffusers import DiffusionPipeline

            class_name = DiffusionPipeline.load_config(path).get("_class_name")
            sd = _from_pretrained(path, class_name, dtype, allow_pickle)
        except InputError:
            raise
        except Exception as err:  # network, missing repo, gated model: all the same to the user
            raise InputError(f"--model: cannot load {path!r} ({type(err).__name__}); "
                             "give a local diffusers folder, a .safetensors file or a reachable hub id") from None
    scheduler = _ddim(sd.scheduler.config, prediction_type)
    guidance, guidance_tok, scorer, scorer_tok = _auxiliary(local, guidance_model, dtype)
    tiny = guidance_vae or (str(local / "vae_tiny") if (local / "vae_tiny").is_dir() else None)
    pipe = MRGDPipeline(sd.unet, sd.vae, sd.text_encoder, sd.tokenizer, scheduler, guidance, guidance_tok,
                        scorer, scorer_tok, device=device, dtype=dtype, name=str(path),
                        text_encoder_2=getattr(sd, "text_encoder_2", None), tokenizer_2=getattr(sd, "tokenizer_2", None),
                        force_zeros_for_empty_prompt=sd.config.get("force_zeros_for_empty_prompt", True),
                        guidance_vae=load_tiny_decoder(tiny, device, dtype) if tiny else None)
    pipe.load_notes = notes
    if guidance is not None:
        pipe.guidance_size = _processor_size(Path(guidance_model) if guidance_model else local / "clipseg")
    return pipe


def _pipeline_class(index: Path, path: str) -> str:
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise InputError(f"--model: {index} is not a readable model_index.json; check the folder") from None
    return class_name


def _from_pretrained(path: str, class_name: str | None, dtype: torch.dtype, allow_pickle: bool):
    """A diffusers SD or SDXL pipeline from a folder or hub id, safetensors unless pickles are allowed."""
    import diffusers

    if class_name not in PIPELINE_CLASSES:
        raise InputError(f"--model: {path} is a {class_name or 'pipeline of unknown class'}; mrgd runs "
                         "StableDiffusionPipeline (SD 1.x/2.x) and StableDiffusionXLPipeline (SDXL) models")
    cls = getattr(diffusers, class_name)
    extra = {"safety_checker": None} if class_name == "StableDiffusionPipeline" else {}
    return cls.from_pretrained(path, dtype=dtype, use_safetensors=None if allow_pickle else True, **extra)


def _ddim(config, prediction_type: str | None):
    """Our sampler's scheduler (DDIM, method.md §2) from any SD scheduler config (PNDM, Euler, DDIM ...).

    DDIM's own defaults clip x̂0 and set the final ᾱ to one, which is wrong for latents; SD configs say otherwise,
    and configs that do not say are taken as SD's (no clipping, final ᾱ = ᾱ_0)."""
    from diffusers import DDIMScheduler

    overrides = {"clip_sample": config.get("clip_sample", False), "set_alpha_to_one": config.get("set_alpha_to_one", False)}
    if prediction_type is not None:
        overrides["prediction_type"] = prediction_type
    return DDIMScheduler.from_config(config, **overrides)


def load_tiny_decoder(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers AutoencoderTiny (the TAESD family) from a folder or hub id, for guidance's cheap decoding."""
    from diffusers import AutoencoderTiny

    folder = Path(path)
    if folder.exists() and not (folder / "config.json").is_file():
        raise InputError(f"--guidance-vae: {path} holds no config.json; give an AutoencoderTiny folder "
                         "(saved by save_pretrained, e.g. madebyollin/taesd)")
    if folder.exists():
        try:
            class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            class_name = None
        if class_name != "AutoencoderTiny":
            raise InputError(f"--guidance-vae: {path} is a {class_name or 'folder of unknown kind'}, not an "
                             "AutoencoderTiny; give a TAESD-family folder, or 'full' for the model's own VAE")
    try:
        tiny = AutoencoderTiny.from_pretrained(path, dtype=dtype)
    except Exception as err:  # missing, unreachable, damaged: the user's to fix
        raise InputError(f"--guidance-vae: cannot load {path!r} ({type(err).__name__}); give a local "
                         "AutoencoderTiny folder or a reachable hub id") from None
    return tiny.to(device).eval().requires_grad_(False)


def _processor_size(folder: Path) -> int | None:
    """The input size an image processor feeds its model (CLIPSeg rd64: 352, above its config's 224)."""
    try:
        from transformers import AutoImageProcessor

        size = AutoImageProcessor.from_pretrained(str(folder)).size
    except Exception:  # no processor saved: fall back to the vision config's size
        return None
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        return size.get("height") or size.get("shortest_edge")
    # transformers 5 hands back a SizeDict object rather than a dict
    return getattr(size, "height", None) or getattr(size, "shortest_edge", None)


def _auxiliary(folder: Path, guidance_model: str | None, dtype: torch.dtype):
    """The guidance model (CLIPSeg) and scorer (CLIP) shipped beside a model family, when there are any."""
    from transformers import AutoTokenizer, CLIPModel, CLIPSegForImageSegmentation

    guidance = guidance_tok = scorer = scorer_tok = None
    seg_path = Path(guidance_model) if guidance_model else folder / "clipseg"
    if guidance_model or seg_path.exists():
        try:
            guidance = CLIPSegForImageSegmentation.from_pretrained(str(seg_path), dtype=torch.float32)
            guidance_tok = AutoTokenizer.from_pretrained(str(seg_path))
        except Exception as err:
            raise InputError(f"--guidance-model: cannot load {seg_path} ({type(err).__name__}); "
                             "give a CLIPSeg folder or hub id such as CIDAS/clipseg-rd64-refined") from None
    if (folder / "clip").exists():
        scorer = CLIPModel.from_pretrained(str(folder / "clip"), dtype=torch.float32)
        scorer_tok = AutoTokenizer.from_pretrained(str(folder / "clip"))
    return guidance, guidance_tok, scorer, scorer_tok
