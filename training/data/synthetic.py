"""A small synthetic data set in Market-1501's layout, for demos and tests without real data.

Each identity is a figure with its own clothing: upper and lower body colours, an upper-body pattern (plain,
horizontal or vertical stripes, checks) in a second colour, hair colour, build and an optional bag. Each camera has
its own lighting (a colour cast and a brightness) and background; every image adds a pose jitter, noise and, at
times, a random occluder. Half the identities train, the other half are split into queries (one per camera) and
gallery, which also holds junk (``-1``) and distractor (``0000``) images, as Market-1501's does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.market1501 import SPLIT_DIRS

logger = logging.getLogger(__name__)

PATTERNS = ("plain", "hstripes", "vstripes", "checks")


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _identity(rng: np.random.Generator) -> dict:
    return {
        "upper": _colour(rng),
        "lower": _colour(rng),
        "second": _colour(rng),
        "pattern": PATTERNS[int(rng.integers(len(PATTERNS)))],
        "period": int(rng.integers(2, 5)),  # stripe period in 1/16ths of the height
        "hair": _colour(rng) * 0.4,
        "skin": np.array([224, 172, 105], np.float32) * rng.uniform(0.5, 1.1),
        "width": rng.uniform(0.45, 0.7),  # body width as a fraction of the image width
        "bag": _colour(rng) if rng.random() < 0.4 else None,
    }


def _camera(rng: np.random.Generator) -> dict:
    return {
        "cast": rng.uniform(0.65, 1.3, size=3).astype(np.float32),  # per-channel gain: the lighting's colour
        "brightness": rng.uniform(-35, 35),
        "background": _colour(rng) * 0.6 + 50,
    }


def _draw(person: dict, camera: dict, size: tuple[int, int], rng: np.random.Generator, occlude: bool) -> np.ndarray:
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.empty((h, w, 3), np.float32)
    image[:] = camera["background"]
    image += rng.normal(0, 12, size=(1, 1, 3)) + (ys[..., None] / h) * rng.normal(0, 25)  # a background gradient
    cx = w / 2 + rng.uniform(-0.08, 0.08) * w  # pose jitter
    top = rng.uniform(0.02, 0.08) * h
    scale = rng.uniform(0.9, 1.05)
    half = person["width"] * w / 2 * scale
    head_r = 0.07 * h * scale
    head_cy = top + head_r
    neck = head_cy + head_r
    waist = neck + 0.38 * h * scale
    feet = min(h - 1.0, waist + 0.45 * h * scale)
    head = (xs - cx) ** 2 + (ys - head_cy) ** 2 <= head_r**2
    hair = head & (ys < head_cy - head_r * 0.3)
    upper = (np.abs(xs - cx) <= half) & (ys >= neck) & (ys < waist)
    lower = (np.abs(xs - cx) <= half * 0.8) & (ys >= waist) & (ys <= feet) & (np.abs(xs - cx) >= half * 0.08)
    image[head] = person["skin"]
    image[hair] = person["hair"]
    pattern_colour = person["upper"].copy()
    period = person["period"] * h / 16
    stripes = {
        "plain": np.zeros_like(ys, dtype=bool),
        "hstripes": ((ys - neck) // (period / 2)) % 2 == 1,
        "vstripes": ((xs - cx + half) // (period / 2)) % 2 == 1,
        "checks": (((ys - neck) // (period / 2)) + ((xs - cx + half) // (period / 2))) % 2 == 1,
    }[person["pattern"]]
    image[upper] = pattern_colour
    image[upper & stripes] = person["second"]
    image[lower] = person["lower"]
    if person["bag"] is not None:
        side = 1 if rng.random() < 0.5 else -1
        bag = (np.abs(xs - (cx + side * half * 1.05)) <= 0.1 * w) & (ys >= neck + 0.15 * h) & (ys < waist + 0.05 * h)
        image[bag] = person["bag"]
    if occlude:  # something between the camera and the person: a box over part of the body
        oh, ow = rng.uniform(0.2, 0.4) * h, rng.uniform(0.3, 0.8) * w
        oy, ox = rng.uniform(0.3, 1.0) * h - oh, rng.uniform(0, w - ow)
        image[(ys >= oy) & (ys < oy + oh) & (xs >= ox) & (xs < ox + ow)] = _colour(rng)
    image = image * camera["cast"] + camera["brightness"]
    image += rng.normal(0, 8, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def generate_synthetic_market1501(
    root: Path,
    num_ids: int = 60,
    images_per_id: int = 8,
    num_cams: int = 4,
    seed: int = 0,
    size: tuple[int, int] = (128, 64),
) -> Path:
    """Write the data set under ``root`` (bounding_box_train/, query/, bounding_box_test/); returns ``root``.

    Deterministic from ``seed``. Identities 1..num_ids/2 train; the others give one query per camera (images are
    spread over the cameras in turn) and the rest of their images to the gallery, with ``num_ids // 2``
    distractors (``0000``) and ``num_ids // 4`` junk images (``-1``, background and fragments).
    """
    if num_ids < 4 or images_per_id < 2 or not 2 <= num_cams <= 6:
        raise ValueError(
            f"need num_ids >= 4, images_per_id >= 2 and 2 <= num_cams <= 6 (Market-1501 names), "
            f"got {num_ids}, {images_per_id}, {num_cams}"
        )
    root = Path(root)
    rng = np.random.default_rng(seed)
    dirs = {split: root / d for split, d in SPLIT_DIRS.items()}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.jpg"):  # a re-run with other arguments must not leave stale images
            old.unlink()
    cameras = [_camera(rng) for _ in range(num_cams)]
    frame = 0

    def save(array: np.ndarray, split: str, pid: int, cam: int) -> None:
        nonlocal frame
        frame += 1
        name = f"{pid:04d}_c{cam + 1}s1_{frame:06d}_00.jpg" if pid >= 0 else f"-1_c{cam + 1}s1_{frame:06d}_00.jpg"
        Image.fromarray(array).save(dirs[split] / name, quality=92)

    num_train = num_ids // 2
    for pid in range(1, num_ids + 1):
        person = _identity(rng)
        queried: set[int] = set()
        for j in range(images_per_id):
            cam = (j + pid) % num_cams
            image = _draw(person, cameras[cam], size, rng, occlude=rng.random() < 0.3)
            if pid <= num_train:
                split = "train"
            elif cam not in queried and j < images_per_id - 1 and images_per_id > num_cams:
                split = "query"
                queried.add(cam)
            else:
                split = "gallery"
            save(image, split, pid, cam)
    for _ in range(num_ids // 2):  # distractors: other people, each seen once
        cam = int(rng.integers(num_cams))
        save(_draw(_identity(rng), cameras[cam], size, rng, occlude=rng.random() < 0.3), "gallery", 0, cam)
    for _ in range(num_ids // 4):  # junk: an empty background or a fragment of a person
        cam = int(rng.integers(num_cams))
        image = _draw(_identity(rng), cameras[cam], size, rng, occlude=False)
        if rng.random() < 0.5:
            image = np.array(Image.fromarray(image[: size[0] // 3]).resize((size[1], size[0])))
        else:
            image[:] = np.clip(cameras[cam]["background"] * cameras[cam]["cast"], 0, 255).astype(np.uint8)
        save(image, "gallery", -1, cam)
    logger.info("wrote a synthetic Market-1501 layout with %d identities to %s", num_ids, root)
    return root
