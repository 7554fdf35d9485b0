"""Bit-for-bit before/after check of a refactoring: outputs, losses and every gradient of three tiny models.

    python benchmarks/equivalence_dump.py --out /tmp/eq_before.pt          # at the old commit
    python benchmarks/equivalence_dump.py --out /tmp/eq_after.pt           # at the new one
    python benchmarks/equivalence_dump.py --compare /tmp/eq_before.pt /tmp/eq_after.pt

Models, built from configs with fixed seeds (nothing from the Hub): a 2-layer GPT-2 (``Conv1D`` projections, causal-LM
loss), a 2-layer BERT (``nn.Linear``, sequence classification) and a small ``nn.Conv2d`` net. Each is patched with
every preset (:func:`hf_cim.list_presets`, level 1), a bare ``AnalogNoiseConfig()`` and a few configs that reach the
other branches of the tile simulation (crossbar tiling, input slicing, a per-tensor DAC, no converters, every noise
model), in each gradient mode the config allows (``ste`` and ``ste_detach`` with the presets' training defaults,
``full`` without them). Per run it records the train-mode loss, outputs and all parameter gradients, the eval-mode
outputs of a programmed chip (:func:`hf_cim.program_chip`; ``pcm_drift`` also one hour later) and of an unprogrammed
eval forward.

``--compare A B`` lists every key missing on one side and every tensor that is not bit-for-bit equal
(:func:`torch.equal`, NaNs at the same places count as equal) and exits non-zero if there is any.

``--backend eager`` turns the C kernels and ``torch.compile`` off (``HF_CIM_NATIVE=0``, ``HF_CIM_COMPILE=0``), so
the torch reference of every fused stage runs; the default uses what the CPU uses (the C kernels). One thread, so
that reductions are deterministic. Takes about 20 s on one CPU core.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time


def _setup_env(backend: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["HF_CIM_COMPILE"] = "0"
    if backend == "eager":
        os.environ["HF_CIM_NATIVE"] = "0"


def _models():
    import torch
    from torch import nn
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_embd=64, n_head=2, vocab_size=61, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
    )  # fmt: skip
    torch.manual_seed(1)
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=61, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
    )  # fmt: skip
    torch.manual_seed(2)
    conv = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 3 * 3, 5),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 61, (2, 12), generator=gen)
    labels = torch.randint(0, 3, (2,), generator=gen)
    pixels = torch.randn(2, 3, 8, 8, generator=gen)
    targets = torch.randint(0, 5, (2,), generator=gen)

    def gpt2_run(model):
        out = model(input_ids=ids, labels=ids)
        return out.loss, out.logits

    def bert_run(model):
        out = model(input_ids=ids, labels=labels)
        return out.loss, out.logits

    def conv_run(model):
        logits = model(pixels)
        return nn.functional.cross_entropy(logits, targets), logits

    return {"gpt2": (gpt2, gpt2_run), "bert": (bert, bert_run), "conv2d": (conv, conv_run)}


def _configs():
    """``(name, make(gradient) -> AnalogNoiseConfig, modes)``."""
    import hf_cim
    from hf_cim.noise import (
        GaussianWeightNoise,
        IRDrop,
        LogNormalNoise,
        OutputNoise,
        PCMNoise,
        ReadNoise,
        ReRAMNoise,
        StuckAtFaults,
        ThermalNoise,
    )

    modes = ("ste", "ste_detach", "full")
    out = []
    for name in hf_cim.list_presets():
        out.append((f"preset:{name}", lambda g, n=name: hf_cim.get_preset(n, 1.0, gradient=g, seed=0), modes))
    out.append(("bare", lambda g: hf_cim.AnalogNoiseConfig(gradient=g), modes))

    def extra(name, **fields):
        out.append((name, lambda g: hf_cim.AnalogNoiseConfig(gradient=g, seed=0, **fields), modes))

    extra("tiled", tile_size=40)
    extra("tiled_levers", tile_size=40, out_bound=2.0)  # saturates: the ADC's clip matters
    extra("sliced", tile_size=40, input_slice_bits=3)
    extra("per_tensor_dac", input_quant="per_tensor", tile_size=40)
    extra("no_converters", input_bits=None, weight_bits=None, output_bits=None, tile_size=40)
    extra("no_adc", output_bits=None, tile_size=40)
    extra("float_weights", weight_bits=None)
    extra("gaussian_per_tensor", noise=[GaussianWeightNoise(std=0.05, per_channel=False), OutputNoise(std=0.1)])
    extra("noise_order", noise=[OutputNoise(std=0.1), LogNormalNoise(std=0.1), GaussianWeightNoise(std=0.05)])
    extra(
        "read_noise",
        tile_size=40,
        noise=[
            ReadNoise(std=0.03, shape="constant"),
            ReadNoise(std=0.03, shape="pcm", draw="batch"),
            ReadNoise(std=0.03, shape="constant", draw="batch"),
        ],
    )
    extra(
        "devices",
        tile_size=40,
        noise=[
            PCMNoise(),
            ReRAMNoise(),
            StuckAtFaults(p_off=0.01, p_on=0.01),
            ThermalNoise(),
            LogNormalNoise(std=0.2, mean_corrected=True),
            IRDrop(scale=2.0, column_current="mean"),
        ],
    )
    # The STE levers (mask_saturated, backward_weights="programmed") on a non-preset config, ste modes only.
    out.append(
        (
            "levers",
            lambda g: hf_cim.AnalogNoiseConfig(
                gradient=g, seed=0, tile_size=40, out_bound=2.0, mask_saturated=True, backward_weights="programmed"
            ),
            ("ste", "ste_detach"),
        )
    )
    return out


def dump(out_path: str) -> None:
    import torch

    import hf_cim
    from hf_cim import native

    torch.set_num_threads(1)
    results: dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    models = _models()
    for cfg_name, make, modes in _configs():
        for mode in modes:
            for model_name, (base, run) in models.items():
                prefix = f"{model_name}/{cfg_name}/{mode}"
                model = copy.deepcopy(base)
                hf_cim.patch_model(model, make(mode))
                model.train()
                loss, logits = run(model)
                loss.backward()
                results[f"{prefix}/train/loss"] = loss.detach().clone()
                results[f"{prefix}/train/logits"] = logits.detach().clone()
                for pname, p in model.named_parameters():
                    if p.grad is not None:
                        results[f"{prefix}/grad/{pname}"] = p.grad.detach().clone()
                model.eval()
                with torch.no_grad():
                    results[f"{prefix}/eval_unprogrammed/logits"] = run(model)[1].clone()
                    hf_cim.program_chip(model, seed=3)
                    results[f"{prefix}/eval_chip/logits"] = run(model)[1].clone()
                    results[f"{prefix}/eval_chip_again/logits"] = run(model)[1].clone()
                    if cfg_name == "preset:pcm_drift":
                        hf_cim.program_chip(model, seed=3, t_inference=3600.0)
                        results[f"{prefix}/eval_chip_1h/logits"] = run(model)[1].clone()
    meta = {
        "native": native.available(),
        "native_env": os.environ.get("HF_CIM_NATIVE", ""),
        "torch": str(torch.__version__),
        "seconds": time.perf_counter() - start,
    }
    torch.save({"meta": meta, "tensors": results}, out_path)
    print(f"{len(results)} tensors -> {out_path} ({meta['seconds']:.1f} s, native kernels: {meta['native']})")


def _equal(a, b) -> bool:
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    both_nan = torch.isnan(a) & torch.isnan(b) if a.is_floating_point() else torch.zeros_like(a, dtype=torch.bool)
    return bool(torch.equal(torch.where(both_nan, 0, a), torch.where(both_nan, 0, b)))


def compare(path_a: str, path_b: str) -> int:
    import torch

    a = torch.load(path_a, weights_only=True)
    b = torch.load(path_b, weights_only=True)
    ta, tb = a["tensors"], b["tensors"]
    print(f"A: {path_a} {a['meta']}\nB: {path_b} {b['meta']}")
    problems = []
    for key in sorted(set(ta) | set(tb)):
        if key not in ta or key not in tb:
            problems.append(f"{key}: only in {'A' if key in ta else 'B'}")
            continue
        x, y = ta[key], tb[key]
        if not _equal(x, y):
            if x.shape != y.shape or x.dtype != y.dtype:
                problems.append(f"{key}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
            else:
                d = (x.double() - y.double()).abs()
                n = int((x != y).sum())
                problems.append(f"{key}: {n}/{x.numel()} elements differ, max |diff| {d.max().item():.3g}")
    for p in problems:
        print("DIFF", p)
    print(f"{len(set(ta) | set(tb))} tensors compared, {len(problems)} differ")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the dump here (.pt)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two dumps bit for bit")
    parser.add_argument("--backend", choices=("default", "eager"), default="default")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        parser.error("give --out FILE or --compare A B")
    _setup_env(args.backend)
    dump(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
