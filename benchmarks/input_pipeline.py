"""Images per second of the per-host input pipeline alone, on ImageNet-like JPEGs.

    python benchmarks/input_pipeline.py                  # 1, 2 read threads; 2 workers
    python benchmarks/input_pipeline.py --threads=1,2,4,8 --num_images=2048
    python benchmarks/input_pipeline.py --long_side=2048 --num_images=256   # large photos

Makes a TFDS dataset in array_record (``--num_images`` JPEGs of ImageNet's typical sizes,
smooth random content at quality 90, about ImageNet's bytes per image) in a temporary
directory, opens it as training opens a TFDS dataset (``tfds.data_source``), and runs the
training stream of ``mage_jax/data/pipeline.py`` with the pretraining presets' data
settings (random resized crop of (0.2, 1) to 256 px, flip, host batches): the same code a
pod host runs, timed after a first untimed batch. Also timed apart: reading + JPEG
decoding alone, and augmentation alone on decoded images. Figures are images/s for the
host and per read thread; the result JSON goes to benchmarks/results/.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from absl import app, flags  # noqa: E402

import record as record_file  # noqa: E402  (benchmarks/record.py)

_NUM_IMAGES = flags.DEFINE_integer("num_images", 1024, "JPEGs in the made dataset.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Host batch.")
_BATCHES = flags.DEFINE_integer("batches", 12, "Timed batches per setting.")
_THREADS = flags.DEFINE_list("threads", ["1", "2"], "grain read threads to try.")
_WORKERS = flags.DEFINE_list("worker_processes", ["2"],
                             "data.worker_processes to try (grain worker processes, each "
                             "with the default read threads); '' for none.")
_SIZE = flags.DEFINE_integer("image_size", 256, "Crop size (the paper: 256).")
_LONG_SIDE = flags.DEFINE_integer(
    "long_side", 0, "0: ImageNet's mix of image sizes (long side 333-640 px); N: every "
    "image N px on its long side, 4:3 (large photos, where jpeg_draft pays).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", os.path.join(_REPO, "benchmarks", "results"),
                                  "Where the result JSON goes ('' writes none).")


def _jpeg(rng, height: int, width: int) -> bytes:
    """A smooth random picture (a low-resolution noise field enlarged), JPEG quality 90."""
    import numpy as np
    from PIL import Image
    small = rng.integers(0, 256, size=(max(2, height // 24), max(2, width // 24), 3),
                         dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 16, size=(height, width, 3))  # ~ImageNet bytes per image
    pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_dataset(data_dir: str, count: int, long_side: int = 0) -> dict:
    """A TFDS dataset `mage_bench_jpegs` (array_record, split train) of ``count`` JPEGs:
    ImageNet's sizes, or all ``long_side`` px on the long side (4:3) when it is not 0."""
    import numpy as np
    import tensorflow_datasets as tfds

    class MageBenchJpegs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=1000)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(0)
            for i in range(count):
                # ImageNet's training images: mostly 500 px on the long side, 4:3 or 3:4.
                if long_side:
                    long_, short_ = long_side, long_side * 3 // 4
                else:
                    long_ = int(rng.choice([500, 500, 500, 375, 640, 333]))
                    short_ = int(long_ * rng.choice([0.75, 0.75, 0.667, 1.0]))
                h, w = (short_, long_) if rng.random() < 0.7 else (long_, short_)
                yield i, {"image": io.BytesIO(_jpeg(rng, h, w)), "label": int(i % 1000)}

    builder = MageBenchJpegs(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    files = [os.path.join(root, f) for root, _, names in os.walk(builder.data_dir)
             for f in names if "array_record" in f]
    size = sum(os.path.getsize(f) for f in files)
    return {"name": builder.name, "images": count, "bytes_per_image": size / count,
            "long_side": long_side or "imagenet mix"}


def _rate(fn, batches: int, batch: int) -> float:
    fn()  # untimed: threads or worker processes start (each imports the pipeline), caches fill
    started = time.perf_counter()
    for _ in range(batches):
        fn()
    return batches * batch / (time.perf_counter() - started)


def main(argv):
    del argv
    import jax
    import ml_collections
    import numpy as np
    import tensorflow_datasets as tfds
    from mage_jax import config_defaults
    from mage_jax.data import pipeline

    scratch = tempfile.mkdtemp(prefix="mage_pipeline_")
    dataset = make_dataset(scratch, _NUM_IMAGES.value, _LONG_SIDE.value)
    source = tfds.data_source(dataset["name"], split="train", data_dir=scratch, download=False)
    data_cfg = config_defaults.data_config("imagenet2012", image_size=_SIZE.value)
    batch = _BATCH.value
    results = {"dataset": dataset, "batch_size": batch, "image_size": _SIZE.value,
               "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
               "jax": jax.__version__, "settings": {}}

    rng = np.random.default_rng(1)
    order = rng.permutation(len(source))
    position = [0]

    def read_batch():
        images = [source[int(order[(position[0] + i) % len(order)])]["image"]
                  for i in range(batch)]
        position[0] += batch
        return images

    results["read_and_decode_per_s"] = _rate(read_batch, _BATCHES.value, batch)
    decoded = read_batch()
    aug = pipeline.TrainAugment.from_config(data_cfg)
    results["augment_per_s"] = _rate(
        lambda: [aug.view(image, rng, contrastive=False) for image in decoded],
        _BATCHES.value, batch)
    # Every setting runs the training stream as the loop opens it (train_iterator).
    data_cfg.update(name=dataset["name"], data_dir=scratch)
    settings = [(f"{t}_threads{'_jpeg_draft' if draft else ''}",
                 dict(read_threads=int(t), jpeg_draft=draft))
                for t in _THREADS.value for draft in (False, True)]
    settings += [(f"{w}_worker_processes", dict(worker_processes=int(w)))
                 for w in _WORKERS.value if w]
    for name, overrides in settings:
        cfg = ml_collections.ConfigDict(data_cfg.to_dict())
        cfg.update(overrides)
        it = pipeline.train_iterator(cfg, seed=0, global_batch_size=batch, process_index=0,
                                     process_count=1)
        results["settings"][name] = _rate(lambda: next(it), _BATCHES.value, batch)
    for key, value in [("read + decode", results["read_and_decode_per_s"]),
                       ("augment (crop, flip) of decoded", results["augment_per_s"])] + [
            (f"pipeline, {k.replace('_', ' ')}", v) for k, v in results["settings"].items()]:
        print(f"{value:8.1f} images/s  {key}")
    record_file.write(_OUTPUT_DIR.value, "input_pipeline", results)


if __name__ == "__main__":
    app.run(main)
