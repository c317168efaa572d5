"""The cached cut: MobileNetV2's activation below the fine-tune layer, cached like the bottleneck.

With BatchNorm in inference mode, every layer below ``fine_tune_at`` is a fixed function of the
image. MobileNetV2 has residual connections, so the cut is the last *single-tensor point* at or
before ``fine_tune_at``: the output of the layer after which no later layer reads anything from
before it. For ``fine_tune_at`` 100 at 160 px that is ``block_10_project_BN``'s output, 10×10×96
(it feeds both ``block_11_expand`` and ``block_11_add``); the frozen layers between the cut and
``fine_tune_at`` (``block_11_expand``, ``block_11_expand_BN``) are recomputed at each step.

A cut cache is an ordinary cache file (``cache build --cut L``) whose configuration carries
``{"cut": {"layer": NAME, "shape": [h, w, c]}}``: the layer's name is in the fingerprint, so
``--cut 99`` and ``--cut 100`` (the same cut) share one file. ``finetune run --from-cache``
trains the network above the cut on it (``cut_model``), then puts the trained layers back into
the whole base (``full_model``): the saved model takes images, as always.

This module imports TensorFlow only inside the functions that build models.
"""

from __future__ import annotations

from functools import lru_cache

from ..core.errors import BottlecacheError
from ..core.options import check_range
from ..core.registry import BACKBONES, DEFAULT_MODEL, bottleneck_shape, get_backbone
from ..core.tf import import_keras
from .network import attach_head, unfreeze

CUT_CONSTRUCTORS = ("MobileNetV2",)  # the registry's networks a cut cache is made for (tested on them)


def check_cut(cut, model: str = DEFAULT_MODEL) -> int:
    """``--cut L``: a fine-tune layer index of ``model`` (a MobileNetV2 of the registry) with at
    least one frozen layer below it."""
    entry = get_backbone(model)
    if entry.constructor not in CUT_CONSTRUCTORS:
        supported = ", ".join(name for name, e in BACKBONES.items() if e.constructor in CUT_CONSTRUCTORS)
        raise BottlecacheError(f"The 'cut' option is supported for the MobileNetV2 models only ({supported}); "
                               f"got --model {model}.")
    return check_range("cut", cut, 1, entry.n_layers, high_open=False)


def cut_index(layers_inputs: list[list[int]], fine_tune_at: int) -> int:
    """The index of the last single-tensor point at or before ``fine_tune_at - 1``.

    ``layers_inputs[j]`` lists the indices of the layers layer ``j`` reads (layers in topological
    order, as a functional model keeps them). Layer ``i`` is a single-tensor point when no layer
    after it reads a layer before it: its output is then all the later layers need.
    """
    reads_before = [min(inputs, default=j) for j, inputs in enumerate(layers_inputs)]
    # the earliest layer read by any layer after i, for each i (a suffix minimum)
    earliest_after = [len(layers_inputs)] * len(layers_inputs)
    for i in range(len(layers_inputs) - 2, -1, -1):
        earliest_after[i] = min(earliest_after[i + 1], reads_before[i + 1])
    for i in range(min(fine_tune_at, len(layers_inputs)) - 1, -1, -1):
        if earliest_after[i] >= i:
            return i
    return 0


def _inbound(model) -> list[list[int]]:
    index = {id(layer): i for i, layer in enumerate(model.layers)}
    out = []
    for layer in model.layers:
        reads = set()
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                reads.add(index[id(tensor._keras_history.operation)])
        out.append(sorted(reads))
    return out


@lru_cache(maxsize=None)
def _architecture(image_size: int, model: str = DEFAULT_MODEL):
    """The registry entry ``model``'s layer names, inbound indices and output shapes (no weights needed)."""

    keras = import_keras()
    entry = get_backbone(model)
    model = getattr(keras.applications, entry.constructor)(input_shape=(image_size, image_size, 3),
                                                          include_top=False, weights=None, **entry.kwargs)
    names = [layer.name for layer in model.layers]
    shapes = [tuple(int(d) for d in layer.output.shape[1:]) for layer in model.layers]
    return names, _inbound(model), shapes


def cut_record(image_size: int, fine_tune_at: int, model: str = DEFAULT_MODEL) -> dict:
    """``{"layer": NAME, "shape": [h, w, c]}``: where the cut for ``fine_tune_at`` lies (the fingerprint's part)."""
    check_cut(fine_tune_at, model)
    names, inbound, shapes = _architecture(image_size, model)
    index = cut_index(inbound, fine_tune_at)
    if index == 0:
        raise BottlecacheError(
            f"The 'cut' option {fine_tune_at} leaves no frozen layer to cache (the last single-tensor point at or "
            f"before it is the input); choose a larger layer index."
        )
    return {"layer": names[index], "shape": list(shapes[index])}


def feature_shape_of(config: dict) -> tuple[int, ...]:
    """The shape of one row of a cache's ``features``: the bottleneck's, or the cut's."""
    cut = config.get("cut")
    if cut:
        return tuple(int(d) for d in cut["shape"])
    return bottleneck_shape(int(config["image_size"]), config.get("model", DEFAULT_MODEL))


def check_engine(config: dict, engine: str) -> str:
    """The engine a build runs: a cut cache runs the Keras base up to the cut (the LiteRT flatbuffer
    holds the whole base)."""
    if not config.get("cut"):
        return engine
    if engine == "litert":
        raise BottlecacheError("The 'engine' option litert runs the whole base only; a --cut cache is built with "
                               "--engine keras or auto.")
    return "keras"


def lower_model(base, layer: str):
    """The base up to and including ``layer``: what a cut cache stores."""

    keras = import_keras()
    return keras.Model(base.inputs, base.get_layer(layer).output, name=f"below_{layer}")


def upper_model(base, layer: str):
    """The base above ``layer``, sharing the base's layers (their weights and trainable flags)."""

    keras = import_keras()
    return keras.Model(base.get_layer(layer).output, base.output, name=f"above_{layer}")


def cut_model(base, head_model, layer: str):
    """Cut activations → the base above the cut (BatchNorm in inference mode) → the head."""
    from .layers import InferenceMode

    keras = import_keras()
    upper = upper_model(base, layer)
    inputs = keras.Input(shape=tuple(upper.input.shape[1:]), name="cut")
    x = InferenceMode(upper, name="frozen_bn_above_cut")(inputs, training=False)
    return keras.Model(inputs, head_model(x), name="bottlecache_finetune_cut")


def full_model(trained, base, fine_tune_at: int, image_size: int):
    """The usual fine-tuned model (images in) with the weights ``trained`` (a ``cut_model``) learned.

    ``base`` is a fresh base: each layer above the cut takes the trained layer's weights by name,
    and the head is the trained one.
    """
    upper = trained.get_layer("frozen_bn_above_cut").layer
    for layer in upper.layers:
        if layer.weights:
            base.get_layer(layer.name).set_weights(layer.get_weights())
    unfreeze(base, fine_tune_at)
    head = trained.layers[-1]
    return attach_head(base, head, image_size)
