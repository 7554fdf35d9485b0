"""Trainer(resume_from_checkpoint=...) on a patched model: same noise config, same noise stream positions."""

import json
import logging
import shutil

import pytest
import torch
from helpers import tiny_gpt2
from safetensors import safe_open

import hf_cim
from hf_cim import AnalogNoiseConfig
from hf_cim.noise import GaussianWeightNoise, OutputNoise
from hf_cim.resume import NOISE_STATE_NAME, load_noise_state, save_noise_state


def _config(**kw):
    base = dict(noise=[GaussianWeightNoise(std=0.05), OutputNoise(std=0.1)], seed=3, exclude_modules=["lm_head"])
    base.update(kw)
    return AnalogNoiseConfig(**base)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=10):
        self.ids = torch.randint(0, 97, (n, length), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(cfg):
    # no dropout: the only randomness in a step is the analog noise
    return hf_cim.patch_model(tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), cfg)


def _train(output_dir, max_steps, cfg=None, resume=None, callback=True):
    from transformers import Trainer, TrainingArguments

    model = _model(cfg or _config())
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, save_strategy="steps", save_steps=2,
        per_device_train_batch_size=2, learning_rate=5e-3, seed=0, report_to=[], use_cpu=True,
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    callbacks = [hf_cim.callbacks.NoiseStateCallback()] if callback else []
    Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=callbacks).train(resume_from_checkpoint=resume)
    return model


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the function-scoped conftest fixture does for the resumed runs
    try:
        return out, _params(_train(out, max_steps=4))
    finally:
        torch.set_num_threads(threads)


def test_checkpoint_holds_noise_config_and_state(full_run):
    out, _ = full_run
    ckpt = out / "checkpoint-2"
    quant = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert AnalogNoiseConfig.from_dict(quant) == _config()
    model = _model(_config())
    with safe_open(str(ckpt / NOISE_STATE_NAME), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys == {layer.hf_cim_name for _, layer in hf_cim.patch.analog_layers(model)}
    assert AnalogNoiseConfig.from_json_string(meta["config"]) == _config()


def test_resume_continues_the_same_noise_streams(full_run, tmp_path):
    _, expected = full_run
    shutil.copytree(full_run[0] / "checkpoint-2", tmp_path / "checkpoint-2")
    resumed = _params(_train(tmp_path, max_steps=4, resume=True))
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[n], expected[n]) for n in expected)


def test_without_the_callback_the_noise_restarts(full_run, tmp_path):
    _, expected = full_run
    shutil.copytree(full_run[0] / "checkpoint-2", tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2" / NOISE_STATE_NAME).unlink()
    resumed = _params(_train(tmp_path, max_steps=4, resume=True, callback=False))
    assert not all(torch.equal(resumed[n], expected[n]) for n in expected)


def test_state_round_trip_and_config_mismatch_warning(tmp_path, caplog):
    model = _model(_config())
    hf_cim.set_noise_level(model, 0.5)
    x = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)  # advance every generator
    save_noise_state(model, tmp_path)
    with torch.no_grad():
        y = model(x).logits

    other = _model(_config(seed=4))
    with caplog.at_level(logging.WARNING, logger="hf_cim.resume"):
        assert load_noise_state(other, tmp_path)
    assert "['seed']" in caplog.text  # the differing field is named
    assert all(layer.hf_cim_level == 0.5 for _, layer in hf_cim.patch.analog_layers(other))
    with torch.no_grad():
        assert torch.equal(other(x).logits, y)  # the restored streams continue where the saved ones were
    assert not load_noise_state(other, tmp_path / "missing")


# -- a state file is validated like a config: nothing of the model changes when it is bad ----------------------------
def _state_file(tmp_path):
    model = _model(_config())
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0)))  # create the generators
    return save_noise_state(model, tmp_path)


def _rewrite(path, layer=None, field=None, value=None, tensor=None, meta=None):
    """Rewrite the state file with one layer's ``field`` set to ``value``, its generator state set to ``tensor``,
    or metadata entries replaced by ``meta`` (None: deleted)."""
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(metadata["layers"])
    if field is not None:
        if value is _DELETE:
            del layers[layer][field]
        else:
            layers[layer][field] = value
    if layer is not None and field is None and value is not None:  # rename the layer (tensor included)
        layers[value] = layers.pop(layer)
        tensors[value] = tensors.pop(layer)
    if tensor is not None:
        tensors[layer] = tensor
    metadata["layers"] = json.dumps(layers)
    for key, text in (meta or {}).items():
        if text is None:
            metadata.pop(key)
        else:
            metadata[key] = text
    save_file(tensors, path, metadata=metadata)


_DELETE = object()
LAYER = "transformer.h.0.attn.c_attn"


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(field="level", value=float("nan")), r"'transformer.h.0.attn.c_attn'.*`level` must be a finite number in \[0, 100\], got nan"),
        (dict(field="level", value=-0.5), r"`level` must be a finite number in \[0, 100\], got -0.5"),
        (dict(field="level", value=101), r"`level` must be a finite number in \[0, 100\], got 101"),
        (dict(field="level", value="1"), r"`level` must be a finite number in \[0, 100\], got '1'"),
        (dict(field="t_inference", value=float("inf")), r"`t_inference` must be a finite number >= 0, got inf"),
        (dict(field="t_inference", value=-1.0), r"`t_inference` must be a finite number >= 0, got -1.0"),
        (dict(field="seed", value=-1), r"`seed` must be an int >= 0, got -1"),
        (dict(field="seed", value=1.5), r"`seed` must be an int >= 0, got 1.5"),
        (dict(field="seed", value=True), r"`seed` must be an int >= 0, got True"),
        (dict(field="seed", value=_DELETE), r"'transformer.h.0.attn.c_attn' lacks `seed`"),
        (dict(field="level", value=None), r"`level` must be a finite number in \[0, 100\], got None"),
        (dict(value="transformer.h.9.attn.c_attn"), r"layer\(s\) \['transformer.h.9.attn.c_attn'\] .*not analog layers of the model"),
        (dict(tensor=torch.zeros(100, dtype=torch.uint8)), r"generator state .* must be a 1-D uint8 tensor of 5056 bytes, got .*\[100\]"),
        (dict(tensor=torch.zeros(5056)), r"generator state .* must be a 1-D uint8 tensor of 5056 bytes, got torch.float32"),
        (dict(meta={"layers": "{not json"}), r"`layers` metadata is not valid JSON"),
        (dict(meta={"layers": "[1, 2]"}), r"`layers` metadata must map layer names to"),
        (dict(meta={"layers": None}), r"no `layers` metadata"),
        (dict(meta={"config": None}), r"no `config` metadata"),
        (dict(meta={"config": '{"level": -3}'}), r"`config`.*level"),
    ],
)  # fmt: skip
def test_bad_noise_state_is_refused_before_the_model_changes(tmp_path, change, match):
    path = _state_file(tmp_path)
    layer = None if "meta" in change else LAYER
    _rewrite(path, layer=layer, **change)
    model = _model(_config())
    with pytest.raises(ValueError, match=NOISE_STATE_NAME) as err:
        load_noise_state(model, tmp_path)
    assert err.match(match)
    # nothing was applied: levels, seeds and generators as patched
    assert all(
        lay.hf_cim_level == 1.0 and lay.hf_cim_state.seed == 3 and lay.hf_cim_state.generator is None
        for _, lay in hf_cim.patch.analog_layers(model)
    )


def test_unreadable_noise_state_file(tmp_path):
    (tmp_path / NOISE_STATE_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=f"{NOISE_STATE_NAME}.*not a readable safetensors file"):
        load_noise_state(_model(_config()), tmp_path)


def test_noise_state_callback_stops_a_resume_from_a_bad_state(full_run, tmp_path):
    shutil.copytree(full_run[0] / "checkpoint-2", tmp_path / "checkpoint-2")
    _rewrite(str(tmp_path / "checkpoint-2" / NOISE_STATE_NAME), layer=LAYER, field="level", value=float("nan"))
    with pytest.raises(ValueError, match=r"checkpoint-2.*`level` must be a finite number in \[0, 100\]"):
        _train(tmp_path, max_steps=4, resume=True)
