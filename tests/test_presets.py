"""Presets: names, fields, the level knob, and ``AnalogNoiseConfig(noise="<preset>")``."""

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2

import hf_cim
from hf_cim import get_preset
from hf_cim.noise import IRDrop, LogNormalNoise, OutputNoise, PCMNoise, ReadNoise, ReRAMNoise, StuckAtFaults
from hf_cim.presets import TRAINING_DEFAULTS, list_presets, preset_fields, preset_noise


def test_list_and_contents():
    assert list_presets() == ["paper", "pcm", "pcm_drift", "rram"]
    paper = get_preset("paper", level=2.0)
    assert (paper.input_bits, paper.weight_bits, paper.output_bits, paper.level) == (8, 8, None, 2.0)
    assert paper.noise == [LogNormalNoise(std=0.1)]
    pcm = get_preset("pcm")
    assert (pcm.input_bits, pcm.output_bits, pcm.out_bound, pcm.tile_size) == (8, 8, 10.0, 512)
    assert pcm.noise == [ReadNoise(std=0.0175, shape="pcm"), IRDrop(scale=1.0), OutputNoise(std=0.04)]
    assert isinstance(get_preset("pcm_drift").noise[0], PCMNoise)
    assert [type(m) for m in get_preset("rram").noise] == [ReRAMNoise, StuckAtFaults, IRDrop, OutputNoise]


def test_overrides_errors_and_fresh_copies():
    cfg = get_preset("pcm", level=0.5, gradient="ste_detach", seed=4)
    assert (cfg.gradient, cfg.seed, cfg.level) == ("ste_detach", 4, 0.5)
    with pytest.raises(ValueError, match="unknown preset 'pmc'; presets: paper, pcm, pcm_drift, rram"):
        get_preset("pmc")
    with pytest.raises(ValueError, match="`level`"):
        get_preset("paper", level=-1.0)
    assert preset_noise("pcm") is not preset_noise("pcm")


def test_noise_preset_name_in_config():
    cfg = hf_cim.AnalogNoiseConfig(noise="rram")
    assert cfg.noise == preset_noise("rram")
    assert cfg.tile_size == 512  # only the noise models are taken, not the converters
    assert hf_cim.AnalogNoiseConfig.from_json_string(cfg.to_json_string()) == cfg
    with pytest.raises(ValueError, match="`noise` unknown preset 'x'"):
        hf_cim.AnalogNoiseConfig(noise="x")


def test_paper_level_means_lognormal_sigma():
    w = torch.full((200_000,), 0.5)
    from hf_cim.noise import NoiseContext

    for level in (1.0, 2.0, 3.0):
        ctx = NoiseContext(generator=torch.Generator().manual_seed(0), level=level)
        out = get_preset("paper", level=level).noise[0].program(w, ctx)
        assert torch.log(out / w).std().item() == pytest.approx(0.1 * level, rel=0.01)


@pytest.mark.parametrize("name", list_presets())
@pytest.mark.parametrize("model_factory", [tiny_gpt2, tiny_bert], ids=["gpt2", "bert"])
def test_level_zero_is_quantization_only(name, model_factory):
    ids = torch.arange(32).reshape(2, 16) % 97
    outs = []
    for cfg in (get_preset(name, level=0.0), get_preset(name, level=1.0).replace(noise=[])):
        model = hf_cim.patch_model(model_factory(), cfg)
        with torch.no_grad():
            outs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    model = hf_cim.patch_model(model_factory(), get_preset(name, level=1.0))
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, outs[0])


def test_presets_train_with_the_hardware_aware_ste():
    cfg = get_preset("pcm")
    assert (cfg.gradient, cfg.mask_saturated, cfg.backward_weights) == ("ste", True, "programmed")
    assert get_preset("rram", gradient="ste_detach").mask_saturated is True
    full = get_preset("pcm", gradient="full")  # full differentiates the clip itself: no STE levers
    assert (full.mask_saturated, full.backward_weights) == (False, "clean")
    plain = get_preset("paper", mask_saturated=False, backward_weights="clean")
    assert (plain.mask_saturated, plain.backward_weights) == (False, "clean")
    # a bare config keeps the plain clean backward (the gradient contract of hf_cim.ste)
    assert (hf_cim.AnalogNoiseConfig().mask_saturated, hf_cim.AnalogNoiseConfig().backward_weights) == (False, "clean")


@pytest.mark.parametrize("name", list_presets())
def test_from_preset_is_get_preset(name):
    for level in (0.0, 1.0, 3.0):
        for overrides in ({}, {"gradient": "full"}, {"seed": 2, "mask_saturated": False}):
            cfg = hf_cim.AnalogNoiseConfig.from_preset(name, level=level, **overrides)
            assert cfg.to_dict() == get_preset(name, level, **overrides).to_dict()
            assert cfg.level == level
    fields = preset_fields(name)
    assert fields["noise"] == preset_noise(name) and fields is not preset_fields(name)
    assert TRAINING_DEFAULTS == {"mask_saturated": True, "backward_weights": "programmed", "program_gradient": True}


def test_presets_are_data_below_the_config():
    import ast
    import inspect

    import hf_cim.presets

    tree = ast.parse(inspect.getsource(hf_cim.presets))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(m and m.endswith("config") for m in imported), imported
