"""The compiled-program reader counts loop bodies per iteration, convolutions by their real
taps, and collectives by kind; checked on programs XLA:CPU compiles here."""
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mage_jax.plan import hlo

STEPS, BATCH, WIDTH = 6, 8, 16


def _scanned_matmuls_text() -> str:
    """STEPS matmuls in a lax.scan, the rows of x over 4 devices and each weight's columns
    too, so every iteration all-gathers its weight; one all-reduce for the sum."""
    mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:4])

    def f(x, w):
        def body(carry, wi):
            y = jax.lax.with_sharding_constraint(carry @ wi, NamedSharding(mesh, P("d", None)))
            return y, None
        return jax.lax.scan(body, x, w)[0].sum()

    x = jax.ShapeDtypeStruct((BATCH, WIDTH), jnp.float32, sharding=NamedSharding(mesh, P("d")))
    w = jax.ShapeDtypeStruct((STEPS, WIDTH, WIDTH), jnp.float32,
                             sharding=NamedSharding(mesh, P(None, None, "d")))
    with jax.set_mesh(mesh):  # not the mesh an earlier test in this process left set
        return jax.jit(f).lower(x, w).compile().as_text()


@pytest.fixture(scope="module")
def scanned():
    return _scanned_matmuls_text()


def test_loop_bodies_count_once_per_iteration(scanned):
    per_iteration = hlo.analyse(scanned)
    once = hlo.analyse(scanned, per_iteration=False)
    matmul = 2 * (BATCH // 4) * WIDTH * WIDTH  # a device's rows times the gathered weight
    assert per_iteration.dot_conv_flops == STEPS * matmul
    assert once.dot_conv_flops == matmul
    assert per_iteration.loops == 1 and per_iteration.unknown_trip_counts == 0
    gathers = per_iteration.collectives["all-gather"]
    assert gathers.count == STEPS and gathers.bytes == STEPS * WIDTH * WIDTH * 4
    assert once.collectives["all-gather"].count == 1
    assert per_iteration.collectives["all-reduce"].count == 1  # the sum, outside the loop


def test_trip_count_from_the_loop_condition_when_xla_does_not_state_it(scanned):
    # TPU's optimised HLO carries no known_trip_count: the condition's constant gives it.
    bare = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", scanned)
    assert "known_trip_count" not in bare
    assert hlo.analyse(bare).dot_conv_flops == hlo.analyse(scanned).dot_conv_flops


def test_convolution_counts_taps_that_read_input_not_padding():
    images = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 4, 5), jnp.float32)
    conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    text = conv.lower(images, kernel).compile().as_text()
    # 8 outputs x 3 taps per dimension, minus the 2 taps that fall on the zero border.
    taps = 8 * 3 - 2
    assert hlo.analyse(text).dot_conv_flops == 2 * 2 * 5 * 4 * taps * taps


def test_taps_of_a_matmul_written_as_a_padded_convolution():
    # TPU writes some matmuls as a convolution over a size-1 dimension padded 2 on each
    # side with a 3-wide window: each of the 3 outputs reads the one input element once.
    assert hlo._taps(out=3, kernel=3, size=1, pad_lo=2, stride=1, lhs_dilation=1,
                     rhs_dilation=1) == 3
    # Stride 2 over 8 inputs, window 3, padding 1 low: outputs 0..3 read 2, 3, 3, 3 taps.
    assert hlo._taps(out=4, kernel=3, size=8, pad_lo=1, stride=2, lhs_dilation=1,
                     rhs_dilation=1) == 11


def test_tpu_reduce_scatter_fusion_is_named_reduce_scatter():
    text = """HloModule m

%all-reduce-scatter.1 (input_0: f32[128,64]) -> f32[32,64] {
  %input_0 = f32[128,64]{1,0} parameter(0)
  %all-reduce.2 = f32[128,64]{1,0} all-reduce(%input_0), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %pid = u32[] partition-id()
  ROOT %ds = f32[32,64]{1,0} dynamic-slice(%all-reduce.2, %pid, %pid), dynamic_slice_sizes={32,64}
}

ENTRY %main (p: f32[128,64]) -> f32[32,64] {
  %p = f32[128,64]{1,0} parameter(0)
  ROOT %fusion.1 = f32[32,64]{1,0} fusion(%p), kind=kCustom, calls=%all-reduce-scatter.1
}
"""
    totals = hlo.analyse(text)
    assert dict(totals.collectives) == {"reduce-scatter": hlo.Collective(1, 128 * 64 * 4)}


def test_text_without_an_entry_is_refused():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo.analyse("HloModule m\n")
