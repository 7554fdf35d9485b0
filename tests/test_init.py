"""hf_cim's top level: the small face, the old names (still importable, with a DeprecationWarning naming the new
place), and an import that raises no DeprecationWarning itself."""

import importlib
import subprocess
import sys

import pytest

import hf_cim

FACE = [
    "AnalogNoiseConfig",
    "NoiseContext",
    "NoiseModel",
    "RobustnessResult",
    "clear_chip",
    "evaluate_robustness",
    "get_preset",
    "list_noise_models",
    "list_presets",
    "noise_disabled",
    "patch_model",
    "program_chip",
    "register_noise_model",
    "reseed",
    "set_drift_time",
    "set_noise_level",
    "unpatch_model",
]

MOVED = {
    "AnalogHfQuantizer": "hf_cim.quantizer",
    "GradientAlignmentCallback": "hf_cim.callbacks",
    "NoiseLevelCallback": "hf_cim.callbacks",
    "NoiseStateCallback": "hf_cim.callbacks",
    "PeakMemoryCallback": "hf_cim.callbacks",
    "add_callbacks": "hf_cim.callbacks",
    "analog_layers": "hf_cim.patch",
    "get_config": "hf_cim.patch",
    "load_noise_config": "hf_cim.hub",
    "load_peft": "hf_cim.peft_utils",
    "push_to_hub": "hf_cim.hub",
    "save_noise_config": "hf_cim.hub",
    "write_model_card": "hf_cim.hub",
}


def test_all_is_the_small_face():
    assert hf_cim.__all__ == sorted(hf_cim.__all__) == FACE
    for name in FACE:
        assert getattr(hf_cim, name) is not None
    assert hf_cim.__version__ == "0.1.0"


@pytest.mark.parametrize("name", sorted(MOVED), ids=sorted(MOVED))
def test_old_names_still_work_and_warn_with_the_new_place(name):
    where = MOVED[name]
    with pytest.warns(DeprecationWarning, match=rf"hf_cim\.{name} is deprecated: use {where}\.{name}"):
        old = getattr(hf_cim, name)
    assert old is getattr(importlib.import_module(where), name)
    with pytest.warns(DeprecationWarning, match=rf"{where}\.{name}"):
        exec(f"from hf_cim import {name}", {})


def test_hub_keeps_its_names_and_submodules_are_reached_from_the_top():
    import hf_cim.hub
    import hf_cim.resume

    for name in ("NoiseStateCallback", "save_noise_state", "load_noise_state", "NOISE_STATE_NAME"):
        assert getattr(hf_cim.hub, name) is getattr(hf_cim.resume, name)
    assert hf_cim.hub.write_model_card is importlib.import_module("hf_cim.model_card").write_model_card
    assert hf_cim.callbacks.NoiseStateCallback is hf_cim.resume.NoiseStateCallback
    assert hf_cim.callbacks.gradient_alignment is importlib.import_module("hf_cim.alignment").gradient_alignment
    assert hf_cim.callbacks.MemoryTracker is importlib.import_module("hf_cim.memory").MemoryTracker
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        hf_cim.not_a_name  # noqa: B018


def test_the_quant_method_is_registered_on_import():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["hf_cim"] is hf_cim.quantizer.AnalogHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["hf_cim"] is hf_cim.AnalogNoiseConfig


def test_import_raises_no_deprecation_warning():
    code = "import hf_cim, hf_cim.callbacks, hf_cim.hub, hf_cim.peft_utils, hf_cim.evaluation"
    proc = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
