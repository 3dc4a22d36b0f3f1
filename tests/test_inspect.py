"""tlkit.inspection: per-layer shapes, parameters, receptive fields and MACs against figures
worked out by hand or published for well-known networks."""

import keras
import pytest
from keras import layers

from tlkit.backbones import build_lenet5, list_backbones
from tlkit.errors import ConfigError
from tlkit.inspection import format_table, inspect_backbone, inspect_model, summarize
from tlkit.models import build_backbone, build_classifier


def by_name(rows):
    return {row.name: row for row in rows}


def functional(input_shape, *stack):
    """A functional model applying `stack` in order to an input of `input_shape`."""
    inputs = x = keras.Input(shape=input_shape)
    for layer in stack:
        x = layer(x)
    return keras.Model(inputs, x)


def conv_out(n, k, s, p):
    """Lecture formula for an output side: (n + 2p - k) / s + 1, rounded down."""
    return (n + 2 * p - k) // s + 1


# --- Known networks ---------------------------------------------------------------------------


def assert_totals_match(model, rows):
    totals = summarize(rows)
    assert totals.params == model.count_params()
    assert totals.trainable_params == sum(w.numpy().size for w in model.trainable_weights)
    assert totals.non_trainable_params == sum(w.numpy().size
                                              for w in model.non_trainable_weights)
    return totals


def test_vgg16_conv_base():
    model = keras.applications.VGG16(include_top=False, weights=None)
    rows = inspect_model(model)
    totals = assert_totals_match(model, rows)
    assert totals.params == 14_714_688
    last = by_name(rows)["block5_pool"]
    assert last.receptive_field == (212, 212) and last.jump == (32, 32)
    # The input has no fixed size, so the cost is unknown (and said so).
    assert totals.macs is None and totals.flops is None
    assert "MACs: unknown" in format_table(rows, totals)


def test_vgg16_full_network_macs():
    model = keras.applications.VGG16(weights=None)
    rows = inspect_model(model)
    totals = assert_totals_match(model, rows)
    assert totals.params == 138_357_544
    assert totals.macs == pytest.approx(15.47e9, rel=0.05)
    assert totals.flops == 2 * totals.macs
    # conv1_1: 224 * 224 * 3 * 3 * 3 * 64; fc1: 25088 * 4096.
    rows = by_name(rows)
    assert rows["block1_conv1"].macs == 224 * 224 * 3 * 3 * 3 * 64
    assert rows["fc1"].macs == 7 * 7 * 512 * 4096
    assert rows["fc1"].receptive_field == (224, 224)


def test_resnet50_without_top():
    model = keras.applications.ResNet50(include_top=False, weights=None)
    totals = assert_totals_match(model, inspect_model(model))
    assert totals.params == 23_587_712


def test_resnet50_macs_and_receptive_field():
    model = keras.applications.ResNet50(weights=None)
    rows = inspect_model(model)
    totals = assert_totals_match(model, rows)
    assert totals.params == 25_636_712
    assert totals.macs == pytest.approx(3.86e9, rel=0.05)
    rows = by_name(rows)
    # Published figure for ResNet-50's last feature map (Araujo et al., Distill 2019).
    assert rows["conv5_block3_out"].receptive_field == (483, 483)
    assert rows["conv5_block3_out"].jump == (32, 32)
    # The stem: 7x7/2 conv after 3-pixel padding, then 3x3/2 max pooling.
    assert rows["conv1_pad"].padding == "3"
    assert (rows["conv1_conv"].receptive_field, rows["conv1_conv"].jump) == ((7, 7), (2, 2))
    assert (rows["pool1_pool"].receptive_field, rows["pool1_pool"].jump) == ((11, 11), (4, 4))
    # At a shortcut the longer path wins: the 1x1 projection has a smaller field.
    assert rows["conv2_block1_0_conv"].receptive_field == (11, 11)
    assert rows["conv2_block1_add"].receptive_field == rows["conv2_block1_3_bn"].receptive_field
    assert rows["conv2_block1_add"].receptive_field == (19, 19)


def test_lenet5():
    inputs = keras.Input(shape=(32, 32, 1))
    outputs = layers.Dense(10, name="predictions")(build_lenet5((32, 32, 1))(inputs))
    model = keras.Model(inputs, outputs)
    rows = inspect_model(model)
    totals = assert_totals_match(model, rows)
    assert totals.params == 61_706
    rows = by_name(rows)
    expected = {  # name: (output shape, params, MACs, rf, jump)
        "backbone/c1": ((28, 28, 6), 156, 28 * 28 * 25 * 6, 5, 1),
        "backbone/s2": ((14, 14, 6), 0, 0, 6, 2),
        "backbone/c3": ((10, 10, 16), 2_416, 10 * 10 * 25 * 6 * 16, 14, 2),
        "backbone/s4": ((5, 5, 16), 0, 0, 16, 4),
        "backbone/c5": ((1, 1, 120), 48_120, 25 * 16 * 120, 32, 4),
        "backbone/c5_pool": ((120,), 0, 0, 32, 4),
        "backbone/f6": ((84,), 10_164, 120 * 84, 32, 4),
        "predictions": ((10,), 850, 840, 32, 4),
    }
    for name, (shape, params, macs, rf, jump) in expected.items():
        row = rows[name]
        assert (row.output_shape, row.params, row.macs) == (shape, params, macs), name
        assert (row.receptive_field, row.jump) == ((rf, rf), (jump, jump)), name
    assert totals.macs == 117_600 + 240_000 + 48_000 + 10_080 + 840


def test_every_registered_backbone_totals_equal_count_params():
    for name in list_backbones():
        model = build_backbone(name, 32)
        rows = inspect_model(model)
        totals = assert_totals_match(model, rows)
        assert totals.macs > 0, name
        assert rows[-1].jump[0] >= 4, name  # every backbone downsamples


def test_classifier_with_frozen_backbone_walks_into_it():
    model = build_classifier("scratch", 3, 32)
    model.get_layer("backbone").trainable = False
    rows = inspect_model(model)
    totals = assert_totals_match(model, rows)
    names = [r.name for r in rows]
    assert names[0] == "preprocess" and names[-3:] == ["pooler", "output_dropout",
                                                       "predictions"]
    assert "backbone/block1_conv1" in names
    head = by_name(rows)["predictions"]
    assert totals.trainable_params == head.params == 128 * 3 + 3  # 3 blocks: 128 features
    assert all(r.trainable_params == 0 for r in rows if r.name.startswith("backbone/"))


# --- Hand-made layers -------------------------------------------------------------------------


def test_output_sizes_follow_the_lecture_formula():
    model = functional(
        (32, 32, 3),
        layers.Conv2D(8, 5, padding="valid", name="valid5"),
        layers.Conv2D(8, 3, strides=2, padding="same", name="same3s2"),
        layers.MaxPooling2D(3, strides=2, name="pool3s2"),
        layers.Conv2D(4, 3, strides=2, padding="valid", name="valid3s2"),
    )
    rows = by_name(inspect_model(model))
    n = 32
    for name, k, s, p, padding in (("valid5", 5, 1, 0, "valid"), ("same3s2", 3, 2, 1, "same"),
                                   ("pool3s2", 3, 2, 0, "valid"),
                                   ("valid3s2", 3, 2, 0, "valid")):
        n = conv_out(n, k, s, p)
        row = rows[name]
        assert row.output_shape[:2] == (n, n), name
        assert (row.kernel, row.stride, row.padding) == ((k, k), (s, s), padding), name
    assert [rows[name].output_shape[0] for name in rows] == [28, 14, 6, 2]


def conv3(**options):
    return layers.Conv2D(4, 3, padding="same", **options)


@pytest.mark.parametrize("make_stack, rf, jump", [
    (lambda: [conv3(), conv3()], 5, 1),
    (lambda: [conv3(), conv3(), conv3()], 7, 1),
    (lambda: [conv3(), layers.MaxPooling2D(2), conv3()], 8, 2),
    (lambda: [conv3(strides=2), conv3(strides=2)], 7, 4),
    (lambda: [conv3(dilation_rate=2)], 5, 1),
], ids=["conv3-conv3", "conv3x3", "conv3-pool2-conv3", "conv3s2-conv3s2", "dilated"])
def test_receptive_field_of_stacks(make_stack, rf, jump):
    last = inspect_model(functional((32, 32, 3), *make_stack()))[-1]
    assert (last.receptive_field, last.jump) == ((rf, rf), (jump, jump))


def test_global_pooling_sees_the_whole_input():
    rows = inspect_model(functional((20, 24, 3), layers.Conv2D(4, 3), layers.Conv2D(4, 3),
                                    layers.GlobalAveragePooling2D(), layers.Dense(2)))
    assert [r.receptive_field for r in rows] == [(3, 3), (5, 5), (20, 24), (20, 24)]


def test_branches_follow_the_main_path():
    inputs = keras.Input(shape=(16, 16, 3))
    a = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = layers.Conv2D(4, 3, padding="same", name="b")(a)
    shortcut = layers.Conv2D(4, 1, name="shortcut")(inputs)
    added = layers.Add(name="add")([shortcut, b])
    summed = added + a  # an operation that is not a layer: followed, no row
    gate = layers.GlobalAveragePooling2D(keepdims=True, name="squeeze")(summed)
    gated = layers.Multiply(name="excite")([summed, gate])  # the 1x1 gate is not the main path
    out = layers.Conv2D(4, 3, padding="same", name="c")(gated)
    rows = by_name(inspect_model(keras.Model(inputs, out)))
    assert sorted(rows) == ["a", "add", "b", "c", "excite", "shortcut", "squeeze"]
    assert rows["shortcut"].receptive_field == (1, 1)
    assert rows["add"].receptive_field == (5, 5)
    assert rows["squeeze"].receptive_field == (16, 16)
    assert rows["excite"].receptive_field == (5, 5)
    assert rows["c"].receptive_field == (7, 7)


def test_macs_of_each_counted_layer():
    model = functional(
        (8, 8, 4),
        layers.Conv2D(6, 3, padding="same", groups=2, name="grouped"),
        layers.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise"),
        layers.SeparableConv2D(5, 3, padding="same", name="separable"),
        layers.Dense(7, name="pointwise"),
        layers.BatchNormalization(name="bn"),
        layers.Flatten(name="flat"),
        layers.Dense(3, name="dense"),
    )
    rows = by_name(inspect_model(model))
    assert rows["grouped"].macs == 8 * 8 * 3 * 3 * 4 * 6 // 2
    assert rows["depthwise"].macs == 6 * 6 * 3 * 3 * 6 * 2
    assert rows["separable"].macs == 6 * 6 * 3 * 3 * 12 + 6 * 6 * 12 * 5
    assert rows["pointwise"].macs == 6 * 6 * 5 * 7  # a Dense on a feature map: per pixel
    assert rows["pointwise"].receptive_field == rows["separable"].receptive_field == (7, 7)
    assert rows["bn"].macs == rows["flat"].macs == 0
    assert rows["dense"].macs == 6 * 6 * 7 * 3
    assert rows["flat"].receptive_field == (8, 8)
    assert summarize(list(rows.values())).macs == sum(r.macs for r in rows.values())


# --- Table and errors -------------------------------------------------------------------------


def test_inspect_backbone_and_format_table():
    rows, totals = inspect_backbone("lenet5", 32)
    assert rows == inspect_model(build_backbone("lenet5", 32))
    assert totals == summarize(rows)
    text = format_table(rows, totals)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["layer", "type", "output"]
    assert any(line.startswith("c1 ") and "5x5" in line and "28x28x6" in line for line in lines)
    assert f"Parameters: {totals.params:,}" in text
    assert "MACs: 650.88K multiply-accumulates per image (FLOPs = 2 x MACs = 1.30M)" in text


def test_inspect_backbone_checks_its_arguments():
    with pytest.raises(ConfigError, match="backbone.*Received: backbone='nope'"):
        inspect_backbone("nope", 32)
    with pytest.raises(ConfigError, match="image_size.*>= 32.*Received: image_size=16"):
        inspect_backbone("lenet5", 16)


def test_models_without_a_graph_are_refused():
    with pytest.raises(ConfigError, match="known input"):
        inspect_model(keras.Sequential([layers.Dense(2)]))
    with pytest.raises(ConfigError, match="keras.Model"):
        inspect_model(layers.Dense(2))
