"""Trainable input modules ``A_θ`` placed in front of an opaque classifier.

Every module is an :class:`InputModule` with a frozen, validated pydantic config, is exactly the
identity at initialisation, and saves to ``module_config.json`` + ``module.safetensors`` (never
pickle). Built-in modules:

- ``dncnn``: residual DnCNN denoiser (:mod:`blackbox_rs.modules.denoiser`);
- ``prompt_full`` / ``prompt_pad``: additive visual prompts (:mod:`blackbox_rs.modules.prompt`);
- ``unet``: residual U-Net denoiser with whole-image context (:mod:`blackbox_rs.modules.unet`);
- ``lora_dncnn``: frozen DnCNN + peft LoRA adapters (:mod:`blackbox_rs.modules.lora_denoiser`;
  ``peft`` is imported only when one is built);
- ``lowres``: denoiser at reduced resolution for large inputs such as 224×224
  (:mod:`blackbox_rs.modules.lowres`);
- ``diffusion``: a frozen off-the-shelf diffusers UNet2DModel, diffusion denoised smoothing
  (:mod:`blackbox_rs.modules.diffusion`; ``diffusers`` is imported only when one is built);
- ``frozen``: a user's own denoiser (TorchScript/.pt2/ONNX file or ``nn.Module``), frozen
  (:mod:`blackbox_rs.modules.frozen`);
- ``denoiser_adapter``: a frozen denoiser followed by a fitted zero-initialised adapter
  (:mod:`blackbox_rs.modules.adapter`).

Use :func:`create_module` / :func:`load_module`; extend with :func:`register_module`.
"""

# Importing the built-in module files registers them (each imports base and registry itself).
from blackbox_rs.modules.adapter import DenoiserAdapter, DenoiserAdapterConfig
from blackbox_rs.modules.base import InputModule, ModuleConfig, load_module
from blackbox_rs.modules.denoiser import DnCNN, DnCNNConfig
from blackbox_rs.modules.diffusion import DiffusionDenoiser, DiffusionDenoiserConfig
from blackbox_rs.modules.frozen import FrozenDenoiser, FrozenDenoiserConfig
from blackbox_rs.modules.lora_denoiser import LoRADnCNN, LoRADnCNNConfig
from blackbox_rs.modules.lowres import LowResDenoiser, LowResDenoiserConfig
from blackbox_rs.modules.prompt import (
    FullFramePrompt,
    FullFramePromptConfig,
    PaddingPrompt,
    PaddingPromptConfig,
)
from blackbox_rs.modules.registry import (
    create_module,
    get_config_class,
    get_module_class,
    list_modules,
    register_module,
)
from blackbox_rs.modules.unet import UNet, UNetConfig

__all__ = [
    "DenoiserAdapter",
    "DenoiserAdapterConfig",
    "DiffusionDenoiser",
    "DiffusionDenoiserConfig",
    "DnCNN",
    "DnCNNConfig",
    "FrozenDenoiser",
    "FrozenDenoiserConfig",
    "FullFramePrompt",
    "FullFramePromptConfig",
    "InputModule",
    "LoRADnCNN",
    "LoRADnCNNConfig",
    "LowResDenoiser",
    "LowResDenoiserConfig",
    "ModuleConfig",
    "PaddingPrompt",
    "PaddingPromptConfig",
    "UNet",
    "UNetConfig",
    "create_module",
    "get_config_class",
    "get_module_class",
    "list_modules",
    "load_module",
    "register_module",
]
