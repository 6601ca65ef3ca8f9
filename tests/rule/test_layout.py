"""The kernels' layout of the rule (celo2.rule.layout) against the spec."""

import numpy as np
import pytest

from celo2 import load_theta
from celo2.rule import layout, spec


def test_channel_order_reads_every_group_once():
    rows = list(layout.ELEMENT_ROWS) + list(layout.ROW_STAT_ROWS) + list(layout.COL_STAT_ROWS)
    assert sorted(rows) == list(range(spec.NUM_FEATURES))
    assert layout.MATRIX_CHANNELS == 18 and layout.VECTOR_CHANNELS == 15
    # Vectors use a prefix of the matrix order: the first nine groups in spec order.
    assert list(layout.ELEMENT_ROWS[: layout.VECTOR_CHANNELS]) == list(range(spec.NUM_VECTOR_FEATURES))
    assert layout.CHANNEL_OFFSET["fac_m"] == layout.VECTOR_CHANNELS


def test_pack_then_unpack_gives_back_the_weights():
    theta = load_theta()
    parts = layout.unpack(layout.pack_theta(theta))
    first = theta.first_layer()
    np.testing.assert_array_equal(parts["w_el"], first[list(layout.ELEMENT_ROWS)])
    np.testing.assert_array_equal(parts["w_row"], first[list(layout.ROW_STAT_ROWS)])
    np.testing.assert_array_equal(parts["w_col"], first[list(layout.COL_STAT_ROWS)])
    np.testing.assert_array_equal(parts["w1"], theta["w1"])
    np.testing.assert_array_equal(parts["w2"], theta["w2"][:, spec.DIRECTION_OUTPUT])
    assert parts["b2"][0] == theta["b2"][spec.DIRECTION_OUTPUT]
    assert sum(s.size for s in layout.PACKED) == layout.NET_SIZE


def test_unpack_names_a_wrong_length():
    with pytest.raises(ValueError, match=r"expected \(329,\)"):
        layout.unpack(np.zeros(328, np.float32))
