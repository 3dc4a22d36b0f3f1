"""Per-layer inspection of a Keras model, as CNN lecture notes compute it.

For every layer, in the order `model.layers` lists them (a topological order) and inside
nested models (a tlkit classifier's `backbone`): output shape, parameters (trainable and
not), kernel, stride, padding, receptive field, cumulative stride ("jump") and the
multiply-accumulates it costs per image.

Receptive field and jump follow the standard recurrence. The input pixel has rf = 1 and
jump = 1; a convolution or pooling window of size k (dilation d: k_eff = d (k - 1) + 1) and
stride s gives

    jump_out = jump_in * s
    rf_out   = rf_in + (k_eff - 1) * jump_in

Global pooling, flatten (and so the dense layers after them) see the whole input: their rf
is the input size (or the rf already reached, if larger). Other layers (activations,
BatchNorm, padding, a Dense applied per pixel) keep rf and jump.

Branching networks (ResNet's shortcuts, Inception-style concatenations) are followed through
the graph the model's config describes: at a merge, the main path is the input with
the largest spatial size (so a squeeze-and-excitation gate of 1x1 is not it) and, among
those, the largest rf, whose jump is kept. The rf of a layer after a merge is therefore the
rf along its longest path, the usual lecture figure, not the exact union of all paths.

Cost is counted in MACs (multiply-accumulates; FLOPs = 2 x MACs), for the layers that
dominate it, as published figures count it:

    Conv2D           H_out * W_out * K_h * K_w * C_in * C_out / groups
    DepthwiseConv2D  H_out * W_out * K_h * K_w * C_in * depth_multiplier
    SeparableConv2D  the depthwise part + H_out * W_out * C_in * depth_multiplier * C_out
    Dense            in * out (per pixel when applied to a feature map)

Pooling, BatchNorm, activations and additions count 0.
"""

import math
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

from tlkit.backbones import get_backbone
from tlkit.errors import ConfigError
from tlkit.models import build_backbone
from tlkit.validation import check_number

WINDOW_LAYERS = (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D,
                 layers.MaxPooling2D, layers.AveragePooling2D)
"""Layers that slide a window: they grow the receptive field and multiply the jump."""

GLOBAL_LAYERS = (layers.GlobalAveragePooling2D, layers.GlobalMaxPooling2D, layers.Flatten)
"""Layers whose output sees the whole input."""

MAC_KERNELS = (
    (layers.SeparableConv2D, ("depthwise_kernel", "pointwise_kernel")),
    (layers.DepthwiseConv2D, ("kernel",)),
    (layers.Conv2D, ("kernel",)),
    (layers.Dense, ("kernel",)),
)
"""Layers whose MACs are counted, and their kernels: MACs = output positions x kernel size
(a Conv2D kernel holds K_h * K_w * C_in / groups * C_out weights, a Dense kernel in * out)."""


@dataclass(frozen=True)
class LayerRow:
    """One layer of `inspect_model`'s table."""

    name: str  # layer name; layers of nested models are prefixed "backbone/"
    type: str  # layer class name
    output_shape: tuple  # output shape without the batch axis (None: unknown size)
    params: int  # all parameters
    trainable_params: int  # parameters that training updates
    non_trainable_params: int  # frozen parameters and BatchNorm moving statistics
    kernel: tuple | None  # (height, width) of a conv or pooling window
    stride: tuple | None  # (height, width) stride of a conv or pooling window
    padding: str | None  # "same"/"valid" of a window layer; the pad sizes of ZeroPadding2D
    receptive_field: tuple | None  # (height, width) input pixels seen, along the main path
    jump: tuple | None  # (height, width) input pixels between neighbouring outputs
    macs: int | None  # multiply-accumulates per image (FLOPs = 2 x MACs); None: size unknown


@dataclass(frozen=True)
class Totals:
    """Sums over an `inspect_model` table."""

    params: int  # equals `model.count_params()`
    trainable_params: int  # what training updates
    non_trainable_params: int  # frozen layers and BatchNorm moving statistics
    macs: int | None  # multiply-accumulates per image; None if a layer's size is unknown

    @property
    def flops(self):
        """Floating-point operations per image: 2 x MACs (None if unknown)."""
        return None if self.macs is None else 2 * self.macs


@dataclass(frozen=True)
class _Field:
    rf: tuple  # (height, width)
    jump: tuple  # (height, width)


def inspect_model(model):
    """Describes every layer of a Keras model: shapes, parameters, window, receptive field
    and cost (see the module docstring for the formulas).

    Args:
        model: a built functional or Sequential `keras.Model` (one made with `keras.Input`,
            such as the keras.applications networks and tlkit's classifiers). Nested models
            are walked layer by layer; their rows are named `outer/inner`.

    Returns:
        A list of `LayerRow`, in `model.layers` order (input layers are left out). The MACs
        are multiply-accumulates per image; FLOPs = 2 x MACs.

    Raises:
        ConfigError: if `model` is not a Keras model with a known input (a subclassed model,
            or a Sequential model built without `keras.Input`).

    Example:

    >>> rows = inspect_model(keras.applications.VGG16(weights=None))
    >>> summarize(rows).macs / 1e9
    15.47...
    """
    if not isinstance(model, keras.Model):
        raise ConfigError(f"`model` must be a keras.Model. Received: model={model!r}")
    inputs = _graph_inputs(model)
    fields = [_Field((1, 1), (1, 1)) if len(t.shape) == 4 else None for t in inputs]
    image = next((tuple(t.shape[1:3]) for t in inputs if len(t.shape) == 4), (None, None))
    rows = []
    _walk(model, "", fields, image, rows)
    return rows


def _graph_inputs(model):
    try:
        return list(model.inputs)
    except (AttributeError, ValueError):
        raise ConfigError(
            "`model` must be a functional or Sequential Keras model with a known input "
            f"(built from keras.Input). Received: model={model.name!r} with no inputs"
        ) from None


def _walk(model, prefix, fields, image, rows):
    """Appends the rows of `model`'s layers, given the `_Field` of each of its inputs, and
    returns the `_Field` of each of its outputs.

    A functional model's graph is read from its config, Keras's public description of it:
    every call of a layer names the (layer, call, output) each of its inputs comes from, with
    its shape. Operations that are not layers (`x + y` on symbolic tensors) are followed but
    get no row."""
    if isinstance(model, keras.Sequential):
        return _walk_sequential(model, prefix, fields, image, rows)
    config = model.get_config()
    operations = {operation.name: operation for operation in model.operations}
    outputs = _history_keys(config["output_layers"])
    known = dict(zip(_history_keys(config["input_layers"]), fields))
    shapes = {key: shape for entry in config["layers"] for node in entry["inbound_nodes"]
              for key, shape in _node_inputs(node)}
    shapes.update(zip(outputs, (tuple(t.shape[1:]) for t in model.outputs)))
    for entry in config["layers"]:
        layer = operations[entry["name"]]
        for call, node in enumerate(entry["inbound_nodes"]):
            inputs = [(known[key], shape) for key, shape in _node_inputs(node)]
            keys = sorted(k for k in shapes if k[:2] == (layer.name, call))
            if isinstance(layer, keras.Model):
                inner = _walk(layer, f"{prefix}{layer.name}/", [f for f, _ in inputs], image,
                              rows if call == 0 else [])
                known.update(zip(keys, inner))
                continue
            shape = shapes[keys[0]]
            field = _propagate(layer, inputs, shape, image)
            known.update((key, field) for key in keys)
            if isinstance(layer, layers.Layer) and call == 0:
                rows.append(_row(layer, prefix, shape, field))
    return [known[key] for key in outputs]


def _walk_sequential(model, prefix, fields, image, rows):
    """`_walk` for a Sequential model: each layer takes the output of the one before."""
    field, shape = fields[0], tuple(model.inputs[0].shape[1:])
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            field = _walk(layer, f"{prefix}{layer.name}/", [field], image, rows)[0]
            shape = tuple(layer.outputs[0].shape[1:])
            continue
        output = tuple(layer.output.shape[1:])
        field = _propagate(layer, [(field, shape)], output, image)
        rows.append(_row(layer, prefix, output, field))
        shape = output
    return [field]


def _history_keys(value):
    """`(layer, call, output)` keys from a config's `input_layers` or `output_layers`."""
    return [tuple(value)] if value and isinstance(value[0], str) else [tuple(v) for v in value]


def _node_inputs(node):
    """`((layer, call, output), shape)` of each tensor a serialized layer call takes."""
    found = []

    def visit(value):
        if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
            found.append((tuple(value["config"]["keras_history"]),
                          tuple(value["config"]["shape"][1:])))
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit([node["args"], node["kwargs"]])
    return found


def _propagate(layer, inputs, shape, image):
    """The receptive field and jump of `layer`'s output, from its main input; `inputs` are
    the `(field, shape)` of each input."""
    candidates = [(field, in_shape) for field, in_shape in inputs if field is not None]
    if not candidates:
        return None
    largest = max(_area(s) for _, s in candidates)
    field, in_shape = max((c for c in candidates if _area(c[1]) == largest),
                          key=lambda c: c[0].rf)
    if isinstance(layer, WINDOW_LAYERS):
        kernel, stride = _effective_kernel(layer), tuple(layer.strides)
        return _Field(tuple(r + (k - 1) * j for r, k, j in zip(field.rf, kernel, field.jump)),
                      tuple(j * s for j, s in zip(field.jump, stride)))
    if isinstance(layer, GLOBAL_LAYERS) or (len(in_shape) == 3 and len(shape) != 3):
        return _Field(tuple(max(r, n or 0) for r, n in zip(field.rf, image)), field.jump)
    return field


def _area(shape):
    """Spatial size of a feature map (inf when unknown, 1 when it has no spatial axes)."""
    if len(shape) != 3:
        return 1
    return math.prod(math.inf if d is None else d for d in shape[:2])


def _effective_kernel(layer):
    kernel = getattr(layer, "kernel_size", None) or layer.pool_size
    dilation = getattr(layer, "dilation_rate", (1, 1))
    return tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))


def _row(layer, prefix, shape, field):
    kernel = stride = padding = None
    if isinstance(layer, WINDOW_LAYERS):
        kernel = tuple(getattr(layer, "kernel_size", None) or layer.pool_size)
        stride, padding = tuple(layer.strides), layer.padding
    elif isinstance(layer, layers.ZeroPadding2D):
        pads = [p for pair in layer.padding for p in pair]
        padding = str(pads[0]) if len(set(pads)) == 1 else str(layer.padding)
    trainable = sum(math.prod(w.shape) for w in layer.trainable_weights)
    non_trainable = sum(math.prod(w.shape) for w in layer.non_trainable_weights)
    return LayerRow(
        name=prefix + layer.name,
        type=type(layer).__name__,
        output_shape=shape,
        params=int(trainable + non_trainable),
        trainable_params=int(trainable),
        non_trainable_params=int(non_trainable),
        kernel=kernel,
        stride=stride,
        padding=padding,
        receptive_field=field and field.rf,
        jump=field and field.jump,
        macs=_macs(layer, shape),
    )


def _macs(layer, shape):
    kernels = next((names for kind, names in MAC_KERNELS if isinstance(layer, kind)), None)
    if kernels is None:
        return 0
    channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
    positions = shape[1:] if channels_first else shape[:-1]
    if any(d is None for d in positions):
        return None
    return math.prod(positions) * sum(math.prod(getattr(layer, k).shape) for k in kernels)


def summarize(rows):
    """Totals of an `inspect_model` table.

    Args:
        rows: the `LayerRow`s of one model.

    Returns:
        `Totals`: parameters (all, trainable, non-trainable; all equals the model's
        `count_params()`) and MACs per image (None if a layer's spatial size is unknown).
    """
    macs = [r.macs for r in rows]
    return Totals(
        params=sum(r.params for r in rows),
        trainable_params=sum(r.trainable_params for r in rows),
        non_trainable_params=sum(r.non_trainable_params for r in rows),
        macs=None if None in macs else sum(macs),
    )


def inspect_backbone(name, image_size):
    """Inspects a registered backbone, built with random weights at `image_size`.

    Args:
        name: a registered backbone name (`tlkit.backbones.list_backbones()`).
        image_size: side of the square RGB input, at least the backbone's `min_size`.

    Returns:
        `(rows, totals)`: the `LayerRow`s of `inspect_model` and their `Totals`.

    Raises:
        ConfigError: for an unknown backbone or an image size it does not accept.

    Example:

    >>> rows, totals = inspect_backbone("vgg16", 224)
    >>> print(format_table(rows, totals))
    """
    spec = get_backbone(name)
    check_number("image_size", image_size, spec.min_size, integer=True)
    rows = inspect_model(build_backbone(spec.name, image_size, "none"))
    return rows, summarize(rows)


def format_table(rows, totals):
    """The table as text, for the command line.

    Columns: layer, type, output shape, kernel, stride, padding, receptive field (rf),
    jump, parameters, the non-trainable ones among them and MACs; then the totals.

    Args:
        rows: `LayerRow`s from `inspect_model`.
        totals: their `Totals` (`summarize(rows)`).

    Returns:
        A string of aligned columns, one line per layer, and the totals below.
    """
    header = ("layer", "type", "output shape", "kernel", "stride", "padding", "rf", "jump",
              "params", "non-train.", "MACs")
    table = [header] + [(
        r.name, r.type, "x".join("?" if d is None else str(d) for d in r.output_shape),
        _pair(r.kernel, always=True), _pair(r.stride), r.padding or "",
        _pair(r.receptive_field), _pair(r.jump), f"{r.params:,}",
        f"{r.non_trainable_params:,}" if r.non_trainable_params else "",
        "?" if r.macs is None else (_si(r.macs) if r.macs else ""),
    ) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    left = 3
    lines = ["  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
             for line in table]
    lines.insert(1, "-" * len(lines[0]))
    macs = ("unknown (the input size is not fixed)" if totals.macs is None else
            f"{_si(totals.macs)} multiply-accumulates per image "
            f"(FLOPs = 2 x MACs = {_si(totals.flops)})")
    lines += [
        "",
        f"Parameters: {totals.params:,} (trainable {totals.trainable_params:,}, "
        f"non-trainable {totals.non_trainable_params:,}: frozen layers and BatchNorm "
        "statistics)",
        f"MACs: {macs}; counted for Conv2D, DepthwiseConv2D, SeparableConv2D and Dense",
        "rf, jump: receptive field and cumulative stride in input pixels along the main path "
        "(at a merge: the input with the largest rf)",
    ]
    return "\n".join(lines)


def _pair(values, always=False):
    """Formats a pair as "3x3" (when `always` or unequal) or "3"; None as ""."""
    if values is None:
        return ""
    if not always and len(set(values)) == 1:
        return str(values[0])
    return "x".join(str(v) for v in values)


def _si(number):
    """1234567 -> "1.23M"."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if number >= factor:
            return f"{number / factor:.2f}{suffix}"
    return str(number)


def stage_table(name, image_size, num_classes=2, weights="imagenet"):
    """Trainable and frozen parameters of a classifier at each step of the unfreeze schedule.

    Args:
        name: a registered backbone name.
        image_size: input side.
        num_classes: size of the head used for the count.
        weights: `"none"` trains everything in one stage; anything else (pretrained) counts
            the head stage, then each unfreeze group from the top (BatchNorm kept frozen).

    Returns:
        A list of `(stage, trainable, frozen)` parameter counts.
    """
    from tlkit.backbones import unfreeze_groups
    from tlkit.models import build_classifier
    from tlkit.schedule import ALL, HEAD
    from tlkit.training import set_trainable

    model = build_classifier(name, num_classes, image_size, weights="none")
    groups = unfreeze_groups(get_backbone(name), model.get_layer("backbone"))
    targets = [ALL] if weights == "none" else [HEAD, *(g for g, _ in groups)]
    table = []
    for target in targets:
        set_trainable(model, groups, target, freeze_batchnorm=weights != "none")
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        table.append((target, trainable, model.count_params() - trainable))
    return table
