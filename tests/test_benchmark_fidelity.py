"""benchmarks/fidelity.py: parsing, pairing and the recovered share, on a few steps of the digits CNN."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
pytest.importorskip("sklearn")

import fidelity  # noqa: E402

import hf_cim  # noqa: E402


def test_conditions_and_times():
    c = fidelity.Condition.parse("pcm_drift:2@1d")
    assert (c.preset, c.level, c.t, c.label) == ("pcm_drift", 2.0, 86400.0, "pcm_drift L2 @1d")
    assert fidelity.Condition.parse("paper:3").t == 0.0
    assert fidelity.seconds("1y") == 365 * 86400 and fidelity.seconds("3600") == 3600.0
    assert fidelity.human_time(3600.0) == "1h" and fidelity.human_time(90.0) == "90s"
    with pytest.raises(ValueError, match="not a condition"):
        fidelity.Condition.parse("pcm@1d")
    with pytest.raises(ValueError, match="unknown mode"):
        fidelity.mode_config("ste_magic", c, 0, None)


def test_fine_tuning_modes_name_their_digital_share():
    assert fidelity.split_mode("ste_hw", 0.75) == (0.0, "ste_hw")
    assert fidelity.split_mode("ft_ste_hw", 0.75) == (0.75, "ste_hw")
    assert fidelity.split_mode("ft50_full", 0.75) == (0.5, "full")
    assert fidelity.split_mode("ste_hw_clip", 0.75) == (0.0, "ste_hw_clip")
    assert fidelity.split_mode("ft_ste_hw_clip", 0.75) == (0.75, "ste_hw_clip")
    assert fidelity.split_mode("ft_ste_hw_cal", 0.75) == (0.75, "ste_hw_cal")
    cal = fidelity.mode_config("ft_ste_hw_cal", fidelity.Condition.parse("paper:3"), 0, None)
    assert cal.train_output_correction == "affine" and cal.gradient == "ste" and cal.mask_saturated
    assert (
        fidelity.mode_config("ft_ste_hw", fidelity.Condition.parse("paper:3"), 0, None).train_output_correction is None
    )
    chain = fidelity.mode_config("ft50_ste_hw_chain_clip", fidelity.Condition.parse("paper:3"), 0, None)
    assert chain.program_gradient and chain.mask_saturated and chain.backward_weights == "programmed"
    assert not fidelity.mode_config("ft_ste_hw", fidelity.Condition.parse("paper:3"), 0, None).program_gradient
    for bad in ("ft_digital", "ft5x_ste", "ft123_ste", "ft_", "digital_clip", "magic_clip"):
        with pytest.raises(ValueError, match="unknown mode"):
            fidelity.split_mode(bad, 0.75)


def test_restarted_schedule_gives_the_noise_aware_phase_its_own_warm_up_and_cosine():
    import math

    steps, warmup = 100, 10
    single = [fidelity.lr_factor(s, steps, warmup) for s in range(steps)]
    assert single[0] == 0.1 and single[9] == 1.0 and single[10] == 1.0
    assert single[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    # without a restart a digital start changes nothing: the noise-aware steps take the single schedule's tail
    assert [fidelity.lr_factor(s, steps, warmup, 75) for s in range(steps)] == single
    assert max(single[75:]) < 1 / 5
    restarted = [fidelity.lr_factor(s, steps, warmup, 75, restart=0.5) for s in range(steps)]
    # the digital phase: warm-up, then a cosine that reaches zero at the switch (step 75 of 100)
    assert restarted[:10] == single[:10]
    assert restarted[40] == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 65)))
    assert restarted[74] == pytest.approx(0.5 * (1 + math.cos(math.pi * 64 / 65)))
    # the noise-aware phase (25 steps): warm-up over 2 steps (a tenth of it) to 0.5 x the peak, cosine to zero
    assert restarted[75:78] == pytest.approx([0.25, 0.5, 0.5])
    assert restarted[99] == pytest.approx(0.25 * (1 + math.cos(math.pi * 22 / 23)))
    assert fidelity.lr_factor(80, steps, warmup, 0, restart=0.5) == single[80]  # no digital start: no restart


def test_restart_lr_is_part_of_a_noise_aware_run_key_only(tmp_path, monkeypatch):
    out = tmp_path / "fid"
    argv = ["--setting", "digits", "--train", "pcm:1", "--modes", "digital,ft50_ste_hw", "--seeds", "0", "--chips",
            "1", "--steps", "4", "--batch_size", "8", "--eval", "pcm:1", "--keep_models", "--out", str(out),
            "--threads", "1"]  # fmt: skip
    fidelity.main(argv)
    trained, factors = [], []
    real_train = fidelity.train
    monkeypatch.setattr(fidelity, "train", lambda setting, mode, seed, args, starts=None: trained.append(mode)
                        or real_train(setting, mode, seed, args, starts))  # fmt: skip
    real_factor = fidelity.lr_factor
    monkeypatch.setattr(fidelity, "lr_factor", lambda *a, **k: factors.append((a, k)) or real_factor(*a, **k))
    fidelity.main([*argv, "--restart_lr", "0.5"])
    assert trained == ["ft50_ste_hw"]  # the digital model is reused: its training has no second phase
    # every step of the run asks with the restart (the phase's own schedule is a nested call without one)
    assert {a[4] if len(a) > 4 else k.get("restart") for a, k in factors if len(a) > 3} == {0.5}
    kept = torch.load(out / "runs" / "ft50_ste_hw_seed0.pt", weights_only=True)
    assert kept["key"]["restart_lr"] == 0.5
    with pytest.raises(SystemExit):
        fidelity.main([*argv, "--restart_lr", "0"])


def test_shared_digital_start_gives_the_same_models_for_a_quarter_of_the_steps(tmp_path, monkeypatch):
    """--share_digital_start: the ft_ modes resume from the digital run's state at their switch to noise; their
    models, results and logged losses equal those of the runs that train their digital steps themselves."""
    argv = ["--setting", "digits", "--train", "pcm:1", "--modes", "digital,ft50_ste_hw,ft75_ste_hw", "--seeds", "0",
            "--chips", "1", "--steps", "8", "--batch_size", "8", "--eval", "pcm:1", "--keep_models",
            "--threads", "1"]  # fmt: skip
    alone = fidelity.main([*argv, "--out", str(tmp_path / "alone")])
    steps = []
    real_loss = fidelity.Digits.loss
    monkeypatch.setattr(
        fidelity.Digits, "loss", lambda self, model, idx: steps.append(1) or real_loss(self, model, idx)
    )
    shared = fidelity.main([*argv, "--share_digital_start", "--out", str(tmp_path / "shared")])
    assert len(steps) == 8 + 4 + 2  # the digital run, then each ft_ mode's noise-aware steps alone
    for table in (shared, alone):
        for row in table.values():
            row.pop("step_time_s")  # (wall time: the one thing that differs)
    assert json.dumps(shared) == json.dumps(alone)
    digital = torch.load(tmp_path / "shared" / "runs" / "digital_seed0.pt", weights_only=True)["state_dict"]
    for mode in ("ft50_ste_hw", "ft75_ste_hw"):
        a, b = (torch.load(tmp_path / d / "runs" / f"{mode}_seed0.pt", weights_only=True) for d in ("alone", "shared"))
        assert a["key"] == b["key"] and a["info"]["train_loss_last10pct"] == b["info"]["train_loss_last10pct"]
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
        assert not all(torch.equal(a["state_dict"][k], digital[k]) for k in digital)  # (noise-aware steps ran)
    kept = torch.load(tmp_path / "shared" / "runs" / "digital_start_seed0_step6.pt", weights_only=True)
    assert kept["key"]["step"] == 6 and "train" not in kept["key"] and len(kept["losses"]) == 6
    # a chip that keeps a layer digital (--exclude) does not change the digital training: the kept digital model is
    # measured again untrained, and the ft_ mode resumes from the kept start (only its 4 noise-aware steps train)
    runs = {"digital": json.load(open(tmp_path / "shared" / "runs" / "digital_seed0.json"))["result"]["chips"]}
    steps.clear()
    ex = [*argv, "--share_digital_start", "--exclude", "17", "--out", str(tmp_path / "shared")]
    excluded = fidelity.main([*ex[: ex.index("--modes") + 1], "digital,ft50_ste_hw", *ex[ex.index("--modes") + 2 :]])
    assert len(steps) == 4
    assert excluded["digital"]["clean"] == shared["digital"]["clean"]
    run = json.load(open(tmp_path / "shared" / "runs" / "digital_seed0.json"))
    assert run["args"]["exclude"] == ["17"]
    assert run["result"]["chips"]["pcm L1"] != runs["digital"]["pcm L1"]  # (measured with the last layer digital)
    # a start kept by another digital training (another learning rate) is not taken: the ft_ mode trains it all
    monkeypatch.setattr(fidelity.Digits, "loss", real_loss)
    lr = [*argv, "--lr", "1e-3", "--share_digital_start", "--out", str(tmp_path / "shared")]
    fidelity.main([*lr[: lr.index("--modes") + 1], "ft50_ste_hw", *lr[lr.index("--modes") + 2 :]])
    assert (
        torch.load(tmp_path / "shared" / "runs" / "digital_start_seed0_step4.pt", weights_only=True)["key"]["lr"]
        == 1e-3
    )
    with pytest.raises(SystemExit):
        fidelity.main([*argv, "--share_digital_start", "--restart_lr", "0.5", "--out", str(tmp_path / "x")])


def test_training_level_prefix_sets_the_level_trained_at():
    c = fidelity.Condition.parse("pcm:1")
    assert fidelity.split_level("at0.5_ste_hw") == (0.5, "ste_hw")
    assert fidelity.split_level("ste_hw") == (None, "ste_hw")
    assert fidelity.split_mode("at2_ft50_ste_hw", 0.75) == (0.5, "ste_hw")
    assert fidelity.mode_config("at0.5_ste_hw", c, 0, None).level == 0.5
    assert fidelity.mode_config("at0_ste_hw", c, 0, None).level == 0.0
    assert fidelity.mode_config("ste_hw", c, 0, None).level == 1.0
    for bad in ("at0.5_digital", "atx_ste_hw", "at0.5_magic"):
        with pytest.raises(ValueError, match="unknown mode"):
            fidelity.split_mode(bad, 0.75)


def test_paired_runs_same_init_and_chips(tmp_path):
    out = tmp_path / "fid"
    argv = ["--setting", "digits", "--train", "pcm:1", "--modes", "digital,ste_hw,ft_ste_hw_clip", "--seeds", "0,1",
            "--chips", "2", "--steps", "6", "--batch_size", "8", "--eval", "pcm:1,pcm_drift:1@1h", "--out", str(out),
            "--threads", "1"]  # fmt: skip
    table = fidelity.main(argv)
    assert set(table) == {"digital", "ste_hw", "ft_ste_hw_clip"}
    runs = {f: json.load(open(out / "runs" / f)) for f in os.listdir(out / "runs")}
    assert len(runs) == 6
    d0 = runs["digital_seed0.json"]["result"]
    assert len(d0["chips"]["pcm L1"]) == 2 and "pcm_drift L1 @1h" in d0["chips"]
    cell = table["ste_hw"]["pcm L1"]
    means = {m: [sum(c["accuracy"] for c in runs[f"{m}_seed{s}.json"]["result"]["chips"]["pcm L1"]) / 2
                 for s in (0, 1)] for m in ("digital", "ste_hw")}  # fmt: skip
    delta = [a - b for a, b in zip(means["ste_hw"], means["digital"])]
    assert cell["delta_vs_digital"][0] == pytest.approx(sum(delta) / 2)
    assert (out / "fidelity.md").read_text().count("| ste_hw |") == 1
    # cached: a second call trains nothing (run files untouched) and gives the same table
    stamps = {f: os.path.getmtime(out / "runs" / f) for f in runs}
    assert json.dumps(fidelity.main(argv)) == json.dumps(table)
    assert stamps == {f: os.path.getmtime(out / "runs" / f) for f in runs}
    # another clip strength retrains the clip mode alone: the other modes' runs do not depend on it
    fidelity.main([*argv, "--clip_sigmas", "2.0"])
    changed = {f for f in runs if os.path.getmtime(out / "runs" / f) != stamps[f]}
    assert changed == {"ft_ste_hw_clip_seed0.json", "ft_ste_hw_clip_seed1.json"}
    assert json.load(open(out / "runs" / "ft_ste_hw_clip_seed0.json"))["args"]["clip_sigmas"] == 2.0
    assert "clip_sigmas" not in json.load(open(out / "runs" / "digital_seed0.json"))["args"]


def test_static_dac_runs_calibrate_every_model_on_the_same_batches(tmp_path, monkeypatch):
    """--input_quant static: noise-aware training recalibrates its ranges; before measuring, every model (digital
    included) is calibrated on the same fixed batches; the header says so."""
    import hf_cim.callbacks  # noqa: F401  (imported before the spy: it binds the real function for later tests)
    from hf_cim import calibration

    seen = []
    real = calibration.calibrate_input_ranges

    def spy(model, batches, **kw):
        batches = list(batches)
        seen.append([b.clone() for b in batches])
        return real(model, batches, **kw)

    monkeypatch.setattr(calibration, "calibrate_input_ranges", spy)
    out = tmp_path / "fid"
    argv = ["--setting", "digits", "--train", "pcm:1", "--modes", "digital,ste_hw", "--seeds", "0", "--chips", "1",
            "--steps", "4", "--batch_size", "8", "--eval", "pcm:1", "--input_quant", "static", "--calibrate_every", "2",
            "--calibration_batches", "2", "--alignment_every", "2", "--out", str(out), "--threads", "1"]  # fmt: skip
    table = fidelity.main(argv)
    assert set(table) == {"digital", "ste_hw"}
    # ste_hw: steps 0 and 2 in training, then before measuring; digital: before measuring only.
    assert len(seen) == 4
    measured = [b for b in seen if len(b) == 2]
    assert len(measured) == 2 and all(torch.equal(x, y) for x, y in zip(*measured))
    assert "static DAC ranges (3 σ)" in (out / "fidelity.md").read_text()
    with pytest.raises(SystemExit):
        fidelity.main(argv[:-4] + ["--calibrate_every", "0", "--out", str(out)])


def test_output_alpha_calibrates_adc_ranges_in_training_and_before_measuring(tmp_path, monkeypatch):
    """--output_alpha: every config's ADC ranges per layer, recalibrated in noise-aware training and calibrated for
    every model on the same fixed batches before measuring; the cache key and the header say so."""
    from hf_cim import calibration

    seen = []
    real = calibration.calibrate_output_ranges

    def spy(model, batches, **kw):
        batches = list(batches)
        seen.append(([b.clone() for b in batches], kw["alpha"]))
        found = real(model, batches, **kw)
        assert found and hf_cim.patch.get_config(model).output_ranges == found
        return found

    monkeypatch.setattr(calibration, "calibrate_output_ranges", spy)
    out = tmp_path / "fid"
    argv = ["--setting", "digits", "--train", "pcm:1", "--modes", "digital,ste_hw", "--seeds", "0", "--chips", "1",
            "--steps", "4", "--batch_size", "8", "--eval", "pcm:1", "--output_alpha", "6", "--calibrate_every", "2",
            "--calibration_batches", "2", "--out", str(out), "--threads", "1"]  # fmt: skip
    fidelity.main(argv)
    assert len(seen) == 4 and all(alpha == 6.0 for _, alpha in seen)  # ste_hw: steps 0, 2, measure; digital: measure
    measured = [b for b, _ in seen if len(b) == 2]
    assert len(measured) == 2 and all(torch.equal(x, y) for x, y in zip(*measured))
    assert "ADC ranges per layer (6 σ)" in (out / "fidelity.md").read_text()
    assert json.load(open(out / "runs" / "digital_seed0.json"))["args"]["output_alpha"] == 6.0
    with pytest.raises(SystemExit):
        fidelity.main(argv[:-4] + ["--output_alpha", "0", "--out", str(out)])


def _tiny_glue(tmp_path):
    """A tiny BERT with a word-level vocab saved as a local folder, and SST-2 / MRPC tsv files in the GLUE layout."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    words = ["good", "bad", "fine", "awful", "film", "plot", "the", "was", "a", "very"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    model_dir = tmp_path / "bert"
    BertTokenizer(str(vocab)).save_pretrained(model_dir)
    cfg = BertConfig(vocab_size=15, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, num_labels=2)  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    glue = tmp_path / "glue"
    (glue / "SST-2").mkdir(parents=True)
    (glue / "MRPC").mkdir()
    sst = ["sentence\tlabel"] + [f"the film was {w} \t{int(w in ('good', 'fine'))}" for w in words[:4] * 6]
    for split in ("train", "dev"):
        (glue / "SST-2" / f"{split}.tsv").write_text("\n".join(sst) + "\n")
    mrpc = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"] + [
        f"{int(a == b)}\t{i}\t{i + 1}\tthe plot was {a}\ta plot was {b}" for i, (a, b) in
        enumerate([("good", "good"), ("good", "bad"), ("awful", "awful"), ("fine", "bad")] * 5)
    ]  # fmt: skip
    for split in ("train", "dev"):
        (glue / "MRPC" / f"{split}.tsv").write_text("\n".join(mrpc) + "\n")
    return model_dir, glue


def test_glue_setting_reads_both_layouts_and_pairs_sentences(tmp_path):
    model_dir, glue = _tiny_glue(tmp_path)
    args = fidelity.argparse.Namespace(task="mrpc", model_name_or_path=model_dir, glue_dir=str(glue), max_length=32,
                                       batch_size=4)  # fmt: skip
    setting = fidelity.Glue(args)
    assert len(setting.train_set) == 20 and setting.train_set[1][2] == 0 and setting.train_set[0][2] == 1
    batch = next(setting.batches(0, 1))
    # a sentence pair: [CLS] A [SEP] B [SEP], segment ids 0 then 1, padding masked
    ids, types, mask = batch["input_ids"][0], batch["token_type_ids"][0], batch["attention_mask"][0]
    n = int(mask.sum())
    assert types[:n].tolist() == [0] * 6 + [1] * 5 and (types[n:] == 0).all()
    assert ids[:n].tolist().count(3) == 2 and (ids[n:] == 0).all()
    with pytest.raises(ValueError, match="--task"):
        fidelity.Glue(fidelity.argparse.Namespace(**{**vars(args), "task": "cola"}))


def test_glue_setting_trains_paired_modes(tmp_path):
    model_dir, glue = _tiny_glue(tmp_path)
    out = tmp_path / "fid"
    argv = ["--setting", "glue", "--task", "sst2", "--model_name_or_path", str(model_dir), "--glue_dir", str(glue),
            "--train", "pcm:1", "--modes", "digital,ste_hw", "--seeds", "0", "--chips", "2", "--steps", "4",
            "--batch_size", "4", "--lr", "1e-3", "--warmup_steps", "1", "--eval", "pcm:1", "--out", str(out),
            "--threads", "1"]  # fmt: skip
    table = fidelity.main(argv)
    assert set(table) == {"digital", "ste_hw"}
    run = json.load(open(out / "runs" / "ste_hw_seed0.json"))
    assert run["args"]["task"] == "sst2" and run["args"]["model_name_or_path"] == str(model_dir)
    accs = [c["accuracy"] for c in run["result"]["chips"]["pcm L1"]]
    assert len(accs) == 2 and all(0.0 <= a <= 100.0 for a in accs)
    # 24 dev rows: accuracy is a multiple of 100/24
    assert all(abs(a * 24 / 100 - round(a * 24 / 100)) < 1e-9 for a in accs)
    assert "### glue (bert, SST-2)" in (out / "fidelity.md").read_text()


def test_noise_draws_split_the_batch_into_micro_batches(tmp_path, capsys):
    """``<mode>_draws<K>``: K forwards of equal micro-batches per step. With nothing random in the forward (level 0:
    converters only), that is the full batch's gradient: the trained models agree; with noise they do not."""
    assert fidelity.split_draws("ste_hw_draws4") == (4, "ste_hw")
    assert fidelity.split_draws("ft_ste_hw_clip_draws2") == (2, "ft_ste_hw_clip")
    assert fidelity.split_mode("ft_ste_hw_draws16", 0.75) == (0.75, "ste_hw")
    for bad in ("digital_draws4", "ste_hw_draws1", "ste_hw_draws"):
        with pytest.raises(ValueError, match="unknown mode"):
            fidelity.split_mode(bad, 0.75)
    parts = fidelity.split_batch({"a": torch.arange(6), "b": torch.arange(6) * 2}, 3)
    assert [p["a"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]] and parts[2]["b"].tolist() == [8, 10]
    with pytest.raises(ValueError, match="does not split"):
        fidelity.split_batch(torch.zeros(5, 2), 2)

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 40)
    out = tmp_path / "fid"
    argv = ["--setting", "shakespeare", "--train", "pcm:1", "--arch", "1x32", "--block_size", "16", "--batch_size",
            "4", "--steps", "3", "--warmup_steps", "1", "--eval_blocks", "4", "--chips", "1", "--eval", "pcm:1",
            "--train_file", str(text), "--threads", "1", "--out", str(out), "--modes"]  # fmt: skip
    fidelity.main(argv + ["at0_ste_hw,at0_ste_hw_draws2,ste_hw,ste_hw_draws2"])
    run = {m: json.load(open(out / "runs" / f"{m}_seed0.json"))["result"]
           for m in ("at0_ste_hw", "at0_ste_hw_draws2", "ste_hw", "ste_hw_draws2")}  # fmt: skip
    clean = {m: r["clean"]["loss"] for m, r in run.items()}
    assert clean["at0_ste_hw_draws2"] == pytest.approx(clean["at0_ste_hw"], rel=1e-5)
    assert clean["ste_hw_draws2"] != pytest.approx(clean["ste_hw"], rel=1e-5)
    with pytest.raises(SystemExit):
        fidelity.main(argv + ["ste_hw_draws2", "--batch_size", "3"])
    assert "does not split into the 2 micro-batches" in capsys.readouterr().err
    # --untied_head: an LM head of its own, a run of its own (the tied model's cached run is not reused)
    args = fidelity.build_parser().parse_args(argv[:-1] + ["--untied_head"])
    untied = fidelity.Shakespeare(args).model()
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    tied = fidelity.Shakespeare(fidelity.build_parser().parse_args(argv[:-1])).model()
    assert tied.lm_head.weight is tied.transformer.wte.weight
    fidelity.main(argv + ["ste_hw", "--untied_head"])
    assert json.load(open(out / "runs" / "ste_hw_seed0.json"))["args"]["untied_head"] is True


def test_gradient_noise_splits_draw_and_batch_variance(tmp_path):
    """benchmarks/gradient_noise.py: nothing random in the forward (level 0) -> no variance over draws and identical
    draws; the lognormal chip -> variance over draws, and clean gradients equal whatever the draw."""
    import gradient_noise

    base = ["--setting", "digits", "--steps", "3", "--batch_size", "8", "--draws", "3", "--batches", "3",
            "--threads", "1"]  # fmt: skip
    still = gradient_noise.main(base + ["--train", "pcm:0"])
    assert still["var_over_draws"] == pytest.approx(0.0, abs=1e-10)
    assert still["cosine_two_draws"] == pytest.approx(1.0, abs=1e-5)
    noisy = gradient_noise.main(base + ["--train", "paper:3", "--out", str(tmp_path / "g.json")])
    assert noisy["var_over_draws"] > 1e-6 and noisy["cosine_two_draws"] < 0.9999
    assert noisy["var_over_batches_clean"] == pytest.approx(still["var_over_batches_clean"], rel=1e-5)
    assert json.load(open(tmp_path / "g.json"))["var_over_draws"] == noisy["var_over_draws"]
    with pytest.raises(SystemExit):
        gradient_noise.main(base + ["--mode", "digital"])


def test_distillation_modes_and_loss(tmp_path):
    """``ft_<mode>_kd``: parsed, refused without a digital start; the loss is the documented mix (reference values);
    alpha 0 trains exactly as the undistilled mode; the teacher changes the run otherwise."""
    assert fidelity.split_kd("ft50_ste_hw_kd") == (True, "ft50_ste_hw")
    assert fidelity.split_mode("ft50_ste_hw_kd_draws4", 0.75) == (0.5, "ste_hw")
    with pytest.raises(ValueError, match="needs an ft_ prefix"):
        fidelity.split_mode("ste_hw_kd", 0.75)
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    label_loss = torch.tensor(1.25)
    temp = 2.0
    p_t = torch.softmax(t / temp, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / temp, -1))).sum(-1).mean()  # mean over the 6 rows
    got = fidelity.distillation_loss(label_loss, s, t, alpha=0.25, temperature=temp)
    assert got.item() == pytest.approx(0.75 * 1.25 + 0.25 * 4.0 * kl.item(), rel=1e-6)
    assert fidelity.distillation_loss(label_loss, s, s, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-7)

    def run(mode, *extra):
        out = tmp_path / mode / "_".join(extra)
        argv = ["--setting", "digits", "--train", "pcm:1", "--modes", mode, "--seeds", "0", "--chips", "1",
                "--steps", "6", "--batch_size", "8", "--eval", "pcm:1", "--out", str(out), "--threads", "1",
                *extra]  # fmt: skip
        fidelity.main(argv)
        return json.load(open(out / "runs" / f"{mode}_seed0.json"))["result"]["info"]["train_loss_last10pct"]

    plain = run("ft50_ste_hw")
    assert run("ft50_ste_hw_kd", "--kd_alpha", "0") == plain
    assert run("ft50_ste_hw_kd", "--kd_alpha", "1") != plain
    with pytest.raises(SystemExit):
        run("ft50_ste_hw_kd", "--kd_alpha", "1.5")


def test_kept_models_are_measured_again_without_training(tmp_path, monkeypatch):
    """--keep_models: a run that differs only in how it is measured reuses the trained weights (for a digital model
    also across converter calibrations, which its training never sees); a noise-aware model whose training sees the
    calibration is trained again."""
    out = tmp_path / "fid"
    argv = ["--setting", "digits", "--train", "pcm:1", "--modes", "digital,ste_hw", "--seeds", "0", "--chips", "1",
            "--steps", "4", "--batch_size", "8", "--eval", "pcm:1", "--keep_models", "--out", str(out),
            "--threads", "1"]  # fmt: skip
    first = fidelity.main(argv)
    kept = torch.load(out / "runs" / "digital_seed0.pt", weights_only=True)
    assert "output_alpha" not in kept["key"] and kept["key"]["steps"] == 4
    trained = []
    real_train = fidelity.train
    monkeypatch.setattr(fidelity, "train", lambda setting, mode, seed, args, starts=None: trained.append(mode)
                        or real_train(setting, mode, seed, args, starts))  # fmt: skip
    again = fidelity.main([*argv, "--eval", "pcm:1,pcm:2", "--output_alpha", "6"])
    assert trained == ["ste_hw"]  # the digital model was loaded, not retrained
    assert again["digital"]["clean"] == first["digital"]["clean"]  # the same weights
    assert json.load(open(out / "runs" / "digital_seed0.json"))["args"]["output_alpha"] == 6.0
    # a change of training (the step count) trains the digital model again
    fidelity.main([*argv[: argv.index("--steps") + 1], "5", *argv[argv.index("--steps") + 2 :]])
    assert trained == ["ste_hw", "digital", "ste_hw"]
    assert torch.load(out / "runs" / "digital_seed0.pt", weights_only=True)["key"]["steps"] == 5


def test_chip_calibration_corrects_every_chip_of_every_model_without_retraining(tmp_path, monkeypatch):
    """--chip_calibration: each programmed chip is corrected on the fixed calibration batches before it is measured
    (the same batches for every model and chip); kept models are measured again without training."""
    from hf_cim import calibration

    out = tmp_path / "fid"
    argv = ["--setting", "digits", "--train", "paper:3", "--modes", "digital,ste_hw", "--seeds", "0", "--chips", "2",
            "--steps", "4", "--batch_size", "8", "--eval", "paper:3", "--keep_models", "--calibration_batches", "2",
            "--out", str(out), "--threads", "1"]  # fmt: skip
    first = fidelity.main(argv)
    seen = []

    def spy(model, batches, **kw):
        seen.append(([b[0].clone() for b in batches], kw["kind"]))
        return calibration.calibrate_chip_outputs(model, batches, **kw)

    monkeypatch.setattr(fidelity, "calibrate_chip_outputs", spy)
    monkeypatch.setattr(fidelity, "train", lambda *a: pytest.fail("a kept model was trained again"))
    corrected = fidelity.main([*argv, "--chip_calibration", "affine"])
    assert len(seen) == 4 and {kind for _, kind in seen} == {"affine"}  # 2 models x 2 chips
    assert all(torch.equal(x, y) for batches, _ in seen[1:] for x, y in zip(batches, seen[0][0]))
    for mode in ("digital", "ste_hw"):
        assert corrected[mode]["clean"] == first[mode]["clean"]
        assert corrected[mode]["paper L3"]["mean"] != first[mode]["paper L3"]["mean"]
    assert "chip outputs corrected (affine)" in (out / "fidelity.md").read_text()
    # the digital model's chip metric is the library's: program chip k, calibrate, reseed, evaluate
    args = fidelity.build_parser().parse_args([*argv, "--chip_calibration", "gain"])
    setting = fidelity.SETTINGS["digits"](args)
    model, _ = fidelity.load_trained(setting, str(out / "runs" / "digital_seed0.pt"), "digital",
                                     fidelity.training_key("digital", json.load(open(out / "runs" / "digital_seed0.json"))["args"]))  # fmt: skip
    got = fidelity.on_chips(setting, model, hf_cim.get_preset("paper", level=3.0), 0.0, 1, args)
    batches = list(setting.batches(fidelity.CALIBRATION_SEED, 2))
    hf_cim.patch_model(model, hf_cim.get_preset("paper", level=3.0))
    model.eval()
    hf_cim.program_chip(model, seed=0)
    hf_cim.reseed(model, 2_000)
    calibration.calibrate_chip_outputs(model, batches, kind="gain", forward=setting.loss)
    hf_cim.reseed(model, 1_000)
    assert got == [setting.evaluate(model)]
