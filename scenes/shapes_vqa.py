"""shapes-vqa: procedurally drawn scenes and questions that cannot be answered without looking.

A 64x64 image holds 2-5 objects, each in its own cell of a 4x4 grid (jittered inside the
cell): a circle, square or triangle in one of six colours, small or large, on a tinted, noisy
background. Every object has a distinct (colour, shape) pair so it can be named unambiguously.
Questions ask for the colour of the object at a grid place, the count of a shape, whether one
named object is left of / above another, whether a named object exists, and the shape of the
object of a colour. Answers are one word.

Splits come from disjoint seed ranges, so train, validation and test never share a scene.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 64
GRID = 4
CELL = IMAGE_SIZE // GRID
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (150, 60, 190), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
ORDINALS = ("one", "two", "three", "four")  # grid rows/columns are named, not digits
SPLIT_SEEDS = {"train": 0, "validation": 10_000_000, "test": 20_000_000}
QUESTION_TYPES = ("colour_at", "count", "left_of", "above", "exists", "shape_of_colour")

TEMPLATES = {
    "colour_at": ["what colour is the object in row {r} column {c} ?",
                  "which colour does the shape at row {r} , column {c} have ?",
                  "the object in row {r} and column {c} is what colour ?"],
    "count": ["how many {s}s are there ?", "count the {s}s .", "how many {s}s can you see ?"],
    "left_of": ["is the {c1} {s1} left of the {c2} {s2} ?", "is the {c1} {s1} to the left of the {c2} {s2} ?"],
    "above": ["is the {c1} {s1} above the {c2} {s2} ?", "is the {c1} {s1} higher than the {c2} {s2} ?"],
    "exists": ["is there a {c} {s} ?", "can you see a {c} {s} ?", "does the image contain a {c} {s} ?"],
    "shape_of_colour": ["what shape is the {c} object ?", "which shape is {c} ?", "the {c} object is which shape ?"],
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    large: bool
    row: int
    col: int
    cx: int
    cy: int


@dataclass
class Example:
    image: object  # PIL.Image.Image
    question: str
    answer: str
    kind: str
    index: int


CAPTION_PROMPT = "describe the image ."  # training-only turn: every object, its place first


def vocabulary() -> list[str]:
    """Every word a question, answer or training caption can use (the word tokenizer's vocabulary)."""
    words = set(NUMBERS) | set(ORDINALS) | set(COLOURS) | set(SHAPES) | {s + "s" for s in SHAPES} | {"yes", "no"}
    words.update(CAPTION_PROMPT.split())
    for templates in TEMPLATES.values():
        for template in templates:
            words.update(w for w in template.split() if not w.startswith("{"))
    return sorted(words)


def _scene(rng: np.random.Generator) -> list[SceneObject]:
    count = int(rng.integers(2, 6))
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    pairs = rng.choice(len(COLOURS) * len(SHAPES), size=count, replace=False)
    colours = list(COLOURS)
    objects = []
    for cell, pair in zip(cells, pairs):
        row, col = divmod(int(cell), GRID)
        cx = col * CELL + CELL // 2 + int(rng.integers(-2, 3))
        cy = row * CELL + CELL // 2 + int(rng.integers(-2, 3))
        objects.append(SceneObject(SHAPES[pair % 3], colours[pair // 3], bool(rng.random() < 0.5), row, col, cx, cy))
    return objects


def render(objects: list[SceneObject], rng: np.random.Generator):
    from PIL import Image, ImageDraw

    tint = rng.integers(170, 246, 3)
    pixels = np.clip(tint[None, None, :] + rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj, COLOURS[obj.colour])
    return image


def _draw(draw, obj: SceneObject, fill) -> None:
    r = 6 if obj.large else 3
    box = [obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r]
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(obj.cx, obj.cy - r), (obj.cx - r, obj.cy + r), (obj.cx + r, obj.cy + r)], fill=fill)


def _question(kind: str, objects: list[SceneObject], rng: np.random.Generator):
    """(question, answer, [(object, role)]) or None when the scene cannot ask this kind. Roles: 1 for
    the object asked about (or counted, or named first), 2 for the one named second."""
    template = TEMPLATES[kind][int(rng.integers(len(TEMPLATES[kind])))]
    if kind == "colour_at":
        obj = objects[int(rng.integers(len(objects)))]
        return template.format(r=ORDINALS[obj.row], c=ORDINALS[obj.col]), obj.colour, [(obj, 1)]
    if kind == "count":
        shape = SHAPES[int(rng.integers(3))]
        counted = [o for o in objects if o.shape == shape]
        return template.format(s=shape), NUMBERS[len(counted)], [(o, 1) for o in counted]
    if kind in ("left_of", "above"):
        attr = "col" if kind == "left_of" else "row"
        pairs = [(a, b) for a in objects for b in objects if getattr(a, attr) != getattr(b, attr)]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        answer = "yes" if getattr(a, attr) < getattr(b, attr) else "no"
        return template.format(c1=a.colour, s1=a.shape, c2=b.colour, s2=b.shape), answer, [(a, 1), (b, 2)]
    if kind == "exists":
        present = {(o.colour, o.shape) for o in objects}
        if rng.random() < 0.5:
            colour, shape = sorted(present)[int(rng.integers(len(present)))]
            named = [o for o in objects if (o.colour, o.shape) == (colour, shape)]
            return template.format(c=colour, s=shape), "yes", [(o, 1) for o in named]
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = absent[int(rng.integers(len(absent)))]
        return template.format(c=colour, s=shape), "no", []
    unique = [o for o in objects if sum(p.colour == o.colour for p in objects) == 1]
    if not unique:
        return None
    obj = unique[int(rng.integers(len(unique)))]
    return template.format(c=obj.colour), obj.shape, [(obj, 1)]


def example(split: str, index: int) -> Example:
    """The index-th example of a split: deterministic, independent of any other example."""
    rng, objects, (question, answer, kind) = _example_question(split, index)
    return Example(render(objects, rng), question, answer, kind, index)


def question_only(split: str, index: int) -> tuple[str, str, str]:
    """(question, answer, kind) of ``example(split, index)`` without drawing the image."""
    return _example_question(split, index)[2]


def _example_question(split: str, index: int):
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLIT_SEEDS)}")
    rng = np.random.default_rng(SPLIT_SEEDS[split] + index)
    objects = _scene(rng)
    kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    qa = _question(kind, objects, rng)
    while qa is None:  # the scene cannot ask this kind (e.g. no unique colour): fall back in order
        kind = QUESTION_TYPES[(QUESTION_TYPES.index(kind) + 1) % len(QUESTION_TYPES)]
        qa = _question(kind, objects, rng)
    return rng, objects, (qa[0], qa[1], kind)


def examples(split: str, count: int, start: int = 0) -> list[Example]:
    return [example(split, i) for i in range(start, start + count)]


PATCH = 4  # shapes-llava's patch size: label maps are sampled at patch centres
PATCHES_PER_SIDE = IMAGE_SIZE // PATCH


@dataclass
class Scene:
    """One training scene: the image, a question of every kind it can ask, per-patch targets
    and a caption."""

    image: object
    qas: list[tuple[str, str, str]]  # (question, answer, kind)
    patch_classes: np.ndarray  # [PATCHES_PER_SIDE**2] 0 background, else 1 + colour*3 + shape
    patch_centres: np.ndarray  # [PATCHES_PER_SIDE**2] 1 where an object's centre falls
    caption: list[tuple[str, bool]]  # (word, supervised): places are given, what is there is asked
    drill: list[tuple[str, str, str]]  # more questions of every kind, for training rows
    relevance: list[np.ndarray]  # per question of qas + drill: role of each patch (see relevance())
    refs: list[list[tuple[SceneObject, int]]] = field(default_factory=list)  # per question: (object, role)
    cells: np.ndarray | None = None  # [PATCHES_PER_SIDE**2] class of the object in the patch's grid cell


def patch_classes(objects: list[SceneObject]) -> np.ndarray:
    """Per-patch class (row-major): 0 background, else 1 + colour*3 + shape.

    Drawn with the same geometry as ``render``; a training-only auxiliary target so the vision
    tower learns what each patch shows."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    colours = list(COLOURS)
    for obj in objects:
        _draw(draw, obj, 1 + colours.index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape))
    centre = PATCH // 2
    return np.asarray(canvas)[centre::PATCH, centre::PATCH].reshape(-1).astype(np.int64)


def cell_classes(objects: list[SceneObject]) -> np.ndarray:
    """Per-patch class (row-major, as ``patch_classes``) of the object whose grid cell holds the
    patch, 0 for an empty cell: a training-only target that spreads an object's identity over its cell."""
    colours = list(COLOURS)
    grid = np.zeros((GRID, GRID), dtype=np.int64)
    for obj in objects:
        grid[obj.row, obj.col] = 1 + colours.index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)
    per_cell = PATCHES_PER_SIDE // GRID
    return np.repeat(np.repeat(grid, per_cell, 0), per_cell, 1).reshape(-1)


def patch_centres(objects: list[SceneObject]) -> np.ndarray:
    """1 for the patch holding each object's centre (what counting counts), else 0."""
    flags = np.zeros(PATCHES_PER_SIDE * PATCHES_PER_SIDE, dtype=np.int64)
    for obj in objects:
        flags[(obj.cy // PATCH) * PATCHES_PER_SIDE + obj.cx // PATCH] = 1
    return flags


def caption(objects: list[SceneObject]) -> list[tuple[str, bool]]:
    """Objects in reading order as "row R column C colour shape , ...": the place words are
    unsupervised (given), the colour and shape words are what the model must read off the image."""
    words: list[tuple[str, bool]] = []
    for obj in sorted(objects, key=lambda o: (o.row, o.col)):
        if words:
            words.append((",", False))
        words += [("row", False), (ORDINALS[obj.row], False), ("column", False), (ORDINALS[obj.col], False),
                  (obj.colour, True), (obj.shape, True)]
    return words


def relevance(refs) -> np.ndarray:
    """Per-patch role of a question's objects (row-major): 0 not named, 1 asked about / counted /
    named first, 2 named second; the patches whose centre the drawing covers and the patch of the
    object's centre (a small object may cover no patch centre). Training-only target."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    for obj, role in refs:
        _draw(draw, obj, role)
    centre = PATCH // 2
    roles = np.asarray(canvas)[centre::PATCH, centre::PATCH].reshape(-1).astype(np.int64)
    for obj, role in refs:
        roles[(obj.cy // PATCH) * PATCHES_PER_SIDE + obj.cx // PATCH] = role
    return roles


def scene(split: str, index: int, drill: int = 0) -> Scene:
    """The index-th scene of a split with a question of every kind it can ask (in random order),
    and ``drill`` more rounds of such questions (drawn after, so the rest does not depend on it).

    Training packs these as one multi-turn conversation, so the image is encoded once for
    many supervised answers."""
    rng = np.random.default_rng(SPLIT_SEEDS[split] + index)
    objects = _scene(rng)
    image = render(objects, rng)
    qas, more, roles, refs = [], [], [], []
    for round_ in range(1 + drill):
        for kind in rng.permutation(QUESTION_TYPES):
            qa = _question(str(kind), objects, rng)
            if qa is not None:
                (more if round_ else qas).append((qa[0], qa[1], str(kind)))
                roles.append(relevance(qa[2]))
                refs.append(qa[2])
    return Scene(image, qas, patch_classes(objects), patch_centres(objects), caption(objects), more, roles, refs,
                 cell_classes(objects))
