"""How often online tokenization in bfloat16 gives the float32 token ids.

    python benchmarks/tokenizer_bf16.py --tokenizer_workdir=workdirs/demo/tokenizer
    python benchmarks/tokenizer_bf16.py --fixture=../shared/reference/mage_torch_tiny.npz

Pretraining tokenizes every batch inside the step; in bf16 the VQGAN encoder's output
moves by bf16 rounding and a position whose two nearest codes are close changes its id,
so MAGE would learn other targets than the float32 tokenizer gives. Measured here:

* ``--fixture``: the official code's tokenizer (the weights and images of a reference
  file, ``../shared/reference/README.md``), beside the ids the official code computed;
* ``--tokenizer_workdir``: a tokenizer run of this project (the demo's) on the first
  ``--num_images`` test images of its dataset, at its image size.

For each: the fraction of positions whose bf16 id equals the float32 id (the nearest-code
search itself is in float32 in both, mage_jax/models/vqgan.py; only the encoder's
convolutions and norms change precision). The result goes into benchmarks/results/.
"""
from __future__ import annotations

import datetime
import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from absl import app, flags  # noqa: E402

import record as record_file  # noqa: E402  (benchmarks/record.py)

from mage_jax import xla_defaults  # noqa: E402

xla_defaults.apply()

_FIXTURE = flags.DEFINE_string("fixture", None, "A reference .npz of the official code.")
_WORKDIR = flags.DEFINE_string("tokenizer_workdir", None, "A tokenizer run of this project.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 2000, "Test images for --tokenizer_workdir.")
_BATCH = flags.DEFINE_integer("batch_size", 250, "Images per encoding call.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", os.path.join(_REPO, "benchmarks", "results"),
                                  "Where the result JSON goes ('' writes none).")


def agreement(model, params, images, batch_size: int) -> dict:
    """Token ids of ``images`` (NHWC, [0, 1]) in float32 and bfloat16: how often they agree."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    encode = {dtype: jax.jit(lambda p, x, m=model.clone(dtype=dtype): m.apply(
        {"params": p}, x, method=m.encode)) for dtype in (jnp.float32, jnp.bfloat16)}
    same = total = 0
    for start in range(0, len(images), batch_size):
        chunk = jnp.asarray(images[start:start + batch_size], jnp.float32)
        ids32 = np.asarray(encode[jnp.float32](params, chunk))
        ids16 = np.asarray(encode[jnp.bfloat16](params, chunk))
        same += int((ids32 == ids16).sum())
        total += ids32.size
    return {"positions": total, "same": same, "fraction_same": same / total}


def fixture_figures(path: str) -> dict:
    import jax.numpy as jnp
    import numpy as np
    from mage_jax.convert.torch_tokenizer import check_tokenizer_params, convert_tokenizer
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    state_dict = {k[len("state_dict/"):]: v for k, v in arrays.items()
                  if k.startswith("state_dict/")}
    variables, kwargs = convert_tokenizer(state_dict, prefix="vqgan.")
    model = check_tokenizer_params(variables, kwargs)
    images = np.transpose(arrays["inputs/images"], (0, 2, 3, 1))
    result = agreement(model, variables["params"], images, _BATCH.value)
    ids = np.asarray(model.apply(variables, jnp.asarray(images), method=model.encode))
    result["float32_equals_official"] = bool((ids.reshape(len(ids), -1)
                                              == arrays["tokenizer/token_indices"]).all())
    return {"source": f"fixture {path}", **result}


def workdir_figures(workdir: str) -> dict:
    import jax
    import numpy as np
    import ml_collections
    from mage_jax import checkpointing, sharding
    from mage_jax.models import vqgan
    from mage_jax.train import evaluation
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        config = ml_collections.ConfigDict(json.load(f))
    params, step = checkpointing.restore_params(workdir)
    model = vqgan.vqgan_from_config(config.tokenizer, dtype="float32")
    config.eval.num_examples = _NUM_IMAGES.value
    config.batch_size = _BATCH.value
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                              jax.devices()[:1])
    images = []
    for batch in evaluation.test_batches(config, mesh):
        keep = np.asarray(batch["mask"])
        images.append(np.asarray(batch["image"])[keep])
    images = np.concatenate(images)[:_NUM_IMAGES.value]
    result = agreement(model, params, images, _BATCH.value)
    return {"source": f"{workdir} (step {step}), {len(images)} {config.data.name} "
                      f"{config.data.eval_split} images at {config.data.image_size} px",
            **result}


def main(argv):
    del argv
    import jax
    import jaxlib
    if not (_FIXTURE.value or _WORKDIR.value):
        raise app.UsageError("give --fixture and/or --tokenizer_workdir.")
    results = []
    if _FIXTURE.value:
        results.append(fixture_figures(_FIXTURE.value))
    if _WORKDIR.value:
        results.append(workdir_figures(_WORKDIR.value))
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "platform": jax.devices()[0].platform, "jax": jax.__version__,
              "jaxlib": jaxlib.__version__, "results": results}
    for r in results:
        print(f"{r['fraction_same']:.5f} of {r['positions']} positions keep their id in "
              f"bf16: {r['source']}")
    record_file.write(_OUTPUT_DIR.value, "tokenizer_bf16", record)


if __name__ == "__main__":
    app.run(main)
