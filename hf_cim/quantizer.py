"""transformers integration: ``quant_method "hf_cim"``, so the noise config travels inside ``config.json``.

Importing ``hf_cim`` registers :class:`~hf_cim.AnalogNoiseConfig` as a transformers quantization config and
:class:`AnalogHfQuantizer` as its quantizer (``transformers.quantizers.register_quantization_config`` /
``register_quantizer``). Then:

* ``AutoModel*.from_pretrained(path, quantization_config=AnalogNoiseConfig(...))`` loads the weights and patches the
  model with :func:`hf_cim.patch_model`;
* ``model.save_pretrained(dir)`` writes the ordinary safetensors (the same keys as the plain model: patching never
  moves a Parameter) and the noise config as ``config.json["quantization_config"]`` with ``"quant_method": "hf_cim"``;
* ``from_pretrained(dir)`` in a process that imported ``hf_cim`` patches the model again with an equal config; plain
  transformers (no ``hf_cim``) logs "Unknown quantization type, got hf_cim ... we will skip the quantization" and
  loads the clean digital model;
* ``Trainer`` fine-tunes the loaded model (``is_trainable`` and ``is_qat_trainable`` are ``True``);
* ``model.dequantize()`` is :func:`hf_cim.unpatch_model`: a plain digital model with the trained weights.

Nothing is pickled: the weights are safetensors, the config is JSON, and noise models are rebuilt by name through
the registry (:func:`hf_cim.register_noise_model`).

Known limits (transformers' rules for quantized models, not ours): a model loaded this way refuses ``.half()`` /
``.float()`` (use ``.to(dtype)``), and a checkpoint that already carries an ``hf_cim`` config ignores a
``quantization_config`` passed to ``from_pretrained`` (transformers warns); to change the noise of such a checkpoint,
``hf_cim.unpatch_model(model)`` then ``hf_cim.patch_model(model, new_config)``.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .config import QUANT_METHOD, AnalogNoiseConfig
from .patch import analog_layers, get_config, patch_model, unpatch_model

__all__ = ["AnalogHfQuantizer", "register"]

logger = logging.getLogger(__name__)


class AnalogHfQuantizer(HfQuantizer):
    """The ``HfQuantizer`` of ``quant_method "hf_cim"``: patch the model after its weights are loaded.

    Weights load unchanged (no tensor is "quantized" on disk: the analog simulation runs in the forward pass), so
    every checkpoint of the base architecture can be loaded as an analog model, and an analog checkpoint loads in
    plain transformers as the digital model.
    """

    requires_calibration = False

    def __init__(self, quantization_config: AnalogNoiseConfig, **kwargs: Any) -> None:
        if not isinstance(quantization_config, AnalogNoiseConfig):
            raise TypeError(
                f"AnalogHfQuantizer: `quantization_config` must be an AnalogNoiseConfig, "
                f"got {type(quantization_config).__name__}"
            )
        quantization_config.validate()  # a bad config fails here, before the weights load, not after
        super().__init__(quantization_config, **kwargs)

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        # After loading, so tied weights are tied and the patched layers hold the final Parameters.
        if any(True for _ in analog_layers(model)):
            current = get_config(model)
            if current != self.quantization_config:
                raise ValueError("AnalogHfQuantizer: the model is already patched with a different AnalogNoiseConfig")
            return model
        patch_model(model, self.quantization_config)
        logger.info("hf_cim: patched %d layers of %s", sum(1 for _ in analog_layers(model)), type(model).__name__)
        return model

    def _dequantize(self, model, dtype=None):
        return unpatch_model(model)

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return False


def register() -> None:
    """Register ``quant_method "hf_cim"`` with transformers (idempotent; ``import hf_cim`` calls it)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not AnalogNoiseConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(AnalogNoiseConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not AnalogHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(AnalogHfQuantizer)


register()
