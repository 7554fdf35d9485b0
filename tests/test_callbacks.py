import json
import math

import pytest
import torch
from helpers import fresh_resident_memory, lm_samples, patched_gpt2, stack_batch, tiny_gpt2, tiny_training_args
from transformers import Trainer, TrainerCallback, TrainingArguments

import hf_cim
from hf_cim.callbacks import (
    DigitalWarmupCallback,
    GradientAlignmentCallback,
    NoiseLevelCallback,
    PeakMemoryCallback,
    add_callbacks,
)

SEQ, VOCAB = 16, 97


def _data(n=64, seed=0):
    return lm_samples(n, SEQ, VOCAB, seed)


def _probe(data, n=4):
    return stack_batch(data, n)


def _patched(**cfg):
    return patched_gpt2(SEQ, **cfg)


def _trainer(model, tmp_path, callbacks, max_steps=6, logging_steps=2, hf=(), **kw):
    """A Trainer with ``callbacks`` given as usual and the hf_cim callbacks ``hf`` added with add_callbacks."""
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=max_steps,
        logging_steps=logging_steps,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=7,
        **kw,
    )
    return add_callbacks(Trainer(model=model, args=args, train_dataset=_data(), callbacks=callbacks), *hf)


class Spy(TrainerCallback):
    """Stands for a reporting integration listed before the hf_cim callbacks."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class Ballast(TrainerCallback):
    """Holds `mib` MiB of fresh resident memory from step `at` on."""

    def __init__(self, at, mib):
        self.at, self.mib, self.tensor = at, mib, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            self.tensor = fresh_resident_memory(self.mib)


MEMORY_KEYS = ("peak_memory_mb", "peak_memory_growth_mb", "step_time_s", "samples_per_second", "tokens_per_second")


# -- PeakMemoryCallback ---------------------------------------------------------------------------------------------
def test_peak_memory_reaches_log_history_integrations_and_json(tmp_path):
    spy = Spy()
    cb = PeakMemoryCallback(tokens_per_sample=SEQ)
    trainer = _trainer(_patched(), tmp_path, [spy, Ballast(at=3, mib=200)], hf=[cb])
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("PeakMemoryCallback") < names.index("Spy")
    trainer.train()

    records = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        for key in MEMORY_KEYS:
            assert key in r and math.isfinite(r[key]) and r[key] > 0 or key == "peak_memory_growth_mb", (key, r)
        # The growth can be 0 in a window whose steps reuse memory freed earlier in the process (other tests):
        # the peak RSS then never passes the RSS at the start.
        assert math.isfinite(r["peak_memory_growth_mb"]) and r["peak_memory_growth_mb"] >= 0, r
        # throughput = samples / time and step time = time / steps: samples_per_second · step_time = batch size
        assert r["samples_per_second"] * r["step_time_s"] == pytest.approx(8, rel=1e-3)
        assert r["tokens_per_second"] == pytest.approx(r["samples_per_second"] * SEQ, rel=1e-5)
    # The integration listed before the callback saw the same values.
    spied = [r for r in spy.logs if "loss" in r]
    assert [{k: r[k] for k in MEMORY_KEYS} for r in spied] == [{k: r[k] for k in MEMORY_KEYS} for r in records]
    # The 200 MiB tensor held from step 4 on shows in the peak of the window (3, 4] and later, not before.
    assert records[1]["peak_memory_mb"] >= records[0]["peak_memory_mb"] + 150
    assert records[1]["peak_memory_growth_mb"] >= 150 > records[0]["peak_memory_growth_mb"]

    summary = json.loads((tmp_path / "out" / "hf_cim_memory.json").read_text())
    assert summary == cb.summary
    assert summary["world_size"] == 1 and summary["steps"] == 6 and summary["device"] == "cpu"
    # logged values are rounded to 6 decimals, the summary is not
    assert summary["peak_memory_mb"] >= max(r["peak_memory_mb"] for r in records) - 1e-6
    assert summary["peak_memory_mb"] >= summary["start_memory_mb"]
    assert summary["peak_memory_growth_mb"] == pytest.approx(summary["peak_memory_mb"] - summary["start_memory_mb"])
    assert summary["samples_per_second"] * summary["mean_step_time_s"] == pytest.approx(8, rel=1e-6)
    assert summary["tokens_per_second"] == pytest.approx(summary["samples_per_second"] * SEQ)
    assert [r["rank"] for r in summary["ranks"]] == [0]


def test_peak_memory_output_dir_and_callback_added_after_init(tmp_path):
    spy = Spy()
    trainer = _trainer(_patched(), tmp_path, [spy], max_steps=2, logging_steps=1)
    add_callbacks(trainer, PeakMemoryCallback(output_dir=str(tmp_path / "elsewhere")))
    trainer.train()
    assert "peak_memory_mb" in spy.logs[0] and "tokens_per_second" not in spy.logs[0]
    assert (tmp_path / "elsewhere" / "hf_cim_memory.json").exists()
    assert not (tmp_path / "out" / "hf_cim_memory.json").exists()


def test_peak_memory_rejects_bad_tokens_per_sample():
    with pytest.raises(ValueError, match="`tokens_per_sample`"):
        PeakMemoryCallback(tokens_per_sample=0)


# -- gradient alignment ---------------------------------------------------------------------------------------------
def test_gradient_alignment_callback_does_not_change_training(tmp_path):
    data = _data()
    runs = []
    for with_probe in (False, True):
        spy = Spy()
        hf = [GradientAlignmentCallback(_probe(data), every_n_steps=2)] if with_probe else []
        trainer = _trainer(_patched(), tmp_path / str(with_probe), [spy], max_steps=4, hf=hf)
        trainer.train()
        runs.append((trainer, spy))
    (plain, _), (probed, spy) = runs
    for (n, p), (_, q) in zip(plain.model.named_parameters(), probed.model.named_parameters()):
        assert torch.equal(p, q), n
    records = [r for r in probed.state.log_history if "loss" in r]
    assert len(records) == 2  # steps 2 and 4: the loops below check something
    assert [r["loss"] for r in records] == [r["loss"] for r in plain.state.log_history if "loss" in r]
    assert all(0.9 < r["grad_cosine"] <= 1.0 for r in records)
    assert all(f"grad_cosine/{n}" in records[0] for n, _ in hf_cim.patch.analog_layers(probed.model))
    assert "grad_cosine" in [r for r in spy.logs if "loss" in r][0]


def test_gradient_alignment_callback_validates():
    with pytest.raises(ValueError, match="`every_n_steps`"):
        GradientAlignmentCallback({"input_ids": torch.zeros(1, 2, dtype=torch.long)}, every_n_steps=0)
    with pytest.raises(ValueError, match="`probe_batch`"):
        GradientAlignmentCallback({}, every_n_steps=1)


# -- noise level schedules ------------------------------------------------------------------------------------------
def test_ramp_goes_linearly_from_zero_to_target():
    cb = NoiseLevelCallback(target_level=2.0, warmup_ratio=0.5)
    assert [cb.level_at(s, 10) for s in range(10)] == pytest.approx([0.0, 0.4, 0.8, 1.2, 1.6, 2, 2, 2, 2, 2])
    assert NoiseLevelCallback(1.5).level_at(0, 10) == 1.5


def test_level_sampling_is_uniform_in_range_and_seeded():
    cb = NoiseLevelCallback(target_level=2.0, sample_range=(0.5, 1.5), seed=3)
    levels = [cb.level_at(s, 4000) for s in range(4000)]
    assert min(levels) >= 1.0 and max(levels) <= 3.0
    assert sum(levels) / len(levels) == pytest.approx(2.0, abs=0.03)  # mean of U(1, 3); std of the mean 0.009
    var = sum((v - 2.0) ** 2 for v in levels) / len(levels)
    assert var == pytest.approx(4 / 12, rel=0.05)  # (3 - 1)² / 12
    assert levels == [NoiseLevelCallback(2.0, sample_range=(0.5, 1.5), seed=3).level_at(s, 4000) for s in range(4000)]
    assert levels[:20] != [
        NoiseLevelCallback(2.0, sample_range=(0.5, 1.5), seed=4).level_at(s, 4000) for s in range(20)
    ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_level": -1.0}, "`target_level`"),
        ({"target_level": 1.0, "warmup_ratio": 1.5}, "`warmup_ratio`"),
        ({"target_level": 1.0, "sample_range": (2.0, 1.0)}, r"`sample_range\[1\]`"),
        ({"target_level": 1.0, "sample_range": (1.0,)}, "`sample_range`"),
        ({"target_level": 60.0, "sample_range": (1.0, 2.0)}, "largest level 100"),
        ({"target_level": 1.0, "seed": -1}, "`seed`"),
    ],
    ids=["target", "warmup", "range-order", "range-shape", "range-too-high", "seed"],
)
def test_noise_level_callback_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseLevelCallback(**kwargs)


def test_noise_level_callback_sets_the_level_of_each_training_step(tmp_path):
    model = _patched()
    layer = dict(hf_cim.patch.analog_layers(model))["transformer.h.0.mlp.c_fc"]
    seen = []
    layer.register_forward_pre_hook(lambda m, _: seen.append(m.hf_cim_level) if m.training else None)
    cb = NoiseLevelCallback(target_level=1.5, warmup_ratio=0.5, sample_range=(0.5, 1.0), seed=1)
    trainer = _trainer(model, tmp_path, [], max_steps=6, logging_steps=3, hf=[cb])
    trainer.train()
    expected = [cb.level_at(s, 6) for s in range(6)]
    assert seen == pytest.approx(expected) and expected[0] == 0.0 and expected[-1] > 0.0
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["noise_level"] for r in records] == pytest.approx([sum(expected[:3]) / 3, sum(expected[3:]) / 3])
    assert all(m.hf_cim_level == 1.5 for _, m in hf_cim.patch.analog_layers(model))


def test_all_callbacks_end_to_end(tmp_path):
    data = _data()
    spy = Spy()
    hf = [
        GradientAlignmentCallback(_probe(data), every_n_steps=2),
        NoiseLevelCallback(1.0, warmup_ratio=0.3),
        PeakMemoryCallback(tokens_per_sample=SEQ),
    ]
    trainer = _trainer(_patched(), tmp_path, [spy], max_steps=4, hf=hf)
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names[:3] == ["PeakMemoryCallback", "NoiseLevelCallback", "GradientAlignmentCallback"]
    trainer.train()
    metrics = trainer.evaluate(eval_dataset=data[:8])
    assert math.isfinite(metrics["eval_loss"])
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in records] == [2, 4]  # the loop below checks something
    for r in records:
        assert {"grad_cosine", "noise_level", *MEMORY_KEYS} <= set(r)
    assert (tmp_path / "out" / "hf_cim_memory.json").exists()


# -- order in the Trainer's callback list, without reading the call stack ------------------------------------------
def _fake_integration():
    """A real transformers reporting integration class (TensorBoard's), with its writer replaced by a spy."""
    from transformers.integrations import TensorBoardCallback

    class FakeTensorBoard(TensorBoardCallback):
        def __init__(self):  # no tensorboard package needed
            self.logs = []

        def on_train_begin(self, *args, **kwargs):
            pass

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

        def on_train_end(self, *args, **kwargs):
            pass

    return FakeTensorBoard()


def test_add_callbacks_puts_hf_cim_ahead_of_a_real_integration(tmp_path, caplog):
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

    tb = _fake_integration()
    trainer = _trainer(_patched(), tmp_path, [tb], max_steps=2, logging_steps=1)
    assert isinstance(trainer.callback_handler, CallbackHandler)
    state_cb = hf_cim.callbacks.NoiseStateCallback()
    out = add_callbacks(trainer, NoiseLevelCallback(1.0), state_cb, PeakMemoryCallback())
    assert out is trainer
    cbs = trainer.callback_handler.callbacks
    names = [type(c).__name__ for c in cbs]
    assert names[:3] == ["PeakMemoryCallback", "NoiseLevelCallback", "DefaultFlowCallback"]
    assert isinstance(cbs[2], DefaultFlowCallback) and cbs[-1] is state_cb  # the others: appended as usual
    with caplog.at_level("WARNING", logger="hf_cim.callbacks"):
        trainer.train()
    assert not [r for r in caplog.records if "integration" in r.getMessage()]
    seen = [r for r in tb.logs if "loss" in r]
    assert seen and all({"noise_level", "peak_memory_mb"} <= set(r) for r in seen)
    with pytest.raises(ValueError, match="already"):
        add_callbacks(trainer, state_cb)
    with pytest.raises(TypeError, match="instances"):
        add_callbacks(trainer, PeakMemoryCallback)


def test_warns_when_a_callback_ends_up_behind_an_integration(tmp_path, caplog):
    # added with add_callbacks, then an integration is put in front of it: the place is checked at train begin
    cb = PeakMemoryCallback()
    trainer = _trainer(_patched(), tmp_path / "a", [], max_steps=1, logging_steps=1, hf=[cb])
    tb = _fake_integration()
    trainer.callback_handler.callbacks.insert(0, tb)
    with caplog.at_level("WARNING", logger="hf_cim.callbacks"):
        trainer.train()
    msgs = [r.getMessage() for r in caplog.records]
    assert any("PeakMemoryCallback runs after the reporting integration(s) ['FakeTensorBoard']" in m for m in msgs)
    assert "peak_memory_mb" not in tb.logs[0] and "peak_memory_mb" in trainer.state.log_history[0]

    # given to Trainer(callbacks=...) while report_to names an integration: a warning pointing to add_callbacks
    caplog.clear()
    trainer = _trainer(_patched(), tmp_path / "b", [NoiseLevelCallback(1.0)], max_steps=1, logging_steps=1)
    trainer.args.report_to = ["tensorboard"]
    trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("NoiseLevelCallback was not added with hf_cim.callbacks.add_callbacks" in m for m in msgs)
    assert any("['tensorboard']" in m for m in msgs)


def test_input_range_callback_keeps_static_ranges_calibrated(tmp_path):
    from transformers import Trainer, default_data_collator

    from hf_cim.calibration import calibrate_input_ranges
    from hf_cim.callbacks import InputRangeCallback

    model = tiny_gpt2()
    hf_cim.patch_model(model, hf_cim.get_preset("pcm", input_quant="static", seed=0))
    samples = lm_samples(16)
    calib = [default_data_collator(samples[:4])]
    seen = []

    class Spy(InputRangeCallback):
        def _calibrate(self, model):
            super()._calibrate(model)
            seen.append(dict(hf_cim.patch.get_config(model).input_ranges))

    trainer = Trainer(model=model, args=tiny_training_args(tmp_path, max_steps=4), train_dataset=samples,
                      callbacks=[Spy(calib, every=2)])  # fmt: skip
    trainer.train()
    assert len(seen) == 4  # train begin, steps 2 and 4, train end
    assert seen[0] != seen[1]  # the weights moved, the ranges followed
    final = dict(hf_cim.patch.get_config(model).input_ranges)
    assert final == seen[-1] == calibrate_input_ranges(model, calib)  # deterministic: same weights, same ranges
    with pytest.raises(ValueError, match="every"):
        InputRangeCallback(calib, every=0)
    with pytest.raises(ValueError, match="empty"):
        InputRangeCallback([])


def test_output_range_callback_follows_the_static_dac_it_is_added_after(tmp_path):
    """Both callbacks on a static DAC: the ADC's ranges are calibrated after the DAC's at each point (the order
    added), four times, and end as a fresh calibration of the final weights gives them."""
    from transformers import Trainer, default_data_collator

    from hf_cim.calibration import calibrate_input_ranges, calibrate_output_ranges
    from hf_cim.callbacks import InputRangeCallback, OutputRangeCallback

    model = tiny_gpt2()
    hf_cim.patch_model(model, hf_cim.get_preset("rram", input_quant="static", seed=0))
    samples = lm_samples(16)
    calib = [default_data_collator(samples[:4])]
    order = []

    class InputSpy(InputRangeCallback):
        def _calibrate(self, model):
            super()._calibrate(model)
            order.append("input")

    class OutputSpy(OutputRangeCallback):
        def _calibrate(self, model):
            super()._calibrate(model)
            order.append("output")

    callbacks = [InputSpy(calib, every=2), OutputSpy(calib, every=2, alpha=6.0)]
    trainer = Trainer(model=model, args=tiny_training_args(tmp_path, max_steps=4), train_dataset=samples,
                      callbacks=callbacks)  # fmt: skip
    trainer.train()
    assert order == ["input", "output"] * 4
    cfg = hf_cim.patch.get_config(model)
    final = dict(cfg.output_ranges)
    calibrate_input_ranges(model, calib)
    assert final == calibrate_output_ranges(model, calib, alpha=6.0)
    assert OutputRangeCallback(calib).alpha == 6.0
    with pytest.raises(ValueError, match="OutputRangeCallback: `alpha`"):
        OutputRangeCallback(calib, alpha=0.0)


def test_weight_clip_callback_clips_after_every_step(tmp_path):
    from transformers import Trainer

    from hf_cim.callbacks import WeightClipCallback

    model = tiny_gpt2()
    hf_cim.patch_model(model, hf_cim.AnalogNoiseConfig(noise=[], seed=0))
    steps = []

    class Spy(WeightClipCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            layers = [layer for _, layer in hf_cim.patch.analog_layers(model)]
            expected = []
            for layer in layers:  # the weights the optimizer left, clamped to 1.5 std of their channel
                w = layer.weight_oi(layer.weight.detach()).clone()
                bound = 1.5 * w.std(dim=1, keepdim=True, correction=0)
                expected.append((torch.maximum(torch.minimum(w, bound), -bound), bool((w.abs() > bound).any())))
            super().on_step_end(args, state, control, model=model, **kwargs)
            steps.append(all(torch.equal(layer.weight_oi(layer.weight.detach()), e) for layer, (e, _) in
                             zip(layers, expected)) and any(c for _, c in expected))  # fmt: skip

    trainer = Trainer(model=model, args=tiny_training_args(tmp_path, max_steps=3, learning_rate=0.05),
                      train_dataset=lm_samples(16), callbacks=[Spy(1.5)])  # fmt: skip
    trainer.train()
    assert steps == [True, True, True]  # clipped every step, and something to clip each time
    with pytest.raises(ValueError, match="sigmas"):
        WeightClipCallback(0.0)
    with pytest.raises(ValueError, match="start_ratio"):
        WeightClipCallback(2.5, start_ratio=1.0)


def test_weight_clip_starts_with_the_first_noise_aware_step(tmp_path):
    """With the digital warm-up's ratio as start_ratio (4 steps at 0.5: steps 0-1 digital), steps 0-1 leave the
    optimizer's weights as they are and steps 2-3 clip them."""
    from transformers import Trainer

    from hf_cim.callbacks import DigitalWarmupCallback, WeightClipCallback

    model = tiny_gpt2()
    hf_cim.patch_model(model, hf_cim.AnalogNoiseConfig(noise=[], seed=0))
    clipped = []

    class Spy(WeightClipCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            layers = [layer for _, layer in hf_cim.patch.analog_layers(model)]
            before = [layer.weight.detach().clone() for layer in layers]
            super().on_step_end(args, state, control, model=model, **kwargs)
            clipped.append(any(not torch.equal(b, layer.weight.detach()) for b, layer in zip(before, layers)))

    trainer = Trainer(model=model, args=tiny_training_args(tmp_path, max_steps=4, learning_rate=0.05),
                      train_dataset=lm_samples(16), callbacks=[DigitalWarmupCallback(0.5), Spy(1.5, start_ratio=0.5)])  # fmt: skip
    trainer.train()
    assert clipped == [False, False, True, True]


def test_digital_warmup_runs_the_first_steps_digitally_and_the_rest_on_the_chip(tmp_path):
    # 6 steps at ratio 0.5: steps 0-2 digital (the exact digital forward), 3-5 analog; between steps analog.
    model = _patched()
    layer = dict(hf_cim.patch.analog_layers(model))["transformer.h.0.mlp.c_fc"]
    seen = []
    layer.register_forward_pre_hook(lambda m, _: seen.append(m.hf_cim_disabled) if m.training else None)
    cb = DigitalWarmupCallback(ratio=0.5)
    trainer = _trainer(model, tmp_path, [], max_steps=6, hf=[cb])
    trainer.train()
    assert seen == [True, True, True, False, False, False]
    assert not any(m.hf_cim_disabled for _, m in hf_cim.patch.analog_layers(model))
    assert DigitalWarmupCallback(0.25).digital_steps(1000) == 250 and DigitalWarmupCallback(0.0).digital_steps(9) == 0


def test_digital_warmup_trains_the_digital_model_during_its_steps(tmp_path):
    # Over steps it runs digitally the patched model trains exactly as the unpatched one (same seed, data, steps).
    plain = tiny_gpt2(n_positions=SEQ)
    _trainer(plain, tmp_path / "plain", [_StopAfter(3)], max_steps=4).train()  # the same schedule: 4 steps
    patched = _patched()
    cb = DigitalWarmupCallback(ratio=0.75)  # 3 of 4 steps digital: stop after 3
    trainer = _trainer(patched, tmp_path / "patched", [], max_steps=4, hf=[cb])
    trainer.add_callback(_StopAfter(3))
    trainer.train()
    for (name, p), q in zip(plain.named_parameters(), patched.parameters()):
        assert torch.equal(p, q), name


class _StopAfter(TrainerCallback):
    def __init__(self, steps):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True


@pytest.mark.parametrize("ratio", [-0.1, 1.0, float("nan"), "0.5"], ids=str)
def test_digital_warmup_validates(ratio):
    with pytest.raises((ValueError, TypeError), match="DigitalWarmupCallback.*`ratio`"):
        DigitalWarmupCallback(ratio)


def test_digital_warmup_restores_the_chip_before_other_callbacks_step_end(tmp_path):
    # A callback placed ahead of it (as add_callbacks places the logging ones) sees the analog model at step end.
    class Seen(TrainerCallback):
        def __init__(self):
            self.disabled = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.disabled.append(any(m.hf_cim_disabled for _, m in hf_cim.patch.analog_layers(model)))

    seen = Seen()
    trainer = _trainer(_patched(), tmp_path, [seen], max_steps=4, hf=[DigitalWarmupCallback(ratio=0.5)])
    assert trainer.callback_handler.callbacks.index(seen) < len(trainer.callback_handler.callbacks) - 1
    trainer.train()
    assert seen.disabled == [False, False, False, False]
