"""Few-shot linear evaluation of the encoder on labelled datasets (big_vision's protocol).

For each dataset of a task: the probe features (``features.py``) of a pool of training
images and of test images, computed once per evaluation from their evaluation views; then
``eval/fewshot.py`` draws k examples per class for each seed, fits closed-form regularised
least squares and scores the test images. Results: ``<dataset>_<k>shot`` (mean over seeds).

Used by the ``fewshot`` stage (``configs/fewshot.py``, a trained or converted MAGE) and by
the ``fewshot`` evaluator during pretraining (``mage_jax/evaluators.py``).
"""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from mage_jax import validation
from mage_jax.data import datasets
from mage_jax.eval import fewshot as lsr
from mage_jax.probe import cached
from mage_jax.probe.features import FeatureExtractor


@dataclasses.dataclass(frozen=True)
class FewshotDataset:
    name: str
    data: ml_collections.ConfigDict  # the base data config with this dataset's name
    train_split: str                 # the pool the shots are drawn from
    test_split: str


@dataclasses.dataclass(frozen=True)
class FewshotTask:
    datasets: tuple[FewshotDataset, ...]
    shots: tuple[int, ...]
    seeds: int
    batch_size: int

    @classmethod
    def from_config(cls, spec, base_data, image_size: int) -> "FewshotTask":
        """``spec``: ``datasets`` ({name: (train_split, test_split)}), ``shots``, ``seeds``,
        ``batch_size``; every dataset is read at ``image_size`` with ``base_data``'s
        evaluation view."""
        entries = []
        for name, splits in dict(spec.datasets).items():
            if len(tuple(splits)) != 2:
                raise validation.ConfigError(
                    f"few-shot dataset {name!r}: expected (train_split, test_split), e.g. "
                    f"('train[:10000]', 'test'); got {splits!r}.")
            data = ml_collections.ConfigDict(base_data.to_dict())
            data.name, data.image_size = name, int(image_size)
            entries.append(FewshotDataset(name, data, *tuple(splits)))
        return cls(tuple(entries), tuple(int(k) for k in spec.shots), int(spec.seeds),
                   int(spec.batch_size))

    def check(self) -> None:
        """Datasets exist and are labelled, shot counts fit every class: before compiling."""
        if not self.datasets:
            raise validation.ConfigError("the few-shot task names no dataset (datasets={}).")
        if not self.shots or min(self.shots) < 1 or self.seeds < 1:
            raise validation.ConfigError(
                f"few-shot shots={self.shots} and seeds={self.seeds}: give positive shot "
                f"counts (big_vision: 1, 5, 10, 25) and at least one seed.")
        for d in self.datasets:
            for split in (d.train_split, d.test_split):
                datasets.check_dataset(d.data, split)
            classes = datasets.num_classes(d.data, d.train_split)
            source = datasets.open_source(d.data, d.train_split)
            counts = np.bincount([int(source[i]["label"]) for i in range(len(source))],
                                 minlength=classes)
            if max(self.shots) > counts.min():
                fewest = int(np.argmin(counts))
                raise validation.ConfigError(
                    f"few-shot {d.name} {d.train_split}: class {fewest} has {counts.min()} "
                    f"examples, fewer than {max(self.shots)} shots; use a larger train split "
                    f"or fewer shots.")

    def evaluate(self, model, tokenizer, params, mesh) -> dict:
        """``{<dataset>_<k>shot: accuracy}`` for the MAGE ``params`` (``{"mage", "tokenizer"}``)."""
        results = {}
        for d in self.datasets:
            extractor = FeatureExtractor("encoder", model, tokenizer, int(d.data.image_size))
            train = cached.extract(extractor, params, d.data, d.train_split, self.batch_size,
                                   mesh)
            test = cached.extract(extractor, params, d.data, d.test_split, self.batch_size,
                                  mesh)
            classes = datasets.num_classes(d.data, d.train_split)
            scores = lsr.fewshot_results(*train, *test, num_classes=classes, shots=self.shots,
                                         seeds=tuple(range(self.seeds)))
            results.update({f"{d.name}_{k}shot": float(scores[f"{k}shot"]) for k in self.shots})
        return results
