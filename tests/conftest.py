import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch.compile of the fused kernels takes tens of seconds per process: tests run the C kernels on the CPU (built
# once, in about a second) and never torch.compile, except tests/test_kernels.py, which checks every
# implementation against the eager one.
os.environ.setdefault("HF_CIM_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fixed_threads():
    # Deterministic reductions and no oversubscription on the 2-core CI machine.
    torch.set_num_threads(1)
    yield


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
