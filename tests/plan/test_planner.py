"""The pod planner compiles the real train step for TPU slices with libtpu's compile-only
devices (the `[tpu]` extra), on this CPU."""
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from mage_jax.plan import aot, search, topology
import tiny_configs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIB = 2 ** 30


def _plan_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "mage_jax.plan", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _state_bytes(config, part):
    """Bytes of the whole (unsharded) train state's ``part`` leaves, from its shapes alone."""
    stage = aot.build_stage(config)
    state = jax.eval_shape(lambda r: nn.unbox(stage.init_state(r)), jax.random.key(0))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state[part]))


def test_demo_preset_plan_for_v5e_2x2(tmp_path):
    out = tmp_path / "plan.json"
    result = _plan_cli("--config=configs/pretrain.py:demo", "--topology=v5e:2x2",
                       f"--json={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "configs/pretrain.py:demo on v5e:2x2: 4 devices" in result.stdout
    plan = json.loads(out.read_text())["plans"][0]
    assert (plan["devices"], plan["chip"], plan["hbm_bytes"]) == (4, "v5e", 16 * GIB)
    # The demo's mesh is data-parallel: every chip holds all parameters and Adam's moments.
    assert plan["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    config = tiny_configs.load_config("pretrain", "demo")
    assert plan["parameter_bytes"] == _state_bytes(config, "params")
    assert plan["optimizer_bytes"] == _state_bytes(config, "opt_state")
    assert plan["fits"] and plan["total_bytes"] >= plan["argument_bytes"] + plan["temp_bytes"]
    # The compiled program's matmuls and convolutions are nearly all of the model's FLOPs
    # (the rest is elementwise work), counted by two different routes.
    assert 0.85 < plan["executed_dot_conv_flops"] / plan["model_flops"] < 1.02
    # The roofline's compute term is the executed matmuls at v5e's peak bf16 rate; the
    # estimate is XLA's where libtpu gives one, else the slowest of the three terms.
    assert plan["compute_seconds"] == pytest.approx(plan["executed_dot_conv_flops"] / 197e12)
    terms = (plan["compute_seconds"], plan["hbm_seconds"], plan["ici_seconds"])
    if plan["step_seconds_source"] == "roofline":
        assert plan["step_seconds"] == max(terms)
    else:
        assert plan["step_seconds"] == pytest.approx(plan["xla_step_seconds"])
    assert plan["images_per_s"] == pytest.approx(32 / plan["step_seconds"])
    assert 0 < plan["mfu"] < 1
    # Data parallelism: gradients are all-reduced, no parameter is gathered.
    assert plan["collectives"]["all-reduce"]["count"] >= 1
    assert "all-gather" not in plan["collectives"]
    # Saved plans read back into one table.
    table = _plan_cli(f"--summarize={tmp_path}", timeout=300)
    assert table.returncode == 0, table.stderr[-2000:]
    row = [line for line in table.stdout.splitlines() if line.startswith("| configs/")]
    assert len(row) == 1 and "| v5e:2x2 | float32 | 4 x 1 x 1 | 8 |" in row[0]


def _tiny(scan_layers):
    config = tiny_configs.tiny_pretrain_config()
    # Wide enough that the transformer, not the tiny tokenizer, holds most of the FLOPs.
    config.model.update(depth=4, decoder_depth=2, embed_dim=64, decoder_embed_dim=64,
                        scan_layers=scan_layers)
    config.mesh.update(data=1, fsdp=4, tensor=1)
    return config


@pytest.fixture(scope="module")
def v5e():
    return topology.devices("v5e:2x2")


def test_scanned_layers_are_counted_once_per_layer(v5e):
    # Under a mesh the caller left set (the training loop sets one): the plan ignores it.
    cpu = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                        axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(cpu):
        unrolled, scanned = (aot.plan(_tiny(s), "v5e:2x2", v5e) for s in (False, True))
    # The same model: the same model FLOPs, and nearly the same matmuls executed.
    assert scanned.model_flops == unrolled.model_flops
    assert scanned.executed_dot_conv_flops == pytest.approx(unrolled.executed_dot_conv_flops,
                                                            rel=0.03)
    # XLA's own count sees each scanned block once; the planner's correction undoes it.
    assert unrolled.loop_correction == 1.0
    assert scanned.loop_correction > 1.3
    assert scanned.xla_flops_loops_once < 0.8 * unrolled.xla_flops_loops_once
    # FSDP: parameters are gathered for use and gradients reduce-scattered.
    for plan in (unrolled, scanned):
        assert plan.collectives["all-gather"]["count"] > 0
        assert plan.collectives["reduce-scatter"]["count"] > 0
        assert plan.parameter_bytes < _state_bytes(_tiny(False), "params") / 2


def test_a_variant_too_large_for_hbm_is_refused_with_the_excess(v5e):
    config = _tiny(False)
    config.optimizer.epochs = 100.0  # keeps the schedule valid at any batch
    plans, refused = search.run(config, "v5e:2x2", v5e,
                                [((1, -1, 1), False, False, 2), ((1, -1, 1), False, False,
                                                                 2 ** 16)])
    assert [p.batch_size for p in plans] == [8]
    assert len(refused) == 1 and "batch 262144" in refused[0].variant
    assert "over by" in refused[0].reason and "GiB" in refused[0].reason
    over = float(refused[0].reason.split("over by ")[1].split(" GiB")[0])
    assert over > 16


@pytest.mark.parametrize("args, message", [
    (["--config=configs/pretrain.py:demo", "--topology=v9:2x2"], "not a TPU slice name"),
    (["--config=configs/probe.py:demo", "--topology=v5e:2x2"], "the planner compiles"),
    (["--config=configs/pretrain.py:demo", "--topology=v5e:2x2", "--search",
      "--meshes=2x2"], "is not data x fsdp x tensor"),
    (["--config=configs/pretrain.py:demo", "--topology=v5e:3x7"], "libtpu has no such slice"),
])
def test_bad_input_is_one_line_and_exit_status_2(args, message):
    result = _plan_cli(*args, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
