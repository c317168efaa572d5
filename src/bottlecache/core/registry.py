"""The registry of frozen bases: which ``keras.applications`` networks bottlecache can cache.

Each entry knows its constructor, its one preprocessing function, the input sizes it accepts,
its bottleneck shape, where fine-tuning cuts it by default ("the top part"), where Keras
downloads its ImageNet weights, and whether the LiteRT engine runs it. Nothing here imports
TensorFlow: the registry is plain data, read by the command line's ``bottlecache models`` and
by every check made before a model is loaded.

Adding a model: one ``Backbone(...)`` line in ``_ENTRIES`` (docs/backbones.md, "Adding a model");
tests/test_backbones.py then runs the whole pipeline on it with random weights and checks the
numbers written here (layers, cut, bottleneck) against the built network.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BottlecacheError
from .options import DEFAULT_MODEL, IMAGE_SIZES, NATIVE

# ---------------------------------------------------------------------------------------------
# Preprocessing: each model has exactly one, named and versioned (both are in the fingerprint)


@dataclass(frozen=True)
class Preprocessing:
    """Float32 pixels in [0, 255], already resized → what the network expects."""

    name: str
    version: int
    description: str

    def __call__(self, x):
        """``x`` a float32 tensor or array (..., 3); tensors stay tensors (runs inside tf.data)."""
        if self.name == "scale_pm1":
            return x / 127.5 - 1.0
        if self.name == "torch":
            return (x / 255.0 - _TORCH_MEAN) / _TORCH_STD
        if self.name == "none":
            return x
        raise AssertionError(f"unknown preprocessing {self.name!r}")  # every entry below is handled above


_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)

PREPROCESSINGS = {
    # 2: resize before scaling (same values within float32 rounding); version 1 scaled first
    "scale_pm1": Preprocessing("scale_pm1", 2, "x / 127.5 - 1: scale to [-1, 1] (Keras mode 'tf')"),
    "torch": Preprocessing("torch", 1, "x / 255, minus the ImageNet mean, over its std (Keras mode 'torch')"),
    "none": Preprocessing("none", 1, "pixels as they are, 0-255: the model rescales and normalizes inside"),
}
# Records without a "preprocess" key mean this one: the function bottlecache had before the registry
# (so caches and heads made then keep their fingerprints).
LEGACY_PREPROCESSING = "scale_pm1"


# ---------------------------------------------------------------------------------------------
# The entries


@dataclass(frozen=True)
class Backbone:
    """One frozen base. ``name`` is what ``--model`` takes and what records store as ``model``."""

    name: str
    constructor: str  # the keras.applications attribute
    module: str  # keras.applications.<module>, whose preprocess_input ours must equal (tested)
    preprocessing: str  # a key of PREPROCESSINGS
    channels: int  # the bottleneck's depth
    n_layers: int  # len(base.layers) without the top
    fine_tune_layer: str  # the first layer fine-tuning trains by default
    fine_tune_at: int  # its index in base.layers
    imagenet_url: str  # where Keras downloads the no-top ImageNet weights ({size}: the input side)
    alpha: float | None = None
    valid_padding: bool = False  # the stem uses 'valid' convolutions: the bottleneck side is not ceil(size / 32)
    litert: bool = True
    keras_only_reason: str = ""
    image_sizes: tuple[int, ...] = IMAGE_SIZES
    per_size_imagenet: bool = False  # Keras ships one ImageNet checkpoint per input size
    native_size: int = 224  # the size its ImageNet weights were trained at: accepted too, `--image-size native`

    def __post_init__(self):
        if self.native_size not in self.image_sizes:
            object.__setattr__(self, "image_sizes", tuple(sorted({*self.image_sizes, self.native_size})))

    @property
    def kwargs(self) -> dict:
        return {} if self.alpha is None else {"alpha": self.alpha}

    @property
    def preprocess(self) -> Preprocessing:
        return PREPROCESSINGS[self.preprocessing]

    def bottleneck_shape(self, image_size: int) -> tuple[int, int, int]:
        side = _XCEPTION_SIDES[image_size] if self.valid_padding else -(-image_size // 32)
        return (side, side, self.channels)

    def imagenet_file(self, image_size: int) -> tuple[str, str]:
        """``(file name, url)`` of the no-top ImageNet weights Keras would download."""
        url = self.imagenet_url.format(size=image_size)
        return url.rsplit("/", 1)[1], url

    def record(self) -> dict:
        """The model's part of a backbone record (the weights' sha256 and image size are added)."""
        out = {"model": self.name}
        if self.alpha is not None:
            out["alpha"] = self.alpha
        if self.preprocessing != LEGACY_PREPROCESSING:
            out["preprocess"] = self.preprocessing
        out["preprocess_version"] = self.preprocess.version
        return out


# Xception's stem (two 'valid' 3x3 convolutions) loses pixels before its four stride-2 stages.
_XCEPTION_SIDES = {96: 3, 128: 4, 160: 5, 192: 6, 224: 7, 299: 10}

_KA = "https://storage.googleapis.com/tensorflow/keras-applications/"
_MOBILENET_V2_URL = _KA + "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{{size}}_no_top.h5"


def _mobilenet_v2(name: str, alpha: float, channels: int) -> Backbone:
    return Backbone(name, "MobileNetV2", "mobilenet_v2", "scale_pm1", channels, 154, "block_11_expand_relu", 100,
                    _MOBILENET_V2_URL.format(alpha=float(alpha)), alpha=alpha, per_size_imagenet=True)


_EFFICIENTNET_NATIVE = (224, 240, 260, 300)  # B0-B3, as Keras documents them (the V2 B0-B3 the same)


def _efficientnet(b: int, n_layers: int, cut: int) -> Backbone:
    channels = (1280, 1280, 1408, 1536)[b]
    return Backbone(f"efficientnet_b{b}", f"EfficientNetB{b}", "efficientnet", "none", channels, n_layers,
                    "block6a_expand_conv", cut, f"https://storage.googleapis.com/keras-applications/efficientnetb{b}_notop.h5",
                    native_size=_EFFICIENTNET_NATIVE[b])


def _efficientnet_v2(b: int, n_layers: int, cut: int) -> Backbone:
    channels = (1280, 1280, 1408, 1536)[b]
    return Backbone(f"efficientnet_v2_b{b}", f"EfficientNetV2B{b}", "efficientnet_v2", "none", channels, n_layers,
                    "block6a_expand_conv", cut, _KA + f"efficientnet_v2/efficientnetv2-b{b}_notop.h5",
                    native_size=_EFFICIENTNET_NATIVE[b])


_ENTRIES = (
    _mobilenet_v2("mobilenet_v2", 1.0, 1280),
    _mobilenet_v2("mobilenet_v2_0.35", 0.35, 1280),
    _mobilenet_v2("mobilenet_v2_0.5", 0.5, 1280),
    _mobilenet_v2("mobilenet_v2_0.75", 0.75, 1280),
    _mobilenet_v2("mobilenet_v2_1.3", 1.3, 1664),
    _mobilenet_v2("mobilenet_v2_1.4", 1.4, 1792),
    Backbone("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", "none", 576, 157, "expanded_conv_8_expand", 109,
             _KA + "mobilenet_v3/weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", alpha=1.0),
    Backbone("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", "none", 960, 187, "expanded_conv_12_expand", 139,
             _KA + "mobilenet_v3/weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", alpha=1.0),
    _efficientnet(0, 237, 162),
    _efficientnet(1, 339, 234),
    _efficientnet(2, 339, 234),
    _efficientnet(3, 384, 264),
    _efficientnet_v2(0, 270, 149),
    _efficientnet_v2(1, 334, 198),
    _efficientnet_v2(2, 349, 198),
    _efficientnet_v2(3, 409, 228),
    Backbone("resnet50_v2", "ResNet50V2", "resnet_v2", "scale_pm1", 2048, 190, "conv5_block1_preact_bn", 154,
             _KA + "resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("densenet121", "DenseNet121", "densenet", "torch", 1024, 427, "conv5_block1_0_bn", 313,
             _KA + "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("xception", "Xception", "xception", "scale_pm1", 2048, 132, "block11_sepconv1_act", 96,
             _KA + "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5", valid_padding=True, native_size=299),
    Backbone("convnext_tiny", "ConvNeXtTiny", "convnext", "none", 768, 133, "convnext_tiny_downsampling_block_2", 110,
             _KA + "convnext/convnext_tiny_notop.h5"),
)
BACKBONES: dict[str, Backbone] = {entry.name: entry for entry in _ENTRIES}


def get_backbone(name) -> Backbone:
    """The registry entry ``name``, or one line listing the registered names."""
    if not isinstance(name, str) or name not in BACKBONES:
        raise BottlecacheError(
            f"The 'model' option must be one of {', '.join(BACKBONES)} (see `bottlecache models`). "
            f"Got {name!r} instead."
        )
    return BACKBONES[name]


def resolve_image_size(name: str, image_size):
    """``native`` → the base's native size; any other value as it is."""
    return get_backbone(name).native_size if image_size == NATIVE else image_size


def check_model_size(name: str, image_size: int) -> Backbone:
    entry = get_backbone(name)
    if image_size not in entry.image_sizes:
        raise BottlecacheError(
            f"The 'image_size' option must be one of {', '.join(map(str, entry.image_sizes))} for the model "
            f"{name}. Got {image_size!r} instead."
        )
    return entry


def bottleneck_shape(image_size: int, model: str = DEFAULT_MODEL) -> tuple[int, int, int]:
    return get_backbone(model).bottleneck_shape(image_size)


def preprocessing_of(model: str) -> Preprocessing:
    return get_backbone(model).preprocess


def table_rows() -> list[dict]:
    """One plain dict per registered model, for ``bottlecache models`` (and its ``--json``)."""
    rows = []
    for entry in BACKBONES.values():
        rows.append({
            "model": entry.name, "keras": entry.constructor + (f"(alpha={entry.alpha})" if entry.alpha else ""),
            "preprocessing": f"{entry.preprocessing} v{entry.preprocess.version}",
            "image_sizes": list(entry.image_sizes), "native_size": entry.native_size,
            "bottleneck_160": list(entry.bottleneck_shape(160)) if 160 in entry.image_sizes else None,
            "layers": entry.n_layers, "fine_tune_at": entry.fine_tune_at, "fine_tune_layer": entry.fine_tune_layer,
            "engines": "keras, litert" if entry.litert else "keras",
            "keras_only_reason": entry.keras_only_reason or None,
        })
    return rows
