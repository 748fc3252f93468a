"""Run configuration: YAML presets plus ``key=value`` overrides, validated by pydantic.

Every section forbids unknown keys, so a typo stops the run before any work with a message
that names the key and lists the accepted ones.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from attnssl.methods import method_class, method_names
from attnssl.methods.bam import BAMSection

# each method's section lives beside the method; these names stay importable from here
from attnssl.methods.dino import DINOSection  # noqa: F401
from attnssl.methods.mae import MAESection  # noqa: F401
from attnssl.methods.simclr import SimCLRSection  # noqa: F401
from attnssl.methods.udi import UDISection  # noqa: F401
from attnssl.settings import MethodSection, Section

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DatasetName = Literal["fashion-mnist", "synthetic", "imbalance", "imagefolder", "shards", "cifar10",
                      "cifar100", "stl10"]
# ``trainer.precision=32`` on the command line reads as the integer 32: accept it as "32".
# ``auto``: bf16-mixed where the device runs bf16 natively, 32 elsewhere (attnssl.precision)
Precision = Annotated[
    Literal["auto", "32", "bf16-mixed", "16-mixed"],
    BeforeValidator(lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else v),
]
FeatureKind = Literal["cls", "mean", "cls+mean", "cls_plus", "cls+cls_plus"]


class ConfigError(ValueError):
    """A configuration value or key that cannot be accepted; the message says what would be."""


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=,-]*")


class RunSection(Section):
    out_dir: str = "runs"
    name: str | None = Field(
        None, description="the run folder's name under out_dir (null: METHOD-DATASET-TIMESTAMP)")
    seed: int = 0
    resume: Literal["never", "auto"] = Field(
        "never", description="auto: if out_dir/name holds checkpoints, continue from its newest "
        "readable one (the same command can be rerun after any stop); needs run.name")

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, name: str | None) -> str | None:
        if name is not None and (not RUN_NAME.fullmatch(name) or name in (".", "..")):
            raise ValueError("must be one folder name under run.out_dir: letters, digits and "
                             "._+=,- starting with a letter or digit (no '/', '..' or leading '.')")
        return name


class DataSection(Section):
    dataset: DatasetName = "fashion-mnist"
    root: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    subset: int | None = Field(None, gt=0, description="use only the first N training images")
    synthetic_size: int = Field(2000, gt=0, description="training images of the synthetic and "
                                "imbalance sets (test: a quarter and a sixth as many)")
    synthetic_imbalance: float = Field(
        4.0, ge=0, description="imbalance set: the shared global grating's strength over the "
        "class shape's")
    image_size: int | None = Field(
        None, gt=0, description="imagefolder and synthetic: side images are resized to before "
        "cropping; shards: must be their stored size")
    skip_bad_images: bool = Field(
        False, description="imagefolder only: decode every file once at start and leave out "
        "those that cannot be read (listed on stderr) instead of stopping at the first")
    num_workers: int = Field(0, ge=0)


class ViewsSection(Section):
    """Multi-crop views; sizes default to the dataset's image size (global) and 3/7 of it (local)."""

    global_crops: int = Field(2, ge=1)
    global_size: int | None = Field(None, gt=0)
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = Field(0, ge=0)
    local_size: int | None = Field(None, gt=0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    hflip_prob: float = Field(0.5, ge=0, le=1)
    interpolation: Literal["bilinear", "bicubic"] = Field(
        "bilinear", description="resampling of the resized crop; the official DINO, MAE and BAM "
        "code use bicubic (torchvision's interpolation=3), bicubic results clamped to [0, 1] as "
        "PIL's are")
    color_jitter_prob: float = Field(0.8, ge=0, le=1)
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.2, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    grayscale_prob: float = Field(0.2, ge=0, le=1)
    blur_prob: tuple[float, float] = Field((1.0, 0.1), description="first global, other globals")
    local_blur_prob: float = Field(0.5, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: tuple[float, float] = (0.0, 0.2)
    gamma_prob: float = Field(0.0, ge=0, le=1, description="probability of a gamma change")
    gamma: tuple[float, float] = Field((0.7, 1.5), description="gamma g ~ U(low, high), x -> x^g")
    erasing_prob: float = Field(0.0, ge=0, le=1, description="probability of random erasing "
                                "(a rectangle set to black, after every other change)")
    erasing_scale: tuple[float, float] = Field(
        (0.02, 0.33), description="erased area as a share of the view (torchvision's default)")

    @model_validator(mode="after")
    def _check_ranges(self) -> ViewsSection:
        for name in ("global_scale", "local_scale", "blur_sigma", "gamma", "erasing_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {low, high}")
        for name in ("global_scale", "local_scale", "erasing_scale"):
            if getattr(self, name)[1] > 1:
                raise ValueError(f"{name} upper bound must be <= 1, got {getattr(self, name)[1]}")
        for name in ("blur_prob", "solarize_prob"):
            if not all(0 <= p <= 1 for p in getattr(self, name)):
                raise ValueError(f"{name} entries must be probabilities in [0, 1]")
        return self


class ModelSection(Section):
    """ViT backbone. ``preset`` fills the size; explicit keys below override it."""

    preset: str | None = "vit_tiny_p4"
    patch_size: int | None = Field(None, gt=0)
    embed_dim: int | None = Field(None, gt=0)
    depth: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    mlp_ratio: float | None = Field(None, gt=0)
    attention: str = "softmax"
    weight_init: Literal["timm", "moco", "jax", "mae"] = Field(
        "timm", description="ViT initialisation: timm (trunc-normal 0.02), moco (MoCo v3 "
        "xavier, as BAM's official code), jax, mae (MAE's: xavier-uniform linears and patch "
        "embedding, class token N(0, 0.02))")
    drop_path: float = Field(0.0, ge=0, lt=1)
    qkv_bias: bool = True
    class_tokens: int | None = Field(
        None, ge=1, le=2, description="class tokens (null: what the method needs, 2 for udi)")
    pos_embed: Literal["learned", "sincos"] = Field(
        "learned", description="learned (timm) or the fixed 2-D sine-cosine table (MAE's)")
    freeze_patch_embed: bool = Field(
        False, description="keep the patch projection at its start, untrained (MoCo v3's "
        "stabilising trick, which BAM's official ViT uses with fixed sine-cosine positions and "
        "timm's default initialisation of the projection)")
    cbsa_pool: int = Field(8, gt=0, description="cbsa/agent: representatives pooled on an "
                           "m x m grid of patches (8 officially)")
    cbsa_learned_std: float = Field(
        0.02, gt=0, description="cbsa_learned: the standard deviation of the learned "
        "representatives' normal start (0.02: timm's start for extra tokens). They enter the "
        "extraction softmax(R0 W^T scale) unnormalised, so at 0.02 it starts uniform and a "
        "short run keeps it there (docs/experiments.md, section 10)")
    cbsa_small_grid: Literal["cap", "repeat"] = Field(
        "cap", description="cbsa/agent on a patch grid smaller than cbsa_pool: cap the "
        "representatives at the grid (one per patch), or repeat patches to m x m as the official "
        "code's AdaptiveAvgPool2d does")
    block: Literal["vit", "cbt"] = Field(
        "vit", description="vit: attention + MLP; cbt: CBSA + the ISTA step (CBSA paper)")
    init_from: str | None = Field(
        None, description="start the backbone from an `attnssl export` folder's weights (its "
        "architecture must match this section; the image size may differ)")


class OptimSection(Section):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    batch_size: int = Field(256, gt=0, description="images per step over all processes")
    epochs: int = Field(5, gt=0)
    lr: float = Field(1e-3, gt=0)
    lr_scaling_batch: int | None = Field(
        None, gt=0, description="the linear scaling rule: the peak learning rate is lr * "
        "batch_size / lr_scaling_batch (DINO's and BAM's code scale by batch / 256); null: lr "
        "as given")
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    weight_decay_end: float | None = Field(None, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, lt=1)
    clip_grad: float | None = Field(None, gt=0)
    clip_mode: Literal["global_norm", "per_parameter"] = Field(
        "global_norm", description="global_norm: all gradients together (torch's "
        "clip_grad_norm_, BAM's code); per_parameter: each parameter's own (DINO's and UDI's)")

    @property
    def peak_lr(self) -> float:
        """``lr``, times ``batch_size / lr_scaling_batch`` under the linear scaling rule."""
        if self.lr_scaling_batch is None:
            return self.lr
        return self.lr * self.batch_size / self.lr_scaling_batch


def _check_devices(devices: int | str) -> int | str:
    if isinstance(devices, int):
        if devices < 1 and devices != -1:
            raise ValueError("must be a positive number of devices, -1 (all), 'auto' or indices "
                             "such as '0,1'")
        return devices
    text = devices.strip()
    if text == "auto" or re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", text) or text == "-1":
        return devices
    raise ValueError("must be a positive number of devices, -1 (all), 'auto' or indices such "
                     "as '0,1'")


class TrainerSection(Section):
    accelerator: Literal["cpu", "cuda", "gpu", "mps", "auto"] = "auto"
    devices: int | str = Field(
        1, description="processes per node: a number, 'auto', or device indices such as '0,1'")
    num_nodes: int = Field(1, gt=0)
    strategy: str = "auto"
    precision: Precision = "32"
    checkpoint_every_steps: int = Field(500, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    log_every_steps: int = Field(10, gt=0)
    max_steps: int | None = Field(
        None, gt=0, description="train at most N more optimiser steps this session, then stop "
        "with a checkpoint (each --resume runs N more; null: to the end)"
    )
    progress_bar: bool = True
    num_threads: int | None = Field(None, gt=0)
    nonfinite_loss: Literal["stop", "skip"] = Field(
        "stop", description="a NaN or infinite loss: stop, naming the step and the last good "
        "checkpoint; or skip that step's update and count it (skipped_steps)")
    collective_timeout_s: float = Field(
        300.0, gt=0, description="multi-process runs: how long a process waits in a collective "
        "for the others before it stops with an error")
    compile: bool = Field(
        False, description="torch.compile every transformer block (the first steps compile; "
        "fp32 on a 2-core AVX2 CPU: 1.01-1.10x, benchmarks/fp32_levers.py)")

    @field_validator("devices")
    @classmethod
    def _known_devices(cls, devices: int | str) -> int | str:
        return _check_devices(devices)


class FinetuneSection(Section):
    """Full fine-tuning (MAE's recipe: layer-wise lr decay, label smoothing, AdamW, warm-up then
    cosine), at the end of pretraining and in ``attnssl eval`` when ``enabled``."""

    enabled: bool = False
    epochs: int = Field(10, gt=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(256, gt=0)
    layer_decay: float = Field(0.75, gt=0, le=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    features: FeatureKind | None = Field(
        None, description="pooled features under the classifier (null: eval.features)")


class EvalSection(Section):
    at_end: bool = True
    features: FeatureKind = "cls"
    blocks: int = Field(
        1, ge=1, description="read-out from the last N blocks: eval.features of each block's "
        "normalised tokens, concatenated (DINO's linear evaluation reads the class tokens of "
        "the last 4); the random-init floor uses the same read-out")
    knn_k: int = Field(20, gt=0)
    knn_temperature: float = Field(0.07, gt=0)
    random_init_floor: bool = True
    linear_probe: bool = True
    linear_epochs: int = Field(30, gt=0)
    linear_lr: float = Field(1e-3, gt=0)
    linear_batch_size: int = Field(1024, gt=0)
    batch_size: int = Field(512, gt=0, description="images per forward when extracting features")
    precision: Precision = "32"
    max_train: int | None = Field(None, gt=0)
    max_test: int | None = Field(None, gt=0)
    finetune: FinetuneSection = FinetuneSection()
    low_shot: tuple[float, ...] = Field(
        (), description="label shares for low-shot linear probe (and fine-tuning when "
        "finetune.enabled) on fixed, class-balanced, seeded subsets, e.g. [0.01, 0.1]")
    low_shot_seed: int = Field(0, description="seed of the low-shot subsets (not run.seed: "
                               "every run is probed on the same images)")

    @model_validator(mode="after")
    def _check_low_shot(self) -> EvalSection:
        if not all(0 < f <= 1 for f in self.low_shot):
            raise ValueError(f"low_shot shares must be in (0, 1], got {list(self.low_shot)}")
        return self


class Config(Section):
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    views: ViewsSection = ViewsSection()
    model: ModelSection = ModelSection()
    method: SerializeAsAny[MethodSection] = Field(default_factory=BAMSection)
    optim: OptimSection = OptimSection()
    trainer: TrainerSection = TrainerSection()
    eval: EvalSection = EvalSection()

    @field_validator("method", mode="before")
    @classmethod
    def _registered_section(cls, value):
        """``method:`` is validated by the section of the registered method it names."""
        if isinstance(value, dict):
            return method_class(value.get("name", "bam")).Section.model_validate(value)
        return value

    @model_validator(mode="after")
    def _check_class_tokens(self) -> Config:
        needed = method_class(self.method.name).class_tokens
        if self.model.class_tokens is None:
            self.model.class_tokens = needed
        elif needed > 1 and self.model.class_tokens != needed:
            raise ValueError(f"method {self.method.name} needs model.class_tokens={needed}")
        if self.eval.features in ("cls_plus", "cls+cls_plus") and self.model.class_tokens < 2:
            raise ValueError(f"eval.features={self.eval.features} needs a second class token "
                             f"(model.class_tokens=2, as method udi has)")
        return self


SECTIONS: dict[str, type[BaseModel]] = {
    "run": RunSection,
    "data": DataSection,
    "views": ViewsSection,
    "model": ModelSection,
    "optim": OptimSection,
    "trainer": TrainerSection,
    "eval": EvalSection,
}


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_summary(name: str) -> str:
    """The first comment line of a preset's YAML file: what it is."""
    for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_preset(name_or_path: str) -> Path:
    """A preset name (``simclr_fashion_mnist``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(
        f"config {name_or_path!r} is neither a YAML file nor a preset; "
        f"presets: {', '.join(preset_names())}"
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=3e-4`` -> (['optim', 'lr'], 0.0003); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. optim.lr=3e-4")
    key, _, raw = text.partition("=")
    path = [part for part in key.strip().split(".") if part]
    if len(path) < 2:
        raise ConfigError(
            f"override {text!r} must name a section and a key (section.key=value); "
            f"sections: {', '.join(list(SECTIONS) + ['method'])}"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return path, value


def _section_class(raw: dict, section: str) -> type[BaseModel] | None:
    if section == "method":
        name = (raw.get("method") or {}).get("name", "bam")
        return method_class(name).Section if name in method_names() else None
    return SECTIONS.get(section)


def _unknown_key_message(where: str, key: str, accepted: list[str]) -> str:
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {where}{key!r}{hint}; accepted: {', '.join(accepted)}"


def _check_keys(raw: dict) -> None:
    """Name unknown sections and keys before pydantic reports them more tersely."""
    for section, body in raw.items():
        accepted_sections = list(SECTIONS) + ["method"]
        if section not in accepted_sections:
            raise ConfigError(_unknown_key_message("", section, accepted_sections))
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"section {section!r} must be a mapping of keys to values")
        if section == "method" and body.get("name", "bam") not in method_names():
            raise ConfigError(
                f"unknown method.name {body.get('name')!r}; accepted: {', '.join(method_names())}"
            )
        cls = _section_class(raw, section)
        accepted = list(cls.model_fields)
        for key in body:
            if key not in accepted:
                raise ConfigError(_unknown_key_message(f"{section}.", key, accepted))


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        # a check of a whole section gets the section as input: naming it again says nothing
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_config(raw: dict) -> Config:
    _check_keys(raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def merge_overrides(raw: dict, overrides: list[str]) -> dict:
    merged = {k: dict(v or {}) for k, v in raw.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = merged.setdefault(path[0], {})
        for part in path[1:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return merged


# What may change when a run is resumed: anything else would change the batch order, the
# schedules, the random state or the model, and the run would no longer continue exactly.
RESUME_OVERRIDABLE = (
    "trainer.max_steps", "trainer.progress_bar", "trainer.checkpoint_every_steps",
    "trainer.keep_checkpoints", "trainer.log_every_steps", "trainer.num_threads",
    "data.root", "data.num_workers", "data.skip_bad_images", "eval.", "run.resume",
    "trainer.nonfinite_loss", "trainer.collective_timeout_s", "trainer.compile",
)


def flatten_config(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of dotted keys: ``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def nest_config(flat: dict[str, Any]) -> dict:
    """The inverse of :func:`flatten_config`: ``{"optim.lr": 1}`` -> ``{"optim": {"lr": 1}}``."""
    tree: dict = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def with_defaults(saved: dict) -> dict:
    """A saved config as today's schema reads it: a setting added since it was saved appears at
    its default (the value that keeps what ran before the setting existed), so comparing two
    configs sees it. A config that no longer validates (a setting since removed or renamed)
    comes back as it was."""
    try:
        return config_to_dict(build_config(saved))
    except ConfigError:
        return saved


def resume_overridable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_OVERRIDABLE)


def differing_settings(requested: dict, trained: dict) -> dict[str, tuple]:
    """``{dotted key: (trained value, requested value)}`` for the keys set in both configs whose
    values differ, sorted by key, leaving out those a resumed run may change
    (``RESUME_OVERRIDABLE``)."""
    new, old = flatten_config(requested), flatten_config(trained)
    return {k: (old[k], new[k]) for k in sorted(new.keys() & old.keys())
            if new[k] != old[k] and not resume_overridable(k)}


def describe_differences(differences: dict[str, tuple], now: str = "asked") -> str:
    """``key (trained X, asked Y)`` for each entry of :func:`differing_settings`, joined by
    commas."""
    return ", ".join(f"{k} (trained {old!r}, {now} {new!r})" for k, (old, new) in differences.items())


def check_resume_overrides(overrides: list[str]) -> None:
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if not resume_overridable(key):
            accepted = ", ".join(k + "*" if k.endswith(".") else k for k in RESUME_OVERRIDABLE)
            raise ConfigError(
                f"{key} cannot change when resuming: the run would not continue exactly. "
                f"Accepted on resume: {accepted}"
            )


def load_config(preset: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a preset (name or path), apply ``key=value`` overrides, validate."""
    raw: dict = {}
    if preset is not None:
        path = resolve_preset(preset)
        try:
            with open(path) as handle:
                loaded = yaml.safe_load(handle) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            tabs = " (YAML does not allow tabs for indentation: use spaces)" \
                if "\t" in path.read_text(errors="replace") else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path} is not valid YAML{where}: {problem}{tabs}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        raw = loaded
    return build_config(merge_overrides(raw, overrides or []))


def config_to_dict(config: Config) -> dict:
    return config.model_dump(mode="json")
