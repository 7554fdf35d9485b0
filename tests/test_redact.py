"""hf_cim.redact: Hub tokens never reach a written or uploaded file."""

import pytest
from helpers import FAKE_TOKEN

from hf_cim.redact import files_holding_token, is_secret_key, redact_argv, redact_secrets


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
    out = redact_secrets(text)
    assert secret not in out and "<redacted>" in out
    assert "python run.py" in out or text.startswith("see")


def test_redact_keeps_what_is_not_secret():
    text = "python run.py --tokenizer_name bert --max_tokens 5 --pad_token_id 0 --seed 1 --hub_model_id me/x"
    assert redact_secrets(text) == text
    argv = ["--tokenizer_name", "bert", "--hub_token", "s3cret", "--token=abc", "--use_auth_token", "--seed", "1"]
    assert redact_argv(argv) == [
        "--tokenizer_name", "bert", "--hub_token", "<redacted>", "--token=<redacted>", "--use_auth_token",
        "--seed", "1",
    ]  # fmt: skip
    assert redact_argv(["--output_dir", f"out/{FAKE_TOKEN}"]) == ["--output_dir", "out/<redacted>"]


def test_secret_keys_and_files_holding_a_token(tmp_path, monkeypatch):
    assert all(is_secret_key(k) for k in ("hub_token", "token", "api_key", "WANDB_API_KEY", "password"))
    assert not any(is_secret_key(k) for k in ("tokenizer_name", "max_tokens", "learning_rate"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    (tmp_path / "a.txt").write_text(f"x {FAKE_TOKEN} y")
    (tmp_path / "b.txt").write_text("nothing-else-matters")
    (tmp_path / "empty.txt").write_text("")
    files = ["a.txt", "b.txt", "empty.txt"]
    assert files_holding_token(tmp_path, files, FAKE_TOKEN) == ["a.txt"]
    assert files_holding_token(tmp_path, files, None) == []  # no token anywhere: nothing to find
    monkeypatch.setenv("HF_TOKEN", "nothing-else-matters")
    assert files_holding_token(tmp_path, files, None) == ["b.txt"]
