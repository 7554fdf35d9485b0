"""hf_cim.hub: push_to_hub (checked at the huggingface_hub API boundary) and the noise-config file."""

import fnmatch
import json
import os

import pytest
import torch
from helpers import ROWS, noise_config, tiny_bert
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertTokenizer

import hf_cim
from hf_cim import AnalogNoiseConfig


def _tokenizer():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "analog", "world"]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


@pytest.fixture
def fake_hub(monkeypatch):
    """Record what push_to_hub sends through huggingface_hub (no network here)."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kwargs):
        files = {}  # what huggingface_hub would send: the folder's files filtered by allow_patterns
        for root, _, names in os.walk(folder_path):
            for name in names:
                rel = os.path.relpath(os.path.join(root, name), folder_path)
                if allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                    with open(os.path.join(root, name), "rb") as f:
                        files[rel] = f.read()
        calls["upload_folder"] = {"repo_id": repo_id, "files": files, **kwargs}
        calls["folder_path"] = folder_path
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_exact_files(tmp_path, fake_hub):
    model = hf_cim.patch_model(tiny_bert(), noise_config())
    folder = tmp_path / "folder"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"not ours")
    (folder / "results.json").write_text("{}")  # a training output dir holds more than the model
    out = hf_cim.hub.push_to_hub(
        model,
        "me/bert-analog",
        tokenizer=_tokenizer(),
        save_directory=tmp_path / "folder",
        card_kwargs={"task": "text-classification", "robustness": ROWS, "metric": "eval_accuracy"},
        private=True,
    )
    assert out == "commit-info"
    assert fake_hub["create_repo"] == {"repo_id": "me/bert-analog", "private": True, "exist_ok": True}
    up = fake_hub["upload_folder"]
    assert up["repo_id"] == "me/bert-analog" and up["revision"] is None
    assert "hf_cim" in up["commit_message"]
    assert sorted(up["files"]) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    quant = json.loads(up["files"]["config.json"])["quantization_config"]
    assert quant["quant_method"] == "hf_cim" and AnalogNoiseConfig.from_dict(quant) == noise_config()
    card = up["files"]["README.md"].decode()
    assert "- analog-cim" in card and "- hf-cim" in card and "pipeline_tag: text-classification" in card
    assert "| 2 | 3600 | 0.7100 ± 0.0200 |" in card

    # the folder it uploaded reloads as the same analog model, with its tokenizer
    assert sorted(os.listdir(folder)) == sorted([*up["files"], "checkpoint-2", "results.json"])
    back = AutoModelForSequenceClassification.from_pretrained(folder)
    assert hf_cim.patch.get_config(back) == noise_config()
    sd_a, sd_b = model.state_dict(), back.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert AutoTokenizer.from_pretrained(folder)("hello analog world")["input_ids"] == [2, 5, 6, 7, 3]
    assert hf_cim.hub.load_noise_config(folder) == noise_config()


def test_push_to_hub_without_folder_uses_a_temporary_one(fake_hub):
    hf_cim.hub.push_to_hub(hf_cim.patch_model(tiny_bert(), noise_config()), "me/tmp-push")
    assert sorted(fake_hub["upload_folder"]["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert not os.path.exists(fake_hub["folder_path"])  # the temporary folder is gone


def test_push_to_hub_rejects_unpatched_model_and_bad_repo_id(fake_hub):
    with pytest.raises(ValueError, match="not patched"):
        hf_cim.hub.push_to_hub(tiny_bert(), "me/x")
    with pytest.raises(ValueError, match="`repo_id`"):
        hf_cim.hub.push_to_hub(hf_cim.patch_model(tiny_bert(), noise_config()), "a/b/c")
    assert fake_hub == {}


def test_noise_config_file_round_trip(tmp_path):
    assert hf_cim.hub.load_noise_config(tmp_path) is None
    path = hf_cim.hub.save_noise_config(hf_cim.patch_model(tiny_bert(), noise_config()), tmp_path)
    assert os.path.basename(path) == "hf_cim_config.json"
    assert hf_cim.hub.load_noise_config(tmp_path) == noise_config()
    data = json.loads(open(path).read())
    data["level"] = 500
    open(path, "w").write(json.dumps(data))
    with pytest.raises(ValueError, match="`level`"):
        hf_cim.hub.load_noise_config(tmp_path)


def test_load_noise_config_from_a_hub_repo(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    hf_cim.patch_model(tiny_bert(), noise_config()).save_pretrained(tmp_path)
    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        if not (tmp_path / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert hf_cim.hub.load_noise_config("me/bert-analog") == noise_config()
    assert asked == [("me/bert-analog", "hf_cim_config.json"), ("me/bert-analog", "config.json")]


def test_push_to_hub_refuses_to_upload_a_file_holding_the_token(tmp_path, fake_hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    model = hf_cim.patch_model(tiny_bert(), noise_config())
    (tmp_path / "notes.txt").write_text("not ours: not uploaded, not checked")
    with pytest.raises(ValueError, match="README.md.*holds? the Hub token"):
        # a token that looks like nothing the redaction knows, in a place it does not redact
        hf_cim.hub.push_to_hub(
            model, "me/x", save_directory=tmp_path, card_kwargs={"datasets": ["plain-secret-value"]},
            token="plain-secret-value",
        )  # fmt: skip
    assert "upload_folder" not in fake_hub

    # the same from the environment (HF_TOKEN: how the recipes hand the token over)
    monkeypatch.setenv("HF_TOKEN", "plain-secret-value")
    with pytest.raises(ValueError, match="README.md"):
        hf_cim.hub.push_to_hub(
            model, "me/x", save_directory=tmp_path, card_kwargs={"datasets": ["plain-secret-value"]}
        )
    hf_cim.hub.push_to_hub(
        model, "me/x", save_directory=tmp_path, token="plain-secret-value"
    )  # a clean folder uploads
    assert "README.md" in fake_hub["upload_folder"]["files"]


def test_patched_model_carries_the_hub_tags_into_trainers_card(tmp_path, fake_hub):
    """patch_model tags the model (add_model_tags): the card of Trainer.push_to_hub carries them; unpatching
    removes them."""
    from transformers import Trainer, TrainingArguments

    model = tiny_bert()
    model.add_model_tags(["mine"])
    hf_cim.patch_model(model, noise_config())
    assert model.model_tags == ["mine", "hf-cim", "analog-cim"]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    Trainer(model=model, args=args).push_to_hub(tags=["extra"])
    tags = ModelCard(fake_hub["upload_folder"]["files"]["README.md"].decode()).data.tags
    assert {"hf-cim", "analog-cim", "extra", "mine"} <= set(tags)
    hf_cim.unpatch_model(model)
    assert model.model_tags == ["mine"]
