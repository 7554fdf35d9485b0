"""hf_cim.model_card: the card's text, its Hub metadata (model-index), the robustness table and redacted secrets."""

import pytest
from helpers import FAKE_TOKEN, ROWS, noise_config, tiny_bert
from huggingface_hub import ModelCard

import hf_cim
from hf_cim.model_card import write_model_card


def test_model_card_content_and_metadata(tmp_path):
    model = hf_cim.patch_model(tiny_bert(), noise_config())
    text = write_model_card(
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
    text = write_model_card(tmp_path, config=noise_config(), robustness=result)
    assert result.to_markdown() in text
    assert "| eval_loss | 1.5 |" in text
    assert ModelCard.load(tmp_path / "README.md").data.to_dict()["metrics"] == ["eval_loss"]


def test_model_card_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="`config`"):
        write_model_card(tmp_path, tiny_bert())
    with pytest.raises(ValueError, match="n_chips"):
        write_model_card(tmp_path, config=noise_config(), robustness=[{"level": 1.0, "t_inference": 0.0}])


def test_model_card_redacts_the_recipe_and_training_args(tmp_path):
    model = hf_cim.patch_model(tiny_bert(), noise_config())
    text = write_model_card(
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


def test_model_card_puts_the_chips_in_the_model_index(tmp_path):
    write_model_card(
        tmp_path,
        config=noise_config(),
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
