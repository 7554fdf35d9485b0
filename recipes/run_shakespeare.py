#!/usr/bin/env python
"""Train GPT-2 on Tiny Shakespeare noise-aware for an analog chip, then measure it on simulated chips.

Two ways, as transformers' ``run_clm.py`` and nanoGPT's ``shakespeare_char``:

* character level, from scratch (default): ``--model_type gpt2 --config_overrides n_layer=4,n_embd=128,...``;
  the tokenizer is built from the text's characters (65 for Tiny Shakespeare) and saved with the model;
* a pretrained GPT-2 with its BPE tokenizer: ``--model_name_or_path gpt2`` (or a local folder).

Data: by default the copy of Tiny Shakespeare shipped with the recipes (``recipes/data/tinyshakespeare.txt.xz``,
1,115,394 characters, checked against its SHA-256: no network). Else ``--train_file`` (a local text file),
``--dataset_name`` (a dataset through ``datasets.load_dataset``: its train split's text column, joined) or
``--data_url`` (downloaded once, cached). Split (fixed, as nanoGPT): the first 90 % of the characters train,
the last 10 % validate (``--validation_split_percentage``). Both are cut into non-overlapping blocks of
``--block_size`` tokens. Reports validation loss and perplexity (``exp(loss)``), clean and on simulated chips.

    python recipes/run_shakespeare.py --output_dir out/char \\
        --config_overrides n_layer=4,n_head=4,n_embd=128 --block_size 128 --max_steps 1000 --preset paper
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import math
import os
import time
import urllib.request
from dataclasses import dataclass, field

from _common import (
    AnalogArguments,
    RowLocator,
    add_digital_warmup,
    add_range_calibration,
    add_recipe_callbacks,
    add_weight_clip,
    build_noise_config,
    calibration_batches,
    card_and_push,
    card_kwargs,
    command_line,
    compare_with_baseline,
    eval_metrics,
    find_checkpoint,
    format_time,
    load_data_file,
    load_named_dataset,
    measure_chips,
    measured_as_chip,
    parse_args,
    prepare_model,
    run_mode,
    save_eval_outputs,
    save_train_outputs,
    setup_logging,
    shutdown,
    snapshot_for_baseline,
    train_digital_baseline,
    write_comparison,
    write_results,
)
from _metrics import perplexity
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import hf_cim

logger = logging.getLogger("recipes.run_shakespeare")

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # of input.txt
# input.txt compressed with xz -9e (356 KiB), source and checksum in recipes/data/README.md
#: --digital_warmup_ratio's default for --gradient ste/ste_detach: the first quarter of the steps digital. On the pcm
#: chips (3 training seeds x 5 chips, 1,000 steps; docs/fidelity.md) it won back 94 % of the chip's cost (61 % from
#: scratch) for 0.005 nats of clean loss (0.039 from scratch).
DIGITAL_WARMUP_RATIO = 0.25
#: --weight_clip_sigmas's default per preset for --gradient ste/ste_detach. On the rram chip (3 training seeds x 5
#: chips; docs/fidelity.md) clipping the noise-aware steps' weights won back 57 % of the chip's cost at 1,000 steps
#: (44 % unclipped) and 60 % at 4,000; a device's programming error and a stuck-on device are fractions of its
#: channel's full scale, which the clip lowers. A tighter bound pays only converged: at 1,000 steps 1.75 won back 25 %.
#: On pcm clipping made no difference, so the other presets do not clip.
WEIGHT_CLIP_SIGMAS = {"rram": 2.5}
SHIPPED_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tinyshakespeare.txt.xz")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained model (Hub id or folder); leave out to train from scratch."}
    )
    model_type: str = field(default="gpt2", metadata={"help": "Architecture when training from scratch."})
    config_overrides: str | None = field(
        default="n_layer=4,n_head=4,n_embd=128,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0",
        metadata={"help": "From scratch: comma-separated config fields, e.g. n_layer=6,n_embd=384,n_head=6."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder or Hub id; default: the model's, or a character-level one from scratch."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "A local text corpus (default: the Tiny Shakespeare copy in recipes/data, no network): a text "
            "file as written (.txt or any other extension), or the --text_column of a .csv / .tsv / .json / .jsonl "
            "file, rows joined by newlines; read with datasets.load_dataset."
        },
    )
    validation_file: str | None = field(
        default=None,
        metadata={
            "help": "A local validation corpus (as --train_file); then all of the training text trains and "
            "--validation_split_percentage is not used."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A dataset for datasets.load_dataset (Hub id or local folder, or a save_to_disk folder) instead: "
            "the rows of its train split's --text_column, joined by newlines, are the text; its validation split, "
            "if it has one, validates (else the text is split as any text)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    text_column: str = field(
        default="text",
        metadata={"help": "--dataset_name, or a csv / tsv / json(l) file: the column holding the text."},
    )
    data_url: str | None = field(
        default=None,
        metadata={
            "help": f"Download the text from this URL instead (cached in --cache_dir; the original {TINY_SHAKESPEARE_URL}"
            " is checked against its SHA-256)."
        },
    )
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "The last N percent of the text is the validation set (nanoGPT: 10)."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training example (context length)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N validation blocks."})
    predict_prompt: str = field(default="ROMEO:", metadata={"help": "--do_predict: the text the model continues."})
    predict_max_new_tokens: int = field(default=200, metadata={"help": "--do_predict: tokens generated."})

    def __post_init__(self) -> None:
        given = [f"--{n}" for n in ("train_file", "dataset_name", "data_url") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one source of text, got {' and '.join(given)}")
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"`--validation_split_percentage` must be in (0, 100), got {self.validation_split_percentage}"
            )
        if self.block_size < 2:
            raise ValueError(f"`--block_size` must be >= 2 tokens, got {self.block_size}")


def read_shipped_text(path: str = SHIPPED_TEXT) -> str:
    """Tiny Shakespeare as shipped with the recipes: ``recipes/data/tinyshakespeare.txt.xz`` decompressed with
    :mod:`lzma`, checked against :data:`TINY_SHAKESPEARE_SHA256` (the SHA-256 of the original ``input.txt``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from this checkout; pass a text with --train_file or --data_url")
    with lzma.open(path) as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != TINY_SHAKESPEARE_SHA256:
        raise RuntimeError(f"{path}: SHA-256 mismatch (expected {TINY_SHAKESPEARE_SHA256}); the file is damaged")
    return data.decode("utf-8")


def join_text_column(ds, column: str, locator: RowLocator, what: str) -> str:
    """The rows of ``column`` joined by newlines; a missing column, or a row without text (null, a number...),
    stops with the file and line (or the dataset, split and row) and the column."""
    if column not in ds.column_names:
        raise ValueError(f"`--text_column` {column!r} is not a column of {what}: {ds.column_names}")
    rows = list(ds[column])
    for i, row in enumerate(rows):
        if not isinstance(row, str):
            problem = "no text (missing or null)" if row is None else f"not text: {row!r}"
            raise ValueError(locator.malformed(i) or f"{locator.where(i)} column {column!r}: {problem}")
    text = "\n".join(rows)
    if not text:
        raise ValueError(f"{what} holds no text")
    return text


def read_file_text(path: str, flag: str, text_column: str, cache_dir: str | None) -> str:
    """A local corpus through ``datasets.load_dataset``: a text file as written, or the ``text_column`` of a csv /
    tsv / json / jsonl file (rows joined by newlines, each checked)."""
    ds, locator = load_data_file(path, flag, extensions=None, cache_dir=cache_dir)
    if locator.ext not in ("csv", "tsv", "json", "jsonl"):
        text = "".join(ds["text"])
        if not text:
            raise ValueError(f"`{flag}` {path!r} is empty")
        return text
    return join_text_column(ds, text_column, locator, f"`{flag}` {path!r}")


def read_dataset_texts(data_args: DataArguments, cache_dir: str | None) -> tuple[str, str | None]:
    """``--dataset_name``: the train split's ``--text_column``, rows joined by newlines; and its validation split's
    when it has one (else None)."""
    try:
        raw = load_named_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    except Exception as err:  # offline without a cache, unknown name
        raise RuntimeError(
            f"could not load `--dataset_name` {data_args.dataset_name!r} ({type(err).__name__}: {err}); "
            "leave it out for the shipped Tiny Shakespeare or pass --train_file"
        ) from err
    if "train" not in raw:
        raise ValueError(f"`--dataset_name` {data_args.dataset_name!r} has no train split: {list(raw)}")
    texts = []
    for split in ("train", "validation"):
        if split in raw:
            locator = RowLocator(name=data_args.dataset_name, split=split)
            what = f"`--dataset_name` {data_args.dataset_name!r} ({split})"
            texts.append(join_text_column(raw[split], data_args.text_column, locator, what))
        else:
            texts.append(None)
    return texts[0], texts[1]


def read_dataset_text(data_args: DataArguments, cache_dir: str | None) -> str:
    """``--dataset_name``: the train split's ``--text_column``, rows joined by newlines."""
    return read_dataset_texts(data_args, cache_dir)[0]


def read_texts(data_args: DataArguments, cache_dir: str | None) -> tuple[str, str | None]:
    """The training text and the validation text (None: the last ``--validation_split_percentage`` of the training
    text validates): ``--validation_file``, else a ``--dataset_name``'s validation split."""
    valid = None
    if data_args.validation_file is not None:
        valid = read_file_text(data_args.validation_file, "--validation_file", data_args.text_column, cache_dir)
    if data_args.dataset_name is not None:
        text, split_valid = read_dataset_texts(data_args, cache_dir)
        return text, valid if valid is not None else split_valid
    return read_text(data_args, cache_dir), valid


def read_text(data_args: DataArguments, cache_dir: str | None) -> str:
    """The text: ``--train_file``, ``--dataset_name``, ``--data_url`` (downloaded once, cached), else the shipped copy."""
    if data_args.train_file is not None:
        return read_file_text(data_args.train_file, "--train_file", data_args.text_column, cache_dir)
    if data_args.dataset_name is not None:
        return read_dataset_text(data_args, cache_dir)
    if data_args.data_url is None:
        return read_shipped_text()
    url = data_args.data_url
    name = hashlib.sha256(url.encode()).hexdigest()[:16] if url != TINY_SHAKESPEARE_URL else "input"
    cache = os.path.join(cache_dir or os.path.expanduser("~/.cache/hf_cim"), "tinyshakespeare", f"{name}.txt")
    if not os.path.isfile(cache):
        logger.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                data = r.read()
        except OSError as err:
            raise RuntimeError(
                f"could not download {url} ({err}); leave out --data_url for the shipped copy, or use --train_file"
            ) from err
        if url == TINY_SHAKESPEARE_URL and hashlib.sha256(data).hexdigest() != TINY_SHAKESPEARE_SHA256:
            raise RuntimeError(f"{url}: SHA-256 mismatch (expected {TINY_SHAKESPEARE_SHA256})")
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache, "wb") as f:
            f.write(data)
    with open(cache, encoding="utf-8") as f:
        return f.read()


def data_source(data_args: DataArguments) -> str:
    """Where the text came from, for results.json."""
    if data_args.train_file is not None:
        return data_args.train_file
    if data_args.dataset_name is not None:
        return (
            f"{data_args.dataset_name} ({data_args.dataset_config_name or 'default'}, train, {data_args.text_column})"
        )
    return data_args.data_url or "recipes/data/tinyshakespeare.txt.xz (shipped, SHA-256 checked)"


def validation_source(data_args: DataArguments, given: bool) -> str:
    """Where the validation text came from, for results.json (``given``: not cut from the training text)."""
    if data_args.validation_file is not None:
        return data_args.validation_file
    if given:
        return f"{data_args.dataset_name} (validation split)"
    return f"the last {data_args.validation_split_percentage:g} % of the training text"


def char_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over the text's distinct characters (sorted, as nanoGPT), saved with the model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    vocab["<|endoftext|>"] = len(vocab)  # unknown characters and the eos/pad id
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character a token
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def blocks(ids: list[int], block_size: int) -> dict[str, list[list[int]]]:
    """Non-overlapping blocks of ``block_size`` tokens (the tail shorter than one block is dropped)."""
    n = len(ids) // block_size
    chunks = [ids[i * block_size : (i + 1) * block_size] for i in range(n)]
    return {"input_ids": chunks, "labels": [list(c) for c in chunks]}


def add_perplexity(evals: dict) -> None:
    """perplexity = exp(mean token cross-entropy), clean and of each chip."""
    for entry in evals.values():
        entry["clean"]["perplexity"] = perplexity(entry["clean"]["loss"])
        for row in entry.get("robustness", []):
            row["perplexity"] = [perplexity(v) for v in row["values"]]
            row["perplexity_mean"] = sum(row["perplexity"]) / len(row["perplexity"])


def generate(
    model, tokenizer, data_args: DataArguments, noise_config, t_inference: float, analog_args, calibration=()
) -> dict[str, str]:
    """``--do_predict``: greedy continuations of ``--predict_prompt`` by the digital model and by simulated chip 0
    (the measured noise config at its level, drifted to the last ``--eval_t_inference``; a static DAC calibrated on
    ``calibration`` for a digital model)."""
    import torch

    model.eval()
    ids = tokenizer(data_args.predict_prompt, return_tensors="pt")["input_ids"].to(model.device)
    limit = model.config.n_positions - ids.shape[1]
    kwargs = {
        "max_new_tokens": min(data_args.predict_max_new_tokens, limit),
        "do_sample": False,
        "pad_token_id": tokenizer.eos_token_id,
    }
    out = {}
    with measured_as_chip(model, noise_config, calibration, analog_args):
        with torch.no_grad():
            with hf_cim.noise_disabled(model):
                out["digital"] = tokenizer.decode(model.generate(ids, **kwargs)[0])
            hf_cim.program_chip(model, seed=0, t_inference=t_inference)
            try:
                out[f"chip_0_level{noise_config.level:g}_t{format_time(t_inference)}"] = tokenizer.decode(
                    model.generate(ids, **kwargs)[0]
                )
            finally:
                hf_cim.clear_chip(model)
    return out


def main(argv: list[str] | None = None) -> dict:
    start = time.time()
    model_args, data_args, analog_args, training_args = parse_args(
        (ModelArguments, DataArguments, AnalogArguments, TrainingArguments), argv
    )
    setup_logging(training_args)
    run_mode(training_args, analog_args)
    if not training_args.do_train and not model_args.model_name_or_path:
        raise ValueError(
            "without `--do_train` there is no model to evaluate: pass `--model_name_or_path` (a saved model folder, "
            "digital or analog)"
        )
    noise_config = build_noise_config(analog_args)
    checkpoint = find_checkpoint(training_args, analog_args)
    text, valid_text = read_texts(data_args, model_args.cache_dir)
    set_seed(training_args.seed)

    # tokenizer
    if model_args.tokenizer_name or model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.tokenizer_name or model_args.model_name_or_path, cache_dir=model_args.cache_dir
        )
        char_level = False
    else:
        tokenizer = char_tokenizer(text + (valid_text or ""))  # every character of the corpus in the vocabulary
        char_level = True

    # fixed split on characters: first (100 - p) % train, last p % validation (unless a validation text is given);
    # only what the run needs is tokenized
    import datasets

    validation_given = valid_text is not None
    if valid_text is None:
        cut = int(len(text) * (1 - data_args.validation_split_percentage / 100))
        train_text, valid_text = text[:cut], text[cut:]
    else:
        train_text = text
    train = valid = None
    with training_args.main_process_first(desc="tokenize"):
        if training_args.do_train:
            train = datasets.Dataset.from_dict(blocks(tokenizer(train_text)["input_ids"], data_args.block_size))
        if training_args.do_eval:
            valid = datasets.Dataset.from_dict(blocks(tokenizer(valid_text)["input_ids"], data_args.block_size))
    if (train is not None and len(train) == 0) or (valid is not None and len(valid) == 0):
        raise ValueError(
            f"the text gives {len(train or [])} training and {len(valid or [])} validation blocks of --block_size "
            f"{data_args.block_size} tokens; use a longer text or a smaller --block_size"
        )
    if train is not None and data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if valid is not None and data_args.max_eval_samples is not None:
        valid = valid.select(range(min(data_args.max_eval_samples, len(valid))))
    logger.info(
        "%d characters (%s tokenizer, vocab %d): %s train / %s validation blocks of %d tokens",
        len(train_text) + len(valid_text),
        "character" if char_level else "pretrained",
        len(tokenizer),
        len(train) if train is not None else "no",
        len(valid) if valid is not None else "no",
        data_args.block_size,
    )

    # model
    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
        if model.config.n_positions < data_args.block_size:
            raise ValueError(
                f"`--block_size` {data_args.block_size} exceeds the model's n_positions {model.config.n_positions}"
            )
    else:
        config = AutoConfig.for_model(
            model_args.model_type,
            vocab_size=len(tokenizer),
            n_positions=data_args.block_size,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if model_args.config_overrides:
            try:
                config.update_from_string(model_args.config_overrides)
            except ValueError as err:
                raise ValueError(f"`--config_overrides` {model_args.config_overrides!r}: {err}") from err
        model = AutoModelForCausalLM.from_config(config)
        logger.info("from scratch: %s, %.2fM parameters", config.to_diff_dict(), model.num_parameters() / 1e6)

    analog_checkpoint = hf_cim.patch.get_config(model) is not None
    initial_model = snapshot_for_baseline(model, analog_args)  # --digital_baseline: the twin starts from here
    noise_config = prepare_model(model, noise_config, analog_args, train=training_args.do_train)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=valid,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    add_recipe_callbacks(trainer, tokens_per_sample=data_args.block_size)
    calibration = calibration_batches(trainer, train if train is not None else valid, analog_args)
    add_range_calibration(trainer, calibration, analog_args)
    add_digital_warmup(trainer, analog_args, ste_default=DIGITAL_WARMUP_RATIO)
    add_weight_clip(trainer, analog_args, ste_defaults=WEIGHT_CLIP_SIGMAS)
    results: dict = {
        "recipe": "run_shakespeare",
        "command": command_line(argv, __file__),
        "do_train": training_args.do_train,
        "do_eval": training_args.do_eval,
        "do_predict": training_args.do_predict,
        "model": model_args.model_name_or_path
        or f"{model_args.model_type} from scratch ({model_args.config_overrides})",
        "analog_checkpoint": analog_checkpoint,
        "tokenizer": "character" if char_level else (model_args.tokenizer_name or model_args.model_name_or_path),
        "vocab_size": len(tokenizer),
        "num_parameters": model.num_parameters(),
        "data": data_source(data_args),
        "validation_data": validation_source(data_args, validation_given),
        "text_characters": len(train_text) + len(valid_text),
        "split": {"train_characters": len(train_text), "validation_characters": len(valid_text)},
        "num_train_blocks": len(train) if train is not None else None,
        "num_eval_blocks": len(valid) if valid is not None else None,
        "block_size": data_args.block_size,
        "metric": "loss",
        "analog": {
            "preset": analog_args.preset if not analog_checkpoint or analog_args.preset_given else "checkpoint",
            "level": noise_config.level,
            "gradient": analog_args.gradient,
            "mask_saturated": analog_args.mask_saturated,
            "backward_weights": analog_args.backward_weights,
            "program_gradient": analog_args.program_gradient,
            "digital_warmup_ratio": analog_args.digital_warmup_ratio,
            "train_t_inference": analog_args.train_time,
            "weight_clip_sigmas": analog_args.weight_clip_sigmas,
            "input_range_alpha": analog_args.input_range_alpha,
            "output_range_alpha": analog_args.output_range_alpha,
            "chip_calibration": analog_args.chip_calibration,
            "config": noise_config.to_dict(),
        },
    }
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # config.json carries the noise config (quantization_config) for an analog model
        results["train"] = save_train_outputs(trainer, train_result, len(train))
        results["analog"]["config"] = noise_config.to_dict()  # with a static DAC: the ranges calibrated in training
    if training_args.do_eval:
        evals = measure_chips(trainer, noise_config, analog_args, {"validation": valid}, "loss", calibration)
        add_perplexity(evals)
        results["eval"] = evals
        val = evals["validation"]
        trained = [r for r in val.get("robustness", []) if math.isclose(r["level"], noise_config.level)]
        logger.info(
            "validation loss: clean %.4f (perplexity %.2f)%s",
            val["clean"]["loss"],
            val["clean"]["perplexity"],
            f"; noisy at level {noise_config.level:g}: {trained[0]['mean']:.4f} ± {trained[0]['std']:.4f} "
            f"(perplexity {trained[0]['perplexity_mean']:.2f})"
            if trained
            else "",
        )
        metrics = eval_metrics(evals, "validation", "loss", {"validation": len(valid)})
        metrics["perplexity"] = val["clean"]["perplexity"]  # transformers' run_clm.py key
        save_eval_outputs(trainer, metrics)
    if training_args.do_predict:
        results["predict"] = generate(
            model, tokenizer, data_args, noise_config, max(analog_args.t_inference), analog_args, calibration
        )  # fmt: skip
        if trainer.is_world_process_zero():
            with open(os.path.join(training_args.output_dir, "generated_predictions.txt"), "w") as f:
                f.writelines(f"## {k}\n{v}\n\n" for k, v in results["predict"].items())
    if initial_model is not None:
        _, baseline = train_digital_baseline(
            trainer, initial_model, noise_config, analog_args, {"validation": valid}, "loss", data_args.block_size,
            calibration,
        )  # fmt: skip
        add_perplexity(baseline["eval"])
        results["digital_baseline"] = baseline
        results["comparison"] = compare_with_baseline(results["eval"], baseline["eval"], "loss")
    write_results(trainer, results, start)
    if "comparison" in results:
        write_comparison(trainer, results["comparison"])
    if training_args.do_train:
        card = card_kwargs(
            results, "text-generation", [data_args.dataset_name or "tiny_shakespeare"], model_args.model_name_or_path
        )
        card_and_push(trainer, hf_cim.patch.get_config(model) is not None, card, push=analog_args.push_to_hub)
    return results


if __name__ == "__main__":
    main()
    shutdown()
