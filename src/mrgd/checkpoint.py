"""Single-file checkpoints (the original Stable Diffusion key layout), read offline and written back.

People download one `.safetensors` from a model site: SD 1.x fine-tunes, SD 2.x, SDXL and its fine-tunes.
diffusers' `from_single_file` converts such a file, but without a config it asks a model hub for one. Here:

1. `inspect_checkpoint` reads the tensor names and shapes (no weights) and `detect_family` tells SD 1.x, 2.x and
   SDXL base apart by their text encoders' key layout (HF CLIP, OpenCLIP, or both), whatever the sizes.
2. `derive_configs` starts from the family's architecture configs shipped in `assets/families/*.json` and
   replaces every number the state dict fixes (channels, depths, cross-attention width, vocabulary, ...), so a
   fine-tune, a pruned model or a tiny test model of the same family loads with its real shape.
3. `load_single_file` writes those configs, the scheduler config and CLIP's tokenizer files (no weights) to a
   temporary diffusers folder and hands it to the pipeline class's `from_single_file(config=..., local_files_only=True)`:
   diffusers does the key conversion, nothing is fetched from anywhere.

What the weights cannot say: the number of attention heads (each family's rule: SD 1.x 8 heads; SD 2.x/SDXL and
all CLIP text towers 64 channels per head) and, for SD 2.x, whether the model predicts ε or v. For the latter a
`v_pred` key in the file decides, else the WebUI's test (one UNet call on a constant input at t = 999: a
v-model's output lies far below its input, an ε-model's near it); `--prediction-type` overrides both.

`write_single_file` is the inverse (diffusers components -> original keys), used to test the loader and to hand
a model back to tools that want one file.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

FAMILIES_DIR = Path(__file__).parent / "assets" / "families"
TOKENIZER_DIR = FAMILIES_DIR / "clip-tokenizer"
UNET = "model.diffusion_model."
VAE = "first_stage_model."
PREDICTION_TYPES = ("epsilon", "v_prediction")
SD1_TEXT, SD2_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model."
XL_TEXT, XL_TEXT_2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


@dataclass
class CheckpointInfo:
    """What a single file holds: its family, tensor shapes and what decided the prediction type."""

    path: Path
    family: str  # "sd1" | "sd2" | "sdxl"
    shapes: dict[str, tuple[int, ...]]
    markers: set[str] = field(default_factory=set)  # non-weight keys such as "v_pred", "ztsnr"


def family_template(family: str) -> dict[str, Any]:
    """The shipped architecture configs of a family (`assets/families/<family>.json`)."""
    return json.loads((FAMILIES_DIR / f"{family}.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _read_shapes(path: Path, allow_pickle: bool) -> dict[str, tuple[int, ...]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:  # truncated download, not a safetensors file
            raise InputError(f"--model: cannot read {path} as safetensors ({type(err).__name__}); "
                             "download it again or check the file") from None
    if not allow_pickle:
        raise InputError(f"--model: {path} is a pickle file, which can run code when loaded; "
                         "convert it to .safetensors or pass --allow-pickle if you trust it")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(f"--model: cannot read {path} ({type(err).__name__}); give a .safetensors or .ckpt "
                         "checkpoint") from None
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def inspect_checkpoint(path: str | Path, allow_pickle: bool = False) -> CheckpointInfo:
    """Tensor names and shapes of a single-file checkpoint and the family they belong to."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--model: {path} not found; check the path")
    shapes = _read_shapes(path, allow_pickle)
    markers = {k for k in ("v_pred", "ztsnr") if k in shapes}
    return CheckpointInfo(path, detect_family(shapes, path), shapes, markers)


def detect_family(shapes: dict[str, tuple[int, ...]], path: Path | str = "checkpoint") -> str:
    """SD 1.x (HF CLIP text tower), SD 2.x (OpenCLIP), SDXL base (both), from the key layout alone."""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    if not has(UNET):
        prefixes = sorted({k.split(".")[0] for k in shapes})[:6]
        raise InputError(f"--model: {path} holds no Stable Diffusion UNet (no {UNET}* tensors; found "
                         f"{', '.join(p + '.*' for p in prefixes) or 'no tensors'}); give an SD 1.x, SD 2.x or SDXL "
                         "checkpoint, or a diffusers folder")
    in_channels = shapes.get(UNET + "input_blocks.0.0.weight", (0, 4))[1]
    if in_channels != 4:
        raise InputError(f"--model: {path} is a UNet with {in_channels} input channels (an inpainting or other "
                         "special model); use a text-to-image SD 1.x, SD 2.x or SDXL checkpoint")
    if has(XL_TEXT) and has(XL_TEXT_2):
        family = "sdxl"
    elif has("conditioner.embedders.0.model."):
        raise InputError(f"--model: {path} is an SDXL refiner (one OpenCLIP text tower); use an SDXL base checkpoint")
    elif has(SD2_TEXT):
        family = "sd2"
    elif has(SD1_TEXT):
        family = "sd1"
    else:
        raise InputError(f"--model: {path} has a UNet but no text encoder of a known layout ({SD1_TEXT}*, "
                         f"{SD2_TEXT}* or conditioner.embedders.*); use a full SD 1.x, SD 2.x or SDXL checkpoint")
    if not has(VAE):
        raise InputError(f"--model: {path} has no VAE ({VAE}* tensors); use a checkpoint with its VAE baked in")
    return family


# ---------------------------------------------------------------------------------------------------------------
# Configs from shapes


def _count(shapes, pattern: str) -> int:
    """How many distinct values of the number in `pattern` ({n}) appear in the keys."""
    regex = re.compile(re.escape(pattern).replace(r"\{n\}", r"(\d+)"))
    return len({m.group(1) for k in shapes if (m := regex.match(k))})


def _heads(rule: str, channels: list[int]) -> int | list[int]:
    kind, _, value = rule.partition(":")
    if kind == "fixed":
        return int(value)
    return [max(1, c // int(value)) for c in channels]


def _unet_config(template: dict, shapes, heads_rule: str, pooled_dim: int | None) -> dict:
    p = UNET
    levels: list[dict] = [{"channels": None, "resnets": 0, "depth": 0}]
    cross_dim = linear = None
    i = 1
    while f"{p}input_blocks.{i}.0.op.weight" in shapes or f"{p}input_blocks.{i}.0.in_layers.2.weight" in shapes:
        if f"{p}input_blocks.{i}.0.op.weight" in shapes:  # a downsampler closes the level
            levels.append({"channels": None, "resnets": 0, "depth": 0})
        else:
            level = levels[-1]
            level["channels"] = shapes[f"{p}input_blocks.{i}.0.in_layers.2.weight"][0]
            level["resnets"] += 1
            depth = _count(shapes, f"{p}input_blocks.{i}.1.transformer_blocks.{{n}}.attn1.to_q.weight")
            level["depth"] = max(level["depth"], depth)
            if depth and cross_dim is None:
                cross_dim = shapes[f"{p}input_blocks.{i}.1.transformer_blocks.0.attn2.to_k.weight"][1]
                linear = len(shapes[f"{p}input_blocks.{i}.1.proj_in.weight"]) == 2
        i += 1
    channels = [level["channels"] for level in levels]
    resnets = {level["resnets"] for level in levels}
    if None in channels or len(resnets) != 1 or cross_dim is None:
        raise InputError("--model: the checkpoint's UNet has an irregular block layout; it is not an SD 1.x, SD 2.x "
                         "or SDXL UNet")
    depths = [level["depth"] for level in levels]
    mid_depth = _count(shapes, f"{p}middle_block.1.transformer_blocks.{{n}}.attn1.to_q.weight")
    layers = [max(d, 1) for d in depths]
    if mid_depth and mid_depth != layers[-1]:
        layers[-1] = mid_depth  # diffusers' mid block takes the last level's depth
        if depths[-1] and depths[-1] != mid_depth:
            raise InputError("--model: the checkpoint's UNet has a mid block deeper than its last level; not supported")
    config = dict(template)
    config.update({
        "in_channels": shapes[f"{p}input_blocks.0.0.weight"][1],
        "out_channels": shapes[f"{p}out.2.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": resnets.pop(),
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        "cross_attention_dim": cross_dim,
        "use_linear_projection": bool(linear),
        "attention_head_dim": _heads(heads_rule, channels),
        "transformer_layers_per_block": layers if len(set(layers)) > 1 else layers[0],
    })
    if "addition_embed_type" in template:
        adm = shapes[f"{p}label_emb.0.0.weight"][1]
        config["projection_class_embeddings_input_dim"] = adm
        if pooled_dim is not None:
            config["addition_time_embed_dim"] = (adm - pooled_dim) // 6  # pooled text + 6 Fourier-embedded numbers
    return config


def _vae_config(template: dict, shapes) -> dict:
    p = VAE
    levels = _count(shapes, f"{p}encoder.down.{{n}}.block.0.conv1.weight")
    config = dict(template)
    config.update({
        "in_channels": shapes[f"{p}encoder.conv_in.weight"][1],
        "out_channels": shapes[f"{p}decoder.conv_out.weight"][0],
        "block_out_channels": [shapes[f"{p}encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": _count(shapes, f"{p}encoder.down.0.block.{{n}}.conv1.weight"),
        "latent_channels": shapes[f"{p}decoder.conv_in.weight"][1],
        "mid_block_add_attention": f"{p}encoder.mid.attn_1.q.weight" in shapes,
    })
    return config


def _text_config(spec: dict, shapes) -> dict:
    p, config = spec["prefix"], dict(spec["config"])
    if spec["layout"] == "clip":
        vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
        positions = shapes[p + "embeddings.position_embedding.weight"][0]
        layers = _count(shapes, p + "encoder.layers.{n}.self_attn.q_proj.weight")
        intermediate = shapes[p + "encoder.layers.0.mlp.fc1.weight"][0]
    else:  # OpenCLIP: fused qkv, text_projection stored as [hidden, projection]
        vocab, hidden = shapes[p + "token_embedding.weight"]
        positions = shapes[p + "positional_embedding"][0]
        layers = _count(shapes, p + "transformer.resblocks.{n}.attn.in_proj_weight")
        intermediate = shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        if p + "text_projection" in shapes:
            config["projection_dim"] = shapes[p + "text_projection"][1]
        # SD 2.x reads the penultimate layer: its diffusers text encoder simply has one layer fewer
        layers -= 1 if spec.get("drop_last_layer") else 0
    config.update({"vocab_size": vocab, "hidden_size": hidden, "max_position_embeddings": positions,
                   "num_hidden_layers": layers, "intermediate_size": intermediate,
                   "num_attention_heads": max(1, hidden // 64)})
    return config


def derive_configs(info: CheckpointInfo) -> dict[str, Any]:
    """The family's configs with every number the state dict fixes taken from it."""
    template = family_template(info.family)
    shapes = info.shapes
    texts = {name: _text_config(template[name], shapes) for name in ("text_encoder", "text_encoder_2") if name in template}
    pooled = texts.get("text_encoder_2", {}).get("projection_dim")
    try:
        unet = _unet_config(template["unet"], shapes, template["heads"], pooled)
        vae = _vae_config(template["vae"], shapes)
    except KeyError as err:
        raise InputError(f"--model: {info.path} lacks {err.args[0]!r} that a {info.family} checkpoint has; "
                         "the file may be damaged or of another architecture") from None
    return {"template": template, "unet": unet, "vae": vae, "text": texts}


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _write_config_folder(folder: Path, info: CheckpointInfo, configs: dict, scheduler: dict) -> None:
    template = configs["template"]
    index = {"_class_name": template["pipeline"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
             **template.get("pipeline_config", {})}
    if template["pipeline"] == "StableDiffusionPipeline":
        index.update({"safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None]})
    for name, config in (("unet", configs["unet"]), ("vae", configs["vae"])):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(config, indent=2))
    for name, config in configs["text"].items():
        index[name] = ["transformers", template[name]["_class"]]
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer = name.replace("text_encoder", "tokenizer")
        index[tokenizer] = ["transformers", "CLIPTokenizer"]
        shutil.copytree(TOKENIZER_DIR, folder / tokenizer)
        tok_config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
        tok_config.update(template[tokenizer])
        (folder / tokenizer / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def probe_v_prediction(unet) -> bool:
    """The WebUI's test for SD 2.x: at t = 999 an ε-model predicts ≈ its (almost pure-noise) input, a v-model
    ≈ −x̂0, which for a constant grey input lies well below it. True when the output's mean is below input − 1."""
    param = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=param.dtype, device=param.device)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        out = unet(x, 999, encoder_hidden_states=context).sample
    return (out - x).float().mean().item() < -1


def load_single_file(path: str | Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                     prediction_type: str | None = None):
    """A diffusers pipeline (SD or SDXL) from one checkpoint file, offline; and how its prediction type was chosen.

    Returns (pipeline, notes): notes say what was detected and decided, for info.json and the terminal.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise InputError(f"--prediction-type: unknown {prediction_type!r}; use epsilon or v_prediction")
    info = inspect_checkpoint(path, allow_pickle)
    configs = derive_configs(info)
    template = configs["template"]
    scheduler = dict(template["scheduler"])
    decided_by = "the family's default"
    if "v_pred" in info.markers:
        scheduler["prediction_type"], decided_by = "v_prediction", "the checkpoint's v_pred key"
    if "ztsnr" in info.markers:  # zero-terminal-SNR fine-tunes (e.g. NoobAI v-pred) say so in the file
        scheduler.update({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"})
    cls = StableDiffusionXLPipeline if template["pipeline"] == "StableDiffusionXLPipeline" else StableDiffusionPipeline
    extra = {"safety_checker": None, "feature_extractor": None} if cls is StableDiffusionPipeline else {}
    with tempfile.TemporaryDirectory(prefix="mrgd-config-") as folder:
        _write_config_folder(Path(folder), info, configs, scheduler)
        try:
            pipe = cls.from_single_file(str(info.path), config=folder, local_files_only=True, dtype=dtype, **extra)
        except InputError:
            raise
        except Exception as err:  # a state dict that does not fit the derived shapes
            raise InputError(f"--model: {info.path} looks like {info.family} but does not load "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); the file may be damaged") from None
    if prediction_type is not None:
        chosen, decided_by = prediction_type, "--prediction-type"
    elif info.family == "sd2" and "v_pred" not in info.markers:
        chosen = "v_prediction" if probe_v_prediction(pipe.unet) else "epsilon"
        decided_by = "a test denoising (the WebUI's rule)"
    else:
        chosen = scheduler["prediction_type"]
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, prediction_type=chosen)
    notes = [f"{info.path.name}: {template['description'].split(' (')[0]}, prediction type {chosen} "
             f"(decided by {decided_by}; override with --prediction-type)"]
    return pipe, info.family, notes


# ---------------------------------------------------------------------------------------------------------------
# Writing (diffusers -> original keys)


_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _unet_key(key: str, config) -> str:
    n = config.layers_per_block + 1
    parts = key.split(".")
    head = parts[0]
    for diffusers, ldm in _UNET_FIXED.items():
        if key.startswith(diffusers + "."):
            return ldm + key[len(diffusers):]

    def resnet(tail: str) -> str:
        for diffusers, ldm in _RESNET:
            tail = tail.replace(diffusers, ldm, 1) if tail.startswith(diffusers) else tail
        return tail

    if head == "down_blocks":
        level, kind, j, tail = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{1 + level * n + j}.0.{resnet(tail)}"
        if kind == "attentions":
            return f"input_blocks.{1 + level * n + j}.1.{tail}"
        return f"input_blocks.{(level + 1) * n}.0.op.{'.'.join(parts[5:])}"  # downsamplers.0.conv.*
    if head == "up_blocks":
        level, kind, j, tail = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{level * n + j}.0.{resnet(tail)}"
        if kind == "attentions":
            return f"output_blocks.{level * n + j}.1.{tail}"
        has_attention = config.up_block_types[level].startswith("CrossAttn")
        return f"output_blocks.{level * n + n - 1}.{2 if has_attention else 1}.{tail}"  # upsamplers.0.conv.*
    if head == "mid_block":
        kind, j, tail = parts[1], int(parts[2]), ".".join(parts[3:])
        return f"middle_block.{2 * j}.{resnet(tail)}" if kind == "resnets" else f"middle_block.1.{tail}"
    raise ValueError(f"UNet key {key!r} has no place in the original layout")


def _vae_key(key: str, value: torch.Tensor, levels: int) -> tuple[str, torch.Tensor]:
    parts = key.split(".")
    renames = (("conv_norm_out", "norm_out"), ("conv_shortcut", "nin_shortcut"))
    if parts[1] in ("down_blocks", "up_blocks"):
        side, level, kind = parts[0], int(parts[2]), parts[3]
        where = "down" if side == "encoder" else "up"
        index = level if side == "encoder" else levels - 1 - level
        if kind == "resnets":
            key = f"{side}.{where}.{index}.block.{parts[4]}." + ".".join(parts[5:])
        else:  # downsamplers.0.conv / upsamplers.0.conv
            key = f"{side}.{where}.{index}.{'downsample' if side == 'encoder' else 'upsample'}." + ".".join(parts[5:])
    elif parts[1] == "mid_block":
        side = parts[0]
        if parts[2] == "resnets":
            key = f"{side}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
        else:
            names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
            tail = parts[4:] if parts[4] != "to_out" else ["to_out"] + parts[6:]
            key = f"{side}.mid.attn_1.{names[tail[0]]}." + ".".join(tail[1:])
            if value.ndim == 2:  # the original attention uses 1×1 convolutions
                value = value[:, :, None, None]
    for diffusers, ldm in renames:
        key = key.replace(diffusers, ldm)
    return key, value


def _openclip_keys(model, prefix: str) -> dict[str, torch.Tensor]:
    """An HF CLIP text model in OpenCLIP's layout (fused qkv, text_projection as [hidden, projection])."""
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    out = {prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": state["final_layer_norm.weight"],
           prefix + "ln_final.bias": state["final_layer_norm.bias"]}
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    for i in range(model.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{block}attn.in_proj_{kind}"] = torch.cat([state[f"{layer}self_attn.{q}_proj.{kind}"] for q in "qkv"])
            out[f"{block}attn.out_proj.{kind}"] = state[f"{layer}self_attn.out_proj.{kind}"]
            out[f"{block}ln_1.{kind}"] = state[f"{layer}layer_norm1.{kind}"]
            out[f"{block}ln_2.{kind}"] = state[f"{layer}layer_norm2.{kind}"]
            out[f"{block}mlp.c_fc.{kind}"] = state[f"{layer}mlp.fc1.{kind}"]
            out[f"{block}mlp.c_proj.{kind}"] = state[f"{layer}mlp.fc2.{kind}"]
    return out


def write_single_file(path: str | Path, unet, vae, text_encoder, text_encoder_2=None) -> None:
    """Write diffusers components as one safetensors file in the original layout: SD 1.x (one HF CLIP text
    encoder) or SDXL base (with `text_encoder_2`). The inverse of what `load_single_file` reads."""
    from safetensors.torch import save_file

    tensors = {UNET + _unet_key(k, unet.config): v for k, v in unet.state_dict().items()}
    levels = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        ldm_key, ldm_value = _vae_key(key, value, levels)
        tensors[VAE + ldm_key] = ldm_value
    clip_prefix = SD1_TEXT if text_encoder_2 is None else XL_TEXT
    tensors.update({clip_prefix + "text_model." + k.removeprefix("text_model."): v
                    for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")})
    if text_encoder_2 is not None:
        tensors.update(_openclip_keys(text_encoder_2, XL_TEXT_2))
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
