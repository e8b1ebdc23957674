"""The training loop every stage shares: one batch from disk to a parameter update.

A stage (train/tokenizer.py, train/pretrain.py) supplies the model-specific pieces as a
`Stage`; this file owns the order of events, which reads top to bottom:

    validate -> mesh -> abstract state & shardings -> restore or init -> data iterator
    -> jit(step) -> loop { step, log, images, checkpoint } -> final checkpoint

Everything that can be wrong with the config is found before the first compile.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from mage_jax import checkpointing, paths, sharding, validation, workdir_lock
from mage_jax.data import datasets, pipeline
from mage_jax.train import device_prefetch, interrupt

State = dict  # {"step": int32 scalar, "params": ..., "opt_state": ..., stage extras}


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss; the last good checkpoint is left untouched."""


@dataclasses.dataclass
class Stage:
    """What a training stage contributes to the shared loop.

    init_state(rng) -> State with *boxed* (logically partitioned) params and optimizer state.
    train_step(state, batch, rng, frozen) -> (state, metrics); pure, jitted by the loop.
    summarize(state, batch, rng, frozen) -> {name: images NHWC in [0, 1]}; jitted.
    frozen: parameters the stage reads but never trains (tokenizer, perceptual net).
    evaluate(state, frozen, mesh, workdir) -> (scores, images): held-out scores, logged at
      the last step (``test_*`` keys), and image grids for TensorBoard; it may also save
      pictures into the workdir. Run once, when the run reaches ``total_steps``.
    warm_start(state) -> state: pretrained weights put into the initial state (fine-tuning).
    """
    init_state: Callable[[jax.Array], State]
    train_step: Callable[..., tuple[State, Mapping[str, jax.Array]]]
    summarize: Callable[..., Mapping[str, jax.Array]] | None = None
    frozen: Any = None
    two_views: bool = False
    check: Callable[[], None] | None = None  # stage-specific validation, before compiling
    evaluate: Callable[..., tuple[Mapping[str, float], Mapping[str, Any]]] | None = None
    # Fine-tuning: (freshly initialised state) -> state with pretrained weights put in. Runs
    # once, at step 0; a resumed run reads its own checkpoint instead.
    warm_start: Callable[[State], State] | None = None
    # (frozen, mesh) -> frozen on the mesh; default: replicated. A frozen ViT-L encoder
    # (the probe) is placed by the sharding rules instead.
    place_frozen: Callable[[Any, Any], Any] | None = None


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """A periodic measurement during training (big_vision style: data in ``config.evals``).

    ``run(state, frozen, mesh, step) -> (scalars, images)`` reads the train state and the
    frozen inputs on the training mesh (its own jitted functions: the train step is never
    recompiled); the loop logs them as ``<name>/<key>`` every ``every`` steps and at the
    last step.
    """
    name: str
    every: int
    run: Callable[..., tuple[Mapping[str, float], Mapping[str, Any]]]


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:  # every process reads the same file (pretrained.py)
        paths.write_text(os.path.join(workdir, "config.json"),
                         config.to_json_best_effort(indent=2, sort_keys=True))


def _place_frozen(frozen, mesh):
    """Frozen params are replicated: they are small beside the trained model."""
    if frozen is None:
        return None
    return jax.device_put(frozen, sharding.replicated(mesh))


def abstract_train_state(stage: Stage, mesh, init_rng) -> tuple[State, State]:
    """(ShapeDtypeStructs carrying their shardings, the NamedShardings) of the train state."""
    boxed_abstract = jax.eval_shape(stage.init_state, init_rng)
    state_shardings = sharding.logical_shardings(boxed_abstract, mesh)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(boxed_abstract), state_shardings)
    return abstract_state, state_shardings


def jit_train_step(stage: Stage, mesh, state_shardings, train_rng):
    """The jitted ``(state, batch, frozen) -> (state, metrics)`` of a run: state donated,
    kept in ``state_shardings``, metrics replicated, the step's key ``fold_in(train_rng,
    step)``. The loop, the throughput benchmark and the pod planner (mage_jax/plan) all
    compile this one function, so what is planned and timed is what trains."""
    def step_fn(state, batch, frozen):
        rng = jax.random.fold_in(train_rng, state["step"])
        return stage.train_step(state, batch, rng, frozen)

    return jax.jit(step_fn, donate_argnums=0,
                   out_shardings=(state_shardings, sharding.replicated(mesh)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stage: Stage,
                       devices=None, evaluators: tuple[Evaluator, ...] = ()) -> State:
    """Trains ``stage`` to ``config.total_steps`` on ``devices`` (default: all), resuming
    from the newest checkpoint in ``workdir``, running ``evaluators`` at their periods;
    returns the final state."""
    # ---------------------------------------------------------------- validate
    validation.validate_training_config(config, workdir)
    if stage.check is not None:
        stage.check()
    mesh = sharding.make_mesh(config.mesh, devices)
    validation.validate_batch(config, mesh)
    jax.set_mesh(mesh)

    # ------------------------------------------------- abstract state, shardings
    base_rng = jax.random.key(config.seed)
    init_rng, train_rng, summary_rng = jax.random.split(base_rng, 3)
    abstract_state, state_shardings = abstract_train_state(stage, mesh, init_rng)

    # ------------------------------------------------------- restore or init
    checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
    start_step = checkpointer.latest_step() or 0
    if start_step:
        checkpointer.check_compatible(start_step, abstract_state)
    # Only now: a config that does not fit the workdir's checkpoint must not replace the
    # config.json that says how the checkpoint was made.
    _write_config(config, workdir)
    data_iter = pipeline.train_iterator(
        config.data, seed=config.seed, global_batch_size=config.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        two_views=stage.two_views, start_step=start_step)
    # Batches go to the devices `data.device_prefetch` steps ahead of their step.
    data_iter = device_prefetch.to_devices(data_iter, mesh, config.data.get("device_prefetch", 2))
    # The iterator is positioned by step either way; its state is checkpointed beside the
    # model's (and checked on restore) where it is the plain {'next_index': step}.
    saved_iter = None if pipeline.worker_processes(config.data) else data_iter
    if start_step:
        logging.info("Resuming from %s at step %d.", checkpointer.directory, start_step)
        state = checkpointer.restore(start_step, abstract_state, saved_iter)
    else:
        init = jax.jit(lambda r: nn.unbox(stage.init_state(r)), out_shardings=state_shardings)
        state = init(init_rng)
        if stage.warm_start is not None:
            state = stage.warm_start(state)
    frozen = (stage.place_frozen(stage.frozen, mesh) if stage.place_frozen is not None
              else _place_frozen(stage.frozen, mesh))

    # ----------------------------------------------------------------- compile
    train_step = jit_train_step(stage, mesh, state_shardings, train_rng)
    summarize = None
    if stage.summarize is not None and config.image_summary_every > 0:
        summarize = jax.jit(
            lambda s, b, f: stage.summarize(s, b, summary_rng, f),
            out_shardings=sharding.replicated(mesh))

    # -------------------------------------------------------------------- loop
    # clu's writers bring TensorFlow: imported by the run, not by the step's builders.
    from clu import periodic_actions
    from mage_jax import metrics as metrics_lib
    writer = metrics_lib.create_writer(workdir)
    # Logs steps/s and ETA; throughput also goes into metrics.jsonl through _log.
    progress = periodic_actions.ReportProgress(
        num_train_steps=config.total_steps, every_steps=config.log_every, every_secs=None)
    timer = _Throughput(start_step, config.batch_size)
    last_metrics = None
    step = start_step
    skipped = 0  # unreadable files passed over by this host's input since the run started
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            workdir_lock.check_held(workdir)  # a bucket lease another run took over: stop
            batch = next(data_iter)
            # Unreadable files the folder source passed over (mage_jax/data/datasets.py):
            # counted on the host, never sent to the devices.
            skipped += batch.pop(datasets.SKIPPED_KEY)
            state, step_metrics = train_step(state, batch, frozen)
            progress(step)
            # The first step is logged too: the loss a run starts from.
            if step % config.log_every == 0 or step in (1, config.total_steps):
                last_metrics = _log(writer, step, step_metrics, timer,
                                    {"data/skipped": skipped} if skipped else {})
            if summarize is not None and step % config.image_summary_every == 0:
                images = jax.device_get(summarize(state, batch, frozen))
                writer.write_images(step, {k: np.asarray(v) for k, v in images.items()})
            for evaluator in evaluators:
                if step % evaluator.every == 0 or step == config.total_steps:
                    _run_evaluator(writer, evaluator, state, frozen, mesh, step)
            # A preemption notice to any host (orbax), or SIGTERM / Ctrl-C to this one.
            preempted = checkpointer.reached_preemption(step) or interrupt.requested()
            if step % config.checkpoint_every == 0 or step == config.total_steps or preempted:
                _check_finite(step, step_metrics)
                writer.flush()  # the metrics up to a checkpoint are kept with it (a bucket's)
                checkpointer.save(step, state, saved_iter)
            if preempted:
                checkpointer.wait()
                logging.warning("Stopped at step %d (%s): checkpoint saved; run the same "
                                "command to resume.", step,
                                "signal %d" % interrupt.received() if interrupt.requested()
                                else "preemption notice")
                break
        # ---------------------------------------------------------------- evaluate
        if (stage.evaluate is not None and int(config.eval.num_examples) != 0
                and step == config.total_steps > start_step):
            scores, images = stage.evaluate(state, frozen, mesh, workdir)
            writer.write_scalars(step, scores)
            writer.write_images(step, {k: np.asarray(v) for k, v in images.items()})
            last_metrics = dict(last_metrics or {}, **scores)
    except BaseException as e:
        # Pending asynchronous saves finish even when a step raised; but what stopped the run
        # is the error to report: a writer that cannot flush either (a full disk fails both)
        # must not replace it. A lost lease: the workdir is another run's now; its metrics
        # are not overwritten with this run's.
        lost = isinstance(e, workdir_lock.LeaseLostError)
        for finish in (checkpointer.close,) if lost else (writer.flush, checkpointer.close):
            try:
                finish()
            except Exception as also:  # noqa: BLE001
                logging.warning("while stopping: %s", " ".join(str(also).split())[:300])
        raise
    writer.flush()
    checkpointer.close()
    if last_metrics is not None:
        logging.info("Finished at step %d: %s", config.total_steps, last_metrics)
    return state


def _run_evaluator(writer, evaluator: Evaluator, state, frozen, mesh, step: int) -> None:
    started = time.perf_counter()
    scalars, images = evaluator.run(state, frozen, mesh, step)
    scalars = {f"{evaluator.name}/{k}": float(v) for k, v in scalars.items()}
    scalars[f"{evaluator.name}/seconds"] = time.perf_counter() - started
    writer.write_scalars(step, scalars)
    if images:
        writer.write_images(step, {f"{evaluator.name}/{k}": np.asarray(v)
                                   for k, v in images.items()})


def _check_finite(step: int, step_metrics) -> float:
    loss = float(jax.device_get(step_metrics["loss"]))
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}; the last finite checkpoint was kept and nothing was "
            f"saved over it. Lower the learning rate (--config.optimizer.lr for the tokenizer, "
            f"--config.optimizer.blr for pretraining), clip gradients "
            f"(--config.optimizer.grad_clip_norm), or compute in float32 "
            f"(--config.model.dtype=float32).")
    return loss


class _Throughput:
    """Steps/s and images/s between two logged steps (the first window includes compiling)."""

    def __init__(self, step: int, batch_size: int):
        self._step, self._time, self._batch_size = step, time.perf_counter(), batch_size

    def __call__(self, step: int) -> dict:
        now = time.perf_counter()
        steps_per_sec = (step - self._step) / max(now - self._time, 1e-9)
        self._step, self._time = step, now
        return {"steps_per_sec": steps_per_sec, "images_per_sec": steps_per_sec * self._batch_size}


def _log(writer, step, step_metrics, timer: _Throughput, extra=None) -> dict:
    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    _check_finite(step, step_metrics)
    values.update(timer(step))
    values.update({k: float(v) for k, v in (extra or {}).items()})
    writer.write_scalars(step, values)  # clu's logging writer also prints them
    return values
