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
