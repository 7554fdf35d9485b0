"""The peer of the step-time benchmark: IBM's aihwkit-lightning 2.1.0, configured like hf_cim's default config.

Install: ``pip install --no-deps aihwkit-lightning==2.1.0`` (pure Python; it pins torch 2.13.0 and imports
``typing_extensions`` only). Its PyTorch path (``TorchLinear.linear``) runs unless ``AIHWKIT_USE_TRITON`` is set
and a Volta-or-newer GPU is present; then its Triton kernel (input quantization, matmul, output noise and ADC fused);
:func:`peer_kernels` says which, and the benchmark prints it.

Settings, read off aihwkit-lightning 2.1.0's source (``nn/modules/torch_utils/torch_linear.py``, ``quant_utils.py``)
and matched to ``hf_cim.AnalogNoiseConfig()`` (2 % per-channel Gaussian weight noise + 0.04 output noise, 8-bit DAC
per token, 8-bit weights per channel, 8-bit ADC with ``out_bound`` 10, 512-row tiles):

=========================================  ==========================================================================
hf_cim default                              aihwkit-lightning ``TorchInferenceRPUConfig``
=========================================  ==========================================================================
DAC 8 bits, per-token abs-max               ``forward.inp_res = 254`` (2^8 − 2 steps), ``pre_post.input_range.enable =
                                            True``, ``dynamic = True`` (abs-max of each input vector, per tile)
weights 8 bits per output channel           ``modifier.quantization_type = DISCRETIZE_PER_CHANNEL``, ``res = 254``
GaussianWeightNoise(std=0.02, per channel)  ``modifier.noise_type = ADD_NORMAL_PER_CHANNEL``, ``std_dev = 0.02``
OutputNoise(std=0.04)                       ``forward.out_noise = 0.04``, ``out_noise_per_channel = True``
ADC 8 bits, ``out_bound = 10``              ``forward.out_res = 254``, ``forward.out_bound = 10``
``tile_size = 512``                         ``mapping.max_input_size = 512``
gradient ``ste`` (clean gradient)           autograd through the simulation with straight-through rounding
                                            (hf_cim's ``full`` mode is the like-for-like gradient)
=========================================  ==========================================================================

Known differences (none changes the amount of work much): aihwkit-lightning takes the input abs-max per tile rather
than per whole input vector; with no per-channel clip type its ADC bound is relative to the tile's largest
``|w|`` over all channels (hf_cim: per channel); it divides the output noise by ``sqrt(n_tiles)``; it adds the bias
digitally after the ADC, unquantized. It converts ``nn.Linear`` only, so GPT-2's ``Conv1D`` layers are first
replaced by equivalent ``nn.Linear`` layers (weights transposed), and the LM head is re-tied to the input embedding
after conversion (its ``from_digital`` copies the weight, which would untie it and add a vocabulary-sized
Parameter).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["PEER_NAME", "PEER_SETTINGS", "conv1d_to_linear", "make_peer_model", "peer_available", "peer_kernels"]

logger = logging.getLogger(__name__)

PEER_NAME = "aihwkit-lightning"

#: The settings applied, as printed into the benchmark's output.
PEER_SETTINGS = {
    "forward.inp_res": 254,
    "pre_post.input_range.enable": True,
    "pre_post.input_range.dynamic": True,
    "modifier.quantization_type": "DISCRETIZE_PER_CHANNEL",
    "modifier.res": 254,
    "modifier.noise_type": "ADD_NORMAL_PER_CHANNEL",
    "modifier.std_dev": 0.02,
    "forward.out_noise": 0.04,
    "forward.out_noise_per_channel": True,
    "forward.out_res": 254,
    "forward.out_bound": 10.0,
    "mapping.max_input_size": 512,
}


def peer_kernels() -> str:
    """Which of the peer's forward paths its layers run: its Triton kernel or its PyTorch one.

    aihwkit-lightning decides per call: Triton where ``AIHWKIT_USE_TRITON`` is set and its Triton module imported
    (a Volta or newer GPU), PyTorch otherwise.
    """
    import os

    from aihwkit_lightning.nn.modules import linear

    if os.environ.get("AIHWKIT_USE_TRITON") and linear.TRITON_AVAIL:
        return "Triton (TritonLinear)"
    why = "AIHWKIT_USE_TRITON unset" if not os.environ.get("AIHWKIT_USE_TRITON") else "its Triton module not usable"
    return f"PyTorch (TorchLinear; {why})"


def peer_available() -> tuple[bool, str]:
    """``(True, version)`` if aihwkit-lightning imports, else ``(False, reason)``."""
    try:
        import importlib.metadata

        import aihwkit_lightning  # noqa: F401

        return True, importlib.metadata.version("aihwkit-lightning")
    except Exception as err:  # ImportError, or an error raised while it probes for Triton / a GPU
        return False, f"{type(err).__name__}: {err}"


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` in ``model`` by an ``nn.Linear`` computing the same product.

    ``Conv1D`` stores its weight ``(in, out)``; the ``nn.Linear`` gets the transposed copy. Returns the number
    of modules replaced.
    """
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Conv1D:
                n_in, n_out = child.weight.shape
                lin = nn.Linear(n_in, n_out, bias=child.bias is not None, device=child.weight.device)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                lin.to(child.weight.dtype)
                setattr(parent, name, lin)
                replaced += 1
    return replaced


def _rpu_config():
    from aihwkit_lightning.simulator.configs import (
        TorchInferenceRPUConfig,
        WeightNoiseInjectionType,
        WeightQuantizationType,
    )

    cfg = TorchInferenceRPUConfig()
    cfg.forward.inp_res = 2**8 - 2
    cfg.pre_post.input_range.enable = True
    cfg.pre_post.input_range.dynamic = True
    cfg.modifier.quantization_type = WeightQuantizationType.DISCRETIZE_PER_CHANNEL
    cfg.modifier.res = 2**8 - 2
    cfg.modifier.noise_type = WeightNoiseInjectionType.ADD_NORMAL_PER_CHANNEL
    cfg.modifier.std_dev = 0.02
    cfg.forward.out_noise = 0.04
    cfg.forward.out_noise_per_channel = True
    cfg.forward.out_res = 2**8 - 2
    cfg.forward.out_bound = 10.0
    cfg.mapping.max_input_size = 512
    return cfg


def make_peer_model(model: nn.Module) -> nn.Module:
    """Convert ``model`` (in place) for aihwkit-lightning with the settings of :data:`PEER_SETTINGS`.

    Every linear-like layer becomes an ``AnalogLinear`` (as hf_cim's default patches every one); a tied output
    embedding is re-tied afterwards. Returns the converted model (the same object).
    """
    from aihwkit_lightning.nn.conversion import convert_to_analog

    conv1d_to_linear(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    model = convert_to_analog(model, _rpu_config(), ensure_analog_root=False, inplace=True)
    if tied:
        # ``from_digital`` copied the weight: share the embedding's Parameter again, as the plain model does.
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model
