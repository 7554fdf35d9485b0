"""The Tiny Shakespeare copy shipped with the recipes is the default text: read offline, length and hash checked."""

import hashlib
import json
import lzma
import os
import socket
import sys
import urllib.request

import pytest

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
sys.path.insert(0, RECIPES)

import run_shakespeare  # noqa: E402


@pytest.fixture
def no_network(monkeypatch):
    """Any download or socket connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_shipped_file_is_small_and_documented():
    path = run_shakespeare.SHIPPED_TEXT
    assert os.path.isfile(path) and os.path.getsize(path) < 1 << 20
    readme = open(os.path.join(RECIPES, "data", "README.md"), encoding="utf-8").read()
    assert run_shakespeare.TINY_SHAKESPEARE_SHA256 in readme and "karpathy/char-rnn" in readme
    with lzma.open(path) as f:
        assert hashlib.sha256(f.read()).hexdigest() == run_shakespeare.TINY_SHAKESPEARE_SHA256


def test_default_text_is_the_shipped_copy_without_network(no_network, tmp_path):
    args = run_shakespeare.DataArguments()
    assert args.train_file is None and args.dataset_name is None and args.data_url is None
    text = run_shakespeare.read_text(args, cache_dir=str(tmp_path / "cache"))
    assert len(text) == 1_115_394 and len(set(text)) == 65
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == run_shakespeare.TINY_SHAKESPEARE_SHA256
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert not (tmp_path / "cache").exists()  # nothing downloaded, nothing cached


def test_damaged_shipped_copy_is_refused(tmp_path):
    bad = tmp_path / "bad.txt.xz"
    with lzma.open(bad, "wb") as f:
        f.write(b"not Shakespeare")
    with pytest.raises(RuntimeError, match="SHA-256 mismatch"):
        run_shakespeare.read_shipped_text(str(bad))
    with pytest.raises(FileNotFoundError, match="--train_file or --data_url"):
        run_shakespeare.read_shipped_text(str(tmp_path / "missing.xz"))


def test_main_job_defaults_to_the_shipped_text(no_network, tmp_path):
    out = tmp_path / "out"
    run_shakespeare.main(
        ["--output_dir", str(out), "--config_overrides", "n_layer=1,n_head=2,n_embd=16", "--block_size", "32"]
        + ["--max_steps", "1", "--max_train_samples", "8", "--max_eval_samples", "4", "--eval_chips", "0"]
        + [
            "--per_device_train_batch_size",
            "4",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--dataloader_pin_memory",
            "false",
        ]
    )
    res = json.loads((out / "results.json").read_text())
    assert res["text_characters"] == 1_115_394 and res["vocab_size"] == 66
    assert res["split"] == {"train_characters": 1_003_854, "validation_characters": 111_540}
    assert res["data"].startswith("recipes/data/tinyshakespeare.txt.xz")


def test_dataset_name_reads_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.txt").write_text("ROMEO:\nthou art\nJULIET:\nmy lord\n", encoding="utf-8")
    args = run_shakespeare.DataArguments(dataset_name=str(folder))
    assert run_shakespeare.read_text(args, cache_dir=str(tmp_path / "cache")) == "ROMEO:\nthou art\nJULIET:\nmy lord"
    with pytest.raises(ValueError, match="`--text_column` 'content' is not a column"):
        run_shakespeare.read_text(
            run_shakespeare.DataArguments(dataset_name=str(folder), text_column="content"), str(tmp_path / "c")
        )
    with pytest.raises(ValueError, match="give one source of text, got --train_file and --dataset_name"):
        run_shakespeare.DataArguments(train_file="a.txt", dataset_name=str(folder))


def _clm(train, out, *extra):
    return [
        "--train_file", str(train), "--output_dir", str(out), "--config_overrides", "n_layer=1,n_head=2,n_embd=16",
        "--block_size", "16", "--max_steps", "2", "--per_device_train_batch_size", "4", "--eval_chips", "1",
        "--eval_levels", "1", "--max_eval_samples", "4", "--report_to", "none", "--save_strategy", "no",
        "--dataloader_pin_memory", "false", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def test_any_text_file_char_level_with_a_validation_jsonl(no_network, tmp_path):
    """Not Shakespeare: a markdown file (any extension is text, read as written) trains, a jsonl's text column
    validates; the character vocabulary covers both."""
    corpus = "# Notes\n\nΩmega drifts; café ☕ at 1e-3 lr.\n" * 20
    train = tmp_path / "notes.md"
    train.write_text(corpus, encoding="utf-8")
    valid = tmp_path / "valid.jsonl"
    rows = [{"id": i, "content": f"naïve row {i} — ✓"} for i in range(12)]
    valid.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    res = run_shakespeare.main(_clm(train, out, "--validation_file", str(valid), "--text_column", "content"))
    valid_text = "\n".join(r["content"] for r in rows)
    assert res["split"] == {"train_characters": len(corpus), "validation_characters": len(valid_text)}
    assert res["validation_data"] == str(valid) and res["tokenizer"] == "character"
    assert res["vocab_size"] == len(set(corpus + valid_text)) + 1  # + <|endoftext|>
    assert res["eval"]["validation"]["clean"]["loss"] > 0
    assert run_shakespeare.read_texts(run_shakespeare.DataArguments(train_file=str(train)), cache_dir=None) == (
        corpus,
        None,
    )  # no validation file: the last 10 % of the text validates


def test_csv_corpus_rows_are_checked(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('title,body\na,"first\nline"\nb,\nc,third\n', encoding="utf-8")
    args = run_shakespeare.DataArguments(train_file=str(path), text_column="body")
    assert run_shakespeare.read_text(args, None) == "first\nline\n\nthird"  # an empty row is empty text, kept
    with pytest.raises(ValueError, match=r"`--text_column` 'text' is not a column of `--train_file` .*c.csv'"):
        run_shakespeare.read_text(run_shakespeare.DataArguments(train_file=str(path)), None)
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "a"}\n{"text": null}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.jsonl:2 column 'text': no text \(missing or null\)"):
        run_shakespeare.read_text(run_shakespeare.DataArguments(train_file=str(bad)), None)
    bad.write_text('{"text": "a"}\n{"text": 7}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.jsonl:2 column 'text': not text: 7"):
        run_shakespeare.read_text(run_shakespeare.DataArguments(train_file=str(bad)), None)


def test_tokenizer_name_from_scratch_and_a_saved_dataset_with_validation(tmp_path):
    """Any tokenizer (here a tiny WordPiece one) from scratch; --dataset_name a save_to_disk folder whose validation
    split validates."""
    import datasets
    from test_recipes_glue import WORDS, make_tiny_bert

    tok_dir = make_tiny_bert(tmp_path / "bert")
    r = __import__("random").Random(0)
    lines = [" ".join(r.choice(WORDS) for _ in range(12)) for _ in range(60)]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": lines[:48]}),
            "validation": datasets.Dataset.from_dict({"text": lines[48:]}),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "out"
    args = _clm("unused", out, "--tokenizer_name", tok_dir)
    args = args[2:] + ["--dataset_name", str(tmp_path / "saved")]  # drop --train_file
    res = run_shakespeare.main(args)
    assert res["tokenizer"] == tok_dir and res["vocab_size"] == len(WORDS) + 5
    assert res["split"]["validation_characters"] == len("\n".join(lines[48:]))
    assert res["validation_data"].endswith("(validation split)") and res["num_eval_blocks"] >= 1
