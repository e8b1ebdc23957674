"""Steady-state training throughput and peak memory of a stage config, on this machine.

    python benchmarks/train_throughput.py --config=configs/pretrain.py:demo
    python benchmarks/train_throughput.py --config=configs/pretrain.py:vit_b \
        --config.batch_size=256 --config.model.dtype=bfloat16 --config.model.remat=True
    python benchmarks/train_throughput.py --summarize     # table of benchmarks/results/*.json

What is timed: the jitted train step the loop builds (``mage_jax.train.loop``: the same
stage, abstract state, logical shardings, donated state, ``fold_in(rng, step)``), run
``--steps`` times after ``--warmup`` untimed steps that absorb compilation. No checkpoints,
metrics files or image summaries: those are periodic costs of a run, not of a step.

``--data=synthetic`` (default) feeds one batch of uniform random images that stays on the
devices: the number is the model's, and presets whose dataset is not on this machine
(vit_b/vit_l on ImageNet) run too. ``--data=pipeline`` reads a new batch from the real grain
pipeline each step, as training does: on a small host the input pipeline may be the limit.

Pretraining needs a frozen tokenizer; unless ``--config.tokenizer_workdir`` names one, a
randomly initialised tokenizer of the config's architecture is saved to a temporary
directory (its weights do not change the cost of a step). The tokenizer stage is timed past
its adversarial warm-up (``--start_step=-1``), where the discriminator runs, as it does for
most of training.

Peak memory: ``peak_bytes_in_use`` from the devices' memory_stats on GPU/TPU; on CPU the
process's peak RSS (ru_maxrss), which also counts the Python/TF runtime.
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `python benchmarks/train_throughput.py` from a checkout
    sys.path.insert(0, _REPO)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mage_jax import xla_defaults  # noqa: E402

# As the entry point does: what users run is what is timed (MAGE_JAX_XLA_DEFAULTS=0 for the
# plain XLA defaults; the result file records XLA_FLAGS).
xla_defaults.apply()

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config, e.g. configs/pretrain.py:demo (overrides: --config.k=v).",
    lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first one compiles).")
_DATA = flags.DEFINE_enum("data", "synthetic", ["synthetic", "pipeline"],
                          "synthetic: one random batch kept on device; pipeline: grain batches.")
_START_STEP = flags.DEFINE_integer(
    "start_step", -1, "Step counter of the timed state; -1: past the tokenizer's adversarial "
    "warm-up (the discriminator runs), 0 for other stages.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", os.path.join(_REPO, "benchmarks", "results"),
                                  "Where the result JSON goes ('' writes none).")
_NAME = flags.DEFINE_string("name", None, "Label of this run (default: config and overrides).")
_SUMMARIZE = flags.DEFINE_bool("summarize", False,
                               "Print a markdown table of the results in --output_dir and exit.")


# ----------------------------------------------------------------------------- machine

def machine_description() -> dict:
    import flax
    import jax
    import jaxlib
    devices = jax.devices()
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f
                              if line.startswith("model name")), cpu_model)
    except OSError:
        pass
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "devices": [str(d) for d in devices[:16]],
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # Other work on the machine slows every figure: the 1/5/15-minute load averages.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
        "python": platform.python_version(),
    }


def peak_memory() -> dict:
    """Device peak where the backend reports it (GPU/TPU), else the process's peak RSS."""
    import jax
    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s]
    if peaks and all(p is not None for p in peaks):
        return {"kind": "device_peak_bytes_in_use (max over local devices)",
                "bytes": int(max(peaks))}
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": "process_peak_rss",
            "bytes": int(rss if sys.platform == "darwin" else rss * 1024)}


# Peak dense bf16 matmul rates of accelerators (vendor figures), for MFU; TPUs come from
# the planner's chip table.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def peak_bf16_flops(device) -> float | None:
    kind = str(getattr(device, "device_kind", ""))
    if device.platform == "gpu":
        return next((peak for name, peak in GPU_PEAK_BF16.items() if name in kind), None)
    if device.platform == "tpu":
        from mage_jax.plan import topology
        chip = topology.chip_of_kind(kind)
        return None if chip is None else chip.peak_bf16_flops / chip.cores * max(
            1, getattr(device, "num_cores", 1) or 1)
    return None


def _model_flops(config) -> float | None:
    """The step's model FLOPs, counted by XLA on the lowered plain program on the CPU."""
    from mage_jax.plan import aot
    try:
        return aot.model_flops(config)
    except Exception as e:  # a stage the planner does not build; the figure is optional
        logging.warning("no model FLOPs: %s", e)
        return None


# ----------------------------------------------------------------------------- stage setup

def _dummy_folder_dataset(root: str) -> str:
    """One class folder with one image: satisfies the stage's dataset check in synthetic
    mode (the batches themselves are generated here)."""
    import numpy as np
    from PIL import Image
    os.makedirs(os.path.join(root, "class0"), exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(root, "class0", "0.png"))
    return root


def _random_tokenizer(config, directory: str) -> str:
    """A randomly initialised tokenizer checkpoint of config.tokenizer's architecture."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    from mage_jax import checkpointing
    from mage_jax.models import vqgan
    model = vqgan.vqgan_from_config(config.tokenizer)
    size = config.data.image_size
    params = nn.unbox(jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 3))))(
        jax.random.key(0))["params"])
    checkpointer = checkpointing.Checkpointer(directory, keep=1, async_save=False)
    checkpointer.save(1, {"step": jnp.ones((), jnp.int32), "params": params})
    checkpointer.close()
    return directory


def prepare_config(config, scratch: str, data: str):
    """The config as benchmarked: a synthetic-data folder and a tokenizer where needed."""
    config = config.copy_and_resolve_references()
    if data == "synthetic":
        config.data.name = "folder"
        config.data.manual_dir = _dummy_folder_dataset(os.path.join(scratch, "data"))
    if config.stage == "pretrain" and not config.tokenizer_workdir:
        config.train_tokenizer_if_missing = False
        config.tokenizer_workdir = _random_tokenizer(config, os.path.join(scratch, "tokenizer"))
    return config


def build_step(config, workdir: str):
    """(stage, mesh, jitted step, initial state, frozen) exactly as the loop builds them."""
    import flax.linen as nn
    import jax
    from mage_jax import sharding, validation
    from mage_jax.train import loop, stages
    stage = stages.STAGES[config.stage](config, workdir, None)
    validation.validate_training_config(config, workdir)
    if stage.check is not None:
        stage.check()
    mesh = sharding.make_mesh(config.mesh)
    validation.validate_batch(config, mesh)
    jax.set_mesh(mesh)
    init_rng, train_rng, _ = jax.random.split(jax.random.key(config.seed), 3)
    _, state_shardings = loop.abstract_train_state(stage, mesh, init_rng)
    init = jax.jit(lambda r: nn.unbox(stage.init_state(r)), out_shardings=state_shardings)
    state = init(init_rng)
    frozen = None if stage.frozen is None else jax.device_put(stage.frozen,
                                                              sharding.replicated(mesh))
    train_step = loop.jit_train_step(stage, mesh, state_shardings, train_rng)
    return stage, mesh, train_step, state, frozen


def batches(config, stage, mesh, data: str):
    """An endless iterator of global batches (synthetic: the same one, on device)."""
    import jax
    import numpy as np
    from mage_jax import sharding
    from mage_jax.data import datasets, pipeline
    if data == "pipeline":
        it = pipeline.train_iterator(
            config.data, seed=config.seed, global_batch_size=config.batch_size,
            process_index=jax.process_index(), process_count=jax.process_count(),
            two_views=stage.two_views)
        while True:
            host_batch = next(it)
            host_batch.pop(datasets.SKIPPED_KEY, None)  # a host-side count, as the loop does
            yield sharding.host_batch_to_global(host_batch, mesh)
    rng = np.random.default_rng(0)
    local = config.batch_size // jax.process_count()
    size = config.data.image_size
    host = {"image": rng.uniform(size=(local, size, size, 3)).astype(np.float32),
            "label": np.zeros((local,), np.int32)}
    if stage.two_views:
        host["image2"] = rng.uniform(size=(local, size, size, 3)).astype(np.float32)
    batch = sharding.host_batch_to_global(host, mesh)
    while True:
        yield batch


# ----------------------------------------------------------------------------- measurement

def _count(tree) -> int:
    import jax
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def run_benchmark(config, steps: int, warmup: int, data: str, start_step: int) -> dict:
    import jax
    import jax.numpy as jnp
    from mage_jax import sharding
    scratch = tempfile.mkdtemp(prefix="mage_bench_")
    try:
        config = prepare_config(config, scratch, data)
        stage, mesh, train_step, state, frozen = build_step(config, os.path.join(scratch, "run"))
        if start_step < 0:
            start_step = (int(config.loss.adversarial_warmup_steps)
                          if config.stage == "tokenizer" else 0)
        state["step"] = jax.device_put(jnp.asarray(start_step, jnp.int32),
                                       sharding.replicated(mesh))
        feed = batches(config, stage, mesh, data)

        batch = next(feed)
        # Compiled once, ahead of time, and the compiled step is what runs below.
        t0 = time.perf_counter()
        train_step = train_step.lower(state, batch, frozen).compile()
        compile_s = time.perf_counter() - t0
        flops = None
        try:  # XLA's own count for one step (forward + backward + update), where it has one.
            cost = train_step.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            flops = float(cost["flops"]) if cost and cost.get("flops", -1) > 0 else None
            if config.get("model", {}).get("scan_layers", False):
                flops = None  # XLA counts a scanned (while-loop) body once: not per step
        except Exception as e:  # cost analysis is optional; a backend may not offer it
            logging.warning("no cost analysis: %s", e)

        t0 = time.perf_counter()
        state, metrics = train_step(state, batch, frozen)
        jax.block_until_ready(metrics)
        first_step_s = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            state, metrics = train_step(state, next(feed), frozen)
        jax.block_until_ready((state, metrics))

        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = train_step(state, next(feed), frozen)
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - t0
        loss = float(jax.device_get(metrics["loss"]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    steps_per_sec = steps / elapsed
    model_flops = _model_flops(config)
    peak = peak_bf16_flops(jax.devices()[0])
    peak = None if peak is None else peak * len(jax.devices())
    return {
        "stage": config.stage,
        "batch_size": int(config.batch_size),
        "image_size": int(config.data.image_size),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "dtype": config.get("model", config.get("tokenizer", {})).get("dtype", "float32"),
        "remat": bool(config.get("model", {}).get("remat", False)),
        "scan_layers": bool(config.get("model", {}).get("scan_layers", False)),
        "data": data,
        "start_step": start_step,
        "trained_params": _count(state["params"]) + _count(state.get("disc_params", {})),
        "steps": steps, "warmup": warmup,
        "seconds": elapsed,
        "steps_per_sec": steps_per_sec,
        "images_per_sec": steps_per_sec * config.batch_size,
        "compile_seconds": compile_s,
        "first_step_seconds": first_step_s,
        "flops_per_step": flops,
        "achieved_tflops": None if flops is None else flops * steps_per_sec / 1e12,
        # The plain program's FLOPs (unrolled, no remat; mage_jax/plan/aot.py) per second,
        # against the devices' peak bf16 rate where it is known (GPUs, TPUs).
        "model_flops_per_step": model_flops,
        "mfu": None if not (model_flops and peak) else model_flops * steps_per_sec / peak,
        "final_loss": loss,
        "peak_memory": peak_memory(),
    }


# ----------------------------------------------------------------------------- reporting

_COLUMNS = ("name", "platform", "devices", "batch", "dtype", "data", "steps/s", "images/s",
            "MFU", "compile s", "peak mem GiB", "load avg")


def _row(result: dict) -> list[str]:
    m = result["machine"]
    return [result["name"], f"{m['platform']} ({m['device_kind']}, {m['cpu_count']} CPUs)",
            str(m["device_count"]), str(result["batch_size"]), result["dtype"], result["data"],
            f"{result['steps_per_sec']:.3g}", f"{result['images_per_sec']:.4g}",
            "-" if result.get("mfu") is None else f"{100 * result['mfu']:.0f}%",
            f"{result['compile_seconds']:.1f}",
            f"{result['peak_memory']['bytes'] / 2**30:.2f}"
            + (" (RSS)" if result["peak_memory"]["kind"] == "process_peak_rss" else ""),
            "-" if not m.get("load_average") else f"{m['load_average'][0]:.1f}"]


def markdown_table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in results]
    return "\n".join(lines)


def _default_name(config_flag) -> str:
    from mage_jax import cli
    name = os.path.basename(config_flags.get_config_filename(config_flag))
    return " ".join([name] + cli.config_overrides(config_flag))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}.")
    if _SUMMARIZE.value:
        paths = sorted(glob.glob(os.path.join(_OUTPUT_DIR.value, "*.json")))
        records = [json.load(open(p, encoding="utf-8")) for p in paths]
        # The other benchmarks (sampler, bf16 tokens, input pipeline) write there too.
        print(markdown_table([r for r in records if "steps_per_sec" in r]))
        return
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/pretrain.py:demo.")
    if _STEPS.value < 1 or _WARMUP.value < 1:
        raise app.UsageError(f"--steps={_STEPS.value} and --warmup={_WARMUP.value} must be >= 1.")
    if not flags.FLAGS["verbosity"].present:  # the table is the output; keep library chatter out
        logging.set_verbosity(logging.WARNING)
    name = _NAME.value or _default_name(flags.FLAGS["config"])
    result = run_benchmark(_CONFIG.value, _STEPS.value, _WARMUP.value, _DATA.value,
                           _START_STEP.value)
    result = {"name": name, **result, "machine": machine_description(),
              "config": json.loads(_CONFIG.value.to_json_best_effort()),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(markdown_table([result]))
    print(json.dumps({k: result[k] for k in ("trained_params", "flops_per_step",
                                             "achieved_tflops", "model_flops_per_step", "mfu",
                                             "final_loss", "peak_memory")}))
    if _OUTPUT_DIR.value:
        os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")[:80]
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        path = os.path.join(_OUTPUT_DIR.value, f"{stamp}_{slug}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, sort_keys=True)
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
