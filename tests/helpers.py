"""Factories shared by the tests: tiny config-built models, Trainer arguments and data (no fixtures: conftest.py).

Import them as ``from helpers import tiny_gpt2`` (pytest puts ``tests/`` on ``sys.path``, as for ``conftest``).
"""

import torch


def tiny_gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=97, n_positions=32, bos_token_id=0, eos_token_id=0)
    cfg.update(overrides)
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**cfg))


def tiny_bert(num_labels=2, **overrides):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = dict(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=num_labels,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**cfg))


def tiny_training_args(output_dir, **overrides):
    """TrainingArguments for a 2-step CPU run that writes and reports nothing."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def lm_samples(n=64, seq=16, vocab=97, seed=0):
    """``n`` random token sequences as Trainer samples ``{"input_ids", "labels"}`` (labels = inputs)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def stack_batch(samples, n=4, keys=("input_ids", "labels")):
    """The first ``n`` samples stacked into one batch of ``keys``."""
    return {k: torch.stack([d[k] for d in samples[:n]]) for k in keys}


def patched_gpt2(seq=16, **config):
    """:func:`tiny_gpt2` with ``n_positions=seq``, patched with ``AnalogNoiseConfig(**config)`` (``lm_head`` digital
    unless ``exclude_modules`` is given)."""
    import hf_cim

    config.setdefault("exclude_modules", ["lm_head"])
    return hf_cim.patch_model(tiny_gpt2(n_positions=seq), hf_cim.AnalogNoiseConfig(**config))


# -- hub, model card and secrets tests ------------------------------------------------------------------------------
FAKE_TOKEN = "hf_" + "aB3dE5gH7j" * 3 + "kLm9"  # the shape of a Hub access token (hf_ + 34 letters/digits), fake

ROWS = [
    {"level": 1.0, "t_inference": 0.0, "mean": 0.8125, "std": 0.0125, "min": 0.8, "max": 0.825, "n_chips": 2,
     "values": [0.8, 0.825]},
    {"level": 2.0, "t_inference": 3600.0, "mean": 0.71, "std": 0.02, "min": 0.69, "max": 0.73, "n_chips": 2,
     "values": [0.69, 0.73]},
]  # fmt: skip


def noise_config():
    """A small noise config with non-default fields, for files and cards."""
    from hf_cim import AnalogNoiseConfig
    from hf_cim.noise import GaussianWeightNoise, OutputNoise

    return AnalogNoiseConfig(
        noise=[GaussianWeightNoise(std=0.03), OutputNoise(std=0.05)], seed=4, exclude_modules=["classifier"]
    )
