"""SynthVQA: a deterministic synthetic VQA benchmark written in the public formats of the real datasets.

Each image shows a 4 x 4 grid of cells holding 2-9 coloured shapes (5 shapes, 6 colours, 2 sizes, a little
positional jitter inside the cell) and one white sign with a short code (3 characters by default, from a 30-symbol
alphabet without look-alikes such as O/0 or I/1) drawn with a built-in 5 x 7 bitmap font, so no system font is
needed and the pixels are the same everywhere. At the default 224 px a cell is 56 px, i.e. exactly 4 x 4 patches of
14 px (a 16 x 16 patch grid) and 3.5 x 3.5 patches of 16 px; a code character is 10 x 14 px, about one patch.

Every image carries one question of each of the five families, so a split of N images has N questions per family:

=========  ==================  ===========================================================================
family     imitates            question
=========  ==================  ===========================================================================
attr       GQA                 "What color is the triangle?", "What shape is the red object?", "What size is
                               the blue star?", "What color is the object directly left of the red circle?"
exist      POPE                "Is there a red circle in the image?" (yes/no); the N questions are dealt in
                               turn to the three POPE files (random / popular / adversarial negatives), each
                               balanced yes/no to within one question
read       TextVQA             "What does the sign say?" -> the code (fine detail)
count      VQAv2 (numbers)     "How many circles are there?" -> 1..5, balanced
spatial    VSR                 caption "The red circle is left of the blue square." -> true / false, balanced
=========  ==================  ===========================================================================

Referents are always unique in their image; spatial relations are read on the grid ("left of": a smaller column,
"above": a smaller row; "directly left of": the neighbouring cell in the same row). :func:`answer_question`
re-derives any answer from a question's text and the scene description kept in ``scenes/<split>.json``.

POPE negatives (an absent colour+shape category) follow POPE's three strategies, computed over the split itself:
``random`` draws any absent category; ``popular`` one of the 3 absent categories present in the most images of the
split; ``adversarial`` one of the 3 absent categories that co-occur most with the image's present categories (sum
over them of the number of images holding both). POPE takes the top k of its ranking; drawing among the top 3
keeps some variety with one negative per image. Scenes are drawn around a theme colour and shape, so categories
sharing a colour or a shape with the objects present co-occur with them more, and adversarial negatives tend to
be such near misses.

Folder layout written by :func:`generate_synthvqa` (``<split>`` is ``train``, ``val`` or ``test``)::

    OUT/manifest.json                                    config, counts, sha256 of every other file
    OUT/images/<image_id>.png                            all splits; ids 1000000+ train, 2000000+ val, 3000000+ test
    OUT/scenes/<split>.json                              the scene descriptions (objects, code, sign box)
    OUT/gqa/<split>_balanced_questions.json              attr     GQA questions json
    OUT/pope/synth_<split>_pope_<variant>.json           exist    POPE jsonl, one file per negative sampling
    OUT/textvqa/TextVQA_synth_<split>.json               read     TextVQA json
    OUT/vqav2/v2_OpenEnded_synth_<split>_questions.json  count    VQAv2 questions
    OUT/vqav2/v2_synth_<split>_annotations.json          count    VQAv2 annotations (10 answers each)
    OUT/vsr/<split>.jsonl                                spatial  VSR jsonl

Sizes: ``per_family`` images (so questions per family) in val and test, ``per_family * train_multiplier`` in train.
Determinism: every image has its own random stream seeded from (seed, split, index), PNGs are written with fixed
options and no metadata, JSON with sorted keys and no timestamps; the same config gives byte-identical files.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..eval.metrics import normalize_answer

__all__ = [
    "CATEGORIES",
    "CODE_ALPHABET",
    "COLORS",
    "FAMILIES",
    "GLYPHS",
    "POPE_VARIANTS",
    "SHAPES",
    "SPLITS",
    "SynthConfig",
    "answer_question",
    "extra_questions",
    "code_mask",
    "family_files",
    "generate_synthvqa",
    "image_file",
    "load_scenes",
    "referent_name_spans",
    "render_scene",
    "where_questions",
    "recall_questions",
]

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
FAMILIES = ("attr", "exist", "read", "count", "spatial")
POPE_VARIANTS = ("random", "popular", "adversarial")
GRID = 4
IMAGE_DIR = "images"
SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SIZES = ("small", "large")
#: Every colour+shape pair: the "objects" of the exist (POPE-like) family.
CATEGORIES = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
#: Grid relations of the spatial family and of the relational attr questions: (name, row step, column step).
RELATIONS = (("left of", 0, -1), ("right of", 0, 1), ("above", -1, 0), ("below", 1, 0))
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

#: Relative frequencies: uneven on purpose, so that POPE's "popular" negatives differ from random ones.
_COLOR_WEIGHTS = {"red": 6, "blue": 5, "green": 4, "yellow": 3, "purple": 2, "orange": 2}
_SHAPE_WEIGHTS = {"circle": 5, "square": 4, "triangle": 3, "diamond": 2, "star": 2}
_THEME_PROB = 0.4  # chance that an object takes the scene's theme colour (and, independently, its theme shape)
_MAX_COUNT = 5
_SPLIT_STRIDE = 1_000_000
_SPLIT_BASE = {"train": _SPLIT_STRIDE, "val": 2 * _SPLIT_STRIDE, "test": 3 * _SPLIT_STRIDE}

BACKGROUND = (236, 236, 236)
SIGN_FILL = (255, 255, 255)
SIGN_BORDER = (70, 70, 70)
TEXT_COLOR = (15, 15, 15)

# A 5 x 7 bitmap font for the code alphabet (letters without I, O, Q; digits without 0, 1, 8).
_FONT_ROWS = {
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
}
#: Character -> (7, 5) boolean array.
GLYPHS = {ch: np.array([[c == "#" for c in row] for row in rows.split()], dtype=bool)
          for ch, rows in _FONT_ROWS.items()}
CODE_ALPHABET = "".join(_FONT_ROWS)
GLYPH_H, GLYPH_W = 7, 5
_SIGN_PAD = 2  # sign padding around the text, in font pixels


@dataclass(frozen=True)
class SynthConfig:
    """What to generate.

    ``per_family`` images (and questions per family) in val and test, ``per_family * train_multiplier`` in train;
    ``image_size`` in pixels (square, divided into a 4 x 4 grid); ``code_length`` characters per sign.
    """

    seed: int = 0
    per_family: int = 500
    train_multiplier: int = 10
    image_size: int = 224
    code_length: int = 3

    def __post_init__(self):
        if self.per_family < 1:
            raise ValueError(f"per_family must be at least 1, got {self.per_family}")
        if self.train_multiplier < 1:
            raise ValueError(f"train_multiplier must be at least 1, got {self.train_multiplier}")
        if self.per_family * self.train_multiplier >= _SPLIT_STRIDE:
            raise ValueError(f"at most {_SPLIT_STRIDE - 1} images per split (image ids are numbered per split)")
        if self.code_length < 1:
            raise ValueError(f"code_length must be at least 1, got {self.code_length}")
        smallest = GRID * (_text_width(self.code_length, 1) + 2 * _SIGN_PAD + 2)
        if self.image_size < smallest:
            raise ValueError(f"image_size {self.image_size} is too small for a {self.code_length}-character sign "
                             f"in a {GRID}x{GRID} grid; use at least {smallest}")

    def split_sizes(self) -> dict[str, int]:
        """Number of images (= questions per family) in each split."""
        return {"train": self.per_family * self.train_multiplier, "val": self.per_family, "test": self.per_family}


# --- layout -------------------------------------------------------------------------------------------------------

def image_file(image_id: int) -> str:
    """Path of an image, relative to the output folder."""
    return f"{IMAGE_DIR}/{image_id}.png"


def family_files(split: str) -> dict[str, tuple[str, ...]]:
    """The annotation files of each family for one split, relative to the output folder.

    ``exist`` lists the POPE files in :data:`POPE_VARIANTS` order; ``count`` lists questions, then annotations.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown SynthVQA split {split!r}; known: {', '.join(SPLITS)}")
    return {
        "attr": (f"gqa/{split}_balanced_questions.json",),
        "exist": tuple(f"pope/synth_{split}_pope_{v}.json" for v in POPE_VARIANTS),
        "read": (f"textvqa/TextVQA_synth_{split}.json",),
        "count": (f"vqav2/v2_OpenEnded_synth_{split}_questions.json", f"vqav2/v2_synth_{split}_annotations.json"),
        "spatial": (f"vsr/{split}.jsonl",),
    }


def load_scenes(root: str | Path, split: str) -> list[dict]:
    """The scene descriptions of one split, as the generator kept them."""
    path = Path(root) / "scenes" / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"SynthVQA scene file not found: {path}")
    return json.loads(path.read_text())["scenes"]


# --- drawing ------------------------------------------------------------------------------------------------------

def _text_width(length: int, scale: int) -> int:
    return (length * (GLYPH_W + 1) - 1) * scale


def _font_scale(cell: int, length: int) -> int:
    """The largest integer font scale whose sign (text, padding, 1 px border each side) fits in a cell."""
    return max(1, (cell - 2) // (length * (GLYPH_W + 1) - 1 + 2 * _SIGN_PAD))


def code_mask(code: str, scale: int) -> np.ndarray:
    """Boolean (7*scale, width) mask of the code's ink: glyphs 5 font pixels wide, 1 pixel apart."""
    mask = np.zeros((GLYPH_H * scale, _text_width(len(code), scale)), dtype=bool)
    for k, ch in enumerate(code):
        glyph = np.kron(GLYPHS[ch], np.ones((scale, scale), dtype=bool))
        x = k * (GLYPH_W + 1) * scale
        mask[:, x:x + GLYPH_W * scale] = glyph
    return mask


def _shape_points(shape: str, cx: int, cy: int, r: int) -> list[tuple[int, int]]:
    """Polygon of a shape centred at (cx, cy) with outer radius r (circles are drawn apart)."""
    if shape == "square":
        h = round(0.85 * r)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        dx, dy = round(0.95 * r), round(0.75 * r)
        return [(cx, cy - r), (cx + dx, cy + dy), (cx - dx, cy + dy)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + round(0.8 * r), cy), (cx, cy + r), (cx - round(0.8 * r), cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + round(rad * math.cos(ang)), cy + round(rad * math.sin(ang))))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: dict, image_size: int) -> Image.Image:
    """Draw a scene (as kept in ``scenes/<split>.json``) into an RGB image; no anti-aliasing, fully deterministic."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        (cx, cy), r, fill = obj["center"], obj["radius"], COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_points(obj["shape"], cx, cy, r), fill=fill)
    sign = scene["sign"]
    draw.rectangle(tuple(sign["box"]), fill=SIGN_FILL, outline=SIGN_BORDER)
    arr = np.asarray(img).copy()
    mask = code_mask(scene["code"], sign["scale"])
    x0, y0 = sign["text_origin"]
    arr[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]][mask] = TEXT_COLOR
    return Image.fromarray(arr)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


# --- scenes ---------------------------------------------------------------------------------------------------------

def _weighted(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + "s"


def _unique_description(obj: dict, objects: list[dict], key_sets) -> str | None:
    """The first of ``key_sets`` (attribute names) whose values single ``obj`` out in the scene, as words."""
    for keys in key_sets:
        if sum(all(o[k] == obj[k] for k in keys) for o in objects) == 1:
            return " ".join(obj[k] for k in keys)
    return None


_NAME_KEYS = (("shape",), ("color", "shape"), ("size", "color", "shape"))


def _name(obj: dict, objects: list[dict]) -> str | None:
    """The shortest unique noun phrase for an object ("triangle", "red circle", "small red circle") or None."""
    return _unique_description(obj, objects, _NAME_KEYS)


def _count_target(rng: random.Random) -> dict:
    """The kind of object a count question asks about: a shape, a colour, or both."""
    by = rng.choice(("shape", "color", "both"))
    target = {"by": by}
    if by in ("shape", "both"):
        target["shape"] = _weighted(rng, _SHAPE_WEIGHTS)
    if by in ("color", "both"):
        target["color"] = _weighted(rng, _COLOR_WEIGHTS)
    return target


def _is_target(obj: dict, target: dict) -> bool:
    return all(obj[k] == target[k] for k in ("shape", "color") if k in target)


def _count_question(target: dict) -> str:
    if target["by"] == "shape":
        noun = _plural(target["shape"])
    elif target["by"] == "color":
        noun = f"{target['color']} objects"
    else:
        noun = f"{target['color']} {_plural(target['shape'])}"
    return f"How many {noun} are there?"


def _place(rng: random.Random, cell_xy: tuple[int, int], cell: int, radius: int) -> list[int]:
    """Centre of an object of this radius, jittered inside its cell."""
    jitter = max(0, cell // 2 - radius - 2)
    x0, y0 = cell_xy
    return [x0 + cell // 2 + rng.randint(-jitter, jitter), y0 + cell // 2 + rng.randint(-jitter, jitter)]


def _draw_scene(rng: random.Random, cfg: SynthConfig, n_target: int) -> tuple[dict, dict]:
    """Objects, code and sign of a scene with exactly ``n_target`` objects of a random count target."""
    cell = cfg.image_size // GRID
    margin = (cfg.image_size - GRID * cell) // 2
    theme_color, theme_shape = _weighted(rng, _COLOR_WEIGHTS), _weighted(rng, _SHAPE_WEIGHTS)

    def attribute(theme, weights):
        return theme if rng.random() < _THEME_PROB else _weighted(rng, weights)

    target = _count_target(rng)
    kinds = []
    for _ in range(n_target):
        kinds.append((target.get("color") or attribute(theme_color, _COLOR_WEIGHTS),
                      target.get("shape") or attribute(theme_shape, _SHAPE_WEIGHTS)))
    for _ in range(rng.randint(1, 4)):
        while True:
            kind = (attribute(theme_color, _COLOR_WEIGHTS), attribute(theme_shape, _SHAPE_WEIGHTS))
            if not _is_target({"color": kind[0], "shape": kind[1]}, target):
                break
        kinds.append(kind)
    rng.shuffle(kinds)

    cells = list(itertools.product(range(GRID), range(GRID)))
    rng.shuffle(cells)
    objects = []
    for (color, shape), (row, col) in zip(kinds, cells):
        size = rng.choice(SIZES)
        radius = round((0.38 if size == "large" else 0.22) * cell)
        xy = (margin + col * cell, margin + row * cell)
        objects.append({"shape": shape, "color": color, "size": size, "row": row, "col": col,
                        "center": _place(rng, xy, cell, radius), "radius": radius})
    objects.sort(key=lambda o: (o["row"], o["col"]))

    while True:  # a code the VQA normalisation leaves alone (not "THE", "TEN", ...)
        code = "".join(rng.choice(CODE_ALPHABET) for _ in range(cfg.code_length))
        if normalize_answer(code) == code.lower():
            break
    scale = _font_scale(cell, cfg.code_length)
    text_w, text_h = _text_width(cfg.code_length, scale), GLYPH_H * scale
    sign_w, sign_h = text_w + 2 * _SIGN_PAD * scale + 2, text_h + 2 * _SIGN_PAD * scale + 2
    row, col = cells[len(kinds)]
    x = margin + col * cell + rng.randint(0, cell - sign_w)
    y = margin + row * cell + rng.randint(0, cell - sign_h)
    sign = {"row": row, "col": col, "box": [x, y, x + sign_w - 1, y + sign_h - 1], "scale": scale,
            "text_origin": [x + 1 + _SIGN_PAD * scale, y + 1 + _SIGN_PAD * scale]}
    return {"objects": objects, "code": code, "sign": sign}, target


def _attr_candidates(objects: list[dict]) -> dict[str, list[dict]]:
    """Every well-posed GQA-like question of the scene, grouped by template."""
    out: dict[str, list[dict]] = {"color_of": [], "shape_of": [], "size_of": [], "relate_color": [],
                                  "relate_shape": []}
    for obj in objects:
        desc = _unique_description(obj, objects, (("shape",), ("size", "shape")))
        if desc:
            out["color_of"].append({"question": f"What color is the {desc}?", "answer": obj["color"],
                                    "fullAnswer": f"The {desc} is {obj['color']}."})
        desc = _unique_description(obj, objects, (("color",), ("size", "color")))
        if desc:
            out["shape_of"].append({"question": f"What shape is the {desc} object?", "answer": obj["shape"],
                                    "fullAnswer": f"The {desc} object is {_article(obj['shape'])} {obj['shape']}."})
        desc = _unique_description(obj, objects, (("shape",), ("color", "shape")))
        if desc:
            out["size_of"].append({"question": f"What size is the {desc}?", "answer": obj["size"],
                                   "fullAnswer": f"The {desc} is {obj['size']}."})
    at = {(o["row"], o["col"]): o for o in objects}
    for ref in objects:
        ref_name = _name(ref, objects)
        if ref_name is None:
            continue
        for rel, dr, dc in RELATIONS:
            other = at.get((ref["row"] + dr, ref["col"] + dc))
            if other is None:
                continue
            subject = f"the object directly {rel} the {ref_name}"
            out["relate_color"].append({"question": f"What color is {subject}?", "answer": other["color"],
                                        "fullAnswer": f"The object directly {rel} the {ref_name} is "
                                                      f"{other['color']}."})
            out["relate_shape"].append({"question": f"What shape is {subject}?", "answer": other["shape"],
                                        "fullAnswer": f"The object directly {rel} the {ref_name} is "
                                                      f"{_article(other['shape'])} {other['shape']}."})
    return out


def relation_holds(a: dict, b: dict, rel: str) -> bool:
    """Object ``a`` stands in the grid relation ``rel`` (a name of :data:`RELATIONS`) to ``b``; objects are
    dicts with ``row`` and ``col``."""
    _, dr, dc = next(r for r in RELATIONS if r[0] == rel)
    return (a["row"] - b["row"]) * dr > 0 if dr else (a["col"] - b["col"]) * dc > 0


def _spatial_candidates(objects: list[dict], label: bool) -> list[tuple[str, str, str]]:
    """(subject, relation, object) triples between uniquely named objects whose truth is ``label``.

    Only relations along an axis on which the two objects differ are used, so a false caption is always the
    opposite of a true one (never "left of" for two objects in the same column).
    """
    named = [(o, _name(o, objects)) for o in objects]
    named = [(o, n) for o, n in named if n]
    out = []
    for (a, na), (b, nb) in itertools.permutations(named, 2):
        for rel, _, _ in RELATIONS:
            holds = relation_holds(a, b, rel)
            if holds or relation_holds(a, b, _OPPOSITE[rel]):
                if holds == label:
                    out.append((na, rel, nb))
    return out


_READ_QUESTIONS = ("What does the sign say?", "What code is written on the sign?", "What is written on the sign?")


def _make_scene(rng: random.Random, cfg: SynthConfig, n_count: int, spatial_label: bool) -> dict:
    """A scene and its attr / read / count / spatial questions (exist comes later, from split statistics)."""
    while True:
        scene, target = _draw_scene(rng, cfg, n_count)
        objects = scene["objects"]
        attr = {k: v for k, v in _attr_candidates(objects).items() if v}
        spatial = _spatial_candidates(objects, spatial_label)
        if attr and spatial:
            break
    template = rng.choice(sorted(attr))
    attr_q = dict(rng.choice(attr[template]), template=template)
    subj, rel, obj = rng.choice(spatial)
    scene["questions"] = {
        "attr": attr_q,
        "read": {"question": rng.choice(_READ_QUESTIONS), "answer": scene["code"].lower()},
        "count": {"question": _count_question(target), "answer": str(n_count), "target": target},
        "spatial": {"caption": f"The {subj} is {rel} the {obj}.", "label": spatial_label, "relation": rel,
                    "subj": subj, "obj": obj},
    }
    return scene


def _categories(scene: dict) -> list[str]:
    return sorted({f"{o['color']} {o['shape']}" for o in scene["objects"]}, key=CATEGORIES.index)


def _exist_questions(scenes: list[dict], plan: list[tuple[str, bool]], seed: int, split: str) -> None:
    """Add one POPE-like question per scene: ``plan[i]`` is (negative sampling variant, label yes?)."""
    present = [_categories(s) for s in scenes]
    freq = Counter(c for cats in present for c in cats)
    cooc: Counter = Counter()
    for cats in present:
        cooc.update(itertools.permutations(cats, 2))
    for i, (scene, (variant, yes)) in enumerate(zip(scenes, plan)):
        rng = random.Random(f"synthvqa/{seed}/{split}/{i}/exist")
        cats = present[i]
        absent = [c for c in CATEGORIES if c not in cats]
        if yes:
            category = rng.choice(cats)
        elif variant == "random":
            category = rng.choice(absent)
        else:
            def rank(c):  # most frequent, or most co-occurring with the present categories, first
                hits = freq[c] if variant == "popular" else sum(cooc[(p, c)] for p in cats)
                return -hits, CATEGORIES.index(c)

            category = rng.choice(sorted(absent, key=rank)[:3])
        scene["questions"]["exist"] = {"question": f"Is there {_article(category)} {category} in the image?",
                                       "answer": "yes" if yes else "no", "variant": variant,
                                       "category": category}


def _balanced_plan(rng: random.Random, n: int) -> tuple[list[int], list[tuple[str, bool]], list[bool]]:
    """Per-image count answers (1..5), exist (variant, label) and spatial labels, each balanced, independently shuffled.

    The exist labels alternate within each variant, so yes and no differ by at most one per POPE file.
    """
    counts = [k % _MAX_COUNT + 1 for k in range(n)]
    exist = [(POPE_VARIANTS[k % 3], (k // 3) % 2 == 0) for k in range(n)]
    spatial = [k % 2 == 0 for k in range(n)]
    for seq in (counts, exist, spatial):
        rng.shuffle(seq)
    return counts, exist, spatial


def extra_questions(scene: dict, rng: random.Random, per_family: int = 2) -> list[tuple[str, str, str]]:
    """More questions about a scene in the families' own templates, for training: ``[(family, question,
    answer)]`` with up to ``per_family`` each of attr, exist (half present, half absent categories), count (kinds
    present in the scene) and spatial (one true, one false caption per pair drawn); ``read`` has one question per
    image and gets none. Answers are in the form the data files hold (``answer_question`` gives the same)."""
    objects = scene["objects"]
    out = []
    attr = [q for qs in _attr_candidates(objects).values() for q in qs]
    for q in rng.sample(attr, min(per_family, len(attr))):
        out.append(("attr", q["question"], q["answer"]))
    cats = _categories(scene)
    absent = [c for c in CATEGORIES if c not in cats]
    n_yes = min(len(cats), (per_family + 1) // 2)
    for c in rng.sample(cats, n_yes) + rng.sample(absent, min(len(absent), per_family - n_yes)):
        out.append(("exist", f"Is there {_article(c)} {c} in the image?", "yes" if c in cats else "no"))
    for _ in range(per_family):
        obj = rng.choice(objects)
        by = rng.choice(("shape", "color", "both"))
        target = {"by": by, **{k: obj[k] for k in ("shape", "color") if by in (k, "both")}}
        out.append(("count", _count_question(target), str(sum(_is_target(o, target) for o in objects))))
    for label in [True, False] * ((per_family + 1) // 2):
        captions = _spatial_candidates(objects, label)
        if captions:
            subj, rel, obj_name = rng.choice(captions)
            out.append(("spatial", f"The {subj} is {rel} the {obj_name}.", "true" if label else "false"))
    return out


def where_questions(scene: dict, rng: random.Random, n: int = 2) -> list[tuple[str, str]]:
    """Up to ``n`` questions "Where is the red circle?" about distinct uniquely named objects, answered with the
    object's grid cell, 1-based: "row 2, column 3". Not a family of the benchmark (no data file holds them): a
    training-only question whose answer depends on one recalled position, where a ``spatial`` caption's truth
    depends on two positions and the relation together (true and false captions of a pair differ only in the
    relation, so no single one of these carries any signal on its own, and the answer loss gives a model that
    has not yet learnt to recall positions no gradient towards doing so). ``[(question, answer)]``."""
    objects = scene["objects"]
    named = [(o, name) for o in objects if (name := _name(o, objects))]
    return [(f"Where is the {name}?", f"row {o['row'] + 1}, column {o['col'] + 1}")
            for o, name in rng.sample(named, min(n, len(named)))]


def recall_questions(scene: dict, rng: random.Random, n: int = 2) -> list[tuple[str, str]]:
    """Up to ``n`` distinct single-object attribute questions about the scene in attr's own templates ("What
    color is the star?", "What shape is the small red object?", "What size is the blue circle?"), for training:
    each answer is one attribute of one object found by its name alone, i.e. one recall from the image by a
    description, the step a ``spatial`` caption needs twice. (The benchmark's attr questions are these templates
    and the two-object "directly left of" ones, one per image: about one image in five asks each of the three
    single-object ones.) ``[(question, answer)]``."""
    candidates = _attr_candidates(scene["objects"])
    pool = [(q["question"], q["answer"]) for key in ("color_of", "shape_of", "size_of") for q in candidates[key]]
    return rng.sample(pool, min(n, len(pool)))


# --- writing --------------------------------------------------------------------------------------------------------

def _json_bytes(obj, indent: int | None = None) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=indent) + "\n").encode()


def _jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()


def _annotation_files(split: str, scenes: list[dict], cfg: SynthConfig) -> dict[str, bytes]:
    """The public-format files of one split, by relative path."""
    files = family_files(split)
    gqa = {}
    textvqa, vqa_q, vqa_a, vsr = [], [], [], []
    pope = {v: [] for v in POPE_VARIANTS}
    for scene in scenes:
        image_id, q = scene["image_id"], scene["questions"]
        qid = image_id * 10
        attr = q["attr"]
        gqa[str(qid + 1)] = {
            "imageId": str(image_id), "question": attr["question"], "answer": attr["answer"],
            "fullAnswer": attr["fullAnswer"], "isBalanced": True,
            "types": {"structural": "query", "semantic": "rel" if attr["template"].startswith("relate") else "attr",
                      "detailed": attr["template"]},
        }
        ex = q["exist"]
        pope[ex["variant"]].append({"question_id": len(pope[ex["variant"]]) + 1, "image": f"{image_id}.png",
                                    "text": ex["question"], "label": ex["answer"]})
        read = q["read"]
        textvqa.append({
            "question_id": qid + 3, "question": read["question"], "image_id": str(image_id),
            "answers": [read["answer"]] * 10, "image_classes": ["sign"], "image_width": cfg.image_size,
            "image_height": cfg.image_size, "set_name": split,
            "question_tokens": re.findall(r"[a-z0-9]+", read["question"].lower()),
        })
        count = q["count"]
        vqa_q.append({"image_id": image_id, "question": count["question"], "question_id": qid + 4})
        word = ("zero", "one", "two", "three", "four", "five")[int(count["answer"])]
        # Ten "humans": eight write the digit, two the number word (the same answer after normalisation).
        answers = [{"answer": count["answer"] if k <= 8 else word, "answer_confidence": "yes", "answer_id": k}
                   for k in range(1, 11)]
        vqa_a.append({"question_id": qid + 4, "image_id": image_id, "question_type": "how many",
                      "answer_type": "number", "multiple_choice_answer": count["answer"], "answers": answers})
        sp = q["spatial"]
        vsr.append({"image": f"{image_id}.png", "caption": sp["caption"], "label": int(sp["label"]),
                    "relation": sp["relation"], "subj": sp["subj"], "obj": sp["obj"]})
    header = {"info": {"description": "SynthVQA count questions (VQAv2 format)", "version": str(FORMAT_VERSION)},
              "license": {"name": "MIT"}, "data_type": "synth", "data_subtype": split}
    out = {
        files["attr"][0]: _json_bytes(gqa),
        files["read"][0]: _json_bytes({"dataset_name": "synthvqa", "dataset_type": split,
                                       "dataset_version": "synth", "data": textvqa}),
        files["count"][0]: _json_bytes({**header, "task_type": "Open-Ended", "questions": vqa_q}),
        files["count"][1]: _json_bytes({**header, "annotations": vqa_a}),
        files["spatial"][0]: _jsonl_bytes(vsr),
    }
    for variant, path in zip(POPE_VARIANTS, files["exist"]):
        out[path] = _jsonl_bytes(pope[variant])
    return out


def _prepare_folder(out: Path) -> None:
    """Make ``out`` ready: new or empty, or a previous SynthVQA folder whose listed files are removed."""
    if not out.exists():
        out.mkdir(parents=True)
        return
    if not out.is_dir():
        raise NotADirectoryError(f"SynthVQA output {out} exists and is not a folder")
    manifest = out / "manifest.json"
    ours: set[str] = set()
    if manifest.is_file():
        previous = json.loads(manifest.read_text())
        if previous.get("name") == "SynthVQA":
            ours = {"manifest.json", *previous["files"]}
    found = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    others = sorted(found - ours)
    if others:
        raise FileExistsError(f"SynthVQA output folder {out} holds files it did not write (e.g. {others[0]}); "
                              "choose an empty or new folder")
    for rel in sorted(found):  # all listed in the earlier manifest, and all inside ``out``
        (out / rel).unlink()


def generate_synthvqa(out: str | Path, config: SynthConfig | None = None,
                      progress: Callable[[int], None] | None = None) -> dict:
    """Write SynthVQA into ``out`` (see the module docstring for the layout) and return its manifest.

    ``progress(n)`` is called after every ``n`` images written. A folder written by an earlier run is replaced
    (the files its manifest lists are removed first); any other non-empty folder is refused.
    """
    cfg = config or SynthConfig()
    out = Path(out)
    _prepare_folder(out)
    (out / IMAGE_DIR).mkdir(exist_ok=True)
    digests: dict[str, str] = {}
    counts: dict[str, dict] = {}

    def write(rel: str, data: bytes) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        digests[rel] = hashlib.sha256(data).hexdigest()

    for split, n in cfg.split_sizes().items():
        plan_counts, plan_exist, plan_spatial = _balanced_plan(random.Random(f"synthvqa/{cfg.seed}/{split}/plan"), n)
        scenes = []
        for i in range(n):
            rng = random.Random(f"synthvqa/{cfg.seed}/{split}/{i}")
            scene = _make_scene(rng, cfg, plan_counts[i], plan_spatial[i])
            scene = {"image_id": _SPLIT_BASE[split] + i, **scene}
            scenes.append(scene)
            write(image_file(scene["image_id"]), _png_bytes(render_scene(scene, cfg.image_size)))
            if progress:
                progress(1)
        _exist_questions(scenes, plan_exist, cfg.seed, split)
        write(f"scenes/{split}.json", _json_bytes({"image_size": cfg.image_size, "grid": GRID, "split": split,
                                                   "scenes": scenes}))
        for rel, data in _annotation_files(split, scenes, cfg).items():
            write(rel, data)
        counts[split] = {"images": n, "questions": {f: n for f in FAMILIES},
                         "pope": {v: sum(e[0] == v for e in plan_exist) for v in POPE_VARIANTS},
                         "files": {f: list(paths) for f, paths in family_files(split).items()}}

    manifest = {"name": "SynthVQA", "format_version": FORMAT_VERSION, "generator": "mambaprune.data.synthvqa",
                "config": asdict(cfg), "splits": counts, "files": dict(sorted(digests.items()))}
    (out / "manifest.json").write_bytes(_json_bytes(manifest, indent=1))
    return manifest


# --- the oracle: answers re-derived from question text and scene ---------------------------------------------------

_ATTRS = {**{s: "shape" for s in SHAPES}, **{_plural(s): "shape" for s in SHAPES}, **{c: "color" for c in COLORS},
          **{z: "size" for z in SIZES}}


def _select(objects: list[dict], phrase: str) -> list[dict]:
    """Objects matching a noun phrase such as "small red circle", "red object", "circles"."""
    wanted = {}
    for word in phrase.split():
        if word in ("object", "objects"):
            continue
        if word not in _ATTRS:
            raise ValueError(f"cannot read the phrase {phrase!r}")
        wanted[_ATTRS[word]] = word[:-1] if _ATTRS[word] == "shape" and word.endswith("s") else word
    return [o for o in objects if all(o[k] == v for k, v in wanted.items())]


def _the(objects: list[dict], phrase: str) -> dict:
    found = _select(objects, phrase)
    if len(found) != 1:
        raise ValueError(f"'the {phrase}' names {len(found)} objects, not one")
    return found[0]


_RELS = "|".join(r[0] for r in RELATIONS)


def _parse_referents(objects: list[dict], family: str, text: str) -> tuple[list[dict], re.Match]:
    """(the objects a spatial or attr question names, its template's match) for :func:`question_referents` and
    :func:`answer_question`; the match's ``relation`` (spatial) or ``asked`` (attr) group says what is asked."""
    if family == "spatial":
        m = re.fullmatch(rf"The (.+) is (?P<relation>{_RELS}) the (.+)\.", text)
        if m:
            return [_the(objects, m.group(1)), _the(objects, m.group(3))], m
    elif family == "attr":
        m = re.fullmatch(rf"What (?P<asked>color|shape) is the object directly ({_RELS}) the (.+)\?", text)
        if m:
            ref = _the(objects, m.group(3))
            _, dr, dc = next(r for r in RELATIONS if r[0] == m.group(2))
            there = [o for o in objects if (o["row"], o["col"]) == (ref["row"] + dr, ref["col"] + dc)]
            if len(there) != 1:
                raise ValueError(f"no object directly {m.group(2)} the {m.group(3)}")
            return [ref, there[0]], m
        m = re.fullmatch(r"What (?P<asked>color|shape|size) is the (.+?)\?", text)
        if m:
            return [_the(objects, m.group(2))], m
    raise ValueError(f"not a SynthVQA {family} question: {text!r}")


def question_referents(scene: dict, family: str, text: str) -> list[dict]:
    """The objects of the scene a question names, in the order that matters to its answer: a spatial caption's
    subject and object; a relational attr question's reference object and the object directly beside it (whose
    attribute is asked); a plain attr question's object; ``[]`` for the other families (they name kinds, not
    objects). Raises ValueError as :func:`answer_question` does."""
    if family not in FAMILIES:
        raise ValueError(f"unknown SynthVQA family {family!r}; known: {', '.join(FAMILIES)}")
    if family not in ("spatial", "attr"):
        return []
    return _parse_referents(scene["objects"], family, text)[0]


def referent_name_spans(scene: dict, family: str, text: str) -> list[tuple[dict, tuple[int, int]]]:
    """``[(object, (start, end))]``: each object a spatial or attr question names in words, with the character
    span of the noun phrase that names it ("red circle" in "The red circle is left of the square."): a spatial
    caption's subject and object; an attr question's object, or a relational one's reference object (the
    object beside it is not named). ``[]`` for the other families; ValueError as :func:`question_referents`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown SynthVQA family {family!r}; known: {', '.join(FAMILIES)}")
    if family not in ("spatial", "attr"):
        return []
    objects, m = _parse_referents(scene["objects"], family, text)
    groups = [g for g in range(1, (m.re.groups or 0) + 1) if g not in m.re.groupindex.values()]
    if family == "attr" and len(objects) == 2:                  # relational: only the reference is spelt out
        return [(objects[0], m.span(groups[-1]))]
    return [(obj, m.span(g)) for obj, g in zip(objects, groups)]


def answer_question(scene: dict, family: str, text: str) -> str:
    """The answer to a SynthVQA question (or, for ``spatial``, the truth of a caption) read off the scene alone.

    Raises ValueError when the text matches no template or a "the ..." phrase does not name exactly one object.
    Returns "true"/"false" for captions, "yes"/"no" for existence, digits for counts.
    """
    objects = scene["objects"]
    if family == "read":
        return scene["code"].lower()
    if family == "count":
        m = re.fullmatch(r"How many (.+) are there\?", text)
        if m:
            return str(len(_select(objects, m.group(1))))
    elif family == "exist":
        m = re.fullmatch(r"Is there an? (.+) in the image\?", text)
        if m:
            return "yes" if _select(objects, m.group(1)) else "no"
    elif family == "spatial":
        (a, b), m = _parse_referents(objects, family, text)
        return "true" if relation_holds(a, b, m.group("relation")) else "false"
    elif family == "attr":
        named, m = _parse_referents(objects, family, text)
        return named[-1][m.group("asked")]
    else:
        raise ValueError(f"unknown SynthVQA family {family!r}; known: {', '.join(FAMILIES)}")
    raise ValueError(f"not a SynthVQA {family} question: {text!r}")
