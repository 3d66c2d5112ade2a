"""The shapes world: small images of coloured shapes with exact ground truth and a language prior.

``bpo-fast demo`` needs a world where the truth is known and a text-leaning model has something
to hallucinate. Every image holds a few shapes (kind x colour) in the cells of a coarse grid;
its caption lists them in one canonical template family over a small closed vocabulary, e.g.::

    the image shows a red circle at the top left, two blue squares at the top right and the
    bottom right and a green cross at the bottom left.

**Language prior.** ``WorldConfig.prior_pairs`` lists (anchor, partner) objects, e.g.
("red circle", "blue square"): when a scene holds the anchor, it also holds the partner with
probability ``text_prior_strength`` (the text-only pretraining corpus: the same conversations,
no image), ``prior_strength`` (the image-caption alignment split, "train") or
``eval_prior_strength`` (the validation and held-out splits). The paper's imbalance: a language
model that read a large corpus with a strong prior, aligned on few images with a weaker one. With
a strong training prior and a weaker held-out one, a model that writes "blue square" because it
wrote "red circle" (rather than because it saw one) is caught by CHAIR on the held-out images.
The prior is exact: anchors are never added or removed after the i.i.d. draw, partners are only
added/removed for the prior, so ``P(partner | anchor)`` is ``prior_strength`` in distribution
(up to the rare image whose grid is full, where the partner cannot be placed).

**Determinism.** Scene ``i`` of split ``s`` is drawn from ``random.Random(f"{seed}:{s}:{i}")``,
so it does not depend on how many scenes are generated or in which order.

Public API
----------
- :class:`WorldConfig`: sizes, palette, kinds, grid, object counts, prior pairs and strengths.
- :func:`make_world(out_dir, n_train, n_eval, seed=0, config=None, *, n_text=0, n_val=0) ->
  WorldPaths`: writes the
  world to disk (see :class:`WorldPaths` for the files); reuses a complete world written with the
  same arguments (``world.json`` is written last and marks completion).
- :func:`generate_scenes(n, seed=0, config=None, split="train", start=0) -> list[Scene]`
- :func:`render(scene, config=None) -> PIL.Image.Image` (RGB, ``config.image_size`` square; no
  anti-aliasing, so every shape pixel has exactly its colour and the rest is the background).
- :func:`caption(scene) -> str`, :func:`qa_pairs(scene, rng, n, config=None) -> list[(q, a)]`
- :func:`patch_labels(scene, patch_size, config=None)`: per image patch, the colour and kind of
  the shape in its cell (the vision tower's pretraining targets).
- :func:`scene_objects(scene) -> list[str]`: the distinct objects ("red circle", ...) of a scene,
  the ground truth for CHAIR.
- :func:`parse_caption_objects(text, config=None) -> list[dict]`: the object groups a caption
  mentions (``{"count", "colour", "kind", "object", "positions"}``), best effort on model output.
- :func:`world_vocabulary(config=None) -> list[str]`: every word and punctuation token the
  world's prompts and answers can contain (for :func:`bpo_fast.models.tiny.build_word_tokenizer`).
- :func:`world_synonyms(config=None) -> dict`: the CHAIR synonym table (object -> synonyms), also
  written as ``synonyms.txt`` in the standard "canonical, syn1, syn2" line format.
- :func:`world_lexicon(config=None) -> dict`: a lexicon for the rule error injector
  (:func:`bpo_fast.data.inject.load_lexicon` format) restricted to the world's words.
- :func:`read_world(root) -> (WorldPaths, WorldConfig, meta)`: a world written before.
- :func:`score_captions(captions, world) -> ChairResult`: CHAIR on the held-out split.
- :func:`prior_hallucination(result, config=None) -> dict`: how often the prior partner is named
  when only its anchor is in the image (the language prior's own error).
- ``EVAL_PROMPT``: the question the held-out split asks (and the demo evaluates with).
"""

import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field

__all__ = [
    "WorldConfig", "Shape", "Scene", "WorldPaths", "make_world", "generate_scenes", "render",
    "caption", "qa_pairs", "scene_objects", "patch_labels", "parse_caption_objects", "world_vocabulary",
    "world_synonyms", "world_lexicon", "write_synonyms", "read_world", "score_captions",
    "prior_hallucination", "prior_statistics", "EVAL_PROMPT", "DESCRIBE_PROMPTS",
    "PALETTE", "KINDS",
]

# Pure, well-separated colours: every pixel of a drawn shape is exactly one of these.
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
KINDS = ("circle", "square", "triangle", "cross", "diamond", "star")
_PLURALS = {"cross": "crosses"}
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

EVAL_PROMPT = "describe the image."
DESCRIBE_PROMPTS = (EVAL_PROMPT, "what is in the image?", "what shapes are in the image?")
_CAPTION_LEAD = "the image shows"

_ROW_NAMES = {1: ("",), 2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COL_NAMES = {1: ("",), 2: ("left", "right"), 3: ("left", "middle", "right")}

# Optional synonyms per kind, for CHAIR only (the world's captions never use them).
KIND_SYNONYMS = {"circle": ("disc", "disk", "dot"), "square": ("box",), "cross": ("plus",),
                 "diamond": ("rhombus",)}


def _plural(kind):
    return _PLURALS.get(kind, kind + "s")


@dataclass(frozen=True)
class WorldConfig:
    """What the world looks like. Defaults: 64x64 images, 2x2 grid, 4 colours x 4 kinds."""

    image_size: int = 64
    grid: tuple = (2, 2)                    # (rows, cols), each 1..3
    colours: tuple = ("red", "green", "blue", "yellow")
    kinds: tuple = ("circle", "square", "triangle", "cross")
    min_objects: int = 1
    max_objects: int = 3                    # drawn i.i.d.; the prior may add one up to the cell count
    background: tuple = (255, 255, 255)
    shape_scale: tuple = (0.55, 0.8)        # shape size as a fraction of the cell's short side
    jitter: bool = True                     # shapes at a random place in their cell (else centred)
    prior_pairs: tuple = (("red circle", "blue square"), ("green triangle", "yellow cross"))
    prior_strength: float = 0.9             # P(partner | anchor) in the image-caption ("train") split
    eval_prior_strength: float = 0.5        # the same in the held-out ("eval") and validation splits
    text_prior_strength: float = 0.95       # the same in the text-only pretraining corpus
    anchor_rate: float = 0.3                # P(an image is seeded with a random anchor)
    qa_per_image: int = 2                   # question/answer turns after the description
    qa_exist_weight: int = 1                # weight of "is there a ...?" among 4 question kinds

    def __post_init__(self):
        # tuples even when built from JSON lists, so configs compare and hash the same
        for name in ("grid", "colours", "kinds", "background", "shape_scale"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "prior_pairs", tuple(tuple(p) for p in self.prior_pairs))
        self.validate()

    @property
    def objects(self):
        return [f"{c} {k}" for c in self.colours for k in self.kinds]

    @property
    def n_cells(self):
        return self.grid[0] * self.grid[1]

    def validate(self):
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"config.image_size: expected an int >= 16, got {self.image_size!r}")
        if len(self.grid) != 2 or not all(isinstance(g, int) and 1 <= g <= 3 for g in self.grid):
            raise ValueError(f"config.grid: expected (rows, cols) with each in 1..3, got {self.grid!r}")
        if self.grid == (1, 1):
            raise ValueError("config.grid: expected at least 2 cells, got (1, 1)")
        if min(self.image_size // self.grid[0], self.image_size // self.grid[1]) < 8:
            raise ValueError("config.image_size: cells would be under 8 pixels; use a larger "
                             "image or a coarser grid")
        bad = [c for c in self.colours if c not in PALETTE]
        if bad or len(set(self.colours)) != len(self.colours) or not self.colours:
            raise ValueError(f"config.colours: expected distinct names from {sorted(PALETTE)}, "
                             f"got {self.colours!r}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or len(set(self.kinds)) != len(self.kinds) or not self.kinds:
            raise ValueError(f"config.kinds: expected distinct names from {list(KINDS)}, "
                             f"got {self.kinds!r}")
        if len(self.background) != 3 or tuple(self.background) in set(PALETTE.values()):
            raise ValueError("config.background: expected an RGB triple that is no shape colour")
        if not (1 <= self.min_objects <= self.max_objects <= self.n_cells):
            raise ValueError(f"config.min_objects/max_objects: expected 1 <= min <= max <= cells "
                             f"({self.n_cells}), got {self.min_objects}, {self.max_objects}")
        lo, hi = self.shape_scale
        if not (0.2 <= lo <= hi <= 0.95):
            raise ValueError(f"config.shape_scale: expected 0.2 <= lo <= hi <= 0.95, got {self.shape_scale}")
        objects = set(self.objects)
        special = []
        for pair in self.prior_pairs:
            if len(pair) != 2 or not all(p in objects for p in pair):
                raise ValueError(f"config.prior_pairs: expected (anchor, partner) objects of the "
                                 f"world ('colour kind'), got {pair!r}")
            special.extend(pair)
        if len(set(special)) != len(special):
            raise ValueError("config.prior_pairs: anchors and partners must be distinct objects "
                             "(pairs must not share objects)")
        if special and len(objects - set(special)) == 0:
            raise ValueError("config.prior_pairs: at least one object must be in no pair")
        for name in ("prior_strength", "eval_prior_strength", "text_prior_strength",
                     "anchor_rate"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"config.{name}: expected a probability in [0, 1], got {v!r}")
        if not isinstance(self.qa_exist_weight, int) or self.qa_exist_weight < 0:
            raise ValueError(f"config.qa_exist_weight: expected an int >= 0, got "
                             f"{self.qa_exist_weight!r}")
        if not isinstance(self.qa_per_image, int) or self.qa_per_image < 0:
            raise ValueError(f"config.qa_per_image: expected an int >= 0, got {self.qa_per_image!r}")

    def position_names(self):
        """Name of every grid cell, in reading order ("top left", ..., or "left", "middle", ...)."""
        rows, cols = self.grid
        names = []
        for r in range(rows):
            for c in range(cols):
                rn, cn = _ROW_NAMES[rows][r], _COL_NAMES[cols][c]
                if rn == "middle" and cn == "middle":
                    names.append("center")
                elif rn and cn and cn != "middle" and rn != "middle":
                    names.append(f"{rn} {cn}")
                elif rn == "middle" or not rn:
                    names.append(cn)
                else:
                    names.append(rn)
        return names

    def to_dict(self):
        return {k: (list(map(list, v)) if k == "prior_pairs" else (list(v) if isinstance(v, tuple) else v))
                for k, v in asdict(self).items()}


@dataclass
class Shape:
    kind: str
    colour: str
    cell: int           # grid cell index in reading order
    position: str       # the cell's name
    bbox: tuple         # (x0, y0, x1, y1) in pixels, x1/y1 exclusive

    @property
    def object(self):
        return f"{self.colour} {self.kind}"

    @property
    def center(self):
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2)


@dataclass
class Scene:
    id: str
    split: str
    index: int
    shapes: list = field(default_factory=list)   # in reading order of their cells

    def to_dict(self):
        return {"id": self.id, "objects": scene_objects(self),
                "shapes": [{"kind": s.kind, "colour": s.colour, "object": s.object,
                            "position": s.position, "cell": s.cell, "bbox": list(s.bbox)}
                           for s in self.shapes]}


# --------------------------------------------------------------------------- sampling


def _sample_objects(rng, cfg, strength):
    colours, kinds = cfg.colours, cfg.kinds
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    objs = [f"{rng.choice(colours)} {rng.choice(kinds)}" for _ in range(n)]
    pairs = cfg.prior_pairs
    special = {o for p in pairs for o in p}
    neutral = [o for o in cfg.objects if o not in special]
    if pairs and rng.random() < cfg.anchor_rate:
        # seed the image with an anchor, so the prior is frequent enough to be learnt
        objs[0] = rng.choice(pairs)[0]
    for anchor, partner in pairs:
        if anchor not in objs:
            continue
        if rng.random() < strength:
            if partner in objs:
                continue
            if len(objs) < cfg.n_cells:
                objs.append(partner)
            else:
                free = [i for i, o in enumerate(objs) if o not in special]
                if free:
                    objs[rng.choice(free)] = partner
        else:
            objs = [rng.choice(neutral) if o == partner else o for o in objs]
    return objs


def _cell_box(cfg, cell):
    rows, cols = cfg.grid
    r, c = divmod(cell, cols)
    s = cfg.image_size
    return (c * s // cols, r * s // rows, (c + 1) * s // cols, (r + 1) * s // rows)


def _make_scene(cfg, seed, split, index, strength):
    rng = random.Random(f"{seed}:{split}:{index}")
    objs = _sample_objects(rng, cfg, strength)
    cells = sorted(rng.sample(range(cfg.n_cells), len(objs)))
    rng.shuffle(objs)
    names = cfg.position_names()
    shapes = []
    for obj, cell in zip(objs, cells):
        colour, kind = obj.split(" ")
        cx0, cy0, cx1, cy1 = _cell_box(cfg, cell)
        short = min(cx1 - cx0, cy1 - cy0)
        size = max(6, int(round(short * rng.uniform(*cfg.shape_scale))))
        size = min(size, short - 2)
        # keep a 1-pixel margin to the cell border so shapes of neighbouring cells never touch
        if cfg.jitter:
            x0 = rng.randint(cx0 + 1, cx1 - 1 - size)
            y0 = rng.randint(cy0 + 1, cy1 - 1 - size)
        else:   # centred in its cell
            x0 = (cx0 + cx1 - size) // 2
            y0 = (cy0 + cy1 - size) // 2
        shapes.append(Shape(kind, colour, cell, names[cell], (x0, y0, x0 + size, y0 + size)))
    return Scene(id=f"{split}_{index:06d}", split=split, index=index, shapes=shapes)


def generate_scenes(n, seed=0, config=None, split="train", start=0):
    """Scenes ``start .. start+n-1`` of ``split`` ("train" uses ``prior_strength``, "text" (the
    scenes the text-only corpus describes) ``text_prior_strength``, any other split
    ``eval_prior_strength``)."""
    cfg = config or WorldConfig()
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    if not isinstance(split, str) or not re.fullmatch(r"[a-z0-9]+", split):
        raise ValueError(f"split: expected a lower-case alphanumeric name, got {split!r}")
    strength = {"train": cfg.prior_strength, "text": cfg.text_prior_strength}.get(
        split, cfg.eval_prior_strength)
    return [_make_scene(cfg, seed, split, i, strength) for i in range(start, start + n)]


# --------------------------------------------------------------------------- drawing


def _star_points(x0, y0, x1, y1):
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ro, ri = (x1 - x0) / 2, (x1 - x0) / 5
    pts = []
    for i in range(10):
        a = -math.pi / 2 + i * math.pi / 5
        r = ro if i % 2 == 0 else ri
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def render(scene, config=None):
    """Draw ``scene`` as an RGB PIL image (no anti-aliasing: exact colours)."""
    from PIL import Image, ImageDraw

    cfg = config or WorldConfig()
    img = Image.new("RGB", (cfg.image_size, cfg.image_size), tuple(cfg.background))
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = PALETTE[s.colour]
        x0, y0, x1, y1 = s.bbox
        xl, yl = x1 - 1, y1 - 1             # PIL boxes are inclusive
        cx, cy = s.center
        if s.kind == "circle":
            draw.ellipse([x0, y0, xl, yl], fill=fill)
        elif s.kind == "square":
            draw.rectangle([x0, y0, xl, yl], fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(cx, y0), (xl, yl), (x0, yl)], fill=fill)
        elif s.kind == "diamond":
            draw.polygon([(cx, y0), (xl, cy), (cx, yl), (x0, cy)], fill=fill)
        elif s.kind == "cross":
            t = max(1, (x1 - x0) // 8)       # half thickness of the bars
            draw.rectangle([x0, cy - t, xl, cy + t], fill=fill)
            draw.rectangle([cx - t, y0, cx + t, yl], fill=fill)
        elif s.kind == "star":
            draw.polygon(_star_points(x0, y0, xl, yl), fill=fill)
        else:  # pragma: no cover - validated by WorldConfig
            raise ValueError(f"unknown kind {s.kind!r}")
    return img


# --------------------------------------------------------------------------- language


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _join(items):
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _groups(scene):
    """[(object, colour, kind, [positions])] in order of first appearance."""
    groups = {}
    for s in scene.shapes:
        groups.setdefault(s.object, (s.colour, s.kind, []))[2].append(s.position)
    return [(o, c, k, p) for o, (c, k, p) in groups.items()]


def _count_phrase(count, colour, kind):
    if count == 1:
        return f"{_article(colour)} {colour} {kind}"
    return f"{COUNT_WORDS[count]} {colour} {_plural(kind)}"


def caption(scene):
    """The canonical description of ``scene``."""
    if not scene.shapes:
        return f"{_CAPTION_LEAD} no shapes."
    parts = []
    for _, colour, kind, positions in _groups(scene):
        where = " and ".join(f"the {p}" for p in positions)
        parts.append(f"{_count_phrase(len(positions), colour, kind)} at {where}")
    if len(parts) == 1:
        body = parts[0]
    else:  # a comma before the last group's "and" keeps it apart from the positions' "and"
        body = ", ".join(parts[:-1]) + ", and " + parts[-1]
    return f"{_CAPTION_LEAD} {body}."


def patch_labels(scene, patch_size, config=None):
    """Per patch of a ``patch_size`` grid over the image (row-major): ``(colour, kind)`` indices
    (1-based into ``config.colours`` / ``config.kinds``; 0 = no shape) of the shape in the grid
    cell that holds the patch's centre. The targets of the vision tower's pretraining."""
    cfg = config or WorldConfig()
    n = cfg.image_size // patch_size
    by_cell = {sh.cell: sh for sh in scene.shapes}
    rows, cols = cfg.grid
    out = []
    for pr in range(n):
        for pc in range(n):
            y, x = (pr + 0.5) * patch_size, (pc + 0.5) * patch_size
            cell = min(int(y * rows // cfg.image_size), rows - 1) * cols + min(
                int(x * cols // cfg.image_size), cols - 1)
            sh = by_cell.get(cell)
            out.append((0, 0) if sh is None else (cfg.colours.index(sh.colour) + 1,
                                                  cfg.kinds.index(sh.kind) + 1))
    return out


def scene_objects(scene):
    """The distinct objects ("colour kind") of a scene, in order of first appearance."""
    return [g[0] for g in _groups(scene)]


def qa_pairs(scene, rng, n, config=None):
    """``n`` question/answer pairs about ``scene`` (count, existence, position, colour questions).

    Existence and count questions ask about absent objects too, preferring the prior partner of
    an anchor that is present without it (the question a text-leaning model gets wrong).
    """
    cfg = config or WorldConfig()
    groups = _groups(scene)
    present = {g[0]: g for g in groups}
    absent = [o for o in cfg.objects if o not in present]
    tricky = [p for a, p in cfg.prior_pairs if a in present and p not in present]
    out = []
    for _ in range(n):
        qtype = rng.choices(("count", "exist", "where", "colour"),
                            weights=(1, cfg.qa_exist_weight, 1, 1))[0]
        # existence and count questions ask about an absent object half the time (so "yes" and
        # "no" are equally frequent answers); where/colour questions about a present one
        ask_absent = absent and (not present or (qtype in ("count", "exist")
                                                 and rng.random() < 0.5))
        if ask_absent:
            obj = rng.choice(tricky) if tricky and rng.random() < 0.5 else rng.choice(absent)
        else:
            obj = rng.choice(list(present)) if present else rng.choice(absent)
        colour, kind = obj.split(" ")
        positions = present[obj][3] if obj in present else []
        if qtype == "count":
            q = f"how many {colour} {_plural(kind)} are there?"
            if not positions:
                a = f"there are no {colour} {_plural(kind)}."
            elif len(positions) == 1:
                a = f"there is one {colour} {kind}."
            else:
                a = f"there are {COUNT_WORDS[len(positions)]} {colour} {_plural(kind)}."
        elif qtype == "exist" or not positions:
            q = f"is there {_article(colour)} {colour} {kind} in the image?"
            if positions:
                a = f"yes, there is {_article(colour)} {colour} {kind} at the {positions[0]}."
            else:
                a = f"no, there is no {colour} {kind}."
        elif qtype == "where":
            if len(positions) == 1:
                q = f"where is the {colour} {kind}?"
                a = f"the {colour} {kind} is at the {positions[0]}."
            else:
                q = f"where are the {colour} {_plural(kind)}?"
                a = f"the {colour} {_plural(kind)} are at " + _join([f"the {p}" for p in positions]) + "."
        else:  # colour of the shape in a cell
            shape = next(s for s in scene.shapes if s.object == obj)
            q = f"what color is the {shape.kind} at the {shape.position}?"
            a = f"the {shape.kind} at the {shape.position} is {shape.colour}."
        out.append((q, a))
    return out


_TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def _tokens(text):
    return _TOKEN_RE.findall(text.lower())


def parse_caption_objects(text, config=None):
    """Object groups mentioned in a caption: ``[{"count", "colour", "kind", "object", "positions"}]``.

    A group is a count word ("a", "an", "one".."nine") followed by a colour and a kind (singular
    or plural); the positions are the cell names after it ("at the top left and the bottom
    right"). Anything else is skipped, so it never fails on model output; words outside the
    world are ignored.
    """
    cfg = config or WorldConfig()
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    toks = _tokens(text)
    counts = {"a": 1, "an": 1, **{w: i for i, w in enumerate(COUNT_WORDS)}}
    kinds = {k: k for k in cfg.kinds} | {_plural(k): k for k in cfg.kinds}
    colours = set(cfg.colours)
    pos_phrases = sorted((tuple(p.split()) for p in cfg.position_names()), key=len, reverse=True)
    groups = []
    i = 0
    while i < len(toks):
        if (toks[i] in counts and i + 2 < len(toks) and toks[i + 1] in colours
                and toks[i + 2] in kinds):
            colour, kind = toks[i + 1], kinds[toks[i + 2]]
            groups.append({"count": counts[toks[i]], "colour": colour, "kind": kind,
                           "object": f"{colour} {kind}", "positions": []})
            i += 3
            continue
        if groups and toks[i] == "the":
            for p in pos_phrases:
                if tuple(toks[i + 1:i + 1 + len(p)]) == p:
                    groups[-1]["positions"].append(" ".join(p))
                    i += 1 + len(p)
                    break
            else:
                i += 1
            continue
        i += 1
    return groups


def world_vocabulary(config=None):
    """Every token (words and punctuation) of the world's prompts and answers, sorted."""
    cfg = config or WorldConfig()
    fixed = " ".join(DESCRIBE_PROMPTS) + " " + _CAPTION_LEAD + (
        " a an at the and , . ? no shapes how many are there is in image yes where what color "
        "of one")
    words = set(_tokens(fixed))
    words.update(COUNT_WORDS)
    # words the rule error injector (bpo_fast.data.inject) can write into a world answer: its
    # number words go up to twelve and its fallback sentence is "there is also a ... at the ...".
    words.update(("ten", "eleven", "twelve", "also"))
    words.update(cfg.colours)
    for k in cfg.kinds:
        words.update((k, _plural(k)))
    for p in cfg.position_names():
        words.update(p.split())
    return sorted(words)


def world_synonyms(config=None):
    """CHAIR synonym table for the world: ``{"red circle": ["red disc", ...], ...}``.

    An object is a colour and a kind, so a right kind in the wrong colour is a hallucination.
    Plurals need not be listed: :mod:`bpo_fast.eval.chair` matches them itself.
    """
    cfg = config or WorldConfig()
    table = {}
    for colour in cfg.colours:
        for kind in cfg.kinds:
            table[f"{colour} {kind}"] = [f"{colour} {s}" for s in KIND_SYNONYMS.get(kind, ())]
    return table


def write_synonyms(path, table):
    """Write a synonym table in the standard one-line-per-object "canonical, syn1, ..." format."""
    lines = ["# CHAIR synonyms: one object a line, 'canonical, synonym, synonym, ...'"]
    lines += [", ".join([canon, *syns]) for canon, syns in table.items()]
    _atomic_write(path, "\n".join(lines) + "\n")


def world_lexicon(config=None):
    """A rule-injector lexicon (``bpo_fast.data.inject.load_lexicon`` keys) over the world's
    words: swaps land on other colours, kinds and cells of the world, so injected errors stay
    in-vocabulary and plausible."""
    cfg = config or WorldConfig()
    return {
        "colors": list(cfg.colours),
        "objects": list(cfg.kinds),
        "plurals": {k: _plural(k) for k in cfg.kinds if _plural(k) != k + "s"},
        "places": [f"at the {p}" for p in cfg.position_names()],
    }


# --------------------------------------------------------------------------- on disk


@dataclass
class WorldPaths:
    """Where :func:`make_world` wrote the world (all paths absolute)."""

    root: str
    images: str           # image folder; records' "image" fields are relative to it
    train: str            # LLaVA-format JSON (description + QA turns): the image-caption alignment data
    eval: str             # LLaVA-format JSON (EVAL_PROMPT + reference caption, one turn)
    train_truth: str      # JSONL {id, objects, shapes} per training image
    eval_truth: str       # JSONL {id, objects, shapes}: the CHAIR ground truth (eval-chair format)
    synonyms: str         # CHAIR synonym file, "canonical, syn, ..." lines
    lexicon: str          # rule-injector lexicon JSON
    meta: str             # world.json: config, seed, sizes, prior statistics, vocabulary
    text: str = None      # LLaVA-format JSON without images: the text-only pretraining corpus
    val: str = None       # LLaVA-format JSON like ``eval``: the validation split
    val_truth: str = None  # its ground truth

    @classmethod
    def under(cls, root):
        root = os.path.abspath(root)
        j = lambda name: os.path.join(root, name)  # noqa: E731
        return cls(root=root, images=j("images"), train=j("train.json"), eval=j("eval.json"),
                   train_truth=j("train_truth.jsonl"), eval_truth=j("eval_truth.jsonl"),
                   synonyms=j("synonyms.txt"), lexicon=j("lexicon.json"), meta=j("world.json"),
                   text=j("text.json"), val=j("val.json"), val_truth=j("val_truth.jsonl"))

    def split(self, name):
        """``(records, truth)`` paths of a scored split: "eval" (held-out) or "val"."""
        if name == "eval":
            return self.eval, self.eval_truth
        if name == "val":
            return self.val, self.val_truth
        raise ValueError(f"split: expected 'eval' or 'val', got {name!r}")


def _atomic_write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _records(scenes, cfg, split, seed):
    recs = []
    for sc in scenes:
        if split in ("train", "text"):
            rng = random.Random(f"{seed}:{split}:{sc.index}:text")
            turns = [(rng.choice(DESCRIBE_PROMPTS), caption(sc))]
            qa = qa_pairs(sc, rng, cfg.qa_per_image, cfg)
            # half the conversations open with a question (as a POPE probe asks it), half
            # with the description
            turns = [qa[0]] + turns + qa[1:] if qa and rng.random() < 0.5 else turns + qa
        else:
            turns = [(EVAL_PROMPT, caption(sc))]
        image = split != "text"     # the text corpus: the same conversations, no image
        conv = []
        for t, (q, a) in enumerate(turns):
            conv.append({"from": "human", "value": ("<image>\n" + q) if t == 0 and image else q})
            conv.append({"from": "gpt", "value": a})
        rec = {"id": sc.id, "conversations": conv}
        if image:
            rec["image"] = f"{sc.id}.png"
        recs.append(rec)
    return recs


def prior_statistics(scenes, config=None):
    """Per prior pair: images with the anchor, and the fraction of them that hold the partner."""
    cfg = config or WorldConfig()
    stats = {}
    for anchor, partner in cfg.prior_pairs:
        with_anchor = [sc for sc in scenes if anchor in scene_objects(sc)]
        both = sum(partner in scene_objects(sc) for sc in with_anchor)
        stats[f"{anchor} -> {partner}"] = {
            "images_with_anchor": len(with_anchor),
            "p_partner_given_anchor": both / len(with_anchor) if with_anchor else None,
        }
    return stats


def read_world(root):
    """``(WorldPaths, WorldConfig, meta)`` of a complete world written by :func:`make_world`."""
    paths = WorldPaths.under(root)
    if not os.path.isfile(paths.meta):
        raise FileNotFoundError(f"root: no complete shapes world under {root!r} (no world.json)")
    with open(paths.meta, encoding="utf-8") as f:
        meta = json.load(f)
    return paths, WorldConfig(**meta["config"]), meta


def score_captions(captions, world, *, subset=False, split="eval"):
    """CHAIR of ``captions`` (id -> text) on the held-out split of ``world`` (a root folder or
    :class:`WorldPaths`; ``split="val"``: the validation split): the ground truth and synonyms
    the world wrote. ``subset``: score only the captioned images."""
    from bpo_fast.eval.chair import SynonymTable, compute_chair, load_ground_truth

    paths = world if isinstance(world, WorldPaths) else WorldPaths.under(world)
    truth = load_ground_truth(paths.split(split)[1])
    return compute_chair(captions, truth, SynonymTable.from_file(paths.synonyms),
                         ignore_extra_ground_truth=subset)


def prior_hallucination(result, config=None):
    """How often captions name the prior partner of an anchor that is in the image while the
    partner is not: the language prior's own hallucination, from a CHAIR result's per-caption
    details. Returns ``{"anchor -> partner": {"images", "hallucinated", "rate"}, "all": {...}}``
    (``rate`` None when no image qualifies; in ``"all"`` an image with two such anchors counts
    once per pair)."""
    cfg = config or WorldConfig()
    out = {}
    tot_n = tot_h = 0
    for anchor, partner in cfg.prior_pairs:
        n = h = 0
        for pc in result.per_caption:
            if anchor in pc["ground_truth"] and partner not in pc["ground_truth"]:
                n += 1
                h += partner in pc["hallucinated"]
        out[f"{anchor} -> {partner}"] = {"images": n, "hallucinated": h,
                                         "rate": h / n if n else None}
        tot_n, tot_h = tot_n + n, tot_h + h
    out["all"] = {"images": tot_n, "hallucinated": tot_h, "rate": tot_h / tot_n if tot_n else None}
    return out


def make_world(out_dir, n_train, n_eval, seed=0, config=None, *, n_text=0, n_val=0):
    """Write the world under ``out_dir`` and return its :class:`WorldPaths`.

    Splits: ``n_text`` text-only conversations (the pretraining corpus: descriptions and QA of
    scenes drawn with ``text_prior_strength``, no image), ``n_train`` image-caption records
    (``prior_strength``), ``n_val`` validation and ``n_eval`` held-out images (both
    ``eval_prior_strength``; the validation split is for choosing settings, the held-out one for
    the final numbers). A complete world written before with the same arguments and config is
    reused as is (``world.json`` is written last, after every image and file).
    """
    cfg = config or WorldConfig()
    if not isinstance(cfg, WorldConfig):
        raise TypeError(f"config: expected a WorldConfig, got {type(cfg).__name__}")
    for name, v in (("n_train", n_train), ("n_eval", n_eval), ("n_text", n_text),
                    ("n_val", n_val)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    if not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    paths = WorldPaths.under(out_dir)
    key = {"n_train": n_train, "n_eval": n_eval, "n_text": n_text, "n_val": n_val, "seed": seed,
           "config": cfg.to_dict()}
    if os.path.isfile(paths.meta):
        try:
            with open(paths.meta, encoding="utf-8") as f:
                old = json.load(f)
            if {k: old.get(k) for k in key} == key:
                return paths
        except (OSError, json.JSONDecodeError):
            pass  # unreadable marker: write the world again
        os.remove(paths.meta)
    os.makedirs(paths.images, exist_ok=True)

    meta = dict(key)
    for split, n, rec_path, truth_path in (("train", n_train, paths.train, paths.train_truth),
                                            ("eval", n_eval, paths.eval, paths.eval_truth),
                                            ("val", n_val, paths.val, paths.val_truth),
                                            ("text", n_text, paths.text, None)):
        scenes = generate_scenes(n, seed, cfg, split)
        if split != "text":
            for sc in scenes:
                render(sc, cfg).save(os.path.join(paths.images, f"{sc.id}.png"), compress_level=1)
        _atomic_write(rec_path, json.dumps(_records(scenes, cfg, split, seed), indent=1))
        if truth_path is not None:
            _atomic_write(truth_path, "".join(json.dumps(sc.to_dict()) + "\n" for sc in scenes))
        meta[f"{split}_prior"] = prior_statistics(scenes, cfg)
    write_synonyms(paths.synonyms, world_synonyms(cfg))
    _atomic_write(paths.lexicon, json.dumps(world_lexicon(cfg), indent=1))
    meta["eval_prompt"] = EVAL_PROMPT
    meta["vocabulary"] = world_vocabulary(cfg)
    _atomic_write(paths.meta, json.dumps(meta, indent=1))
    return paths
