"""Where a benchmark's result goes: ``<output_dir>/<time>_<slug>.json``."""
from __future__ import annotations

import datetime
import json
import os


def write(output_dir: str, slug: str, record) -> str | None:
    """Writes ``record`` as JSON into ``output_dir`` ('' writes nothing); returns the path."""
    if not output_dir:
        return None
    os.makedirs(output_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    path = os.path.join(output_dir, f"{stamp}_{slug}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")
    return path
