"""Factories shared by the tests: tiny config-built models, Trainer arguments and data (no fixtures: conftest.py).

Import them as ``from helpers import tiny_gpt2`` (pytest puts ``tests/`` on ``sys.path``, as for ``conftest``).
"""

import mmap

import torch


def fresh_resident_memory(mib):
    """``mib`` MiB new to this process and resident: a fresh anonymous mapping with every page written.

    A tensor of that size may be served from memory the process freed earlier and still holds (a long test session
    leaves plenty): the RSS then does not grow, and a test of a peak would measure the allocator, not the tracker.
    Delete the returned mapping to give the memory back.
    """
    buf = mmap.mmap(-1, int(mib * 2**20))
    torch.frombuffer(buf, dtype=torch.uint8).fill_(1)
    return buf


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


LAYER_KINDS = ("linear", "conv1d", "conv2d")


def record_hook_inputs(kind, noise, tile_size, model_cls, seed=0):
    """What ``model_cls.output`` receives when one patched layer runs on LLM-like data: a list of ``(y, x, w)``.

    The layer (``nn.Linear`` 384→96, GPT-2's ``Conv1D`` 384→96 on GELU inputs, ``nn.Conv2d`` 16→32 3×3: 144 rows)
    has weights ``N(0, 0.02²)`` with 1 % outliers ×8 and inputs with a few outlier features ×25 (as in LLM
    activations), under the ``pcm`` preset's converters with ``tile_size`` rows per tile and ``noise``.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    import hf_cim

    gen = torch.Generator().manual_seed(seed)
    if kind == "linear":
        layer, x = nn.Linear(384, 96), torch.randn(4, 32, 384, generator=gen)
    elif kind == "conv1d":
        layer, x = Conv1D(96, 384), torch.nn.functional.gelu(torch.randn(4, 32, 384, generator=gen))
    else:
        layer, x = nn.Conv2d(16, 32, 3, padding=1), torch.randn(2, 16, 12, 12, generator=gen)
    with torch.no_grad():
        w = torch.randn(layer.weight.shape, generator=gen) * 0.02
        outliers = torch.rand(w.shape, generator=gen) < 0.01
        layer.weight.copy_(torch.where(outliers, w * 8, w))
    feature_dim = 1 if kind == "conv2d" else -1
    index = [slice(None)] * x.dim()
    index[feature_dim] = torch.tensor([5, 11]) if kind == "conv2d" else torch.tensor([5, 77, 300])
    x[tuple(index)] *= 25
    hf_cim.patch_model(layer, hf_cim.get_preset("pcm", 1.0, tile_size=tile_size, noise=noise, seed=seed))
    seen = []
    original = model_cls.output

    def recording(self, y, x, w, ctx):
        seen.append((y.clone(), x.clone(), w.clone()))
        return original(self, y, x, w, ctx)

    model_cls.output = recording
    try:
        with torch.no_grad():
            layer.train()(x)
    finally:
        model_cls.output = original
    return seen


def train_lm_steps(model, ids, steps=8, lr=3e-3, before_step=None):
    """``steps`` AdamW steps of a causal LM on the fixed batch ``ids``; ``before_step(step)`` runs first at each.
    Returns the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def layer_grads(layer, x, g):
    """``(y, ∂x, ∂W, ∂b)`` of one forward of ``layer`` on a fresh copy of ``x`` and a backward of ``g``."""
    x = x.clone().requires_grad_()
    layer.zero_grad()
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()
