"""The few lines a run ends with: what it reached, where its pictures are, what to try next.

Read from the run's own metrics.jsonl (and the tokenizer run's, for pretraining), so the
summary says what the files say, also for a run that was interrupted and resumed.
"""
from __future__ import annotations

import os

from mage_jax import paths

RECONSTRUCTIONS_PNG = "reconstructions.png"  # test image | tokenizer reconstruction
PREDICTIONS_PNG = "predictions.png"  # masked input | one-step MAGE prediction | original
SAMPLES_WORKDIR = "generate"  # where a run's samples go with `sample_when_done`


def _records(workdir: str) -> list[dict]:
    from mage_jax import metrics as metrics_lib  # clu and TensorFlow: only when reporting
    path = os.path.join(workdir, "metrics.jsonl")
    return metrics_lib.read_metrics(workdir) if paths.exists(path) else []


def _last(records: list[dict], key: str):
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def _tokenizer_line(workdir: str, codebook_size: int) -> str | None:
    records = _records(workdir)
    psnr = _last(records, "test_psnr")
    if psnr is None:
        return None
    return (f"tokenizer  test PSNR {psnr:.2f} dB on {int(_last(records, 'test_examples'))} "
            f"test images, {int(_last(records, 'test_codes_used'))} of {codebook_size} codes "
            f"in use ({workdir})")


def _pretrain_line(records: list[dict]) -> str | None:
    losses = [r["loss"] for r in records if "loss" in r]
    if not losses:
        return None
    line = (f"MAGE       loss {losses[0]:.3f} -> {losses[-1]:.3f} "
            f"({100 * (losses[-1] - losses[0]) / losses[0]:+.0f}% from the first logged value)")
    accuracy = _last(records, "test_masked_accuracy")
    if accuracy is not None:
        line += (f"; test masked-token accuracy {100 * accuracy:.1f}% (the most common token "
                 f"alone: {100 * _last(records, 'test_most_common_token_rate'):.1f}%)")
    return line


def _short(value) -> str:
    """3 significant digits; metrics.jsonl keeps a non-finite value as its string ("nan")."""
    return f"{value:.3g}" if isinstance(value, (int, float)) else str(value)


def _evaluator_lines(records: list[dict]) -> list[str]:
    """Each evaluator's measures (``<name>/<key>``) from its first to its last run."""
    names = sorted({k.split("/")[0] for r in records for k in r if "/" in k})
    lines = []
    for name in names:
        runs = [(r["step"], {k.split("/", 1)[1]: v for k, v in r.items()
                             if k.startswith(name + "/") and not k.endswith("/seconds")})
                for r in records if any(k.startswith(name + "/") for k in r)]
        runs = [(step, values) for step, values in runs if values]
        if not runs:
            continue
        (first_step, first), (last_step, last) = runs[0], runs[-1]
        if len(runs) == 1:  # a run shorter than `every` scores once, at its last step
            shown = ", ".join(f"{k} {_short(v)}" for k, v in last.items())
            lines.append(f"during     {name} at step {last_step}: {shown}")
            continue
        # Measures that moved (a reference such as fd_real stays put), in logged order.
        shown = ", ".join(f"{k} {_short(first[k])} -> {_short(last[k])}" for k in last
                          if k in first and first[k] != last[k])
        lines.append(f"during     {name} at step {first_step} -> {last_step}: {shown}")
    return lines


def _samples_line(generate_workdir: str) -> str | None:
    """Samples drawn at the end of a run (``sample_when_done``) and their measures."""
    records = _records(generate_workdir)
    if not records:
        return None
    last = records[-1]
    line = f"samples    {os.path.join(generate_workdir, 'samples_grid.png')}"
    if "fd_samples" in last:
        line += (f"; classifier Frechet distance {last['fd_samples']:.2f} for "
                 f"{int(last['num_samples'])} samples (real images {last['fd_real']:.2f}, "
                 f"random tokens {last['fd_random_tokens']:.2f})")
    if "cond_accuracy" in last:
        line += f"; {100 * last['cond_accuracy']:.1f}% recognised as their class"
    return line


def summary(config, workdir: str, tokenizer_workdir: str | None = None,
            seconds: float | None = None) -> str:
    """A short text: scores, pictures, TensorBoard, next commands (``config.stage`` picks)."""
    records = _records(workdir)
    step = records[-1]["step"] if records else 0
    took = "" if seconds is None else f", {seconds / 60:.1f} min"
    lines = [f"Run summary: {workdir} (step {step} of {config.total_steps}{took})"]
    codebook_size = config.tokenizer.codebook_size
    preset = "demo" if config.data.name == "fashion_mnist" else "vit_b"
    if config.stage == "tokenizer":
        lines.append(_tokenizer_line(workdir, codebook_size) or "tokenizer  not evaluated yet")
        pictures = [RECONSTRUCTIONS_PNG]
        nxt = [f"python -m mage_jax.main --config=configs/pretrain.py:{preset} "
               f"--workdir={workdir}_mage --config.tokenizer_workdir={workdir}   (MAGE on it)"]
    else:
        if tokenizer_workdir:
            lines.append(_tokenizer_line(tokenizer_workdir, codebook_size)
                         or f"tokenizer  {tokenizer_workdir}")
        lines.append(_pretrain_line(records) or "MAGE       no logged step yet")
        lines += _evaluator_lines(records)
        pictures = [RECONSTRUCTIONS_PNG, PREDICTIONS_PNG]
        samples = _samples_line(os.path.join(workdir, SAMPLES_WORKDIR))
        if samples:
            lines.append(samples)
        nxt = [f"python -m mage_jax.main --config=configs/generate.py:{preset} "
               f"--workdir={workdir}_samples --config.pretrain_workdir={workdir}   (sample)",
               f"python -m mage_jax.generate.edit --pretrain_workdir={workdir} --image=IMAGE "
               f"--box=8,8,24,24 --output=inpainted.png   (inpaint; --outpaint for outside)",
               f"python -m mage_jax.main --config=configs/pretrain.py:{preset},class_conditional "
               f"--workdir={workdir}_cond --config.init_from={workdir}   (class-conditional)"]
        if not config.contrastive.enabled:  # a MAGE-C run is not pointed at MAGE-C again
            nxt.append(f"python -m mage_jax.main --config=configs/pretrain.py:{preset},"
                       f"contrastive --workdir={workdir}_contrastive --config.tokenizer_"
                       f"workdir={tokenizer_workdir or os.path.join(workdir, 'tokenizer')}"
                       f"   (MAGE-C)")
        nxt.append(f"python -m mage_jax.main --config=configs/probe.py:{preset} "
                   f"--workdir={workdir}_probe --config.pretrain_workdir={workdir}   (linear probe)")
    found = [os.path.join(workdir, p) for p in pictures
             if paths.exists(os.path.join(workdir, p))]
    lines.append("pictures   " + (", ".join(found) or "none yet (written when the run ends)"))
    lines.append(f"TensorBoard: tensorboard --logdir {workdir}")
    lines += ["next: " + n for n in nxt]
    return "\n".join(lines)
