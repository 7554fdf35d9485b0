"""The chip sweep's robustness plot goes to the trackers as an image (TensorBoard add_image, W&B wandb.Image).

tensorboard and wandb need not be installed: the integrations are subclassed with fake writers / modules."""

import logging
import os
import sys

import numpy as np
import pytest
from test_recipes_shakespeare import clm_args, write_text
from transformers.integrations import TensorBoardCallback, WandbCallback

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
sys.path.insert(0, RECIPES)

import _common  # noqa: E402
import run_shakespeare  # noqa: E402

pytest.importorskip("matplotlib")


class FakeWriter:
    def __init__(self, images):
        self.images = images

    def add_scalar(self, *args, **kwargs):
        pass

    def add_text(self, *args, **kwargs):
        pass

    def add_image(self, tag, image, step, dataformats="CHW"):
        self.images.append((tag, image, step, dataformats))

    def flush(self):
        pass

    def close(self):
        pass


class FakeTensorBoard(TensorBoardCallback):
    """Like the real one (the writer closed at train end, reopened on the next log), without tensorboard."""

    def __init__(self):
        self.images = []
        self.tb_writer = None
        self.logging_dir = None
        self._SummaryWriter = lambda log_dir=None: FakeWriter(self.images)


class RefusingWriter(FakeWriter):
    def add_image(self, *args, **kwargs):
        raise ValueError("no images today")


class FakeWandbModule:
    def __init__(self):
        self.run = object()
        self.logged = []

    class Image:
        def __init__(self, path):
            self.path = path

    def log(self, data):
        self.logged.append(data)


class FakeWandb(WandbCallback):
    def __init__(self, wandb):
        self._wandb = wandb
        self._initialized = True


@pytest.fixture
def run_with_fake_tensorboard(tmp_path, monkeypatch):
    """run_shakespeare.main for 2 steps and 1 chip with a fake TensorBoard among the callbacks; its trainer kept."""
    seen = {}
    add = run_shakespeare.add_recipe_callbacks

    def add_with_tracker(trainer, **kwargs):
        add(trainer, **kwargs)
        seen["tb"] = FakeTensorBoard()
        trainer.add_callback(seen["tb"])
        seen["trainer"] = trainer
        return trainer

    monkeypatch.setattr(run_shakespeare, "add_recipe_callbacks", add_with_tracker)
    path, _ = write_text(tmp_path / "input.txt", n_chars=4000)
    out = tmp_path / "out"
    run_shakespeare.main(clm_args(path, out, "--max_steps", "2", "--eval_chips", "1", "--max_eval_samples", "4"))
    seen["png"] = out / "robustness_validation" / "robustness.png"
    return seen


def test_chip_plot_reaches_tensorboard_and_wandb(run_with_fake_tensorboard, caplog):
    from matplotlib.image import imread

    seen = run_with_fake_tensorboard
    png, trainer = seen["png"], seen["trainer"]
    assert png.is_file()
    height, width = imread(str(png)).shape[:2]

    # the sweep handed its plot to TensorBoard once: HWC uint8 of the PNG's size, at the last training step
    assert len(seen["tb"].images) == 1
    tag, image, step, dataformats = seen["tb"].images[0]
    assert tag == "chip/validation/plot" and step == trainer.state.global_step == 2 and dataformats == "HWC"
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert image.shape[:2] == (height, width) and image.shape[2] in (3, 4) and image.max() > 0

    # W&B gets a wandb.Image of the file; one without a run is skipped
    wandb, idle = FakeWandbModule(), FakeWandbModule()
    idle.run = None
    trainer.add_callback(FakeWandb(wandb))
    trainer.add_callback(FakeWandb(idle))
    seen["tb"].images.clear()
    assert _common.log_plot_to_trackers(trainer, str(png), "chip/x/plot")
    assert [list(d) for d in wandb.logged] == [["chip/x/plot"]] and wandb.logged[0]["chip/x/plot"].path == str(png)
    assert idle.logged == [] and [i[0] for i in seen["tb"].images] == ["chip/x/plot"]

    # a refusing tracker costs a warning, not the run; the others still get the image
    seen["tb"].tb_writer = RefusingWriter([])
    with caplog.at_level(logging.WARNING, logger="recipes"):
        assert _common.log_plot_to_trackers(trainer, str(png), "chip/y/plot")
    assert "no images today" in caplog.text and list(wandb.logged[-1]) == ["chip/y/plot"]

    # no plot, or a stale one from an earlier run: skipped silently
    n = len(wandb.logged)
    assert not _common.log_plot_to_trackers(trainer, str(png.parent / "missing.png"), "chip/z/plot")
    assert not _common.log_plot_to_trackers(trainer, str(png), "chip/z/plot", since=os.path.getmtime(png) + 60)
    assert len(wandb.logged) == n


def test_no_tracker_no_image(tmp_path):
    """Without a reporting integration the helper does nothing (and needs neither tensorboard nor wandb)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=16, n_positions=8))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args)
    png = tmp_path / "robustness.png"
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    fig.savefig(png)
    plt.close(fig)
    assert not _common.log_plot_to_trackers(trainer, str(png), "chip/plot")
