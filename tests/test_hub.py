"""Model cards, push_to_hub (checked at the huggingface_hub API boundary) and the noise-config file."""

import fnmatch
import json
import os

import pytest
import torch
from helpers import tiny_bert
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertTokenizer

import hf_cim
from hf_cim import AnalogNoiseConfig
from hf_cim.noise import GaussianWeightNoise, OutputNoise

ROWS = [
    {"level": 1.0, "t_inference": 0.0, "mean": 0.8125, "std": 0.0125, "min": 0.8, "max": 0.825, "n_chips": 2,
     "values": [0.8, 0.825]},
    {"level": 2.0, "t_inference": 3600.0, "mean": 0.71, "std": 0.02, "min": 0.69, "max": 0.73, "n_chips": 2,
     "values": [0.69, 0.73]},
]  # fmt: skip


def _config():
    return AnalogNoiseConfig(
        noise=[GaussianWeightNoise(std=0.03), OutputNoise(std=0.05)], seed=4, exclude_modules=["classifier"]
    )


def _tokenizer():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "analog", "world"]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def test_model_card_content_and_metadata(tmp_path):
    model = hf_cim.patch_model(tiny_bert(), _config())
    text = hf_cim.write_model_card(
        tmp_path,
        model,
        model_name="me/bert-analog",
        base_model="google-bert/bert-base-uncased",
        task="text-classification",
        datasets=["nyu-mll/glue"],
        metrics=["accuracy"],
        recipe="accelerate launch recipes/run_glue.py --task_name sst2",
        training_args={"learning_rate": 2e-5, "num_train_epochs": 3},
        clean_metric={"eval_accuracy": 0.84},
        robustness=ROWS,
        metric="eval_accuracy",
        license="apache-2.0",
    )
    assert (tmp_path / "README.md").read_text() == text
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert {"analog-cim", "hf-cim"} <= set(data["tags"])
    assert data["library_name"] == "transformers"
    assert data["datasets"] == ["nyu-mll/glue"] and data["metrics"] == ["accuracy"]
    assert data["base_model"] == "google-bert/bert-base-uncased" and data["pipeline_tag"] == "text-classification"
    assert data["license"] == "apache-2.0"
    body = card.text
    # how to load: hf_cim first, the concrete class
    assert body.index("import hf_cim") < body.index("from transformers import BertForSequenceClassification")
    assert 'BertForSequenceClassification.from_pretrained("me/bert-analog")' in body
    # the noise config table, one row per field and per noise model
    assert "| `seed` | 4 |" in body and "| `exclude_modules` | classifier |" in body
    assert "| `gaussian_weight` | `std`=0.03, `per_channel`=True |" in body
    assert "| `output_noise` | `std`=0.05 |" in body
    # recipe, arguments, clean metric and robustness rows
    assert "recipes/run_glue.py --task_name sst2" in body and "| `learning_rate` | 2e-05 |" in body
    assert "| eval_accuracy | 0.84 |" in body
    assert "| 1 | 0 | 0.8125 ± 0.0125 | 0.8000 | 0.8250 | 2 |" in body
    assert "| 2 | 3600 | 0.7100 ± 0.0200 | 0.6900 | 0.7300 | 2 |" in body


def test_model_card_takes_a_robustness_result(tmp_path):
    evaluation = pytest.importorskip("hf_cim.evaluation")
    result = evaluation.RobustnessResult(metric="eval_loss", rows=ROWS, clean={"eval_loss": 1.5}, seeds=[0, 1])
    text = hf_cim.write_model_card(tmp_path, config=_config(), robustness=result)
    assert result.to_markdown() in text
    assert "| eval_loss | 1.5 |" in text
    assert ModelCard.load(tmp_path / "README.md").data.to_dict()["metrics"] == ["eval_loss"]


def test_model_card_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="`config`"):
        hf_cim.write_model_card(tmp_path, tiny_bert())
    with pytest.raises(ValueError, match="n_chips"):
        hf_cim.write_model_card(tmp_path, config=_config(), robustness=[{"level": 1.0, "t_inference": 0.0}])


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
    model = hf_cim.patch_model(tiny_bert(), _config())
    folder = tmp_path / "folder"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"not ours")
    (folder / "results.json").write_text("{}")  # a training output dir holds more than the model
    out = hf_cim.push_to_hub(
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
    assert quant["quant_method"] == "hf_cim" and AnalogNoiseConfig.from_dict(quant) == _config()
    card = up["files"]["README.md"].decode()
    assert "- analog-cim" in card and "- hf-cim" in card and "pipeline_tag: text-classification" in card
    assert "| 2 | 3600 | 0.7100 ± 0.0200 |" in card

    # the folder it uploaded reloads as the same analog model, with its tokenizer
    assert sorted(os.listdir(folder)) == sorted([*up["files"], "checkpoint-2", "results.json"])
    back = AutoModelForSequenceClassification.from_pretrained(folder)
    assert hf_cim.get_config(back) == _config()
    sd_a, sd_b = model.state_dict(), back.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert AutoTokenizer.from_pretrained(folder)("hello analog world")["input_ids"] == [2, 5, 6, 7, 3]
    assert hf_cim.load_noise_config(folder) == _config()


def test_push_to_hub_without_folder_uses_a_temporary_one(fake_hub):
    hf_cim.push_to_hub(hf_cim.patch_model(tiny_bert(), _config()), "me/tmp-push")
    assert sorted(fake_hub["upload_folder"]["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert not os.path.exists(fake_hub["folder_path"])  # the temporary folder is gone


def test_push_to_hub_rejects_unpatched_model_and_bad_repo_id(fake_hub):
    with pytest.raises(ValueError, match="not patched"):
        hf_cim.push_to_hub(tiny_bert(), "me/x")
    with pytest.raises(ValueError, match="`repo_id`"):
        hf_cim.push_to_hub(hf_cim.patch_model(tiny_bert(), _config()), "a/b/c")
    assert fake_hub == {}


def test_noise_config_file_round_trip(tmp_path):
    assert hf_cim.load_noise_config(tmp_path) is None
    path = hf_cim.save_noise_config(hf_cim.patch_model(tiny_bert(), _config()), tmp_path)
    assert os.path.basename(path) == "hf_cim_config.json"
    assert hf_cim.load_noise_config(tmp_path) == _config()
    data = json.loads(open(path).read())
    data["level"] = 500
    open(path, "w").write(json.dumps(data))
    with pytest.raises(ValueError, match="`level`"):
        hf_cim.load_noise_config(tmp_path)


def test_load_noise_config_from_a_hub_repo(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    hf_cim.patch_model(tiny_bert(), _config()).save_pretrained(tmp_path)
    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        if not (tmp_path / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert hf_cim.load_noise_config("me/bert-analog") == _config()
    assert asked == [("me/bert-analog", "hf_cim_config.json"), ("me/bert-analog", "config.json")]


# -- secrets never reach a written or uploaded file ------------------------------------------------------------------
FAKE_TOKEN = "hf_" + "aB3dE5gH7j" * 3 + "kLm9"  # the shape of a Hub access token (hf_ + 34 letters/digits), fake


@pytest.mark.parametrize(
    "text, secret",
    [
        (f"python run.py --hub_token {FAKE_TOKEN} --seed 0", FAKE_TOKEN),
        (f"python run.py --hub_token={FAKE_TOKEN} --seed 0", FAKE_TOKEN),
        ("python run.py --hub_token my-own-secret --seed 0", "my-own-secret"),  # any value after a token flag
        ("python run.py --hub_token=my-own-secret", "my-own-secret"),
        ("HF_TOKEN=my-own-secret python run.py", "my-own-secret"),  # environment-variable style
        ("HF_TOKEN='my-own-secret' python run.py --hub_token \"my-own-secret\"", "my-own-secret"),  # quoted
        ("HUGGING_FACE_HUB_TOKEN=my-own-secret python run.py", "my-own-secret"),
        (f"see {FAKE_TOKEN}.", FAKE_TOKEN),  # a bare Hub token anywhere
    ],
)
def test_redact_secrets(text, secret):
    from hf_cim.hub import redact_secrets

    out = redact_secrets(text)
    assert secret not in out and "<redacted>" in out
    assert "python run.py" in out or text.startswith("see")


def test_redact_keeps_what_is_not_secret():
    from hf_cim.hub import redact_argv, redact_secrets

    text = "python run.py --tokenizer_name bert --max_tokens 5 --pad_token_id 0 --seed 1 --hub_model_id me/x"
    assert redact_secrets(text) == text
    argv = ["--tokenizer_name", "bert", "--hub_token", "s3cret", "--token=abc", "--use_auth_token", "--seed", "1"]
    assert redact_argv(argv) == [
        "--tokenizer_name", "bert", "--hub_token", "<redacted>", "--token=<redacted>", "--use_auth_token",
        "--seed", "1",
    ]  # fmt: skip
    assert redact_argv(["--output_dir", f"out/{FAKE_TOKEN}"]) == ["--output_dir", "out/<redacted>"]


def test_model_card_redacts_the_recipe_and_training_args(tmp_path):
    model = hf_cim.patch_model(tiny_bert(), _config())
    text = hf_cim.write_model_card(
        tmp_path,
        model,
        recipe=f"python recipes/run_glue.py --hub_token my-own-secret --push_to_hub --x {FAKE_TOKEN}",
        training_args={"learning_rate": 2e-5, "hub_token": "other-secret"},
    )
    on_disk = (tmp_path / "README.md").read_text()
    for secret in ("my-own-secret", "other-secret", FAKE_TOKEN):
        assert secret not in text and secret not in on_disk
    assert "--hub_token <redacted> --push_to_hub" in on_disk
    assert "| `hub_token` | <redacted> |" in on_disk and "| `learning_rate` | 2e-05 |" in on_disk


def test_push_to_hub_refuses_to_upload_a_file_holding_the_token(tmp_path, fake_hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    model = hf_cim.patch_model(tiny_bert(), _config())
    (tmp_path / "notes.txt").write_text("not ours: not uploaded, not checked")
    with pytest.raises(ValueError, match="README.md.*holds? the Hub token"):
        # a token that looks like nothing the redaction knows, in a place it does not redact
        hf_cim.push_to_hub(
            model, "me/x", save_directory=tmp_path, card_kwargs={"datasets": ["plain-secret-value"]},
            token="plain-secret-value",
        )  # fmt: skip
    assert "upload_folder" not in fake_hub

    # the same from the environment (HF_TOKEN: how the recipes hand the token over)
    monkeypatch.setenv("HF_TOKEN", "plain-secret-value")
    with pytest.raises(ValueError, match="README.md"):
        hf_cim.push_to_hub(model, "me/x", save_directory=tmp_path, card_kwargs={"datasets": ["plain-secret-value"]})
    hf_cim.push_to_hub(model, "me/x", save_directory=tmp_path, token="plain-secret-value")  # a clean folder uploads
    assert "README.md" in fake_hub["upload_folder"]["files"]


def test_patched_model_carries_the_hub_tags_into_trainers_card(tmp_path, fake_hub):
    """patch_model tags the model (add_model_tags): the card of Trainer.push_to_hub carries them; unpatching
    removes them."""
    from transformers import Trainer, TrainingArguments

    model = tiny_bert()
    model.add_model_tags(["mine"])
    hf_cim.patch_model(model, _config())
    assert model.model_tags == ["mine", "hf-cim", "analog-cim"]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    Trainer(model=model, args=args).push_to_hub(tags=["extra"])
    tags = ModelCard(fake_hub["upload_folder"]["files"]["README.md"].decode()).data.tags
    assert {"hf-cim", "analog-cim", "extra", "mine"} <= set(tags)
    hf_cim.unpatch_model(model)
    assert model.model_tags == ["mine"]


def test_model_card_puts_the_chips_in_the_model_index(tmp_path):
    hf_cim.write_model_card(
        tmp_path,
        config=_config(),
        model_name="me/bert-analog",
        task="text-classification",
        datasets=["nyu-mll/glue"],
        clean_metric={"eval_accuracy": 0.84, "eval_runtime": 1.2},
        robustness=ROWS,
        metric="eval_accuracy",
        dataset_split="validation",
    )
    data = ModelCard.load(tmp_path / "README.md").data
    got = [(r.metric_type, r.metric_value, r.metric_config, r.dataset_split) for r in data.eval_results]
    assert got == [
        ("accuracy", 0.84, None, "validation"),
        ("accuracy", 0.8125, "level=1,t_inference=0s,chips=2", "validation"),
        ("accuracy", 0.71, "level=2,t_inference=3600s,chips=2", "validation"),
    ]
    assert data.to_dict()["model-index"][0]["name"] == "me/bert-analog"
