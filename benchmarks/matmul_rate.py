"""The float32 matmul rate this machine reaches through XLA, for reading step times against.

    python benchmarks/matmul_rate.py
    python benchmarks/matmul_rate.py --shapes=2080x128x512,4096x4096x4096 --repeats=5

A train step cannot run faster than its matmuls at this rate: ``train_throughput.py``
records a step's model FLOPs, and FLOPs / rate is that floor (benchmarks/README.md reads
the demo's MAGE step this way). Each ``MxKxN`` shape is one jitted ``(M, K) @ (K, N)`` on
the default device, timed over calls that together do about ``--work`` FLOPs, best of
``--repeats``. The default shapes: squares, and the demo MAGE step's own layers (2080 rows
= 32 examples x 65 tokens through 128 -> 512 and 512 -> 128, and a kernel gradient, which
contracts the 2080 rows). Writes ``results/<time>_matmul_rate.json`` with the machine.
"""
from __future__ import annotations

import datetime
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.join(_REPO, "benchmarks"))
import record  # noqa: E402
# Its machine description, the XLA defaults the entry point applies, and --output_dir.
import train_throughput  # noqa: E402

DEMO_SHAPES = "1024x1024x1024,2048x2048x2048,4096x4096x4096,2080x128x512,2080x512x128,128x2080x512"
_SHAPES = flags.DEFINE_string("shapes", DEMO_SHAPES, "Comma-separated MxKxN products.")
_WORK = flags.DEFINE_float("work", 2e11, "FLOPs per timed repeat (sets the call count).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the fastest counts.")


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'MxKxN,...' -> [(M, K, N), ...]; a clear error naming a malformed entry."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise app.UsageError(f"--shapes entry {item!r} is not MxKxN with three positive "
                                 f"integers, e.g. 2080x128x512.")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def rate(m: int, k: int, n: int, work: float, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    a = jnp.ones((m, k), jnp.float32)
    b = jnp.ones((k, n), jnp.float32)
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    matmul(a, b).block_until_ready()
    flops = 2.0 * m * k * n
    calls = max(3, int(work / flops))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = matmul(a, b)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - start) / calls)
    return {"shape": [m, k, n], "seconds": best, "gflops_per_s": flops / best / 1e9,
            "calls": calls}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}.")
    shapes = parse_shapes(_SHAPES.value)
    results = []
    for m, k, n in shapes:
        results.append(rate(m, k, n, _WORK.value, _REPEATS.value))
        print(f"{m}x{k}x{n}: {results[-1]['gflops_per_s']:.1f} GFLOP/s")
    record.write(train_throughput._OUTPUT_DIR.value, "matmul_rate", {
        "name": "float32 matmul rate", "results": results,
        "machine": train_throughput.machine_description(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})


if __name__ == "__main__":
    app.run(main)
