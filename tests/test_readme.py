"""The README's code examples run as written (the quickstart, a custom numpy noise model, save and reload)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block(marker):
    found = [b for b in _blocks() if marker in b]
    assert len(found) == 1, f"README must hold exactly one python block with {marker!r}"
    return found[0]


@pytest.mark.parametrize(
    "marker",
    [
        "for step in range(20):",
        '@hf_cim.register_noise_model("measured_levels")',
        'model.save_pretrained("gpt2-analog")',
    ],
    ids=["quickstart", "custom-numpy-noise", "save-reload"],
)
def test_readme_example_runs(marker, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _block(marker)
    namespace = {"__name__": "readme_example"}
    exec(compile(code, f"README:{marker}", "exec"), namespace)
    if "quickstart" in marker or "range(20)" in marker:
        assert namespace["clean_loss"].item() > 0
    if "measured_levels" in marker:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        import hf_cim

        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
        hf_cim.patch_model(model, namespace["cfg"])
        ids = torch.randint(0, 50, (2, 8))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)


def test_setup_commands_need_nothing_beside_the_repository():
    """A fresh clone with no ../shared and no network: the main job reads the shipped text."""
    bash = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    main_job, tests = bash[0], bash[1]
    assert "recipes/run_shakespeare.py" in main_job and "--digital_baseline true" in main_job
    assert "../" not in main_job and "--train_file" not in main_job and "http" not in main_job
    assert tests.strip() == "HF_HUB_OFFLINE=1 python -m pytest tests"
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install torch==2.13.0 && pip install -e ".[dev]"' in main_job and tests.strip() in ci
