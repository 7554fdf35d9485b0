"""MoE experts (transformers 5's fused 3-D expert weights) on the simulated crossbar: hf_cim/moe.py."""

import copy
import logging
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_cim
from hf_cim import AnalogNoiseConfig
from hf_cim.moe import AnalogExpertsMixin, _Plan

NOISE = [{"name": "gaussian_weight", "std": 0.05}, {"name": "output_noise", "std": 0.05}]
STATIC = [{"name": "gaussian_weight", "std": 0.05}]  # program hook only: a programmed chip is then deterministic
VOCAB = 97


def tiny_mixtral(**overrides):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**cfg))


def tiny_gpt_oss():
    """gpt-oss: transposed expert weights ``(E, in, out)``, biases, an interleaved clamped gate of its own."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    return GptOssForCausalLM(
        GptOssConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            layer_types=["full_attention", "full_attention"],
        )
    )


def _ids(seed=1, shape=(2, 12)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _experts(model):
    return [(n, m) for n, m in model.named_modules() if n.endswith("mlp.experts")]


def _config(**kw):
    kw.setdefault("noise", NOISE)
    kw.setdefault("tile_size", 16)  # hidden 32 and intermediate 64: several tiles per expert product
    kw.setdefault("seed", 0)
    return AnalogNoiseConfig(**kw)


def _grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_experts_are_patched_listed_and_keep_their_parameters():
    model = tiny_mixtral()
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    hf_cim.patch_model(model, _config())
    names = [n for n, _ in hf_cim.patch.analog_layers(model)]
    assert [n for n, _ in _experts(model)] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for name, module in _experts(model):
        assert name in names
        assert isinstance(module, AnalogExpertsMixin) and type(module).__name__ == "NoisyMixtralExperts"
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())


def test_static_dac_refuses_experts_at_patch_time():
    model = tiny_mixtral()
    with pytest.raises(ValueError, match="MoE experts"):
        hf_cim.patch_model(model, _config(input_quant="static"))
    assert not list(hf_cim.patch.analog_layers(model))  # nothing changed
    experts = [n for n, _ in _experts(model)]
    hf_cim.patch_model(model, _config(input_quant="static", exclude_modules=experts))  # the dense layers only
    assert all(not n.endswith("experts") for n, _ in hf_cim.patch.analog_layers(model))


def test_adc_ranges_are_calibrated_for_the_dense_layers_and_refused_for_experts():
    """Per-layer ADC ranges belong to dense layers: calibration skips the experts (they keep ``out_bound``), and a
    range naming an expert bank is refused at patch time."""
    from hf_cim.calibration import calibrate_output_ranges

    model = tiny_mixtral()
    hf_cim.patch_model(model, _config())
    ids = _ids()
    found = calibrate_output_ranges(model, [ids], forward=lambda m, b: m(input_ids=b))
    experts = {n for n, _ in _experts(model)}
    dense = {n for n, _ in hf_cim.patch.analog_layers(model)} - experts
    assert set(found) == dense and dense
    assert torch.isfinite(model(input_ids=ids).logits).all()
    with pytest.raises(ValueError, match="output_ranges.*experts"):
        hf_cim.patch_model(tiny_mixtral(), _config(output_ranges={"model.layers.0.mlp.experts": 5.0}))


def test_noise_disabled_is_the_plain_model_and_noise_is_seeded():
    plain = tiny_mixtral().eval()
    a, b = copy.deepcopy(plain), copy.deepcopy(plain)
    hf_cim.patch_model(a, _config())
    hf_cim.patch_model(b, _config())
    ids = _ids()
    with torch.no_grad():
        ref = plain(ids).logits
        with hf_cim.noise_disabled(a):
            assert torch.equal(a(ids).logits, ref)
        y_a, y_b = a(ids).logits, b(ids).logits
        assert not torch.allclose(y_a, ref, atol=1e-3)  # really noisy
        assert torch.equal(y_a, y_b)  # same seed, same noise
        assert not torch.equal(a(ids).logits, y_a)  # the stream moves on
        hf_cim.reseed(a, 0)
        assert torch.equal(a(ids).logits, y_a)


def test_only_the_experts_are_noisy():
    plain = tiny_mixtral().eval()
    model = copy.deepcopy(plain)
    hf_cim.patch_model(model, _config(target_modules=r".*\.experts"))
    assert [n for n, _ in hf_cim.patch.analog_layers(model)] == [n for n, _ in _experts(model)]
    ids = _ids()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-3)


@pytest.mark.parametrize("mode", ["ste", "ste_detach"])
@pytest.mark.parametrize("levers", [False, True], ids=["clean_backward", "levers"])
def test_ste_projection_gradient_is_each_experts_clean_vjp(mode, levers):
    """The STE contract per projection: noisy forward, each expert's clean VJP (``F.linear``'s) backward."""
    model = tiny_mixtral()
    hf_cim.patch_model(model, _config(gradient=mode, target_modules=r".*\.experts"))
    experts = model.model.layers[0].mlp.experts
    if levers:  # on, but unable to bite: no ADC clip (huge out_bound), programmed = clean weights (float, no
        # static noise); the tiled lever backward must then give the clean VJP too
        experts.hf_cim_config = experts.hf_cim_config.replace(
            mask_saturated=True, backward_weights="programmed", out_bound=1e6, weight_bits=None, noise=[NOISE[1]]
        )
    plan = _Plan.from_counts([3, 0, 5, 2])  # expert 1 not hit
    torch.manual_seed(1)
    x = torch.randn(10, 32, requires_grad=True)
    g = torch.randn(10, 128)
    y = experts._project("gate_up_proj", x, plan)
    y.backward(g)
    w = experts.gate_up_proj
    x_ref = x.detach().clone().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    y_ref = torch.cat([F.linear(x_ref[plan.rows(e)], w_ref[e]) for e in plan.hit])
    y_ref.backward(g)
    assert not torch.allclose(y, y_ref, atol=1e-3)  # the forward really is noisy
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
    assert torch.all(w.grad[1] == 0)


@pytest.mark.parametrize("mode", ["ste", "ste_detach"])
def test_program_gradient_projection_equals_full_without_converters(mode):
    """Lognormal devices, no DAC or ADC: with ``program_gradient`` and the programmed input weights, a projection's
    gradients are ``full``'s for the same draw (each hit expert's weight gradient scaled by its devices' factors);
    an expert not hit gets none."""
    fields = dict(noise=[{"name": "lognormal", "std": 0.3}], input_bits=None, output_bits=None,
                  target_modules=r".*\.experts")  # fmt: skip
    plan = _Plan.from_counts([3, 0, 5, 2])
    torch.manual_seed(1)
    x0, g = torch.randn(10, 32), torch.randn(10, 128)
    grads = {}
    for name, levers in [("full", dict(gradient="full")),
                         ("chain", dict(gradient=mode, backward_weights="programmed", program_gradient=True)),
                         ("crossbar", dict(gradient=mode, backward_weights="programmed"))]:  # fmt: skip
        model = tiny_mixtral()
        hf_cim.patch_model(model, _config(**fields, **levers))
        experts = model.model.layers[0].mlp.experts
        x = x0.clone().requires_grad_()
        y = experts._project("gate_up_proj", x, plan)
        y.backward(g)
        grads[name] = (y.detach(), x.grad, experts.gate_up_proj.grad)
    for got, ref in zip(grads["chain"], grads["full"]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert torch.all(grads["chain"][2][1] == 0)
    gw_crossbar, gw_full = grads["crossbar"][2], grads["full"][2]
    assert (gw_crossbar - gw_full).abs().max() > 0.1 * gw_full.abs().max()


@pytest.mark.parametrize("levers", [False, True, "chain"], ids=["clean_backward", "levers", "chain"])
def test_ste_and_ste_detach_agree_for_the_same_seed(levers):
    extra = {"mask_saturated": True, "backward_weights": "programmed", "out_bound": 0.3} if levers else {}
    if levers == "chain":
        extra.update(program_gradient=True, noise=[{"name": "lognormal", "std": 0.2}, NOISE[1]])
    base = tiny_mixtral()
    runs = {}
    for mode in ("ste", "ste_detach"):
        model = copy.deepcopy(base)
        hf_cim.patch_model(model, _config(gradient=mode, **extra))
        runs[mode] = _grads(model, _ids())
    (loss_s, g_s), (loss_d, g_d) = runs["ste"], runs["ste_detach"]
    torch.testing.assert_close(loss_s, loss_d)
    assert g_s.keys() == g_d.keys() and "model.layers.0.mlp.experts.gate_up_proj" in g_s
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_without_converters_and_noise_the_analog_model_is_the_plain_one(arch):
    """Routing, gate, biases and layouts: with every converter off and level 0 the analog data flow computes the
    plain model (up to float rounding), forward and ``ste`` backward (routing weights and router included)."""
    plain = tiny_mixtral() if arch == "mixtral" else tiny_gpt_oss()
    model = copy.deepcopy(plain)
    cfg = _config(input_bits=None, weight_bits=None, output_bits=None, level=0.0, target_modules=r".*\.experts")
    hf_cim.patch_model(model, cfg)
    assert len(list(hf_cim.patch.analog_layers(model))) == 2
    ids = _ids()
    loss_p, g_p = _grads(plain, ids)
    loss_a, g_a = _grads(model, ids)
    torch.testing.assert_close(loss_a, loss_p, rtol=1e-5, atol=1e-6)
    assert g_a.keys() == g_p.keys()
    for name in g_p:
        torch.testing.assert_close(g_a[name], g_p[name], rtol=1e-3, atol=1e-6, msg=name)


def test_gpt_oss_experts_are_analog_and_digital_when_disabled():
    plain = tiny_gpt_oss().eval()
    model = copy.deepcopy(plain)
    hf_cim.patch_model(model, _config())
    assert {type(m).__name__ for _, m in _experts(model)} == {"NoisyGptOssExperts"}
    ids = _ids()
    with torch.no_grad():
        ref = plain(ids).logits
        with hf_cim.noise_disabled(model):
            assert torch.equal(model(ids).logits, ref)
        assert not torch.allclose(model(ids).logits, ref, atol=1e-3)


def test_full_mode_trains():
    model = tiny_mixtral()
    hf_cim.patch_model(model, _config(gradient="full"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = _ids(shape=(4, 16))
    losses = []
    for _ in range(6):
        loss, grads = _grads(model, ids)
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert grads["model.layers.1.mlp.experts.down_proj"].abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses


def test_programmed_chip_is_deterministic_across_forwards():
    model = tiny_mixtral().eval()
    hf_cim.patch_model(model, _config(noise=STATIC))
    ids = _ids()
    with torch.no_grad():
        unprogrammed = [model(ids).logits for _ in range(2)]
        assert not torch.equal(*unprogrammed)  # static noise drawn anew at every forward
        hf_cim.program_chip(model, seed=3)
        assert all(m.is_programmed for _, m in _experts(model))
        chip3 = model(ids).logits
        assert torch.equal(model(ids[:, :7]).logits, chip3[:, :7])  # same devices for another batch (causal)
        assert torch.equal(model(ids).logits, chip3)
        hf_cim.program_chip(model, seed=4)
        assert not torch.equal(model(ids).logits, chip3)
        hf_cim.program_chip(model, seed=3)
        assert torch.equal(model(ids).logits, chip3)  # the same seed programs the same chip
        hf_cim.clear_chip(model)
        assert not any(m.is_programmed for _, m in _experts(model))
        assert not torch.equal(model(ids).logits, model(ids).logits)


def test_batched_programming_is_per_expert_programming():
    """Quantizing the (experts·out, in) stack at once equals quantizing every expert on its own (converters only),
    and a noise model with whole-matrix statistics is programmed per expert."""
    from hf_cim.moe import rowwise_program
    from hf_cim.noise import NoiseContext
    from hf_cim.noise.gaussian import GaussianWeightNoise
    from hf_cim.tile import program_weights

    model = tiny_mixtral()
    hf_cim.patch_model(model, _config(level=0.0))
    experts = model.model.layers[0].mlp.experts
    cfg = experts.hf_cim_config
    ctx = NoiseContext(generator=torch.Generator().manual_seed(0), level=0.0)
    w = experts.gate_up_proj.detach()
    w_prog, scale = experts._program_experts(w, [0, 2, 3], ctx, differentiable=False)
    for j, e in enumerate([0, 2, 3]):
        ref_prog, ref_scale = program_weights(w[e].float(), cfg, ctx, cfg.noise)
        assert torch.equal(w_prog[j], ref_prog) and torch.equal(scale[j], ref_scale)
    assert rowwise_program([GaussianWeightNoise(std=0.1)], ctx)
    assert not rowwise_program([GaussianWeightNoise(std=0.1, per_channel=False)], ctx)
    ctx.level = 1.0
    w_prog, _ = experts._program_experts(w, None, ctx, differentiable=False)  # per expert, no error
    assert w_prog.shape == w.shape


# -- stacking is a capability a model declares ---------------------------------------------------------------------
@dataclass
class MyLogNormal(hf_cim.NoiseModel):
    """A user's own lognormal programming noise (no subclass of the built-ins): element-wise, declared rowwise."""

    std: float = 0.1

    def rowwise(self, hook, ctx):
        return hook == "program"

    def program(self, w, ctx):
        return w * ctx.randn_like(w).mul_(self.std * ctx.level).clamp_(-20.0, 20.0).exp_()


@dataclass
class MyLogNormalUndeclared(MyLogNormal):
    """The same hook without the declaration: programmed one expert at a time."""

    rowwise = hf_cim.NoiseModel.rowwise


@dataclass
class MyGaussian(hf_cim.NoiseModel):
    """A user's additive Gaussian programming noise: declaring ``additive_gaussian`` makes it rowwise too."""

    std: float = 0.05

    def additive_gaussian(self, hook):
        return self.std if hook == "program" else None

    def program(self, w, ctx):
        return w + (self.std * ctx.level) * ctx.randn_like(w)


@pytest.fixture
def user_models():
    from hf_cim.noise.base import _REGISTRY

    classes = {
        "my_lognormal": MyLogNormal,
        "my_lognormal_undeclared": MyLogNormalUndeclared,
        "my_gaussian": MyGaussian,
    }
    for name, cls in classes.items():
        hf_cim.register_noise_model(name, cls)
    yield classes
    for name in classes:
        _REGISTRY.pop(name, None)


@pytest.mark.parametrize("gradient", ["ste", "full"])
def test_a_user_model_declaring_rowwise_takes_the_builtins_path(user_models, gradient):
    """Same capability, same path, same numbers: a user's model that declares :meth:`NoiseModel.rowwise` (or
    ``additive_gaussian``) is programmed over the stacked experts like the built-in it copies, giving its loss and
    gradients bit for bit; without the declaration it is programmed per expert (other draws)."""
    from hf_cim.moe import rowwise_program
    from hf_cim.noise import GaussianWeightNoise, LogNormalNoise, NoiseContext

    ctx = NoiseContext(generator=None)
    assert rowwise_program([MyLogNormal(), MyGaussian()], ctx)
    assert not rowwise_program([MyLogNormal(), MyLogNormalUndeclared()], ctx)
    ids = _ids()
    runs = {}
    for label, noise in [
        ("lognormal", [LogNormalNoise(0.1)]),
        ("mine", [MyLogNormal(0.1)]),
        ("undeclared", [MyLogNormalUndeclared(0.1)]),
        ("gaussian", [GaussianWeightNoise(0.05)]),
        ("my_gaussian", [MyGaussian(0.05)]),
    ]:
        model = hf_cim.patch_model(tiny_mixtral(), _config(noise=noise, gradient=gradient))
        loss, grads = _grads(model, ids)
        runs[label] = [loss, *grads.values()]
    for builtin, mine in [("lognormal", "mine"), ("gaussian", "my_gaussian")]:
        assert len(runs[builtin]) == len(runs[mine]) > 1
        assert all(torch.equal(a, b) for a, b in zip(runs[builtin], runs[mine])), (builtin, mine)
    assert not torch.equal(runs["lognormal"][0], runs["undeclared"][0])


def test_save_and_reload_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_mixtral()
    config = _config()
    hf_cim.patch_model(model, config)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf_cim.patch.get_config(again) == config
    assert [n for n, _ in hf_cim.patch.analog_layers(again)] == [n for n, _ in hf_cim.patch.analog_layers(model)]
    assert {type(m).__name__ for _, m in _experts(again)} == {"NoisyMixtralExperts"}
    model.eval()
    ids = _ids()
    with torch.no_grad():
        with hf_cim.noise_disabled(model), hf_cim.noise_disabled(again):
            assert torch.equal(again(ids).logits, model(ids).logits)
        hf_cim.reseed(model, 0)
        hf_cim.reseed(again, 0)
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_unpatch_restores_the_plain_experts():
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    plain = tiny_mixtral().eval()
    model = copy.deepcopy(plain)
    hf_cim.patch_model(model, _config())
    hf_cim.program_chip(model, seed=0)
    hf_cim.unpatch_model(model)
    for _, module in _experts(model):
        assert type(module) is MixtralExperts
        assert not any(k.startswith(("hf_cim", "_hf_cim")) for k in vars(module))
    assert hf_cim.patch.get_config(model) is None and not list(hf_cim.patch.analog_layers(model))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    hf_cim.patch_model(model, _config())  # patchable again


@pytest.mark.parametrize("chain", [False, True], ids=["crossbar", "chained"])
def test_gradient_checkpointing_replays_the_experts_noise(chain):
    base = tiny_mixtral()
    ids = _ids()
    runs = []
    fields = {}
    if chain:  # lognormal devices: the chained gradient differs from the crossbar's
        fields = dict(backward_weights="programmed", program_gradient=True, noise=[{"name": "lognormal", "std": 0.2}])
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        model.config.use_cache = False
        hf_cim.patch_model(model, _config(**fields))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        runs.append(_grads(model, ids))
    (loss_a, g_a), (loss_b, g_b) = runs
    assert torch.equal(loss_a, loss_b)
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=0, atol=0, msg=name)


class FakeExperts(nn.Module):
    """An experts module hf_cim does not know: 3-D weights, no @use_experts_implementation."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x):
        return x @ self.w.sum(0)


class FakeMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.experts = FakeExperts()

    def forward(self, x):
        return self.experts(self.proj(x))


def test_unsupported_experts_are_named_in_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_cim.patch"):
        model = hf_cim.patch_model(FakeMoE(), _config())
    assert "stay digital" in caplog.text and "experts (FakeExperts" in caplog.text
    assert [n for n, _ in hf_cim.patch.analog_layers(model)] == ["proj"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_cim.patch"):
        hf_cim.patch_model(FakeMoE(), _config(exclude_modules=["experts"]))  # explicitly digital: no warning
        hf_cim.patch_model(FakeMoE(), _config(target_modules=["proj"]))  # not targeted: no warning
    assert "stay digital" not in caplog.text


def test_expert_parallel_shards_are_named_in_a_warning(caplog):
    model = tiny_mixtral()
    model.model.layers[1].mlp.experts._is_expert_parallel = True
    with caplog.at_level(logging.WARNING, logger="hf_cim.patch"):
        hf_cim.patch_model(model, _config())
    assert "model.layers.1.mlp.experts (MixtralExperts: expert parallel" in caplog.text
    assert "model.layers.0.mlp.experts" in [n for n, _ in hf_cim.patch.analog_layers(model)]


def test_dbrx_experts_are_named_in_a_warning(caplog):
    """DBRX keeps its experts as 2-D (experts·ffn, d_model) Parameters of ``DbrxExpertGLU``: not simulated, named."""
    from transformers import DbrxConfig, DbrxForCausalLM

    cfg = DbrxConfig(
        d_model=32,
        n_heads=4,
        n_layers=1,
        vocab_size=VOCAB,
        max_seq_len=64,
        ffn_config={"moe_num_experts": 4, "moe_top_k": 2, "ffn_hidden_size": 32},
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
    )
    with caplog.at_level(logging.WARNING, logger="hf_cim.patch"):
        hf_cim.patch_model(DbrxForCausalLM(cfg), _config())
    assert "transformer.blocks.0.ffn.experts.mlp (DbrxExpertGLU" in caplog.text


def test_noise_state_round_trip_with_experts(tmp_path):
    """Resume (NoiseStateCallback's files) works for a model whose experts are analog."""
    from hf_cim.hub import load_noise_state, save_noise_state

    def build():
        model = tiny_mixtral()
        hf_cim.patch_model(model, AnalogNoiseConfig(seed=3))
        return model

    model, ids = build(), _ids()
    model(input_ids=ids)  # advance the streams
    save_noise_state(model, tmp_path)
    expected = model(input_ids=ids).logits
    again = build()
    assert load_noise_state(again, tmp_path)
    torch.testing.assert_close(again(input_ids=ids).logits, expected)


def test_experts_state_is_one_object_preserved_and_pickled():
    import pickle

    from hf_cim.state import AnalogState, preserve_analog_state

    model = hf_cim.patch_model(tiny_mixtral(), _config())
    experts = [m for _, m in _experts(model)]
    assert experts and all(isinstance(m.hf_cim_state, AnalogState) for m in experts)
    hf_cim.program_chip(model, seed=0)
    chips = [m.hf_cim_state.chip for m in experts]
    assert all(set(c) == {"gate_up_proj", "down_proj"} for c in chips)
    ids = _ids()
    model.train()
    with torch.no_grad():
        model(ids)  # the streams exist
    gens = [(m.hf_cim_state.generator, m.hf_cim_state.generator.get_state()) for m in experts]
    with preserve_analog_state(model):
        hf_cim.program_chip(model, seed=5)
        with torch.no_grad():
            model(ids)
        hf_cim.reseed(model, 3)
    assert all(m.hf_cim_state.chip is c for m, c in zip(experts, chips))
    assert all(m.hf_cim_state.generator is g and torch.equal(g.get_state(), s) for m, (g, s) in zip(experts, gens))
    other = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(other(ids).logits, model(ids).logits)


def test_ste_projection_under_autocast_saves_bfloat16_input_and_returns_float32_gradients():
    # As the dense layers (and the plain experts) do: the input kept for the backward is the compute dtype's copy.
    model = tiny_mixtral()
    hf_cim.patch_model(model, _config(target_modules=r".*\.experts"))
    experts = model.model.layers[0].mlp.experts
    plan = _Plan.from_counts([3, 0, 5, 2])
    torch.manual_seed(1)
    x = torch.randn(10, 32, requires_grad=True)
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = experts._project("gate_up_proj", x, plan)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert any(t.dtype == torch.bfloat16 and t.shape == x.shape for t in saved)
    assert not any(t.dtype == torch.float32 and t.shape == x.shape for t in saved)
    assert x.grad.dtype == torch.float32 and experts.gate_up_proj.grad.dtype == torch.float32
    # the clean VJP in bfloat16, as the plain projection's under autocast
    w = experts.gate_up_proj.detach()
    g = torch.ones(10, 128, dtype=torch.bfloat16)
    ref = torch.cat([g[plan.rows(e)] @ w[e].to(torch.bfloat16) for e in plan.hit]).float()
    rows = torch.cat([torch.arange(10)[plan.rows(e)] for e in plan.hit])
    torch.testing.assert_close(x.grad[rows], ref, rtol=1e-2, atol=1e-2)


def test_programmed_weights_backward_leaves_the_experts_chip_intact():
    """The experts' forward scales its own programmed weights in place for the input gradient; a programmed chip's,
    read by a differentiated forward in eval (``noise_in_eval``), stay as programmed: the same chip, the same
    gradients, twice."""
    model = tiny_mixtral()
    hf_cim.patch_model(model, _config(noise=STATIC, backward_weights="programmed", noise_in_eval=True))
    hf_cim.program_chip(model, seed=3)
    model.eval()
    chips = {n: {k: tuple(t.clone() for t in v) for k, v in m.hf_cim_state.chip.items()} for n, m in _experts(model)}
    ids = _ids()
    loss_1, g_1 = _grads(model, ids)
    loss_2, g_2 = _grads(model, ids)
    for n, m in _experts(model):
        for k, (w, s) in chips[n].items():
            assert torch.equal(m.hf_cim_state.chip[k][0], w) and torch.equal(m.hf_cim_state.chip[k][1], s), (n, k)
    assert torch.equal(loss_1, loss_2)
    for name in g_1:
        assert torch.equal(g_1[name], g_2[name]), name
