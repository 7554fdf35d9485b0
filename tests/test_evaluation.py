import csv
import math
import statistics

import pytest
import torch
from helpers import tiny_gpt2
from torch import nn
from transformers import Trainer, TrainingArguments

import hf_cim
from hf_cim.evaluation import RobustnessResult, evaluate_robustness, robustness_markdown
from hf_cim.noise import GaussianWeightNoise, OutputNoise


def _mlp(noise, **cfg):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return hf_cim.patch_model(model, hf_cim.AnalogNoiseConfig(noise=noise, **cfg))


X = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))


def _target(model):
    with torch.no_grad():
        return model(X)


def _mse_fn(target):
    @torch.no_grad()
    def evaluate(model):
        batches = [model(x) for x in X.split(16)]  # several batches on the same chip
        return {"mse": float(((torch.cat(batches) - target) ** 2).mean()), "batches": len(batches)}

    return evaluate


@pytest.fixture
def program_only():
    model = _mlp([GaussianWeightNoise(std=0.05)])
    with hf_cim.noise_disabled(model):
        target = _target(model)
    return model, _mse_fn(target)


def test_one_row_per_cell_in_order_with_stats(program_only):
    model, fn = program_only
    res = evaluate_robustness(
        model, fn, "mse", seeds=3, levels=(0.5, 1.0, 2.0), t_inference=(0.0, 3600.0), progress=False
    )
    assert [(r["level"], r["t_inference"]) for r in res.rows] == [
        (lv, t) for lv in (0.5, 1.0, 2.0) for t in (0.0, 3600.0)
    ]
    for r in res.rows:
        assert r["n_chips"] == len(r["values"]) == 3
        assert r["mean"] == pytest.approx(statistics.mean(r["values"]))
        assert r["std"] == pytest.approx(statistics.stdev(r["values"]))
        assert (r["min"], r["max"]) == (min(r["values"]), max(r["values"]))
        assert len(set(r["values"])) == 3  # three different chips
    # Additive weight noise: the error grows with the level (MSE ∝ level² for small noise).
    means = [r["mean"] for r in res.rows if r["t_inference"] == 0.0]
    assert means[0] < means[1] < means[2]
    assert means[2] / means[1] == pytest.approx(4.0, rel=0.25)
    # The digital baseline is the exact digital forward: zero error against the digital target.
    assert res.clean["mse"] == 0.0 and res.clean_value == 0.0 and res.seeds == [0, 1, 2]


def test_sweep_is_deterministic_and_same_chip_gives_same_metric(program_only):
    model, fn = program_only
    a = evaluate_robustness(model, fn, "mse", seeds=[5, 5, 6], levels=(1.0,), progress=False)
    b = evaluate_robustness(model, fn, "mse", seeds=[5, 5, 6], levels=(1.0,), progress=False)
    assert a.rows == b.rows
    v = a.rows[0]["values"]
    assert v[0] == v[1] != v[2]
    # Program once, evaluate twice: no read noise, so the same chip gives the same metric.
    hf_cim.program_chip(model, 5)
    model.eval()
    assert fn(model)["mse"] == fn(model)["mse"] == v[0]


def test_read_noise_is_reproducible_per_cell():
    model = _mlp([GaussianWeightNoise(std=0.05), OutputNoise(std=0.05)])
    with hf_cim.noise_disabled(model):
        fn = _mse_fn(_target(model))
    a = evaluate_robustness(model, fn, "mse", seeds=[1, 2], levels=(1.0, 2.0), progress=False)
    b = evaluate_robustness(model, fn, "mse", seeds=[2, 1], levels=(2.0,), progress=False)
    assert b.rows[0]["values"] == a.rows[1]["values"][::-1]  # a cell does not depend on what ran before


def test_level_zero_leaves_only_the_converters():
    model = _mlp([GaussianWeightNoise(std=0.05), OutputNoise(std=0.05)])
    with hf_cim.noise_disabled(model):
        fn = _mse_fn(_target(model))
    res = evaluate_robustness(model, fn, "mse", seeds=4, levels=(0.0, 1.0), progress=False)
    zero, one = res.rows
    assert zero["std"] == 0.0 and len(set(zero["values"])) == 1 and zero["mean"] > 0.0  # 8-bit quantization
    assert one["mean"] > zero["mean"]


def test_state_is_restored_and_noise_in_eval_off_is_overridden():
    model = _mlp([GaussianWeightNoise(std=0.05)], noise_in_eval=False, level=0.7)
    with hf_cim.noise_disabled(model):
        fn = _mse_fn(_target(model))
    model.train()
    x = X[:4]
    _ = model(x)  # create the training noise streams
    layers = [m for _, m in hf_cim.patch.analog_layers(model)]
    gens = [(m.hf_cim_state.generator, m.hf_cim_state.generator.get_state()) for m in layers]
    cfg = hf_cim.patch.get_config(model)

    res = evaluate_robustness(model, fn, "mse", seeds=2, levels=(1.0,), t_inference=(10.0,), progress=False)

    assert res.rows[0]["mean"] > 0.0  # noise was on although the config keeps eval digital
    assert all(m.training for m in model.modules())
    assert all(m.hf_cim_config is cfg and m.hf_cim_level == 0.7 for m in layers)
    assert all(not m.is_programmed and m.hf_cim_t_inference == 0.0 for m in layers)
    assert all(m.hf_cim_state.generator is g and torch.equal(g.get_state(), s) for m, (g, s) in zip(layers, gens))
    model.eval()
    with hf_cim.noise_disabled(model):
        digital = model(x)
    assert torch.equal(model(x), digital)  # noise_in_eval=False still holds after the sweep


def test_a_programmed_chip_is_kept(program_only):
    model, fn = program_only
    hf_cim.program_chip(model, 9, 5.0)
    chips = [m.hf_cim_state.chip for _, m in hf_cim.patch.analog_layers(model)]
    evaluate_robustness(model, fn, "mse", seeds=2, progress=False)
    assert all(
        m.hf_cim_state.chip is c and m.hf_cim_t_inference == 5.0
        for (_, m), c in zip(hf_cim.patch.analog_layers(model), chips)
    )


def test_files_round_trip_and_markdown(program_only, tmp_path):
    model, fn = program_only
    res = evaluate_robustness(
        model, fn, "mse", seeds=2, levels=(1.0, 2.0), t_inference=(0.0, 60.0), output_dir=str(tmp_path), progress=False
    )
    assert RobustnessResult.from_json(str(tmp_path / "robustness.json")) == res
    with open(tmp_path / "robustness.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 + 4 and rows[0]["level"] == "digital"
    assert [float(r["mean"]) for r in rows[1:]] == [r["mean"] for r in res.rows]
    assert [[float(v) for v in r["values"].split(";")] for r in rows[1:]] == [r["values"] for r in res.rows]
    png = (tmp_path / "robustness.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = res.to_markdown().splitlines()
    assert len(md) == 2 + 1 + 4 and md[2].startswith("| digital |")
    assert md[3].startswith(f"| 1 | 0 | {res.rows[0]['mean']:.4f} ± {res.rows[0]['std']:.4f} |")
    # the recipes' human-readable times come from the same renderer
    human = robustness_markdown(res.rows, "mse", res.clean_value, human_times=True).splitlines()
    assert human[0].startswith("| noise level | t_inference | mse") and human[2:4] == md[2:4]
    assert human[4].startswith(f"| 1 | 1min | {res.rows[1]['mean']:.4f}") and md[4].startswith("| 1 | 60 |")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"metric": "acc"}, KeyError, "`metric` 'acc'"),
        ({"seeds": 0}, ValueError, "`seeds`"),
        ({"seeds": [-1]}, ValueError, "`seeds`"),
        ({"levels": (-1.0,)}, ValueError, "`levels`"),
        ({"t_inference": ()}, ValueError, "`t_inference`"),
        ({"evaluate_fn": 3}, TypeError, "`evaluate_fn`"),
        ({"calibrate_chip": "affine"}, ValueError, "`calibrate_chip`"),
    ],
    ids=["metric", "seeds-zero", "seeds-negative", "levels", "times-empty", "evaluate-fn", "calibrate-chip"],
)
def test_validation(program_only, kwargs, error, match):
    model, fn = program_only
    args = {"evaluate_fn": fn, "metric": "mse", "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        evaluate_robustness(model, **args)


def test_each_chip_is_calibrated_after_programming_and_before_it_is_measured(program_only):
    """``calibrate_chip`` runs once per chip on the programmed chip; the correction it fits is what is measured (here
    the per-column affine correction, which lowers every chip's error against the digital outputs) and is gone after
    the sweep with the chip."""
    import functools

    from hf_cim.calibration import calibrate_chip_outputs

    model, fn = program_only
    plain = evaluate_robustness(model, fn, "mse", seeds=3, progress=False)
    calls = []

    def calibrate(m):
        calls.append(all(layer.is_programmed for _, layer in hf_cim.patch.analog_layers(m)))
        return functools.partial(calibrate_chip_outputs, batches=list(X.split(16)))(m)

    corrected = evaluate_robustness(model, fn, "mse", seeds=3, progress=False, calibrate_chip=calibrate)
    assert calls == [True, True, True]
    assert all(c < p for c, p in zip(corrected.rows[0]["values"], plain.rows[0]["values"]))
    assert corrected.clean == plain.clean
    assert all(layer.hf_cim_state.chip_correction is None for _, layer in hf_cim.patch.analog_layers(model))
    again = evaluate_robustness(model, fn, "mse", seeds=3, progress=False, calibrate_chip=calibrate)
    assert again.rows == corrected.rows


def test_unpatched_model_is_an_error():
    with pytest.raises(ValueError, match="no patched layer"):
        evaluate_robustness(nn.Linear(2, 2), lambda m: {"x": 0.0}, "x")


def test_with_a_trainer(tmp_path):
    model = tiny_gpt2(n_positions=16)
    hf_cim.patch_model(model, hf_cim.AnalogNoiseConfig(exclude_modules=["lm_head"]))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(0, 97, (16,), generator=g)), "labels": ids} for _ in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True, disable_tqdm=True
    )
    trainer = Trainer(model=model, args=args, eval_dataset=data)
    res = evaluate_robustness(model, trainer, "eval_loss", seeds=2, levels=(1.0, 4.0), progress=False)
    assert len(res.rows) == 2 and all(math.isfinite(v) for r in res.rows for v in r["values"])
    # An untrained model is near-uniform, so noise moves its loss either way: check the cells are distinct chips.
    values = [v for r in res.rows for v in r["values"]]
    assert len(set(values)) == 4 and res.clean["eval_loss"] not in values
    with hf_cim.noise_disabled(model):
        assert trainer.evaluate()["eval_loss"] == res.clean["eval_loss"]
    other = Trainer(model=tiny_gpt2(), args=args, eval_dataset=data)
    with pytest.raises(ValueError, match="Trainer's `model`"):
        evaluate_robustness(model, other, "eval_loss", seeds=1, progress=False)


def test_trackers_get_one_clean_record_and_one_per_cell_summary(tmp_path):
    """With a Trainer, the chip evaluations log nothing; one record after the sweep holds every cell under its own
    key: no cloud of repeated eval_loss points at one step for TensorBoard / W&B."""
    from transformers import TrainerCallback

    class Tracker(TrainerCallback):  # what a reporting integration's on_log receives
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    model = tiny_gpt2(n_positions=16)
    hf_cim.patch_model(model, hf_cim.AnalogNoiseConfig(exclude_modules=["lm_head"]))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(0, 97, (16,), generator=g)), "labels": ids} for _ in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True, disable_tqdm=True
    )
    tracker = Tracker()
    trainer = Trainer(model=model, args=args, callbacks=[tracker])
    res = evaluate_robustness(
        model, trainer, "eval_loss", seeds=2, levels=(1.0, 2.0), t_inference=(0.0, 86400.0), progress=False,
        evaluate_kwargs={"eval_dataset": data},
    )  # fmt: skip
    assert trainer.state.log_history == [{**r, "step": 0} for r in tracker.logs]
    assert len(tracker.logs) == 2
    clean, summary = tracker.logs
    assert clean["eval_loss"] == res.clean["eval_loss"]
    assert not any(k.startswith("eval_") for k in summary)
    summary.pop("epoch", None)  # Trainer.log adds it
    expected = {}
    for r in res.rows:
        key = f"chip/level_{r['level']:g}/t_{'0' if r['t_inference'] == 0 else '1d'}/loss"
        expected[key], expected[f"{key}_std"] = r["mean"], r["std"]
    assert summary == expected and "chip/level_2/t_1d/loss" in summary
    assert "log" not in vars(trainer)  # trainer.log is the class's again

    # log_prefix=None: every evaluation logs as Trainer does (1 + 2 x 2 x 2), no summary
    tracker.logs.clear()
    evaluate_robustness(
        model, trainer, "eval_loss", seeds=2, levels=(1.0, 2.0), t_inference=(0.0, 86400.0), progress=False,
        evaluate_kwargs={"eval_dataset": data}, log_prefix=None,
    )  # fmt: skip
    assert len(tracker.logs) == 9 and all("eval_loss" in r for r in tracker.logs)
    with pytest.raises(ValueError, match="`evaluate_kwargs`"):
        evaluate_robustness(model, lambda m: {"x": 1.0}, "x", evaluate_kwargs={"eval_dataset": data})
