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


def test_thread_pool_only_for_simulated_devices_and_never_over_the_users():
    simulated = "--xla_foo=1 --xla_force_host_platform_device_count=8"
    per_device = xla_defaults.NPROC_PER_SIMULATED_DEVICE
    assert xla_defaults.thread_pool_size(simulated, None, None) == str(
        max(os.cpu_count(), 8 * per_device))
    assert xla_defaults.thread_pool_size(simulated, "3", None) is None  # the user's NPROC
    assert xla_defaults.thread_pool_size(simulated, None, "0") is None  # opted out
    assert xla_defaults.thread_pool_size("--xla_foo=1", None, None) is None  # real devices
    assert xla_defaults.thread_pool_size(
        "--xla_force_host_platform_device_count=1", None, None) is None


# An FSDP-sharded chain of layers: every parameter's all-gather is independent of the others,
# so XLA:CPU may run many at once, each holding a pool thread until all 8 devices reach it.
_CONCURRENT_ALL_GATHERS = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mage_jax import xla_defaults
print(xla_defaults.apply())
mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
jax.set_mesh(mesh)
rng = np.random.default_rng(0)
params = [jax.device_put(rng.normal(size=(64, 64)).astype(np.float32),
                         NamedSharding(mesh, P("fsdp", None))) for _ in range(40)]
x = jax.device_put(rng.normal(size=(16, 64)).astype(np.float32), NamedSharding(mesh, P("data")))

def loss(params, x):
    h = x
    for w in params:
        h = jnp.tanh(h @ w)
    return jnp.mean(h ** 2)

@jax.jit
def step(params, x):
    return [w - 0.01 * g for w, g in zip(params, jax.grad(loss)(params, x))]

for _ in range(400):
    params = step(params, x)
print(float(loss(params, x)))
"""


def test_simulated_devices_finish_concurrent_all_gathers():
    """With XLA's default pool (the core count) this program hung in 4 of 4 tries on a
    2-core VM; XLA's 20-second limit turns a hang into a failed process."""
    env = {k: v for k, v in os.environ.items() if k != "NPROC"}
    env.update(MAGE_JAX_XLA_DEFAULTS="1", XLA_FLAGS=(
        "--xla_force_host_platform_device_count=8"
        " --xla_cpu_collective_call_terminate_timeout_seconds=20"))
    out = subprocess.run([sys.executable, "-c", _CONCURRENT_ALL_GATHERS], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    added, final_loss = out.stdout.strip().splitlines()[-2:]
    # 8 per device, or the core count where that is more (thread_pool_size's rule).
    assert f"NPROC={xla_defaults.thread_pool_size(env['XLA_FLAGS'], None, None)}" in added
    assert np.isfinite(float(final_loss))
