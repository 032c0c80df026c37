"""The embedded world: procedural subjects, contexts, renders and prompts (METHOD.md section 7).

A *subject* is an identity (class, body colour, pattern with colour/scale/angle, a small mark with colour and
corner). A *context* is what a prompt asks for (background, position, size). Renders are numpy uint8 arrays
(H, W, 3); every random choice comes from a `numpy.random.Generator` the caller seeds, so the world is a
pure function of its seeds.

- reference: the subject alone, centred, on a plain light background, at the size its target uses
  (copying becomes a translation, METHOD.md section 8);
- target: the subject in the prompted context, with a jitter of up to `jitter` pixels;
- prompt: names the class and the context, never the identity details; the generic prompt names the class
  only ("a photo of a {class}", the world's version of CDNS's text degradation).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# Vocabulary of the world
# ---------------------------------------------------------------------------------------------------------
CLASSES = ("circle", "square", "triangle", "diamond")
BODY_COLORS = {"red": (215, 45, 45), "green": (45, 165, 70), "blue": (45, 85, 215),
               "yellow": (230, 200, 40), "purple": (145, 60, 185), "orange": (240, 130, 30)}
PATTERNS = ("stripes", "dots", "checker", "rings")
PATTERN_COLORS = {"white": (248, 248, 248), "black": (15, 15, 15), "cyan": (40, 225, 235)}
PATTERN_SCALES = (4.0, 6.0)           # period in pixels at 32 px
PATTERN_ANGLES = (0, 45, 90, 135)     # degrees
MARK_CORNERS = ("top left", "top right", "bottom left", "bottom right")
MARK_COLORS = {"white": (248, 248, 248), "black": (15, 15, 15), "pink": (255, 105, 200)}

BACKGROUNDS = {  # name -> prompt phrase
    "sky": "in the sky", "grass": "on the grass", "sand": "on the sand",
    "snow": "in the snow", "night": "at night", "brick": "by a brick wall"}
POSITIONS = {"left": 0.25, "center": 0.5, "right": 0.75}   # x centre as a fraction of the width
POSITION_PHRASES = {"left": "on the left", "center": "in the middle", "right": "on the right"}
SIZES = {"small": 0.19, "large": 0.28}                       # radius as a fraction of the width
REFERENCE_BACKGROUND = (190, 190, 190)

# Every field of a Subject (in its order) and of a Context, with its values: the dataclasses below hold indices
# into these. Sampling and one-field changes (near misses, swapped context attributes) read them from here.
SUBJECT_FIELDS = {"cls": CLASSES, "body_color": tuple(BODY_COLORS), "pattern": PATTERNS,
                  "pattern_color": tuple(PATTERN_COLORS), "pattern_scale": PATTERN_SCALES,
                  "pattern_angle": PATTERN_ANGLES, "mark_corner": MARK_CORNERS, "mark_color": tuple(MARK_COLORS)}
CONTEXT_ATTRS = {"background": tuple(BACKGROUNDS), "position": tuple(POSITIONS), "size": tuple(SIZES)}
# Attributes the judges read and the metrics score: identity (id_acc) and context (ctx_acc).
IDENTITY_ATTRS = {k: SUBJECT_FIELDS[k] for k in ("cls", "body_color", "pattern", "pattern_color", "mark_corner",
                                                 "mark_color")}
ATTRS = {**IDENTITY_ATTRS, **CONTEXT_ATTRS}
FIELDS = {**SUBJECT_FIELDS, **CONTEXT_ATTRS}


@dataclass(frozen=True)
class Subject:
    """Identity of one subject; every field is an index into the tables above."""
    cls: int
    body_color: int
    pattern: int
    pattern_color: int
    pattern_scale: int
    pattern_angle: int
    mark_corner: int
    mark_color: int

    @property
    def key(self) -> tuple[int, ...]:
        return tuple(asdict(self).values())

    @property
    def class_name(self) -> str:
        return CLASSES[self.cls]


@dataclass(frozen=True)
class Context:
    background: int
    position: int
    size: int


def sample_subject(rng: np.random.Generator) -> Subject:
    return Subject(**{k: int(rng.integers(len(v))) for k, v in SUBJECT_FIELDS.items()})


def sample_subjects(rng: np.random.Generator, n: int, exclude: set | frozenset = frozenset()) -> list[Subject]:
    """`n` distinct subjects whose identity keys are not in `exclude` (e.g. the bench's)."""
    seen, out = set(exclude), []
    while len(out) < n:
        s = sample_subject(rng)
        if s.key not in seen:
            seen.add(s.key)
            out.append(s)
    return out


def sample_context(rng: np.random.Generator) -> Context:
    return Context(**{k: int(rng.integers(len(v))) for k, v in CONTEXT_ATTRS.items()})


def with_other_value(obj: Subject | Context, field: str, rng: np.random.Generator) -> Subject | Context:
    """`obj` with `field` set to another of its values, drawn uniformly, all else kept: one identity error (a
    near miss) for a Subject, one swapped context attribute (a hallucinated caption) for a Context."""
    return next(other_values(obj, field, rng))


def other_values(obj: Subject | Context, field: str, rng: np.random.Generator) -> Iterator[Subject | Context]:
    """`obj` with each other value of `field`, starting from one drawn uniformly (one draw, made now) and going on
    to the next values in turn, cyclically, skipping `obj`'s own: a fallback order for a drawn value that is ruled
    out. Lazy: each is built when asked for."""
    n, own = len(FIELDS[field]), getattr(obj, field)
    first = int(rng.integers(1, n))                     # offset from own, in 1..n-1
    return (replace(obj, **{field: (own + 1 + (first - 1 + j) % (n - 1)) % n}) for j in range(n - 1))


def all_contexts() -> list[Context]:
    return [Context(b, p, s) for b in range(len(BACKGROUNDS)) for p in range(len(POSITIONS))
            for s in range(len(SIZES))]


# ---------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------
def prompt(subject: Subject, ctx: Context) -> str:
    """Class and context, never the identity details: 'a small circle in the sky on the left'."""
    return f"a {tuple(SIZES)[ctx.size]} {subject.class_name} {_context_phrase(ctx)}"


def _context_phrase(ctx: Context) -> str:
    return f"{tuple(BACKGROUNDS.values())[ctx.background]} {tuple(POSITION_PHRASES.values())[ctx.position]}"


def generic_prompt(subject: Subject) -> str:
    """CDNS's degraded text condition in the world: 'a photo of a {class}'."""
    return f"a photo of a {subject.class_name}"


def caption(subject: Subject, ctx: Context | None = None) -> str:
    """Full caption (identity and context) used to train the CLIP stand-in."""
    ident = (f"a {tuple(BODY_COLORS)[subject.body_color]} {subject.class_name} with "
             f"{tuple(PATTERN_COLORS)[subject.pattern_color]} {PATTERNS[subject.pattern]} and a "
             f"{tuple(MARK_COLORS)[subject.mark_color]} mark at the {MARK_CORNERS[subject.mark_corner]}")
    if ctx is None:
        return ident
    return f"a {tuple(SIZES)[ctx.size]} {ident[2:]} {_context_phrase(ctx)}"


def vocabulary() -> list[str]:
    """Every word any prompt or caption of the world can use, sorted (the tokenizers' vocabulary)."""
    words = {"a", "photo", "of", "with", "and", "mark", "at", "the", "on"}
    for table in (CLASSES, BODY_COLORS, PATTERNS, PATTERN_COLORS, MARK_COLORS, SIZES):
        words.update(table)
    for phrase in (*MARK_CORNERS, *BACKGROUNDS.values(), *POSITION_PHRASES.values()):
        words.update(phrase.split())
    return sorted(words)


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------
def _background(name: str, size: int) -> np.ndarray:
    """Fixed procedural textures (the same for every image): (H, W, 3) float in [0, 255]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    tex = np.random.default_rng(7).random((size, size)).astype(np.float32)   # fixed texture noise
    if name == "sky":
        top, bottom = np.array([90, 150, 230]), np.array([185, 220, 250])
        return top * (1 - y[..., None]) + bottom * y[..., None]
    if name == "grass":
        return np.array([55, 135, 45]) + 40 * (tex[..., None] - 0.5) * np.array([0.5, 1.0, 0.5])
    if name == "sand":
        return np.array([215, 185, 125]) + 30 * (tex[..., None] - 0.5)
    if name == "snow":
        return np.array([232, 238, 248]) + 12 * (tex[..., None] - 0.5)
    if name == "night":
        stars = (tex > 0.97)[..., None] * 180.0
        return np.array([18, 22, 55]) + stars
    if name == "brick":
        row = np.floor(y * 8)
        mortar = (np.mod(y * 8, 1) < 0.16) | (np.mod(x * 4 + 0.5 * np.mod(row, 2), 1) < 0.08)
        return np.where(mortar[..., None], np.array([200, 195, 185]), np.array([150, 60, 40]))
    raise KeyError(name)


_BACKGROUND_CACHE: dict[tuple[str, int], np.ndarray] = {}


def background(name: str, size: int) -> np.ndarray:
    if (name, size) not in _BACKGROUND_CACHE:
        _BACKGROUND_CACHE[(name, size)] = np.clip(_background(name, size), 0, 255).astype(np.float32)
    return _BACKGROUND_CACHE[(name, size)]


def _shape_mask(cls: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if cls == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if cls == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if cls == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if cls == "triangle":   # pointing up, base at the bottom
        return (dy <= 0.8 * r) & (dy >= -r) & (np.abs(dx) <= 0.55 * (dy + r))
    raise KeyError(cls)


def _pattern_mask(pattern: str, dx: np.ndarray, dy: np.ndarray, period: float, angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    u = dx * np.cos(a) + dy * np.sin(a)
    v = -dx * np.sin(a) + dy * np.cos(a)
    if pattern == "stripes":
        return np.mod(u, period) < period / 2
    if pattern == "checker":
        return (np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2 == 0
    if pattern == "dots":
        cu, cv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        return cu ** 2 + cv ** 2 <= (period / 3.2) ** 2
    if pattern == "rings":
        return np.mod(np.sqrt(dx ** 2 + dy ** 2), period) < period / 2
    raise KeyError(pattern)


def render(subject: Subject, ctx: Context, size: int = 32, jitter: tuple[float, float] = (0.0, 0.0),
           reference: bool = False, reference_size: str = "target") -> tuple[np.ndarray, np.ndarray]:
    """Render `subject` in `ctx`; with `reference=True`, alone and centred on a plain background, at the
    size `ctx` asks for (`reference_size="target"`: copying is a translation) or at the mean size ("fixed").

    Returns (image uint8 (H, W, 3), subject mask bool (H, W)). `jitter` shifts the subject by (dx, dy) px.
    """
    s = size / 32.0   # the pattern tables are in pixels at 32 px
    fixed = reference and reference_size == "fixed"
    r = (np.mean(tuple(SIZES.values())) if fixed else tuple(SIZES.values())[ctx.size]) * size
    if reference:
        cx, cy = size / 2, size / 2
        bg = np.broadcast_to(np.array(REFERENCE_BACKGROUND, np.float32), (size, size, 3))
    else:
        cx = tuple(POSITIONS.values())[ctx.position] * size + jitter[0]
        cy = size / 2 + jitter[1]
        bg = background(tuple(BACKGROUNDS)[ctx.background], size)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    body = _shape_mask(subject.class_name, dx, dy, r)
    pat = body & _pattern_mask(PATTERNS[subject.pattern], dx, dy, PATTERN_SCALES[subject.pattern_scale] * s,
                               PATTERN_ANGLES[subject.pattern_angle])
    # the mark: a solid square of ~3-4 px at the chosen corner of the body, drawn over body and pattern
    sx, sy = {0: (-1, -1), 1: (1, -1), 2: (-1, 1), 3: (1, 1)}[subject.mark_corner]
    mx, my = cx + sx * 0.42 * r, cy + sy * 0.42 * r + (0.25 * r if subject.class_name == "triangle" else 0)
    half = max(1.5, 0.13 * r)
    mark = (np.abs(x - mx) <= half) & (np.abs(y - my) <= half)
    img = np.array(bg, dtype=np.float32, copy=True)
    img[body] = tuple(BODY_COLORS.values())[subject.body_color]
    img[pat] = tuple(PATTERN_COLORS.values())[subject.pattern_color]
    img[mark] = tuple(MARK_COLORS.values())[subject.mark_color]
    return np.clip(img, 0, 255).astype(np.uint8), body | mark


def attribute_labels(subject: Subject, ctx: Context) -> dict[str, int]:
    """The labels the attribute reader is trained on and the metrics compare against."""
    return {**{k: getattr(subject, k) for k in IDENTITY_ATTRS},
            "background": ctx.background, "position": ctx.position, "size": ctx.size}
