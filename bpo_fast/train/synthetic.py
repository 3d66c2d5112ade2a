"""A tiny synthetic preference data set (images + pair JSONL) for tests and smoke runs.

Each image is a flat background with one coloured square; the chosen answer names its colour
and the rejected answer a wrong one, so a tiny model can actually learn the preference.
"""

import json
import os
import random

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220),
          "yellow": (230, 220, 40)}


def make_pairs(root, n=8, *, seed=0, image_size=40, name="pairs.jsonl"):
    """Write ``n`` pairs to ``root/name`` and their PNGs to ``root/img/``; returns the JSONL path
    (image paths in the records are relative to ``root``)."""
    import numpy as np
    from PIL import Image

    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    names = sorted(COLORS)
    lines = []
    for i in range(n):
        color = rng.choice(names)
        wrong = rng.choice([c for c in names if c != color])
        arr = np.full((image_size, image_size, 3), 245, dtype=np.uint8)
        x, y = rng.randrange(0, image_size // 2), rng.randrange(0, image_size // 2)
        arr[y:y + image_size // 2, x:x + image_size // 2] = COLORS[color]
        rel = f"img/{i:04d}.png"
        Image.fromarray(arr).save(os.path.join(root, rel))
        lines.append({
            "id": f"pair-{i:04d}", "image": rel,
            "prompt": [{"from": "human", "value": "<image>\nwhat color is the square?"}],
            "chosen": f"the square is {color} .", "rejected": f"the square is {wrong} .",
            "strategy": "error_injection", "noise_step": None, "injector": "rules",
            "generation": {}, "seed": seed,
        })
    path = os.path.join(root, name)
    with open(path, "w", encoding="utf-8") as f:
        for rec in lines:
            f.write(json.dumps(rec) + "\n")
    return path
