"""The shared description of the rule and the harness routing."""

from celo2.rule import routing, spec


def test_factored_dims_pick_the_two_largest_axes():
    assert spec.factored_dims((64, 32)) == (1, 0)
    assert spec.factored_dims((10, 64)) == (0, 1)
    assert spec.factored_dims((3, 3, 4, 8)) == (2, 3)
    assert spec.factored_dims((16, 3, 3, 3)) == (3, 0)
    assert spec.factored_dims((5, 5)) == (0, 1)
    assert spec.factored_dims((7,)) is None and spec.factored_dims(()) is None


def test_theta_shapes_total_347():
    shapes = spec.theta_shapes()
    assert shapes["w0__13"] == (3, 8) and shapes["w2"] == (8, 3)
    assert spec.NUM_THETA_PARAMS == 347


def test_routing_by_shape_and_name():
    assert routing.route("fc1.weight", (4, 4)) == routing.LEARNED
    assert routing.route("fc1.bias", (4,)) == routing.ADAM
    assert routing.route(None, ()) == routing.ADAM
    assert routing.route("transformer.wte.weight", (50, 8)) == routing.ADAM
    assert routing.route("lm_head.weight", (50, 8)) == routing.ADAM
    assert routing.route("model.embed_tokens.weight", (50, 8)) == routing.ADAM
    assert routing.route("conv1.weight", (8, 3, 3, 3)) == routing.LEARNED
    assert routing.route("blocks.0.ahead.weight", (4, 4)) == routing.LEARNED
    assert routing.route("lm_head.weight", (50, 8), pattern=None) == routing.LEARNED


def test_routing_table_totals():
    table = routing.format_routing_table([("celo2", "w", (4, 5)), ("adam", "b", (5,))])
    assert "celo2: 1 tensors, 20 elements" in table and "adam: 1 tensors, 5 elements" in table
