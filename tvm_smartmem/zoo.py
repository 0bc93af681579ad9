"""Model zoo: real architectures, randomly initialised from library configs, exported to ONNX.

Offline by construction: nothing is downloaded (weights cannot be; latency and layout work do
not need trained ones).  Each model is built with timm / torchvision / transformers / diffusers,
exported with the dynamo exporter (``torch.onnx.export(..., dynamo=True)``) into a cache
directory, and described in ``manifest.json`` (inputs, parameter count, sha256, versions).
Re-running skips models whose file still matches the manifest, so an interrupted run resumes.

Needs the ``zoo`` extra: ``pip install "tvm-smartmem[zoo]"`` (torch==2.13.0, the CPU wheel).
``benchmarks/zoo.py`` and ``tvm-smartmem zoo`` are the command-line faces of this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import SmartMemError


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One architecture: how to build it, with what inputs, in which family."""

    name: str
    family: str  # cnn | local-attention | global-attention | hybrid | diffusion | llm
    source: str  # library and constructor, for the manifest
    build: Callable[[], tuple[Any, tuple, list[str]]]  # -> (module, example args, input names)
    default: bool = True  # part of the default set (the full SD-1.5 UNet is opt-in)


def default_cache() -> Path:
    if os.environ.get("TVM_SMARTMEM_ZOO"):
        return Path(os.environ["TVM_SMARTMEM_ZOO"])
    from .runtime.opencl import cache_dir

    return cache_dir() / "zoo"


# -- library imports -------------------------------------------------------------------------


def _import_torch():
    try:
        import torch
    except ImportError:
        raise SmartMemError(
            "the model zoo needs PyTorch and the exporter stack: "
            "pip install 'tvm-smartmem[zoo]' (torch==2.13.0, CPU)"
        ) from None
    return torch


def _torchvision_ready() -> None:
    """The torchvision wheel for torch 2.13 is CUDA-linked; with the CPU torch its C++ ops are
    missing and ``import torchvision`` fails on two operator schemas.  Declaring those schemas
    and importing again lets the (pure-Python) model definitions load; the detection ops stay
    unusable.  Where torchvision imports as is (a CUDA torch), nothing is declared."""
    _import_torch()
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision
        return
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    import torch

    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]
    lib = torch.library.Library("torchvision", "DEF")
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    ):
        with contextlib.suppress(RuntimeError):  # already defined
            lib.define(schema)
    _torchvision_ready.lib = lib  # keep the library object alive
    import torchvision  # noqa: F401


def _lib(name: str):
    _torchvision_ready()
    try:
        return __import__(name)
    except ImportError:
        raise SmartMemError(
            f"the model zoo needs '{name}': pip install 'tvm-smartmem[zoo]'"
        ) from None


def _image(size: int = 224):
    torch = _import_torch()
    return (torch.randn(1, 3, size, size),)


def _timm(name: str, size: int = 224, **kw) -> Callable:
    def build():
        timm = _lib("timm")
        model = timm.create_model(name, pretrained=False, **kw)
        return model, _image(size), ["pixel_values"]

    return build


def _torchvision(name: str) -> Callable:
    def build():
        tv = _lib("torchvision")
        return getattr(tv.models, name)(weights=None), _image(), ["pixel_values"]

    return build


def _tokens(seq: int = 128, vocab: int = 30522):
    torch = _import_torch()
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, seq), generator=g)


class _LastHidden:
    """Wraps a transformers model so that it returns one tensor (the exporter's favourite)."""

    @staticmethod
    def wrap(model, field: str = "last_hidden_state"):
        torch = _import_torch()

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                out = self.model(*args, return_dict=True)
                return getattr(out, field)

        return Wrapped()


def _bert():
    tr = _lib("transformers")
    cfg = tr.BertConfig(attn_implementation="eager")
    return _LastHidden.wrap(tr.BertModel(cfg)), (_tokens(),), ["input_ids"]


def _distilbert():
    tr = _lib("transformers")
    cfg = tr.DistilBertConfig(attn_implementation="eager")
    return _LastHidden.wrap(tr.DistilBertModel(cfg)), (_tokens(),), ["input_ids"]


def _swin_hf():
    tr = _lib("transformers")
    model = tr.SwinModel(tr.SwinConfig(attn_implementation="eager"))
    return _LastHidden.wrap(model), _image(), ["pixel_values"]


def _gpt2():
    tr = _lib("transformers")
    cfg = tr.GPT2Config(attn_implementation="eager", use_cache=False)
    model = tr.GPT2LMHeadModel(cfg)
    return _LastHidden.wrap(model, "logits"), (_tokens(128, cfg.vocab_size),), ["input_ids"]


def _llama_small():
    tr = _lib("transformers")
    cfg = tr.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
        attn_implementation="eager", use_cache=False,
    )
    model = tr.LlamaForCausalLM(cfg)
    return _LastHidden.wrap(model, "logits"), (_tokens(128, cfg.vocab_size),), ["input_ids"]


def _sd_text_encoder():
    tr = _lib("transformers")
    cfg = tr.CLIPTextConfig(  # the SD-1.5 text encoder (CLIP ViT-L/14 text tower)
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        attn_implementation="eager",
    )
    return _LastHidden.wrap(tr.CLIPTextModel(cfg)), (_tokens(77, 49408),), ["input_ids"]


def _unet(config: dict, latent: int):
    def build():
        torch = _import_torch()
        diffusers = _lib("diffusers")
        model = diffusers.UNet2DConditionModel(**config)

        class UNet(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.unet = model

            def forward(self, sample, timestep, encoder_hidden_states):
                return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

        ctx = config.get("cross_attention_dim", 768)
        args = (torch.randn(1, 4, latent, latent), torch.tensor([10.0]), torch.randn(1, 77, ctx))
        return UNet(), args, ["sample", "timestep", "encoder_hidden_states"]

    return build


_UNET_TINY = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (64, 128, 256),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 256, "attention_head_dim": 8,
}
_UNET_SD15 = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8,
}


def _sd_block(kind: str):
    """SD-1.5's first cross-attention down block or its mid block, at 64x64 latents."""

    def build():
        torch = _import_torch()
        diffusers = _lib("diffusers")
        from diffusers.models.unets import unet_2d_blocks as blocks

        if kind == "down":
            block = blocks.CrossAttnDownBlock2D(
                in_channels=320, out_channels=320, temb_channels=1280, num_layers=2,
                cross_attention_dim=768, num_attention_heads=8, add_downsample=True,
            )
            sample = torch.randn(1, 320, 64, 64)
        else:
            block = blocks.UNetMidBlock2DCrossAttn(
                in_channels=1280, temb_channels=1280, cross_attention_dim=768,
                num_attention_heads=8,
            )
            sample = torch.randn(1, 1280, 8, 8)
        del diffusers

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.block = block

            def forward(self, hidden, temb, context):
                out = self.block(hidden, temb, encoder_hidden_states=context)
                return out[0] if isinstance(out, tuple) else out

        args = (sample, torch.randn(1, 1280), torch.randn(1, 77, 768))
        return Block(), args, ["hidden_states", "temb", "encoder_hidden_states"]

    return build


def _vae_decoder():
    torch = _import_torch()
    diffusers = _lib("diffusers")
    vae = diffusers.AutoencoderKL(  # SD-1.5's VAE
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
    )

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decode(latent, return_dict=False)[0]

    return Decoder(), (torch.randn(1, 4, 64, 64),), ["latent"]


MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("resnet50", "cnn", "timm resnet50", _timm("resnet50")),
        ZooModel("mobilenet_v2", "cnn", "torchvision mobilenet_v2", _torchvision("mobilenet_v2")),
        ZooModel("mobilenetv3", "cnn", "timm mobilenetv3_large_100",
                 _timm("mobilenetv3_large_100")),
        ZooModel("efficientnet_b0", "cnn", "timm efficientnet_b0", _timm("efficientnet_b0")),
        ZooModel("regnety_016", "cnn", "timm regnety_016", _timm("regnety_016")),
        ZooModel("convnext_tiny", "cnn", "timm convnext_tiny", _timm("convnext_tiny")),
        ZooModel("swin_tiny", "local-attention", "timm swin_tiny_patch4_window7_224",
                 _timm("swin_tiny_patch4_window7_224")),
        ZooModel("swin_hf", "local-attention", "transformers SwinModel", _swin_hf),
        ZooModel("vit_base", "global-attention", "timm vit_base_patch16_224",
                 _timm("vit_base_patch16_224")),
        ZooModel("deit_small", "global-attention", "timm deit_small_patch16_224",
                 _timm("deit_small_patch16_224")),
        ZooModel("bert_base", "global-attention", "transformers BertModel, seq 128", _bert),
        ZooModel("distilbert", "global-attention", "transformers DistilBertModel, seq 128",
                 _distilbert),
        ZooModel("mobilevit_s", "hybrid", "timm mobilevit_s, 256x256", _timm("mobilevit_s", 256)),
        ZooModel("levit_128s", "hybrid", "timm levit_128s", _timm("levit_128s")),
        ZooModel("sd_text_encoder", "diffusion", "transformers CLIPTextModel (SD-1.5 config)",
                 _sd_text_encoder),
        ZooModel("unet_tiny", "diffusion", "diffusers UNet2DConditionModel, reduced",
                 _unet(_UNET_TINY, 32)),
        ZooModel("sd_down_block", "diffusion", "diffusers CrossAttnDownBlock2D (SD-1.5)",
                 _sd_block("down")),
        ZooModel("sd_mid_block", "diffusion", "diffusers UNetMidBlock2DCrossAttn (SD-1.5)",
                 _sd_block("mid")),
        ZooModel("vae_decoder", "diffusion", "diffusers AutoencoderKL decoder, 64x64 latent",
                 _vae_decoder),
        ZooModel("gpt2", "llm", "transformers GPT2LMHeadModel, seq 128", _gpt2),
        ZooModel("llama_small", "llm", "transformers LlamaForCausalLM (4 layers), seq 128",
                 _llama_small),
        ZooModel("sd15_unet", "diffusion", "diffusers UNet2DConditionModel (SD-1.5), opt-in",
                 _unet(_UNET_SD15, 64), default=False),
    )
}


#: Short names people use for zoo models (the papers' tables say Swin-T, DeiT-S...).
ALIASES = {"swin_t": "swin_tiny", "deit_s": "deit_small", "vit_b": "vit_base",
           "bert": "bert_base", "convnext_t": "convnext_tiny", "mobilevit": "mobilevit_s",
           "levit": "levit_128s", "effnet_b0": "efficientnet_b0", "llama": "llama_small"}


def names(include_optional: bool = False) -> list[str]:
    return [n for n, m in MODELS.items() if m.default or include_optional]


def resolve(selection: str | list[str] | None) -> list[str]:
    """``None``/``"all"`` -> the default set; a comma list is checked against :data:`MODELS`."""
    if selection is None or selection == "all":
        return names()
    wanted = selection.split(",") if isinstance(selection, str) else list(selection)
    wanted = [ALIASES.get(w.strip(), w.strip()) for w in wanted if w.strip()]
    unknown = [w for w in wanted if w not in MODELS]
    if unknown:
        raise SmartMemError(
            f"unknown zoo model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}"
        )
    return wanted


# -- export ----------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("torch", "torchvision", "transformers", "timm", "diffusers", "onnx",
                 "onnxscript"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def load_manifest(cache: Path) -> dict[str, dict]:
    path = cache / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def model_path(name: str, cache: Path | None = None) -> Path:
    """The exported ONNX file of a zoo model (raises if it has not been exported)."""
    cache = cache or default_cache()
    entry = load_manifest(cache).get(name)
    path = cache / f"{name}.onnx"
    if entry is None or not path.exists():
        raise SmartMemError(
            f"zoo model '{name}' is not exported in {cache}: run `tvm-smartmem zoo --models {name}`"
        )
    return path


def export(name: str, cache: Path, seed: int = 0) -> dict:
    """Build ``name`` with a fixed seed and export it to ``cache/<name>.onnx``."""
    torch = _import_torch()
    spec = MODELS[name]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    module, args, input_names = spec.build()
    module = module.eval()
    path = cache / f"{name}.onnx"
    tmp = cache / f".{name}.onnx.tmp"
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, input_names=input_names,
                                    optimize=True, verbose=False)
    large = sum(p.numel() for p in module.parameters()) * 4 > (1 << 31)
    program.save(str(tmp), external_data=large)
    os.replace(tmp, path)
    return {
        "name": name,
        "family": spec.family,
        "source": spec.source,
        "inputs": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", "")}
                   for n, a in zip(input_names, args, strict=True)],
        "parameters": int(sum(p.numel() for p in module.parameters())),
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": _sha256(path),
        "export_seconds": round(time.perf_counter() - t0, 1),
        "seed": seed,
        "versions": _versions(),
    }


def build_zoo(
    selection: str | list[str] | None = None, cache: Path | None = None, force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Export the selected models (resumable); returns the manifest entries."""
    cache = Path(cache or default_cache())
    cache.mkdir(parents=True, exist_ok=True)
    wanted = resolve(selection)
    manifest = load_manifest(cache)
    failures = {}
    for i, name in enumerate(wanted, 1):
        path = cache / f"{name}.onnx"
        entry = manifest.get(name)
        prefix = f"[{i}/{len(wanted)}] {name:16s}"
        if not force and entry and path.exists() and entry.get("bytes") == path.stat().st_size:
            log(f"{prefix} cached ({entry['bytes'] / 1e6:.1f} MB)")
            continue
        log(f"{prefix} exporting ...")
        try:
            manifest[name] = export(name, cache)
        except SmartMemError:
            raise
        except Exception as err:  # an exporter failure on one model must not lose the others
            failures[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            log(f"{prefix} FAILED: {failures[name]}")
            continue
        (cache / "manifest.json").write_text(json.dumps(manifest, indent=2))
        e = manifest[name]
        log(f"{prefix} done in {e['export_seconds']} s ({e['bytes'] / 1e6:.1f} MB, "
            f"{e['parameters'] / 1e6:.1f} M params)")
    if failures:
        raise SmartMemError(f"export failed for {', '.join(failures)}: "
                            + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    return {n: manifest[n] for n in wanted}
