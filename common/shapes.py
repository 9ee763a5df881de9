"""The built-in synthetic data: coloured shapes on a plain background and sentences that refer to
exactly one of them, by attribute ("the red circle"), by position in a group ("the triangle on
the left") or by relation to another shape ("the square below the green circle"). Samples are
generated from (seed, split, index): every process and every run sees the same data."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 220),
           "yellow": (235, 205, 35), "purple": (145, 60, 190)}
KINDS = ("circle", "square", "triangle", "diamond")
SIZES = {"small": (0.09, 0.12), "big": (0.15, 0.2)}  # radius as a fraction of the image side
ATTRIBUTE_SETS = (("kind",), ("colour", "kind"), ("colour",), ("size", "kind"),
                  ("size", "colour", "kind"))


# (axis, sign, words): the target is the extreme of its group along the axis
EXTREMES = (("x", -1, ("on the left", "leftmost")), ("x", 1, ("on the right", "rightmost")),
            ("y", -1, ("at the top", "topmost")), ("y", 1, ("at the bottom", "bottom")))
RELATIONS = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}


# what a sentence needs: attributes only, the extreme of a group, or a relation to another shape
SENTENCE_TYPES = ("attribute", "position", "relation")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def _phrase(attrs: dict) -> str:
    words = [attrs[k] for k in ("size", "colour") if k in attrs]
    return " ".join(words + [attrs.get("kind", "shape" if words else "shape")])


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if kind == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None  # circle


class ShapesDataset(Dataset):
    """Deterministic synthetic referring segmentation: 2-6 shapes on a textured background.

    Each sample is generated from (seed, split, index) alone, so every process and every run sees
    the same data. The sentence picks out exactly one shape by its attributes ("the big red
    circle"), its position within a group ("the triangle on the left", "the leftmost blue
    shape") or its relation to another shape ("the square below the green circle"). Masks are
    exact; with `instances`, every shape's mask is in `instances` (MaIL's oracle candidates),
    without it samples carry none (target_index -1). Without `images` samples carry the image's
    size (`image_hw`) instead of the image (it is still rendered: it shares the masks' draws).
    """

    MEMO_BYTES = 1 << 30

    def __init__(self, split: str = "train", num_samples: int = 2000, image_size: int = 128,
                 seed: int = 0, instances: bool = True, images: bool = True):
        if split not in SPLIT_CODES:
            raise ValueError(f"shapes has splits {tuple(SPLIT_CODES)}, not {split!r}")
        self.split, self.num_samples, self.size, self.seed = split, num_samples, image_size, seed
        self.with_instances, self.with_images = instances, images
        self.name = f"shapes/{split}"
        # rendered samples are kept in memory (rendering is ~10% of a tiny training step on CPU)
        # up to MEMO_BYTES per process; a fresh dict each time, whose arrays are shared: do not
        # modify them in place (Preprocess never does)
        self._memo: dict[int, dict] = {}
        self._memo_bytes = 0

    def __len__(self) -> int:
        return self.num_samples

    def _scene(self, i: int):
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], i])
        while True:  # a scene without any unambiguous sentence is redrawn (rare)
            objects = self._place(rng)
            target = int(rng.integers(len(objects)))
            described = self._describe(objects, target, rng)
            if described is not None:
                return rng, objects, target, *described

    def sentence(self, i: int) -> str:
        """Sample i's sentence, without rendering its image."""
        return self._scene(i)[3]

    def image_key(self, i: int) -> str:
        """Sample i's `image_key`, without rendering it."""
        return f"shapes/{self.split}/{self.seed}/{self.size}/{i}"

    def __getitem__(self, i: int) -> dict:
        if i in self._memo:
            return dict(self._memo[i])
        rng, objects, target, sentence, sentence_type = self._scene(i)
        image, instances = self._render(objects, rng)
        sample = dict(image=image, sentence=sentence, mask=instances[target], instances=instances,
                      sentence_type=sentence_type, target_index=target, image_id=i,
                      image_key=self.image_key(i))
        if not self.with_instances:  # the target's own copy: the memo keeps no other mask
            sample.update(mask=instances[target].copy(), target_index=-1)
            del sample["instances"]
        if not self.with_images:
            sample["image_hw"] = image.shape[:2]
            del sample["image"]
        size = sum(v.nbytes for v in sample.values() if isinstance(v, np.ndarray))
        if self._memo_bytes + size <= self.MEMO_BYTES:
            self._memo[i], self._memo_bytes = sample, self._memo_bytes + size
        return dict(sample)

    def _place(self, rng) -> list[dict]:
        n = int(rng.integers(2, 7))
        objects: list[dict] = []
        for _ in range(200):
            if len(objects) == n:
                break
            size = str(rng.choice(list(SIZES)))
            r = rng.uniform(*SIZES[size]) * self.size
            cx, cy = rng.uniform(r + 2, self.size - r - 2, size=2)
            if all(math.hypot(cx - o["cx"], cy - o["cy"]) > r + o["r"] + 3 for o in objects):
                objects.append(dict(kind=str(rng.choice(KINDS)),
                                    colour=str(rng.choice(list(COLOURS))),
                                    size=size, cx=cx, cy=cy, r=r))
        return objects

    def _describe(self, objects: list[dict], t: int, rng) -> tuple[str, str] | None:
        """(sentence, its type in SENTENCE_TYPES) naming objects[t] alone, or None."""
        target, margin = objects[t], 0.05 * self.size
        found: dict[str, list[str]] = {k: [] for k in SENTENCE_TYPES}

        def group(attrs):
            return [o for o in objects if all(o[k] == v for k, v in attrs.items())]

        def extreme(members, axis, sign):  # target beats every other member by a margin
            return all(sign * (target["c" + axis] - o["c" + axis]) > margin
                       for o in members if o is not target)

        unique_refs = []  # other objects that attributes alone identify
        for keys in ATTRIBUTE_SETS + ((),):
            attrs = {k: target[k] for k in keys}
            members = group(attrs)
            if len(members) == 1:
                found["attribute"].append(f"the {_phrase(attrs)}")
            elif len(members) >= 2:
                for axis, sign, (after, before) in EXTREMES:
                    if extreme(members, axis, sign):
                        found["position"].append(f"the {_phrase(attrs)} {after}")
                        if keys:
                            found["position"].append(f"the {before} {_phrase(attrs)}")
        for o in objects:
            if o is target:
                continue
            for keys in ATTRIBUTE_SETS[:2]:
                attrs = {k: o[k] for k in keys}
                if len(group(attrs)) == 1:
                    unique_refs.append((o, attrs))
                    break
        for ref, ref_attrs in unique_refs:
            for keys in ATTRIBUTE_SETS[:2] + ((),):
                attrs = {k: target[k] for k in keys}
                members = [o for o in group(attrs) if o is not ref]
                if len(members) < 2:
                    continue  # attributes alone would do
                for rel, (axis, sign) in RELATIONS.items():
                    hits = [o for o in members
                            if sign * (o["c" + axis] - ref["c" + axis]) > o["r"] + ref["r"]]
                    if hits == [target]:
                        found["relation"].append(
                            f"the {_phrase(attrs)} {rel} the {_phrase(ref_attrs)}")
        stypes = [k for k in SENTENCE_TYPES if found[k]]
        if not stypes:
            return None
        weights = np.array([{"attribute": 0.6, "position": 0.25, "relation": 0.15}[k]
                            for k in stypes])
        stype = stypes[int(rng.choice(len(stypes), p=weights / weights.sum()))]
        return str(rng.choice(found[stype])), stype

    def _render(self, objects: list[dict], rng) -> tuple[np.ndarray, np.ndarray]:
        s = self.size
        # textured background: a smooth random field, faint stripes and pixel noise, all greyish
        coarse = rng.normal(0, 1, size=(5, 5, 1))
        field = np.asarray(Image.fromarray(((coarse - coarse.min()) / (np.ptp(coarse) + 1e-6)
                                            * 255).astype(np.uint8)[:, :, 0])
                           .resize((s, s), Image.BICUBIC),
                           dtype=np.float32)[:, :, None] / 255.0
        yy, xx = np.mgrid[0:s, 0:s]
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 16)
        stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        tint = rng.uniform(90, 170) + rng.uniform(-12, 12, size=3)
        bg = tint + 40 * (field - 0.5) + 6 * stripes[:, :, None] + rng.normal(0, 5, size=(s, s, 3))
        image = bg
        instances = np.zeros((len(objects), s, s), dtype=bool)
        for k, o in enumerate(objects):
            canvas = Image.new("L", (s, s), 0)
            draw = ImageDraw.Draw(canvas)
            poly = _shape_polygon(o["kind"], o["cx"], o["cy"], o["r"])
            if poly is None:
                draw.ellipse([o["cx"] - o["r"], o["cy"] - o["r"],
                              o["cx"] + o["r"], o["cy"] + o["r"]],
                             fill=255)
            else:
                draw.polygon(poly, fill=255)
            instances[k] = np.asarray(canvas) > 0
            colour = np.array(COLOURS[o["colour"]]) + rng.uniform(-15, 15, size=3)
            shade = 1 + 0.08 * (field[:, :, 0] - 0.5)[:, :, None]  # a little lighting
            image = np.where(instances[k][:, :, None], colour * shade, image)
        return np.clip(image, 0, 255).astype(np.uint8), instances
