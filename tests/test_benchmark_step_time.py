"""benchmarks/step_time.py: the aihwkit peers are left out with a note where aihwkit is not built; when it is, the
peer model converts every linear layer."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import peer_aihwkit  # noqa: E402
import step_time  # noqa: E402

pytestmark = pytest.mark.usefixtures("transformers_verbosity_restored")


def test_aihwkit_peers_without_aihwkit_are_noted_not_fatal(monkeypatch):
    monkeypatch.setattr(peer_aihwkit, "aihwkit_available", lambda: (False, "ImportError: not built here"))
    out = step_time.main(["--quick", "--models", "gpt2", "--variants", "plain,aihwkit,aihwkit_hwa", "--no-memory",
                          "--widths", "", "--rounds", "1", "--steps", "1", "--warmup", "0", "--threads", "1"])  # fmt: skip
    assert sum("NOT run: ImportError: not built here" in n for n in out["notes"]) == 2
    assert set(out["models"]["gpt2"]["timing"]["variants"]) == {"plain"}
    with pytest.raises(ValueError, match="unknown aihwkit variant"):
        peer_aihwkit._rpu_config("aihwkit_magic")


def test_aihwkit_peer_converts_every_linear_layer():
    pytest.importorskip("aihwkit.simulator.rpu_base", reason="aihwkit (source build) not installed")
    from aihwkit.nn import AnalogLinear
    from transformers import GPT2Config, GPT2LMHeadModel

    for variant in peer_aihwkit.AIHWKIT_VARIANTS:
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
        model = peer_aihwkit.make_aihwkit_model(model, variant)
        # 1 block: c_attn, attn c_proj, c_fc, mlp c_proj, and the LM head
        assert sum(isinstance(m, AnalogLinear) for m in model.modules()) == 5


def test_model_table_reports_tensor_memory_and_the_full_ratio():
    rounds = {v: [1.0, 1.0] for v in ("plain", "ste", "ste_hw", "full")}
    timing = {
        "variants": ["plain", "ste", "ste_hw", "full"],
        "wall_s_per_step": rounds,
        "cpu_s_per_step": rounds,
        "wall_ratio": rounds,
        "cpu_ratio": rounds,
    }
    memory = {
        "plain": {"peak_mb": 100.0, "base_mb": 50.0, "step_mb": 50.0, "tensor_step_mb": 40.0},
        "ste": {"peak_mb": 105.0, "base_mb": 50.0, "step_mb": 55.0, "tensor_step_mb": 40.0},
        "ste_hw": {"peak_mb": 110.0, "base_mb": 50.0, "step_mb": 60.0, "tensor_step_mb": 44.0},
        "full": {"peak_mb": 120.0, "base_mb": 50.0, "step_mb": 70.0, "tensor_step_mb": 80.0},
    }
    table = step_time.model_table({"timing": timing, "memory": memory}, "cpu")
    assert "| tensor step MB | tensor ratio |" in table
    assert "| 44 | 1.10 |" in table and "| 80 | 2.00 |" in table
    lines = step_time.targets({"timing": timing, "memory": memory}, "cpu")
    assert "`ste`/`full` tensor step memory 0.50× (target ≤ 0.7×): met" in lines
    assert "`ste_hw`/`full` tensor step memory 0.55× (target ≤ 0.7×): met" in lines
    assert "`ste_hw`/`full` cpu time 1.00× (paired, 1.00–1.00; target ≤ 0.6×): NOT met" in lines
    without_ste = {**timing, "variants": ["plain", "ste_hw", "full"]}
    lines = step_time.targets({"timing": without_ste, "memory": memory}, "cpu")
    assert "`ste_hw`/`full` cpu time 1.00× (paired, 1.00–1.00; target ≤ 0.6×): NOT met" in lines
