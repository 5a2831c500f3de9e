"""Images in class folders ("images:DIR"), the layout of Keras' ``image_dataset_from_directory``.

    images:DIR                      DIR/<class>/*.{png,jpg,jpeg,bmp,gif}
    images:DIR?scale=255&train_per_class=1000&eval_per_class=100

* **Splits.** When ``DIR/train`` and ``DIR/test`` (or ``DIR/val``) exist they are the
  train/calibration and evaluation splits; otherwise the class folders are in ``DIR`` and the last
  20% of each class's files (sorted by name) form the evaluation split. Classes are the sorted
  folder names (CIFAR-10's folders give its standard label order). Files are sorted by name and
  interleaved class by class (the first file of every class, then the second, ...), so the same
  folder always gives the same arrays and every prefix (calibration takes one) holds every class.
* **Size and colour.** Every image is resized (Pillow, bilinear) to the model's input height and
  width and converted to its channels (1: grayscale, 3: RGB). Without a model shape, the first
  image's size and RGB are used.
* **Scale** (``scale=``): ``1`` (default) divides by 255 (values 0..1), ``255`` keeps 0..255,
  ``-1`` maps to -1..1 (Keras' MobileNet preprocessing). Which one was used is in the provenance;
  pick the one the model was trained with.
* **Limits**: ``train_per_class`` / ``eval_per_class`` keep the first N files of each class per
  split (all by default): CIFAR-10's 10,000 test JPEGs took 10.3 s to decode and resize (Pillow,
  one process on a shared 2-core machine), so its 50,000 training JPEGs take about a minute.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl

import numpy as np

from toolchain.data.dataset import Dataset
from toolchain.errors import ConfigError, DataError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
SCALES = {"1": (1 / 255.0, 0.0, "0..1 (pixel / 255)"), "255": (1.0, 0.0, "0..255 (raw pixels)"),
          "-1": (1 / 127.5, -1.0, "-1..1 (pixel / 127.5 - 1)")}
OPTIONS = ("scale", "train_per_class", "eval_per_class")
#: share of each class's files held out for evaluation when the folder has no train/test split
EVAL_SHARE = 0.2


def _options(text: str) -> Dict[str, str]:
    opts = dict(parse_qsl(text, keep_blank_values=True))
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"images: unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    if opts.get("scale", "1") not in SCALES:
        raise ConfigError(f"images: scale={opts['scale']!r} is not one of {', '.join(SCALES)} "
                          "(0..1, 0..255 or -1..1 pixels); pick the range the model was trained on")
    for key in ("train_per_class", "eval_per_class"):
        if key in opts and (not opts[key].isdigit() or int(opts[key]) <= 0):
            raise ConfigError(f"images: {key}={opts[key]!r} is not a positive integer")
    return opts


def _classes(root: Path) -> Dict[str, List[Path]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = {f.name: sorted(q for q in f.iterdir() if q.is_file() and q.suffix.lower() in SUFFIXES)
               for f in folders}
    if not classes:
        raise DataError(f"images folder {root} has no class sub-folders; put each class's images in "
                        "DIR/<class>/ (or DIR/train/<class>/ and DIR/test/<class>/)")
    empty = [c for c, files in classes.items() if not files]
    if empty:
        raise DataError(f"images folder {root}: class folder(s) {', '.join(empty)} hold no "
                        f"{'/'.join(SUFFIXES)} files; remove them or add images")
    return classes


def _read(files: Sequence[Path], size: Tuple[int, int], channels: int, scale: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    mode = {1: "L", 3: "RGB"}[channels]
    out = np.empty((len(files), size[0], size[1], channels), np.float32)
    mul, add, _ = SCALES[scale]
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                a = np.asarray(im, np.float32)
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"cannot read image {f} ({type(e).__name__}: {e}); remove or replace the file") from None
        out[i] = (a.reshape(size[0], size[1], channels) * mul + add)
    return out


def load_images(path: str, input_shape: Optional[Sequence[int]] = None) -> Dataset:
    text, _, query = path.partition("?")
    opts = _options(query)
    root = Path(text).expanduser()
    if not root.is_dir():
        raise DataError(f"images folder {root} does not exist; pass images:DIR with class sub-folders")
    test = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test is not None:
        train, evaluation = _classes(root / "train"), _classes(test)
        if list(train) != list(evaluation):
            raise DataError(f"images folder {root}: train/ has classes {', '.join(train)} but {test.name}/ has "
                            f"{', '.join(evaluation)}; both splits need the same class folders")
        split = f"{root / 'train'} as train/calibration, {test} as eval"
    else:
        files = _classes(root)
        train, evaluation = {}, {}
        for c, fs in files.items():
            n_eval = int(round(len(fs) * EVAL_SHARE)) if len(fs) > 1 else 0
            train[c], evaluation[c] = fs[: len(fs) - n_eval], fs[len(fs) - n_eval:]
        split = f"{root}: the last {EVAL_SHARE:.0%} of each class's files (sorted) as eval, the rest as train"
    for key, split_files in (("train_per_class", train), ("eval_per_class", evaluation)):
        if key in opts:
            for c in split_files:
                split_files[c] = split_files[c][: int(opts[key])]
    if input_shape is not None:
        if any(d is None for d in input_shape):
            raise DataError(f"images: the model takes samples of shape {tuple(input_shape)} (not fixed), so "
                            "there is no size to resize the images to; give the model a fixed input size")
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != 3 or shape[2] not in (1, 3):
            raise DataError(f"images: the model takes samples of shape {shape}, but images load as "
                            "(height, width, 1 or 3); use a model with an image input")
        size, channels = shape[:2], shape[2]
    else:
        from PIL import Image, UnidentifiedImageError

        first = next(iter(train.values()))[0]
        try:
            with Image.open(first) as im:
                size, channels = (im.size[1], im.size[0]), 3
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"cannot read image {first} ({type(e).__name__}: {e}); remove or replace the file") from None
    scale = opts.get("scale", "1")
    names = tuple(train)

    def arrays(split_files):
        # round-robin over the classes (1st file of each class, then the 2nd, ...): calibration
        # takes a prefix of the train split, and a prefix must hold every class, not only the first
        order = sorted(((j, i) for i, c in enumerate(names) for j in range(len(split_files[c]))))
        files = [split_files[names[i]][j] for j, i in order]
        labels = np.asarray([i for _, i in order], np.int64)
        return _read(files, size, channels, scale), labels

    x_train, y_train = arrays(train)
    x_eval, y_eval = arrays(evaluation) if any(evaluation.values()) else (None, None)
    return Dataset(
        name=f"images:{root}", x_train=x_train, y_train=y_train, x_eval=x_eval, y_eval=y_eval,
        class_names=names, input_shape=tuple(x_train.shape[1:]),
        provenance=(f"image folders, {split}; {len(names)} classes (sorted folder names), "
                    f"{len(x_train)} train / {0 if x_eval is None else len(x_eval)} eval images"
                    + (f" (first {opts['train_per_class']} per class in train)" if "train_per_class" in opts else "")
                    + (f" (first {opts['eval_per_class']} per class in eval)" if "eval_per_class" in opts else "")
                    + f"; resized to {size[0]}x{size[1]}, {'RGB' if channels == 3 else 'grayscale'}, "
                      f"scaled to {SCALES[scale][2]}"),
    )
