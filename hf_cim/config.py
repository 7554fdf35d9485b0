"""``AnalogNoiseConfig``: everything that defines a simulated analog chip and how training sees it."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers.utils.quantization_config import QuantizationConfigMixin

from .converters import adc_step
from .correction import CHIP_CORRECTIONS
from .noise.base import (
    NoiseModel,
    get_noise_model_class,
    integral_floats_to_ints,
    noise_model_from_dict,
)
from .noise.gaussian import GaussianWeightNoise, OutputNoise
from .presets import TRAINING_DEFAULTS, preset_fields, preset_noise
from .validation import check_range

__all__ = [
    "BACKWARD_WEIGHTS",
    "CONFIG_VERSION",
    "GRADIENT_MODES",
    "INPUT_QUANT_MODES",
    "QUANT_METHOD",
    "AnalogNoiseConfig",
    "get_preset",
]

logger = logging.getLogger(__name__)

CONFIG_VERSION = 1
GRADIENT_MODES = ("ste", "ste_detach", "full")
BACKWARD_WEIGHTS = ("clean", "programmed")
INPUT_QUANT_MODES = ("per_token", "per_tensor", "static")
#: ``product_precision``: the operands of the crossbar product (see :class:`AnalogNoiseConfig`).
PRODUCT_PRECISIONS = ("autocast", "float32")
#: Largest calibrated input range ``input_ranges`` accepts (layer units; float32 stays exact far beyond).
MAX_INPUT_RANGE = 1e12
#: Range of ``out_bound`` (normalized units). A tile's partial sum is at most its row count (<= 65536), so a larger
#: bound never clips; far below one full-scale product (1) the ADC only saturates. Outside, the ADC step or its
#: inverse overflows float32 (``1e308``, ``1e-30``) and outputs turn inf/NaN.
MIN_OUT_BOUND = 1e-3
MAX_OUT_BOUND = 1e6
#: The transformers ``quant_method`` under which the config travels in ``config.json`` (see ``hf_cim/quantizer.py``).
QUANT_METHOD = "hf_cim"


def _default_noise() -> list[NoiseModel]:
    return [GaussianWeightNoise(std=0.02), OutputNoise(std=0.04)]


def _check_layer_ranges(
    field_name: str, ranges: Any, low: float, high: float, low_inclusive: bool = True
) -> dict[str, float] | None:
    """``{layer name: range}`` with str keys and every range in [low, high] (as floats), or None."""
    if ranges is None:
        return None
    if not isinstance(ranges, dict):
        raise TypeError(
            f"AnalogNoiseConfig: `{field_name}` must be a dict {{layer name: range}} or None, got {type(ranges).__name__}"
        )
    out: dict[str, float] = {}
    for name, value in ranges.items():
        if not isinstance(name, str):
            raise TypeError(f"AnalogNoiseConfig: `{field_name}` keys must be layer names (str), got {name!r}")
        check_range("AnalogNoiseConfig", f"{field_name}[{name!r}]", value, low, high, low_inclusive=low_inclusive)
        out[name] = float(value)
    return out


def _check_bits(name: str, value: Any, low: int, high: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"AnalogNoiseConfig: `{name}` must be an int or None, got {value!r}")
    if not low <= value <= high:
        raise ValueError(
            f"AnalogNoiseConfig: `{name}` must be in [{low}, {high}] or None (converter off), got {value}"
        )


def _check_patterns(name: str, value: Any, allow_empty: bool = False) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            raise ValueError(f"AnalogNoiseConfig: `{name}` must not be an empty string")
        if value != "all-linear":
            _check_regex(name, value)
        return value
    if isinstance(value, (list, tuple, set)):
        items = list(value)
        if (not items and not allow_empty) or not all(isinstance(v, str) and v for v in items):
            what = "a list of non-empty strings" if allow_empty else "a non-empty list of non-empty strings"
            raise ValueError(f"AnalogNoiseConfig: `{name}` must be {what}, got {value!r}")
        return sorted(items) if isinstance(value, set) else items
    raise TypeError(f"AnalogNoiseConfig: `{name}` must be None, a regex string or a list of names, got {value!r}")


# -- module-name regexes: valid, and matched in bounded time ---------------------------------------------------------
# Python's ``re`` backtracks: a hostile pattern in a downloaded config.json (``(.|.)*Z``) takes exponential time on
# a module name, and ``re`` has no timeout. So a pattern is checked when the config is built: it must compile, be at
# most ``_MAX_REGEX_CHARS`` long, repeat no group that can itself match in several ways (a nested quantifier, an
# ambiguous alternation: the exponential cases), use no backreference, and hold at most ``_MAX_REGEX_CHOICES``
# variable-length parts (each multiplies the worst-case work by up to the name's length: ``.*`` three times costs
# ~0.1 ms on a 100-character name). Module-name patterns need none of that.
_MAX_REGEX_CHARS = 256
_MAX_REGEX_CHOICES = 3
_REPEATS = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")


def _sre_parse(pattern: str):
    try:
        from re import _parser  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse as _parser
    return _parser.parse(pattern)


def _deterministic_branch(alternatives: list) -> bool:
    """Whether at most one alternative can match at a position: each starts with a different literal character."""
    firsts = []
    for alt in alternatives:
        if not alt or str(alt[0][0]) != "LITERAL":
            return False
        firsts.append(chr(alt[0][1]).casefold())
    return len(set(firsts)) == len(firsts)


def _regex_risk(items, in_loop: bool, choices: list[int]) -> str | None:
    """Why matching the parsed pattern ``items`` could backtrack badly, or None; counts variable parts in ``choices``."""
    for op, arg in items:
        kind = str(op)
        if kind in _REPEATS:
            low, high, body = arg
            if low != high:
                if in_loop:
                    return "repeats a group that holds a quantifier (a nested quantifier)"
                choices[0] += 1
            problem = _regex_risk(body, in_loop or high > 1, choices)
        elif kind == "BRANCH":
            alternatives = arg[1]
            if not _deterministic_branch(alternatives):
                if in_loop:
                    return "repeats an alternation whose branches can match the same text"
                choices[0] += 1
            problem = next((p for alt in alternatives if (p := _regex_risk(alt, in_loop, choices))), None)
        elif kind == "SUBPATTERN":
            problem = _regex_risk(arg[-1], in_loop, choices)
        elif kind in ("ASSERT", "ASSERT_NOT"):
            problem = _regex_risk(arg[1], in_loop, choices)
        elif kind == "ATOMIC_GROUP":
            problem = _regex_risk(arg, in_loop, choices)
        elif kind in ("GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE", "GROUPREF_LOC_IGNORE", "GROUPREF_UNI_IGNORE"):
            problem = "uses a backreference"
        else:
            problem = None
        if problem:
            return problem
    return None


def _check_regex(name: str, pattern: str) -> None:
    if len(pattern) > _MAX_REGEX_CHARS:
        raise ValueError(
            f"AnalogNoiseConfig: `{name}` regex is {len(pattern)} characters long; at most {_MAX_REGEX_CHARS} are "
            "allowed (use a list of module names)"
        )
    try:
        re.compile(pattern)
        parsed = _sre_parse(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise ValueError(f"AnalogNoiseConfig: `{name}` is not a valid regex ({err}): {pattern!r}") from None
    choices = [0]
    problem = _regex_risk(list(parsed), False, choices)
    if problem is None and choices[0] > _MAX_REGEX_CHOICES:
        problem = (
            f"has {choices[0]} variable-length parts (quantifiers, alternations); more than {_MAX_REGEX_CHOICES} "
            "can make matching slow"
        )
    if problem:
        raise ValueError(
            f"AnalogNoiseConfig: `{name}` regex {pattern!r} {problem}; such patterns can take exponential time to "
            r"match. Module-name patterns need none of that: e.g. r'.*\.h\.[0-3]\..*', r'.*\.(q_proj|v_proj)', or "
            "a list of names"
        )


# -- validation on assignment ----------------------------------------------------------------------------------------
_local = threading.local()


def _under_construction() -> set[int | None]:
    ids = getattr(_local, "ids", None)
    if ids is None:
        ids = _local.ids = set()
    return ids


def _validated_on_assignment(cls):
    """Class decorator (over ``@dataclass``): assigning a field of a built config validates it as the constructor does.

    ``cfg.weight_bits = 0`` raises the constructor's error naming the field and leaves ``cfg`` unchanged; an
    accepted value is stored normalized (``cfg.noise = [{...}]`` stores noise models). The check builds a copy with
    the new value (:func:`dataclasses.replace`, so ``__post_init__``), hence covers every field, present and future,
    and cross-field rules. Assignments inside ``__init__`` / ``__post_init__`` are not checked again.
    """
    init = cls.__init__
    field_names = frozenset(f.name for f in dataclasses.fields(cls))

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        building = _under_construction()
        building.add(id(self))
        try:
            init(self, *args, **kwargs)
        finally:
            building.discard(id(self))

    def __setattr__(self, name: str, value: Any) -> None:
        building = _under_construction()
        # ``None in building``: a check is running (a subclass's own ``__init__`` is not wrapped: no recursion).
        if name in field_names and name in self.__dict__ and id(self) not in building and None not in building:
            building.add(None)
            try:
                value = getattr(dataclasses.replace(self, **{name: value}), name)
            finally:
                building.discard(None)
        object.__setattr__(self, name, value)

    cls.__init__ = __init__
    cls.__setattr__ = __setattr__
    return cls


@_validated_on_assignment
@dataclass
class AnalogNoiseConfig(QuantizationConfigMixin):
    """How a model's linear layers are simulated on an analog compute-in-memory chip.

    Every field is validated when the config is built and again when it is assigned (``cfg.weight_bits = 0`` and
    ``cfg.update(weight_bits=0)`` raise and change nothing); :func:`hf_cim.patch_model` checks the noise models too.

    The analog product of one layer is: DAC (quantize inputs) → quantize weights per output channel → noise models'
    ``program`` and ``read`` hooks → per-tile matrix-vector product → ``output`` hooks → ADC (clip + quantize each
    tile's partial sum) → digital sum over tiles → rescale → bias added digitally. All analog quantities are in
    normalized units: inputs in [-1, 1] after the DAC, weights in [-1, 1] (1 ↔ ``g_max``).

    Args:
        gradient: how gradients are formed. ``"ste"``: extended straight-through estimation as one autograd Function
            that runs only the noisy forward and saves only ``x`` and ``W`` (fast path). ``"ste_detach"``: the
            paper's literal ``y_clean + (y_noisy - y_clean).detach()`` (arXiv 2508.11940, Alg. 1). ``"full"``:
            autograd through the whole simulation (rounding passes straight through): the baseline.
        input_bits: DAC resolution in bits, in [2, 16]; ``None`` turns the DAC off (inputs stay float but are
            still normalized to the DAC range). 8 bits give the integer levels -127…127.
        input_quant: DAC range: ``"per_token"`` (dynamic abs-max of each input vector), ``"per_tensor"``
            (dynamic abs-max of the whole input) or ``"static"``: a fixed range per layer, calibrated from data
            (``input_ranges``, :func:`hf_cim.calibration.calibrate_input_ranges`), beyond which inputs clip, as a
            chip's DAC with a set full scale does (aihwkit's presets: ``noise_management=CONSTANT`` with input
            ranges). The dynamic modes are optimistic: they re-measure every input vector's abs-max, which a
            chip does not do for free.
        input_ranges: ``"static"`` only: ``{layer name: range}`` in the layer's input units (finite, > 0), the DAC's
            full scale of each layer. Written by :func:`hf_cim.calibration.calibrate_input_ranges`, saved with the
            config (``config.json`` / ``hf_cim_config.json``), so a reloaded checkpoint uses the same ranges.
        weight_bits: weight resolution in bits, in [2, 16], per output channel (abs-max); ``None`` = float weights.
        output_bits: ADC resolution in bits, in [2, 24]; ``None`` turns the ADC off (no clipping, no rounding).
        out_bound: ADC clipping range ``b_out`` in normalized units, in [1e-3, 1e6]: each tile's partial sum is
            clipped to [-b_out, b_out]. aihwkit: 12 (inference default), 10 (hardware-aware training preset). A
            tile's sum is at most its row count (<= 65536) without noise, so a larger bound never clips; the range
            keeps the ADC step and its inverse finite in float32.
        output_ranges: ``{layer name: b_out}`` (each in the range of ``out_bound``): the ADC clipping range of each named
            layer, as a chip whose ADC gain is set per array; other layers keep ``out_bound``. Needs an ADC. Written by
            :func:`hf_cim.calibration.calibrate_output_ranges` from the layer's clean partial sums, saved with the
            config, so a reloaded checkpoint uses the same ranges.
        tile_size: crossbar rows, in [1, 65536]; layers with more inputs are split into tiles along the input
            dimension, each with its own ADC, summed digitally. ``None``: one tile of any size.
        input_slice_bits: input bit-slicing (SplitInput): the magnitude of the ``input_bits`` integer input is
            applied ``input_slice_bits`` bits at a time (sign kept on every slice), each slice through the ADC and
            recombined digitally with its power of two. ``None``: the whole input at once. Needs ``input_bits``.
        noise: the noise models, applied in order: instances of registered :class:`~hf_cim.NoiseModel`\\ s or
            their dicts ``{"name": ..., **fields}``, or a preset name (``"paper"``, ``"pcm"``...; see
            :mod:`hf_cim.presets`) for that preset's noise models. Default: 2 % Gaussian weight noise (per
            channel) and 0.04 output noise. An empty list means quantization only.
        level: global noise scale (dimensionless, in [0, 100]): multiplies every noise magnitude; 0 leaves only
            the converters. Schedules and level sampling change it at run time.
        noise_in_eval: whether noise (and the converters) stay on in ``model.eval()``. ``True`` (default) makes
            ``Trainer.evaluate`` measure the analog model, as a hardware user expects; use
            :func:`hf_cim.noise_disabled` for the digital baseline.
        target_modules: which modules to patch: ``None`` (every linear-like layer), ``"all-linear"`` (peft's
            meaning: every linear-like layer but the output embedding), a regex (full match on the module name)
            or a list of names (exact name or ``.name`` suffix). A target that matches nothing is an error. A
            regex must compile, have at most 256 characters and match in bounded time: no repeated group that can
            match in several ways (``(a+)+``, ``(.|.)*``), no backreference, at most 3 variable-length parts
            (a ``ValueError`` naming the field otherwise, when the config is built or loaded).
        exclude_modules: modules left digital, with the same syntax (e.g. ``["lm_head", "classifier"]``); an
            excluded module leaves its whole subtree digital (``"transformer.h.0"``: that block). An entry that
            excludes no linear-like layer is an error; ``None`` or ``[]`` exclude nothing.
        seed: seed of the noise (int >= 0). Each layer's generator is seeded from (seed, layer name, process rank).
        mask_saturated: ``ste``/``ste_detach`` only: no gradient flows through a tile's partial sum that the ADC
            clipped (``|y| > b_out``), as quantization-aware training does for its clip range; the mask is the
            forward's own saturation, per tile (with input slicing: the least significant slice's, as ``full``).
            The forward saturates there, so the clean gradient would point the wrong way. Without an ADC nothing
            clips and the mask passes everything.
        backward_weights: ``ste``/``ste_detach`` only: the weights of the input gradient ``∂L/∂x = g·W``:
            ``"clean"`` (the float weights) or ``"programmed"`` (the weights the chip computed with: quantized,
            after the ``program`` hooks, before per-product read noise), so earlier layers get the gradient of the
            network that ran. The weight gradient ``gᵀ·x`` is the crossbar's, as ``program_gradient`` leaves it.
            Costs one weight-sized tensor.
        program_gradient: ``ste``/``ste_detach`` only: take the weight gradient ``gᵀ·x`` (the gradient of the weights
            the crossbar computed with) on through the weight programming by the chain rule, at this forward's own
            draw: each device's factor (``w' = w·e^{σξ}`` gives ``e^{σξ}``), drift, stuck devices and clamps, the
            quantizers straight through, as ``full`` differentiates them. Everything after the programming (reads,
            IR-drop, converters, output noise) stays straight through. Under weight noise the crossbar's gradient
            misses the term that makes the expected loss penalize large weights where the loss is curved (for
            ``w' = w·η`` with ``E[η] = 1``, ``E[η·∇L(w')] − E[∇L(w')] ≈ σ²·diag(H)·w``); this keeps it. Costs the
            programming's saved factors (about one weight-sized tensor) and one weight-sized backward per layer
            (for MoE experts, per projection over the experts a batch hits); nothing where no ``program`` hook runs
            (the quantizer alone chains as the identity: skipped).
        product_precision: the operands of the crossbar product itself (the signal ``x·Wᵀ`` per tile).
            ``"autocast"`` (default): in the layer's compute dtype where that is bfloat16 or float16 (under
            ``torch.autocast``, or a half-precision model), as the plain layer's product is; the products accumulate
            and return in float32 (cuBLAS's float32 output on CUDA; elsewhere a float32 product of the rounded
            operands: the same numbers), and every other stage (DAC, weight programming, noise, ADC) stays float32.
            The DAC's integer levels are exact in these dtypes (bfloat16 up to 9 input bits, float16 up to 12);
            each programmed weight rounds by at most 2⁻⁸ (bfloat16) or 2⁻¹¹ (float16) of its value (0.4 % at most,
            against the default weight noise's 2 % of the channel's largest weight), so each partial sum moves by at
            most that fraction of ``Σ|x||w|`` (``tests/test_tile.py``). ``"float32"``: float32 operands always (the
            GPU's reduced-precision matrix units then stay idle: on an H200 GPT-2 small's ``ste`` step took 123 ms
            with float32 products and a float32 saved input against 97 ms with both in bfloat16,
            docs/benchmarks.md). A float32 model without autocast computes in float32 either way.
        train_output_correction: ``None`` (default), ``"affine"`` or ``"gain"``: noise-aware training forwards
            correct each layer's output as a calibrated chip's periphery does
            (:func:`hf_cim.calibration.calibrate_chip_outputs`): the chip sampled for the step is fitted on the batch
            it computes, ``y₀ ≈ a·y + b`` per output column (or one gain per layer), and ``a·y + b`` goes on (``a``,
            ``b`` not differentiated). For a model measured on chips that are calibrated so
            (``calibrate_chip_outputs``, the recipes' ``--chip_calibration``): it trains for what is left after the
            correction instead of for the columns' gains, which the chip removes anyway. Costs one digital product
            per layer and step; evaluation forwards and MoE experts are not touched.
    """

    quant_method: ClassVar[str] = QUANT_METHOD

    gradient: str = field(default="ste", metadata={"help": "Gradient mode: ste, ste_detach or full."})
    input_bits: int | None = field(default=8, metadata={"help": "DAC bits in [2, 16], None = off."})
    input_quant: str = field(default="per_token", metadata={"help": "DAC range: per_token, per_tensor or static."})
    input_ranges: Any = field(default=None, metadata={"help": "static DAC: {layer name: range}, calibrated."})
    weight_bits: int | None = field(default=8, metadata={"help": "Weight bits in [2, 16], None = float weights."})
    output_bits: int | None = field(default=8, metadata={"help": "ADC bits in [2, 24], None = off."})
    out_bound: float = field(default=10.0, metadata={"help": "ADC clipping range (normalized units, > 0)."})
    output_ranges: Any = field(default=None, metadata={"help": "ADC: {layer name: clipping range}, calibrated."})
    tile_size: int | None = field(default=512, metadata={"help": "Crossbar rows per tile, None = untiled."})
    input_slice_bits: int | None = field(default=None, metadata={"help": "Bits per input slice, None = no slicing."})
    noise: Any = field(default_factory=_default_noise, metadata={"help": "Noise models (objects or dicts)."})
    level: float = field(default=1.0, metadata={"help": "Global noise scale in [0, 100]."})
    noise_in_eval: bool = field(default=True, metadata={"help": "Keep noise on in model.eval()."})
    target_modules: Any = field(default=None, metadata={"help": "Modules to patch (None, 'all-linear', regex, list)."})
    exclude_modules: Any = field(default=None, metadata={"help": "Modules left digital (regex or list)."})
    seed: int = field(default=0, metadata={"help": "Noise seed (int >= 0)."})
    mask_saturated: bool = field(
        default=False, metadata={"help": "STE modes: no gradient through partial sums the ADC clipped."}
    )
    backward_weights: str = field(
        default="clean", metadata={"help": "STE modes: weights of the input gradient: clean or programmed."}
    )
    program_gradient: bool = field(
        default=False,
        metadata={"help": "STE modes: the weight gradient taken on through the weight programming (device factors)."},
    )
    product_precision: str = field(
        default="autocast", metadata={"help": "Crossbar product operands: autocast (the compute dtype) or float32."}
    )
    train_output_correction: str | None = field(
        default=None,
        metadata={"help": "Training forwards: per-column output correction fitted per batch (affine, gain)."},
    )

    def __post_init__(self) -> None:
        if self.gradient not in GRADIENT_MODES:
            raise ValueError(f"AnalogNoiseConfig: `gradient` must be one of {GRADIENT_MODES}, got {self.gradient!r}")
        _check_bits("input_bits", self.input_bits, 2, 16)
        _check_bits("weight_bits", self.weight_bits, 2, 16)
        _check_bits("output_bits", self.output_bits, 2, 24)
        if self.input_quant not in INPUT_QUANT_MODES:
            raise ValueError(
                f"AnalogNoiseConfig: `input_quant` must be one of {INPUT_QUANT_MODES}, got {self.input_quant!r}"
            )
        self.input_ranges = self._check_input_ranges(self.input_ranges, self.input_quant)
        if self.product_precision not in PRODUCT_PRECISIONS:
            raise ValueError(
                f"AnalogNoiseConfig: `product_precision` must be one of {PRODUCT_PRECISIONS}, "
                f"got {self.product_precision!r}"
            )
        check_range("AnalogNoiseConfig", "out_bound", self.out_bound, MIN_OUT_BOUND, MAX_OUT_BOUND)
        self.out_bound = float(self.out_bound)
        self.output_ranges = self._check_output_ranges(self.output_ranges, self.output_bits)
        if self.tile_size is not None:
            if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int):
                raise TypeError(f"AnalogNoiseConfig: `tile_size` must be an int or None, got {self.tile_size!r}")
            if not 1 <= self.tile_size <= 65536:
                raise ValueError(f"AnalogNoiseConfig: `tile_size` must be in [1, 65536] or None, got {self.tile_size}")
        if self.input_slice_bits is not None:
            if self.input_bits is None:
                raise ValueError(
                    "AnalogNoiseConfig: `input_slice_bits` needs `input_bits` (slices of an integer input)"
                )
            _check_bits("input_slice_bits", self.input_slice_bits, 1, self.input_bits - 1)
        self.noise = self._normalize_noise(self.noise)
        check_range("AnalogNoiseConfig", "level", self.level, 0.0, 100.0)
        self.level = float(self.level)
        if not isinstance(self.noise_in_eval, bool):
            raise TypeError(f"AnalogNoiseConfig: `noise_in_eval` must be a bool, got {self.noise_in_eval!r}")
        self.target_modules = _check_patterns("target_modules", self.target_modules)
        self.exclude_modules = _check_patterns("exclude_modules", self.exclude_modules, allow_empty=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"AnalogNoiseConfig: `seed` must be an int >= 0, got {self.seed!r}")
        self._check_backward_fields()
        if self.train_output_correction is not None and self.train_output_correction not in CHIP_CORRECTIONS:
            raise ValueError(
                f"AnalogNoiseConfig: `train_output_correction` must be None or one of {CHIP_CORRECTIONS}, "
                f"got {self.train_output_correction!r}"
            )

    def _check_backward_fields(self) -> None:
        if not isinstance(self.mask_saturated, bool):
            raise TypeError(f"AnalogNoiseConfig: `mask_saturated` must be a bool, got {self.mask_saturated!r}")
        if self.backward_weights not in BACKWARD_WEIGHTS:
            raise ValueError(
                f"AnalogNoiseConfig: `backward_weights` must be one of {BACKWARD_WEIGHTS}, got {self.backward_weights!r}"
            )
        if not isinstance(self.program_gradient, bool):
            raise TypeError(f"AnalogNoiseConfig: `program_gradient` must be a bool, got {self.program_gradient!r}")
        if self.gradient == "full" and (
            self.mask_saturated or self.backward_weights != "clean" or self.program_gradient
        ):
            # ``full`` differentiates the clip and the programmed weights itself; the STE levers have no meaning there.
            raise ValueError(
                "AnalogNoiseConfig: `mask_saturated`, `backward_weights` and `program_gradient` shape the STE backward; "
                "with `gradient='full'` autograd already differentiates the ADC clip and the programmed weights: leave "
                "them at False / 'clean' / False"
            )

    @staticmethod
    def _check_input_ranges(ranges: Any, input_quant: str) -> dict[str, float] | None:
        if ranges is not None and input_quant != "static":
            raise ValueError(
                "AnalogNoiseConfig: `input_ranges` are the static DAC's ranges; they need `input_quant='static'` "
                f"(got {input_quant!r}): set input_ranges=None with a dynamic DAC"
            )
        return _check_layer_ranges("input_ranges", ranges, 0.0, MAX_INPUT_RANGE, low_inclusive=False)

    @staticmethod
    def _check_output_ranges(ranges: Any, output_bits: int | None) -> dict[str, float] | None:
        if ranges is not None and output_bits is None:
            raise ValueError(
                "AnalogNoiseConfig: `output_ranges` are the ADC's ranges per layer; they need an ADC (`output_bits`), "
                "got output_bits=None: set output_ranges=None without an ADC"
            )
        return _check_layer_ranges("output_ranges", ranges, MIN_OUT_BOUND, MAX_OUT_BOUND)

    @staticmethod
    def _normalize_noise(noise: Any) -> list[NoiseModel]:
        if noise is None:
            return []
        if isinstance(noise, str):
            try:
                return preset_noise(noise)
            except ValueError as err:
                raise ValueError(f"AnalogNoiseConfig: `noise` {err}") from err
        if isinstance(noise, (NoiseModel, dict)):
            noise = [noise]
        if not isinstance(noise, (list, tuple)):
            raise TypeError(
                f"AnalogNoiseConfig: `noise` must be a preset name or a list of noise models or dicts, "
                f"got {type(noise).__name__}"
            )
        out: list[NoiseModel] = []
        for i, item in enumerate(noise):
            if isinstance(item, NoiseModel):
                if not type(item).name or get_noise_model_class(type(item).name) is not type(item):
                    raise ValueError(
                        f"AnalogNoiseConfig: `noise[{i}]` is a {type(item).__name__}, which is not registered; "
                        "register it with hf_cim.register_noise_model(name, cls) so the config can be saved"
                    )
                out.append(item)
            elif isinstance(item, dict):
                try:
                    out.append(noise_model_from_dict(item))
                except (ValueError, TypeError) as err:
                    raise type(err)(f"AnalogNoiseConfig: `noise[{i}]`: {err}") from err
            else:
                raise TypeError(
                    f"AnalogNoiseConfig: `noise[{i}]` must be a NoiseModel or a dict, got {type(item).__name__}"
                )
        return out

    @classmethod
    def from_preset(cls, name: str, level: float = 1.0, **overrides: Any) -> AnalogNoiseConfig:
        """The config of preset ``name`` (:mod:`hf_cim.presets`) at noise ``level``, with any field overridden.

        The STE modes train with :data:`hf_cim.presets.TRAINING_DEFAULTS` (override them like any field, e.g.
        ``mask_saturated=False`` for the plain clean backward); ``gradient="full"`` takes neither.

        Args:
            name: one of :func:`hf_cim.list_presets` (``"paper"``, ``"pcm"``, ``"pcm_drift"``, ``"rram"``).
            level: global noise scale (in [0, 100]); 0 = quantization only.
            overrides: any other field (e.g. ``gradient="ste_detach"``, ``seed=3``, ``exclude_modules=["lm_head"]``).

        Raises:
            ValueError: for an unknown preset (listing the known ones) or an invalid field value.
        """
        fields = preset_fields(name)
        if overrides.get("gradient", "ste") != "full":
            fields.update(TRAINING_DEFAULTS)
        fields.update(overrides)
        fields["level"] = level
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "noise":
                value = [m.to_dict() for m in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["hf_cim_config_version"] = CONFIG_VERSION
        out["quant_method"] = QUANT_METHOD
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalogNoiseConfig:
        """Build a config from :meth:`to_dict` output. Unknown keys are dropped with a warning naming them.

        Integral floats (``512.0``, as some JSON tools write every number) are accepted for int fields.

        Raises:
            TypeError: if ``data`` is not a dict, or a field has the wrong type.
            ValueError: if a field is out of range, or the config is from a newer hf_cim.
        """
        if not isinstance(data, dict):
            raise TypeError(
                f"AnalogNoiseConfig.from_dict: `data` must be a dict (as written by to_dict), got "
                f"{type(data).__name__} {data!r:.80}"
            )
        data = integral_floats_to_ints(cls, data)
        version = data.pop("hf_cim_config_version", CONFIG_VERSION)
        method = data.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"AnalogNoiseConfig: `quant_method` must be {QUANT_METHOD!r}, got {method!r}")
        if type(version) is float and version.is_integer():
            version = int(version)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"AnalogNoiseConfig: `hf_cim_config_version` must be an int >= 1, got {version!r}")
        if version > CONFIG_VERSION:
            raise ValueError(
                f"AnalogNoiseConfig: `hf_cim_config_version` {version!r} is newer than this hf_cim supports "
                f"({CONFIG_VERSION}); upgrade hf_cim"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((k for k in data if k not in known), key=str)
        if unknown:
            logger.warning("AnalogNoiseConfig.from_dict: ignoring unknown field(s) %s", unknown)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_string(cls, text: str) -> AnalogNoiseConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> AnalogNoiseConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the fields named in ``kwargs``, validated together (all or nothing); return the other ``kwargs``.

        transformers' ``QuantizationConfigMixin.update`` (called by ``from_pretrained`` with its extra kwargs), made
        safe: the changes are checked as one new config, so ``update(input_bits=None, input_slice_bits=None)``
        works in any order and a refused value leaves the config unchanged.
        """
        names = {f.name for f in dataclasses.fields(self)}
        changes = {k: v for k, v in kwargs.items() if k in names}
        if changes:
            checked = self.replace(**changes)
            for k in changes:
                object.__setattr__(self, k, getattr(checked, k))
        return {k: v for k, v in kwargs.items() if k not in changes}

    def validate(self) -> AnalogNoiseConfig:
        """Check every field again, including each noise model's (mutated in place?); return ``self``.

        Assigning a field already validates it; this also catches in-place changes the config cannot see, such as
        ``cfg.noise[0].std = -1`` or ``cfg.noise.append(...)``. :func:`hf_cim.patch_model` calls it.
        """
        noise = list(self.noise) if isinstance(self.noise, (list, tuple)) else self.noise
        if isinstance(noise, list):
            for i, model in enumerate(noise):
                if dataclasses.is_dataclass(model) and not isinstance(model, type):
                    try:
                        noise[i] = dataclasses.replace(model)  # runs the model's own checks on its current values
                    except (ValueError, TypeError) as err:
                        raise type(err)(f"AnalogNoiseConfig: `noise[{i}]`: {err}") from err
        self.replace(noise=noise)
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AnalogNoiseConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def output_bound(self, layer: str | None = None) -> float:
        """The ADC clipping range ``b_out`` of ``layer``: its calibrated ``output_ranges`` entry, else ``out_bound``."""
        return (self.output_ranges or {}).get(layer, self.out_bound) if layer is not None else self.out_bound

    def output_step(self, layer: str | None = None) -> float:
        """ADC step ``Δ_out = 2·b_out/(2^m − 2)`` in normalized units of ``layer`` (:meth:`output_bound`; ``inf``
        when the ADC is off)."""
        if self.output_bits is None:
            return math.inf
        return adc_step(self.output_bits, self.output_bound(layer))


def get_preset(name: str, level: float = 1.0, **overrides: Any) -> AnalogNoiseConfig:
    """:meth:`AnalogNoiseConfig.from_preset`: the config of preset ``name`` at noise ``level``, fields overridden."""
    return AnalogNoiseConfig.from_preset(name, level, **overrides)
