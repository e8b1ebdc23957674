"""Images per second of iterative decoding (the generate stage's jitted sampler).

    python benchmarks/sample_throughput.py --preset=vit_b --batch_size=8 --num_steps=12
    python benchmarks/sample_throughput.py --pretrain_workdir=workdirs/demo --batch_size=100

Times ``mage_jax.generate.sampler.make_sampler`` exactly as the stage runs it (decoding loop
and tokenizer decode in one jitted call), compiled ahead of time, then ``--repeats`` calls;
the tokenizer's decode alone is timed too. Without ``--pretrain_workdir`` the model and
tokenizer are those of ``configs/pretrain.py:<preset>`` with random weights (weights do
not change the cost). Writes ``results/<time>_sample_<name>.json`` with the machine.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from absl import app, flags, logging  # noqa: E402

sys.path.insert(0, os.path.join(_REPO, "benchmarks"))
# Its machine description, the XLA defaults the entry point applies, and its --output_dir
# flag (absl allows one flag of a name per process; both scripts mean the same by it).
import train_throughput  # noqa: E402

_PRESET = flags.DEFINE_string("preset", "vit_b", "configs/pretrain.py preset (random weights).")
_WORKDIR = flags.DEFINE_string("pretrain_workdir", None, "A trained run instead of a preset.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per call.")
_STEPS = flags.DEFINE_integer("num_steps", 12, "Decoding steps (official script: 12).")
_TEMPERATURE = flags.DEFINE_float("choice_temperature", 4.5, "Re-masking temperature.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls after the compiled first one.")
_OUTPUT_DIR = train_throughput._OUTPUT_DIR


def _random_pretrained(preset: str):
    import importlib.util
    import jax
    import jax.numpy as jnp
    from mage_jax import pretrained
    from mage_jax.models import mage, vqgan
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(_REPO, "configs", "pretrain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    size = config.data.image_size
    grid = vqgan.token_grid(config.tokenizer, size)
    model = mage.mage_from_config(config, config.tokenizer.codebook_size, grid * grid)
    tokenizer = vqgan.vqgan_from_config(config.tokenizer)
    ids = jnp.zeros((1, grid * grid + 1), jnp.int32)
    params = jax.jit(lambda r: model.init(r, ids, method=model.decode_step_logits))(
        jax.random.key(0))["params"]
    tok_params = jax.jit(lambda r: tokenizer.init(r, jnp.zeros((1, size, size, 3))))(
        jax.random.key(1))["params"]
    import flax.linen as nn
    return pretrained.Pretrained(model=model, params=nn.unbox(params), tokenizer=tokenizer,
                                 tokenizer_params=nn.unbox(tok_params), image_size=size, step=0,
                                 workdir="", run_config={})


def run(pre, batch: int, num_steps: int, temperature: float, repeats: int, warmup: int = 1,
        time_decode: bool = True) -> dict:
    """``warmup`` untimed calls after the compile, then ``repeats`` timed ones; the
    tokenizer's decode is timed alone too unless ``time_decode`` is False."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from mage_jax import pretrained, sharding
    from mage_jax.generate import sampler
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    jax.set_mesh(mesh)
    sample = sampler.make_sampler(pre.model, lambda tp, i: pretrained.decode_tokens(pre, tp, i),
                                  mesh, num_steps=num_steps, choice_temperature=temperature)
    ids = jnp.full((batch, pre.model.num_tokens), pre.model.mask_token_id, jnp.int32)
    args = (pre.params, pre.tokenizer_params, ids, jnp.arange(batch, dtype=jnp.int32),
            jnp.full((batch,), -1, jnp.int32), jax.random.key(0))
    t0 = time.perf_counter()
    compiled = sample.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    decode_s = None
    if time_decode:
        decode = jax.jit(lambda tp, i: pretrained.decode_tokens(pre, tp, i))
        tokens = jnp.zeros((batch, pre.model.num_tokens), jnp.int32)
        jax.block_until_ready(decode(pre.tokenizer_params, tokens))
        t0 = time.perf_counter()
        jax.block_until_ready(decode(pre.tokenizer_params, tokens))
        decode_s = time.perf_counter() - t0
    seconds = float(np.median(times))
    return {"batch_size": batch, "num_steps": num_steps, "image_size": pre.image_size,
            "seconds_per_batch": seconds, "images_per_sec": batch / seconds,
            "all_seconds": times, "tokenizer_decode_seconds": decode_s,
            "compile_seconds": compile_s, "devices": len(jax.devices())}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}.")
    from mage_jax import pretrained
    logging.set_verbosity(logging.WARNING)
    if _WORKDIR.value:
        pre, name = pretrained.load(_WORKDIR.value), os.path.basename(_WORKDIR.value.rstrip("/"))
    else:
        pre, name = _random_pretrained(_PRESET.value), _PRESET.value
    result = {"name": f"sample {name} batch {_BATCH.value} steps {_STEPS.value}",
              **run(pre, _BATCH.value, _STEPS.value, _TEMPERATURE.value, _REPEATS.value),
              "machine": train_throughput.machine_description(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(result, indent=1))
    if _OUTPUT_DIR.value:
        os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        path = os.path.join(_OUTPUT_DIR.value, f"{stamp}_sample_{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, sort_keys=True)
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
