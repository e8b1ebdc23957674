"""The XLA:CPU defaults the entry points set: when, and that this jaxlib accepts them."""
import os
import subprocess
import sys

import numpy as np

from mage_jax import xla_defaults

FLAG = xla_defaults.CPU_CONV_FLAG


def test_added_only_for_measured_jaxlib_and_when_the_user_has_not_set_it():
    measured = xla_defaults.MEASURED_JAXLIB[0]
    assert xla_defaults.flags_to_add("", measured, None) == [FLAG]
    assert xla_defaults.flags_to_add("--xla_foo=1", measured, "1") == [FLAG]
    # The user's own value wins, whatever it is.
    assert xla_defaults.flags_to_add(FLAG + "conv", measured, None) == []
    # A jaxlib it was not measured on might not know the flag (XLA aborts on unknown flags).
    assert xla_defaults.flags_to_add("", (0, 4), None) == []
    assert xla_defaults.flags_to_add("", None, None) == []
    assert xla_defaults.flags_to_add("", measured, "0") == []  # MAGE_JAX_XLA_DEFAULTS=0


_SCRIPT = """
import os, json, sys
from mage_jax import xla_defaults
added = xla_defaults.apply()
import jax, jax.numpy as jnp, numpy as np
x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
k = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 4)), jnp.float32)
y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
print(json.dumps({"added": added, "flags": os.environ.get("XLA_FLAGS", ""),
                  "y": np.asarray(y).ravel().tolist()}))
"""


def _run(env_update):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(env_update)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                         text=True, check=True)
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_this_jaxlib_runs_with_the_defaults_and_computes_the_same_convolution():
    with_defaults = _run({})
    plain = _run({"MAGE_JAX_XLA_DEFAULTS": "0"})
    assert plain["added"] == [] and FLAG not in plain["flags"]
    measured = xla_defaults._jaxlib_release() in xla_defaults.MEASURED_JAXLIB
    assert with_defaults["added"] == ([FLAG] if measured else [])
    assert (FLAG in with_defaults["flags"]) == measured
    np.testing.assert_allclose(with_defaults["y"], plain["y"], rtol=1e-5, atol=1e-5)
