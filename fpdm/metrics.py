"""The metrics of evaluate.py as a library: the metric table of a paper (FID, sFID, IS, precision/recall, KID) from
one Inception pass, references (ADM batches, stats files, image folders, with a feature cache), sample IO, and the
same metrics on a small MNIST classifier's features for the demo, FID during training and the experiments.

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) between Gaussians fitted to features of samples and reference.
Inception features are pool3 (2048-d) of the TF FID Inception-v3 (pytorch-fid's port of its weights, read from a
local file: nothing is downloaded), on images resized to 299x299 (bilinear) and scaled to [-1, 1]; the same pass
gives sFID's spatial features and the 1008-way logits of the Inception Score. FID-MNIST uses the 128-d penultimate
layer of a small CNN trained once (seeded, ~10 s on one CPU thread) on the 5,000 bundled digits and cached with the
statistics of all 5,000 real digits at each MNISTDigits size (7, 14, 28, 32 px): samples are compared with real
digits of their own size.
"""

import contextlib
import hashlib
import json
import os
import time
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models import inception_v3
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionAux, InceptionB, InceptionC, InceptionD, \
    InceptionE
from tqdm import tqdm

from fpdm.data import IMAGE_EXTENSIONS, MNISTDigits, list_images, read_image
from fpdm.run_folders import atomic_write

INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")
DEFAULT_INCEPTION = os.path.join("~", ".cache", "fpdm", "pt_inception-2015-12-05-6726825d.pth")


#################################################################################
#                                   FID math                                    #
#################################################################################

def feature_statistics(features):
    """(mu, sigma) of features (N, D) in float64; sigma is the unbiased covariance (np.cov)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must have shape (N >= 2, D), got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^1/2), the Fréchet distance of two Gaussians.

    Float64 throughout. sqrtm of the product returns tiny imaginary parts from round-off, which are dropped; when
    the product is singular enough that sqrtm fails (not finite), eps * I is added to both covariances.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape} (features of different networks?)")
    with warnings.catch_warnings():  # "Matrix is singular": common (dead features, N < D) and handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = eps * np.eye(len(mu1))
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"(sigma1 sigma2)^1/2 has an imaginary part of {np.abs(covmean.imag).max():.3g}: "
                             f"these are not covariance matrices")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


#################################################################################
#                      Metrics on features (Inception and MNIST)                #
#################################################################################
# Each takes feature arrays (N, D), so the Inception table and the MNIST table share one implementation. Distances
# and kernels run in float64 on `device` (the GPU when given), in blocks of rows that bound memory at ~256 MB.

def inception_score(logits, split_size=5000):
    """Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs") of class logits (N, C).

    p(y|x) = softmax(logits); in each part IS = exp(mean over x of KL(p(y|x) || p(y))), p(y) being the part's mean
    of p(y|x). As in ADM's evaluator (guided-diffusion evaluations/evaluator.py, compute_inception_score) the samples
    are cut in order into parts of `split_size`, the last one shorter when N is not a multiple, and the score is the
    plain mean over parts; at N = 50,000 these are improved-gan's 10 equal splits. Returns (mean, std) over parts
    (ADM reports no std; with N <= split_size there is one part, std 0).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"logits must have shape (N >= 1, classes), got {logits.shape}")
    if split_size != int(split_size) or split_size < 1:
        raise ValueError(f"split_size must be a positive number of samples, got {split_size}; ADM's is 5000")
    log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    p = np.exp(log_p)
    scores = []
    for start in range(0, len(logits), int(split_size)):
        part = slice(start, start + int(split_size))
        log_marginal = np.log(np.maximum(p[part].mean(axis=0), np.finfo(np.float64).tiny))
        kl = np.where(p[part] > 0, p[part] * (log_p[part] - log_marginal), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _features_tensor(features, device, name="features"):
    x = torch.as_tensor(np.asarray(features, dtype=np.float64), device=device)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
    return x


def _rows_per_block(columns, budget=2 ** 25):
    """Rows of a float64 distance/kernel block with `columns` columns that fit in `budget` elements (256 MB)."""
    return max(1, budget // max(1, columns))


def _squared_distances(a, b):
    """||a_i - b_j||^2 of float64 tensors through the Gram matrix (as the reference implementations), clamped at 0;
    in place on one (len(a), len(b)) block."""
    return (a @ b.T).mul_(-2).add_((a * a).sum(1)[:, None]).add_((b * b).sum(1)[None, :]).clamp_min_(0)


def _knn_radii(x, k):
    """Squared distance of each row of x to its k-th nearest neighbour among the other rows."""
    if len(x) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} feature vectors per set, got {len(x)}")
    radii, rows = [], _rows_per_block(len(x))
    for i in range(0, len(x), rows):
        d = _squared_distances(x[i:i + rows], x)
        index = torch.arange(len(d), device=x.device)
        d[index, index + i] = 0  # the point itself, exactly (round-off would otherwise leave ~1e-12)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, -1])  # the smallest is the point itself
    return torch.cat(radii)


def precision_recall(reference_features, sample_features, k=3, device="cpu"):
    """Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
    Generative Models"): (precision, recall).

    Each set's manifold is the union of balls around its points, of radius the distance to the point's k-th nearest
    neighbour in the same set (k = 3 as in the paper and ADM's evaluator). Precision: the fraction of samples inside
    the reference manifold (within the ball of at least one reference point, distance <= radius); recall: the
    fraction of reference points inside the samples' manifold. Euclidean distances, compared squared (as ADM).
    """
    real = _features_tensor(reference_features, device, "reference features")
    fake = _features_tensor(sample_features, device, "sample features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"reference features have {real.shape[1]} dimensions, samples {fake.shape[1]}")
    real_radii, fake_radii = _knn_radii(real, k), _knn_radii(fake, k)
    inside, recalled = [], torch.zeros(len(real), dtype=torch.bool, device=real.device)
    rows = _rows_per_block(len(real))
    for i in range(0, len(fake), rows):
        d = _squared_distances(fake[i:i + rows], real)
        inside.append((d <= real_radii[None, :]).any(dim=1))
        recalled |= (d <= fake_radii[i:i + rows, None]).any(dim=0)
    return float(torch.cat(inside).double().mean()), float(recalled.double().mean())


def _polynomial_kernel(a, b):
    return (a @ b.T / a.shape[1] + 1) ** 3


def mmd2_unbiased(x, y):
    """Unbiased estimate of MMD^2 between two equal-size float64 tensors (m, D) with the polynomial kernel
    k(x, y) = (x.y / D + 1)^3: the means of k over pairs i != j within x and within y, minus twice the mean over all
    pairs across (Bińkowski et al. 2018, "Demystifying MMD GANs")."""
    m = len(x)
    kxx, kyy, kxy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * kxy.sum() / (m * m)


def kid(reference_features, sample_features, subsets=100, subset_size=1000, seed=0, device="cpu"):
    """Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): (mean, std) over `subsets` random
    subsets of `min(subset_size, N_ref, N_samples)` points drawn without replacement from each set, of the unbiased
    MMD^2 with the polynomial kernel (x.y / D + 1)^3. Unbiased: its expectation is 0 when both sets come from one
    distribution, so it can be negative. Seeded (numpy default_rng(seed)): the same features give the same value.
    """
    x = _features_tensor(reference_features, device, "reference features")
    y = _features_tensor(sample_features, device, "sample features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"reference features have {x.shape[1]} dimensions, samples {y.shape[1]}")
    m = min(int(subset_size), len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 points, got {m} (N_ref {len(x)}, N_samples {len(y)})")
    rng, values = np.random.default_rng(seed), []
    for _ in range(int(subsets)):
        a = x[torch.from_numpy(rng.choice(len(x), m, replace=False)).to(x.device)]
        b = y[torch.from_numpy(rng.choice(len(y), m, replace=False)).to(y.device)]
        values.append(float(mmd2_unbiased(a, b)))
    return float(np.mean(values)), float(np.std(values))


def feature_metrics(features, reference, k=3, kid_subsets=100, kid_subset_size=1000, seed=0, device="cpu"):
    """{"fid", "precision", "recall", "kid", "kid_std"} of sample features (N, D) against a `Reference`.

    FID uses the reference's (mu, sigma); precision/recall and KID need its features and are None without them.
    Shared by the Inception table (pool3 features) and `mnist_metrics` (the MNIST classifier's features).
    """
    mu, sigma = feature_statistics(features)
    result = {"fid": frechet_distance(mu, sigma, reference.mu, reference.sigma), "precision": None, "recall": None,
              "kid": None, "kid_std": None}
    if reference.features is not None:
        result["precision"], result["recall"] = precision_recall(reference.features, features, k, device)
        result["kid"], result["kid_std"] = kid(reference.features, features, kid_subsets, kid_subset_size, seed,
                                               device)
    return result


#################################################################################
#                                   Sample IO                                   #
#################################################################################

def _as_images(array, name):
    """uint8 (N, H, W), (N, H, W, 1) or (N, H, W, 3) -> (N, H, W, C); one clear error otherwise."""
    if array.dtype != np.uint8:
        raise ValueError(f"{name}: images must be uint8 (0-255, as ADM's sample files), got {array.dtype}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or len(array) == 0:
        raise ValueError(f"{name}: expected images of shape (N, H, W, 3), (N, H, W, 1) or (N, H, W), "
                         f"got {array.shape}")
    return array


def _read_image(path):
    """uint8 (H, W, 1) for a grayscale file, (H, W, 3) otherwise, through the training reader (`data.read_image`:
    16-bit grayscale scaled to 8 bits, as training reads it)."""
    array = np.asarray(read_image(path, keep_gray=True))
    return array[..., None] if array.ndim == 2 else array


def _image_files(path):
    """The image files of a sample or reference folder, in the order `load_images` reads them."""
    files = list_images(path, recursive=False)
    if not files:
        raise ValueError(f"{path}: no images ({'/'.join(IMAGE_EXTENSIONS)}) in this folder")
    return files


def _check_image_source(path):
    if os.path.isdir(path):
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: pass an .npz of samples (arr_0) or a folder of images")
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: not an .npz file or an image folder")


def load_images(path):
    """An ADM sample file (`.npz` with `arr_0`) or a folder of PNG/JPG images (sorted by name, read by the training
    reader `data.read_image`: 16-bit grayscale scaled to 8 bits) -> uint8 (N, H, W, C)."""
    path = os.path.expanduser(str(path))
    _check_image_source(path)
    if os.path.isdir(path):
        files = _image_files(path)
        images = [_read_image(f) for f in tqdm(files, desc="reading", disable=len(files) < 1000)]
        channels = max(image.shape[-1] for image in images)  # a grayscale image among RGB ones becomes RGB
        images = [np.repeat(image, channels // image.shape[-1], axis=-1) for image in images]
        sizes = sorted({image.shape[:2] for image in images})
        if len(sizes) > 1:
            raise ValueError(f"{path}: images differ in size ({sizes[0]} and {sizes[-1]}); resize them to one size")
        return np.stack(images)
    try:
        with np.load(path) as data:
            if "arr_0" not in data:
                raise ValueError(f"{path} has no 'arr_0' images (keys: {', '.join(data.files)})")
            return _as_images(data["arr_0"], path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: not a readable .npz of images ({type(e).__name__}); write samples with "
                         f"sample_ddp.py or np.savez(path, arr_0=uint8 array (N, H, W, C))") from None


#################################################################################
#                                Inception FID                                  #
#################################################################################
# TF's FID graph differs from torchvision's Inception-v3 in its pooling branches: average pools exclude the
# padding (Mixed_5b-d, 6b-e, 7b) and Mixed_7c max-pools. Parameter names stay torchvision's.

def _avg_pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    def _forward(self, x):
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), self.branch_pool(_avg_pool(x))]


class FIDInceptionC(InceptionC):
    def _forward(self, x):
        double = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            double = conv(double)
        return [self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), double,
                self.branch_pool(_avg_pool(x))]


class FIDInceptionE(InceptionE):
    max_pool = False  # True for Mixed_7c

    def _forward(self, x):
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        single, double = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [self.branch1x1(x), torch.cat([self.branch3x3_2a(single), self.branch3x3_2b(single)], 1),
                torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], 1), self.branch_pool(pool)]


def load_inception_weights(net, path):
    """Load pytorch-fid's FID Inception weights (torchvision key names, 1008 classes) into `net`, strictly."""
    path = os.path.expanduser(str(path or DEFAULT_INCEPTION))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found at {path}: download {INCEPTION_URL} (pytorch-fid's FID "
                                f"Inception-v3) and pass --inception PATH, or save it as {DEFAULT_INCEPTION}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
    except Exception as e:  # not a state dict, or tensors of other shapes
        raise ValueError(f"{path}: not FID Inception-v3 weights ({type(e).__name__}); use {INCEPTION_URL}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # absent from old state dicts
    if missing or unexpected:
        raise ValueError(f"{path}: not FID Inception-v3 weights ({len(missing)} missing keys, e.g. "
                         f"{(missing + [''])[0]!r}; {len(unexpected)} unexpected); use {INCEPTION_URL}")


# sFID's spatial features (Nash et al. 2021, "Generating Images with Sparse Representations"; ADM's evaluator) are
# the TF graph's tensor `mixed_6/conv:0`, first 7 channels. In that graph (classify_image_graph_def.pb) the mixed
# blocks are numbered from 0: mixed, mixed_1, mixed_2 = Mixed_5b-d (35x35); mixed_3 = Mixed_6a (the reduction to
# 17x17); mixed_4 .. mixed_7 = Mixed_6b .. Mixed_6e; mixed_8 .. mixed_10 = Mixed_7a-c (8x8) -- the name map that the
# TF-to-PyTorch weight conversions use sends mixed_6/conv/conv2d_params to Mixed_6d.branch1x1.conv. Inside a block,
# `conv` is the 1x1 branch (the others are tower, tower_1, tower_2), so `mixed_6/conv` is Mixed_6d.branch1x1:
# conv + batch norm + ReLU, 192 channels at 17x17 for a 299 px input. It is not a 768-channel block output (that
# would be `mixed_6/join`, i.e. Mixed_6d itself). Its first 7 channels are flattened in TF's NHWC order (h, w, c),
# as ADM reshapes them, so that our mu_s / sigma_s line up with those stored in ADM's reference batches: 2023 dims.
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
INCEPTION_FEATURES_VERSION = 2  # bump when the features change: reference caches of other versions are not reused
# (2: TF 1.x's resize and scaling, as in ADM's evaluator; 1: pytorch-fid's)


def _sha256_file(path, digest=None):
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest


@contextlib.contextmanager
def full_fp32():
    """Matmuls and convolutions in full float32 on GPUs inside, whatever the process set: the Inception features
    are the metrics' numbers, and TF32 (PyTorch's default for convolutions; train.py and sample.py turn it on for
    matmuls too) would move them."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


class InceptionFeatures(nn.Module):
    """The FID Inception-v3: uint8 images (N, H, W, C) -> pool3 (2048-d) features, and in the same forward pass
    (`forward_all`, `all_features`) sFID's spatial features (2023-d) and the 1008-way logits of the Inception Score.

    Images enter as ADM's evaluator feeds them to TF's Inception graph (pixel values 0..255 at `ExpandDims:0`), and
    go through what that graph does before its first convolution: TF 1.x's bilinear resize to 299x299 (corners not
    aligned, no half-pixel centres: torch-fidelity's exact port) and (x - 128) / 128. Features are thus those behind
    the statistics stored in ADM's reference batches, not pytorch-fid's (half-pixel resize, x / 127.5 - 1), whose
    FIDs against those statistics mix two preprocessings. Grayscale is repeated to RGB.
    `weights`: a local copy of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (default: DEFAULT_INCEPTION).
    `random_init=True` builds seeded random weights for testing the pipeline: its FIDs mean nothing.
    The logits are pool3 @ W of the 1008-way softmax layer without its bias, as ADM's evaluator and improved-gan
    compute them for the Inception Score.
    """

    def __init__(self, weights=None, random_init=False, seed=0):
        super().__init__()
        blocks = [BasicConv2d, FIDInceptionA, InceptionB, FIDInceptionC, InceptionD, FIDInceptionE, InceptionAux]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008,
                               inception_blocks=blocks)
            if random_init:  # PyTorch's default init shrinks activations ~1e8-fold over the 94 convs: keep scale
                for m in net.modules():
                    if isinstance(m, nn.Conv2d):
                        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        net.Mixed_7c.max_pool = True
        if not random_init:
            load_inception_weights(net, weights)
        self.register_buffer("logits_weight", net.fc.weight.detach().clone())  # (1008, 2048)
        net.fc = nn.Identity()  # in eval mode (dropout off) the network now returns pool3
        self.net = net.eval()
        self.weights = "random" if random_init else os.path.expanduser(str(weights or DEFAULT_INCEPTION))
        self._identity = f"random-init-seed{seed}" if random_init else None

    @property
    def identity(self):
        """What the features depend on besides the images: the weights file's sha256 (or the random-init seed) and
        INCEPTION_FEATURES_VERSION. Part of the reference caches' key."""
        if self._identity is None:
            self._identity = f"sha256:{_sha256_file(self.weights).hexdigest()[:16]}"
        return f"{self._identity}/features-v{INCEPTION_FEATURES_VERSION}"

    @torch.no_grad()
    def forward(self, images):
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        x = images.permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1)
        with full_fp32():
            x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
            return self.net((x - 128) / 128)

    @torch.no_grad()
    def forward_all(self, images):
        """uint8 images (N, H, W, C) on the module's device -> (pool3 (N, 2048), spatial (N, 2023), logits (N, 1008)),
        float32, from one forward pass (the spatial map is caught on its way by a hook on SPATIAL_LAYER)."""
        caught = []
        hook = self.net.get_submodule(SPATIAL_LAYER).register_forward_hook(lambda module, i, out: caught.append(out))
        try:
            pool3 = self(images)
        finally:
            hook.remove()
        spatial = caught[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # NHWC order, as ADM's TF reshape
        return pool3, spatial, pool3 @ self.logits_weight.T

    def features(self, images, batch_size=50, progress=True):
        """uint8 numpy (N, H, W, C) -> float64 numpy (N, 2048), in batches on the module's device."""
        images, device = _as_images(np.asarray(images), "images"), next(self.parameters()).device
        batches = tqdm(range(0, len(images), batch_size), desc="Inception features", disable=not progress)
        return torch.cat([self(torch.from_numpy(images[i:i + batch_size]).to(device)).double().cpu()
                          for i in batches]).numpy()

    def all_features(self, images, batch_size=50, progress=True, desc="Inception features"):
        """uint8 numpy (N, H, W, C) -> {"pool3": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)}, float64
        numpy, from one pass in batches on the module's device (a tqdm bar over the batches)."""
        images, device = _as_images(np.asarray(images), "images"), next(self.parameters()).device
        outputs = {"pool3": [], "spatial": [], "logits": []}
        for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress):
            for key, value in zip(outputs, self.forward_all(torch.from_numpy(images[i:i + batch_size]).to(device))):
                outputs[key].append(value.cpu())
        return {key: torch.cat(values).double().numpy() for key, values in outputs.items()}


#################################################################################
#                         Reference statistics and cache                        #
#################################################################################
# A reference is an ADM reference batch (.npz: uint8 `arr_0` and precomputed `mu`, `sigma`, `mu_s`, `sigma_s`), a
# stats file of ours (`evaluate.py stats`: the same four statistics, the pool3 features `pool3` and metadata, among
# them the images' size `image_size`, absent from files written before sizes were checked), an old stats file (`mu`,
# `sigma` only), or images (an .npz with `arr_0`, or a folder). Features computed from images are cached next to the
# reference in a file of the stats-file format, keyed by the reference's content (sha256) and the Inception weights'
# identity. Samples and reference of other image sizes are refused (`check_reference_size`).

REFERENCE_FORMAT = "fpdm-inception-reference-v1"
STATISTICS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclass
class Reference:
    """What the metrics compare samples with: pool3 (mu, sigma) for FID, spatial (mu_s, sigma_s) for sFID, pool3
    features (N, 2048) for precision/recall and KID (None where the reference lacks them; `note` then says why)."""
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray = None
    sigma_s: np.ndarray = None
    features: np.ndarray = None
    num_images: int = None
    source: str = ""
    note: str = None
    image_size: tuple = None  # (H, W) of the reference images; None where a stats file records none


_CONTENT_HASHES = {}  # (files, sizes, modification times) -> sha256: a reference is read once per process


def reference_content_hash(path):
    """sha256 of a reference: the bytes of an .npz file, or the names and bytes of a folder's images (those
    `load_images` reads, in its order). Remembered for the process while no file's size or modification time
    changes (evaluate.py's cache key and its report ask for the same hash)."""
    path = os.path.expanduser(str(path))
    files = list_images(path, recursive=False) if os.path.isdir(path) else [path]
    stats = [os.stat(f) for f in files]
    signature = (os.path.isdir(path), tuple((os.path.abspath(f), st.st_size, st.st_mtime_ns)
                                            for f, st in zip(files, stats)))
    if signature not in _CONTENT_HASHES:
        if not os.path.isdir(path):
            _CONTENT_HASHES[signature] = _sha256_file(path).hexdigest()
        else:
            digest = hashlib.sha256()
            for file in files:
                digest.update(os.path.basename(file).encode() + b"\0")
                _sha256_file(file, digest)
            _CONTENT_HASHES[signature] = digest.hexdigest()
    return _CONTENT_HASHES[signature]


def reference_cache_path(path, model, content_hash=None):
    """(cache file, key) for the features of the reference at `path` under `model`'s weights: next to the
    reference, `<reference without .npz>.inception-<key[:16]>.npz`."""
    content_hash = content_hash or reference_content_hash(path)
    key = hashlib.sha256(f"{content_hash}|{model.identity}".encode()).hexdigest()
    base = os.path.abspath(os.path.expanduser(str(path))).rstrip(os.sep)
    return f"{base[:-4] if base.endswith('.npz') else base}.inception-{key[:16]}.npz", key


def save_reference(path, reference, inception, key=""):
    """Write a reference in the stats-file format (atomically): mu, sigma, mu_s, sigma_s (float64), pool3 features
    (float32: the network's own precision, so nothing is lost) and metadata."""
    arrays = {name: getattr(reference, name) for name in STATISTICS if getattr(reference, name) is not None}
    if reference.features is not None:
        arrays["pool3"] = reference.features.astype(np.float32)
    arrays.update(format=REFERENCE_FORMAT, inception=inception, key=key, num_images=reference.num_images or -1)
    if reference.image_size is not None:
        arrays["image_size"] = np.asarray(reference.image_size, dtype=np.int64)
    atomic_write(path, lambda f: np.savez(f, **arrays), "wb")


def _read_npz(path):
    """({name: array} of the statistics and features an .npz holds, whether it holds images, its metadata)."""
    try:
        with np.load(path) as data:
            names = set(data.files)
            stored = {name: data[name].astype(np.float64) for name in STATISTICS + ("pool3",) if name in names}
            meta = {name: data[name].item() for name in ("format", "inception", "key", "num_images") if name in names}
            if "image_size" in names:  # recorded since stats files check sizes; older files have none
                meta["image_size"] = tuple(int(v) for v in data["image_size"])
            return stored, "arr_0" in names, meta
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}); pass ADM's reference batch, a file "
                         f"from `evaluate.py stats`, or images") from None


def _reference_from_images(path, model, batch_size=50, cache=True, progress=True):
    """Reference computed from the images at `path` (one Inception pass), through the cache next to it."""
    _check_image_source(path)
    cache_path = key = None
    if cache:
        cache_path, key = reference_cache_path(path, model)
        if os.path.isfile(cache_path):
            try:
                stored, _, meta = _read_npz(cache_path)
                if meta.get("key") == key and all(name in stored for name in STATISTICS + ("pool3",)):
                    print(f"reference features of {path} from the cache {cache_path}")
                    return Reference(*(stored[name] for name in STATISTICS), features=stored["pool3"],
                                     num_images=int(meta["num_images"]), source=path,
                                     image_size=meta.get("image_size") or reference_image_size(path))
            except ValueError:
                pass  # unreadable: computed again and rewritten below
    images = load_images(path)
    features = model.all_features(images, batch_size, progress, desc="Inception: reference")
    reference = Reference(*feature_statistics(features["pool3"]), *feature_statistics(features["spatial"]),
                          features=features["pool3"], num_images=len(images), source=path,
                          image_size=tuple(images.shape[1:3]))
    if cache:
        try:
            save_reference(cache_path, reference, model.identity, key)
            print(f"reference features of {path} cached in {cache_path}")
        except OSError as e:
            print(f"could not cache the reference features next to {path} ({e}); they will be computed again")
    return reference


def load_reference(path, model, batch_size=50, need_features=True, cache=True, progress=True):
    """The `Reference` of an ADM reference batch, a stats file (new or old) or images; see the section comment.

    Statistics stored in an .npz (ADM's precomputed mu/sigma/mu_s/sigma_s) are used as they are; the network runs
    on the reference's images only for what is missing: everything for images alone, the pool3 features for
    precision/recall/KID (`need_features`) of an ADM batch. Results of that pass are cached (`cache`).
    """
    path = os.path.expanduser(str(path))
    stored, has_images, meta = {}, True, {}
    if path.endswith(".npz") and os.path.isfile(path):
        stored, has_images, meta = _read_npz(path)
        if not has_images and not ("mu" in stored and "sigma" in stored):
            raise ValueError(f"{path} has neither images (arr_0) nor statistics (mu, sigma)")
        if meta.get("inception") and meta["inception"] != model.identity:
            print(f"warning: {path} was made with Inception {meta['inception']}, evaluating with {model.identity}: "
                  f"the metrics compare features of two networks")
    wanted = STATISTICS + ("pool3",) if need_features else ("mu", "sigma")
    computed = {}
    if has_images and any(name not in stored for name in wanted):
        ref = _reference_from_images(path, model, batch_size, cache, progress)
        computed = {name: getattr(ref, name) for name in STATISTICS}
        computed.update(pool3=ref.features, num_images=ref.num_images, image_size=ref.image_size)
    values = {**computed, **stored}  # precomputed statistics win over ours
    note, missing, absent = None, [], []
    if "mu_s" not in values or "sigma_s" not in values:
        missing, absent = missing + ["sFID"], absent + ["mu_s/sigma_s"]
    if "pool3" not in values:
        missing, absent = missing + ["precision", "recall", "KID"], absent + ["pool3 features"]
    if need_features and missing:
        held = "only mu/sigma (an old stats file?)" if set(stored) == {"mu", "sigma"} else f"no {' or '.join(absent)}"
        note = (f"{path} holds {held}: {', '.join(missing)} need a stats file re-made with `python evaluate.py "
                f"stats IMAGES --out {path}` (or the reference images)")
    num_images = values.get("num_images", int(meta.get("num_images", -1)))
    return Reference(values["mu"], values["sigma"], values.get("mu_s"), values.get("sigma_s"), values.get("pool3"),
                     num_images if num_images is not None and num_images >= 0 else None, path, note,
                     values.get("image_size", meta.get("image_size")))


def reference_image_size(path):
    """(H, W) of the images behind the reference at `path`, without decoding them: an .npz's `arr_0` (its header
    alone: ADM's reference batches hold gigabytes), the `image_size` that stats files of `evaluate.py stats` record,
    or a folder's first image (`load_images` refuses folders of mixed sizes). None for a stats file that records no
    size (written before sizes were recorded, or `mu`/`sigma` alone)."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        with Image.open(_image_files(path)[0]) as image:
            return image.size[1], image.size[0]
    _check_image_source(path)
    try:
        with np.load(path) as data:
            if "arr_0" in data.files:
                with data.zip.open("arr_0.npy") as f:
                    version = np.lib.format.read_magic(f)
                    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)(f)
                shape = header[0]
                if len(shape) not in (3, 4):
                    raise ValueError(f"{path}: arr_0 has shape {shape}, not images (N, H, W) or (N, H, W, C)")
                return int(shape[1]), int(shape[2])
            return tuple(int(v) for v in data["image_size"]) if "image_size" in data.files else None
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}); pass ADM's reference batch, a file "
                         f"from `evaluate.py stats`, or images") from None


def check_reference_size(sample_size, ref):
    """Refuse (ValueError) samples of (H, W) `sample_size` against a reference of images of another size: Inception
    resizes both to 299 px, so the metrics would not be comparable to published ones. Returns a note (str) when the
    reference records no size (an older stats file), else None."""
    h, w = (int(v) for v in sample_size)
    ref_size = reference_image_size(ref)
    if ref_size is None:
        return (f"{ref} records no image size (a stats file from before sizes were recorded, or mu/sigma alone): "
                f"the samples are {h}x{w} px, and against reference images of another size the metrics are not "
                f"comparable to published ones; re-make it with `python evaluate.py stats IMAGES --out {ref}` to have "
                f"sizes checked")
    if tuple(ref_size) != (h, w):
        rh, rw = ref_size
        raise ValueError(f"samples are {h}x{w} px but the reference {ref} holds {rh}x{rw} px images: Inception "
                         f"resizes both to 299 px, so the metrics would not be comparable to published {rh}x{rw} px "
                         f"numbers; evaluate {rh}x{rw} px samples, or make a {h}x{w} px reference with `python "
                         f"evaluate.py stats IMAGES --out REF.npz`")
    return None


def load_statistics(path, model, batch_size=50):
    """(mu, sigma) of a reference: an .npz with `mu` and `sigma` (ours, or ADM's reference batches), else images
    (their features cached next to them, see `load_reference`)."""
    reference = load_reference(path, model, batch_size, need_features=False)
    return reference.mu, reference.sigma


def inception_metrics(features, reference, k=3, kid_subsets=100, kid_subset_size=1000, is_split_size=5000, seed=0,
                      device="cpu"):
    """The table from sample features {"pool3", "spatial", "logits"} (`InceptionFeatures.all_features`) and a
    `Reference`: {"fid", "sfid", "inception_score", "inception_score_std", "precision", "recall", "kid", "kid_std",
    "reference_note", ...}; metrics the reference cannot give are None and `reference_note` says why.

    FID (Heusel et al. 2017) on pool3, sFID (Nash et al. 2021) the Fréchet distance on the spatial features, IS
    (Salimans et al. 2016) on the logits, precision/recall (Kynkäänniemi et al. 2019) and KID (Bińkowski et al. 2018)
    on pool3: see `feature_metrics`, `inception_score`, `precision_recall`, `kid`.
    """
    result = feature_metrics(features["pool3"], reference, k, kid_subsets, kid_subset_size, seed, device)
    result["sfid"] = None
    if reference.mu_s is not None and reference.sigma_s is not None:
        result["sfid"] = frechet_distance(*feature_statistics(features["spatial"]), reference.mu_s, reference.sigma_s)
    result["inception_score"], result["inception_score_std"] = inception_score(features["logits"], is_split_size)
    order = ("fid", "sfid", "inception_score", "inception_score_std", "precision", "recall", "kid", "kid_std")
    result = {name: result[name] for name in order}
    n, n_ref = len(features["pool3"]), None if reference.features is None else len(reference.features)
    result.update(num_samples=n, num_reference=reference.num_images, reference_note=reference.note, k=k,
                  kid_subsets=kid_subsets, kid_subset_size=None if n_ref is None else min(kid_subset_size, n, n_ref),
                  is_split_size=is_split_size, is_parts=-(-n // is_split_size))
    return result


def evaluate_inception(samples, ref, model, batch_size=50, cache=True, progress=True, device=None, **settings):
    """`inception_metrics` of samples (images, or a path `load_images` reads) against the reference at `ref`, with
    one Inception pass over the samples and at most one over the reference (none when cached or precomputed).
    Samples and reference images of other sizes are refused before any pass (`check_reference_size`; its note, for
    a reference without a recorded size, is `size_note`). `settings`: k, kid_subsets, kid_subset_size,
    is_split_size, seed."""
    if isinstance(samples, (str, os.PathLike)):
        images = load_images(samples)
    else:
        images = _as_images(np.asarray(samples), "samples")
    device = device or next(model.parameters()).device
    size_note = check_reference_size(images.shape[1:3], ref)
    reference = load_reference(ref, model, batch_size, need_features=True, cache=cache, progress=progress)
    features = model.all_features(images, batch_size, progress, desc="Inception: samples")
    result = inception_metrics(features, reference, device=device, **settings)
    result.update(image_shape=list(images.shape[1:]), size_note=size_note)
    return result


#################################################################################
#                                   FID-MNIST                                   #
#################################################################################

MNIST_CLASSIFIER = {"version": 1, "channels": [32, 64], "features": 128, "epochs": 8, "batch_size": 128, "lr": 3e-3,
                    "seed": 0, "holdout_per_class": 50, "max_shift": 2}
CLASSIFIER_FORMAT = "fpdm-mnist-classifier-v1"


class MNISTClassifier(nn.Module):
    """28x28 digits in [-1, 1] -> 10 logits. `trunk` ends in the penultimate layer that FID-MNIST compares."""

    def __init__(self, channels=(32, 64), features=128):
        super().__init__()
        c1, c2 = channels
        self.trunk = nn.Sequential(
            nn.Conv2d(1, c1, 4, stride=2, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),  # 14x14
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),  # 7x7
            nn.Flatten(), nn.Linear(c2 * 49, features), nn.ReLU())
        self.head = nn.Linear(features, 10)

    def forward(self, x):
        return self.head(self.trunk(x))


def _down_up(x, factor):
    """28 px digits as MNISTDigits stores them at 28 / factor px, then back to 28 as `mnist_inputs` does."""
    return F.interpolate(F.avg_pool2d(x, factor), size=28, mode="bilinear", align_corners=False)


def mnist_inputs(samples):
    """Digits -> (float (N, 1, 28, 28) in [-1, 1], their size in px).

    Float tensors/arrays are taken to be in [-1, 1]: (N, 1, S, S) or (N, S, S); uint8 (0-255) also as ADM's
    (N, S, S, 1 or 3) (RGB is averaged to gray). S = 28 as is, 32 cropped to the centre 28 (MNISTDigits pads 2 px),
    14 and 7 upsampled bilinearly.
    """
    x = torch.as_tensor(np.asarray(samples) if not torch.is_tensor(samples) else samples).detach().cpu()
    scale = x.dtype == torch.uint8
    if x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3] or len(x) == 0:
        raise ValueError(f"digits must have shape (N, 1, S, S), (N, S, S) or (N, S, S, 1|3), got {tuple(x.shape)}")
    x = x.float().mean(dim=1, keepdim=True)
    x = x / 127.5 - 1 if scale else x
    size = x.shape[-1]
    if size == 32:
        x = x[..., 2:30, 2:30]
    elif size in (7, 14):
        x = F.interpolate(x, size=28, mode="bilinear", align_corners=False)
    elif size != 28:
        raise ValueError(f"FID-MNIST takes digits of {MNISTDigits.SIZES} px (MNISTDigits sizes), got {size} px")
    return x.contiguous(), size


@torch.no_grad()
def _classify(model, x, batch_size=1000):
    """(penultimate features float64 (N, D), predicted labels (N,)) of prepared 28 px digits."""
    device, features, predictions = next(model.parameters()).device, [], []
    for i in range(0, len(x), batch_size):
        f = model.trunk(x[i:i + batch_size].to(device))
        features.append(f.double().cpu())
        predictions.append(model.head(f).argmax(1).cpu())
    return torch.cat(features).numpy(), torch.cat(predictions).numpy()


def _fit(model, x, y, config):
    """Adam with a one-cycle schedule, seeded. A random shift per batch, and a quarter of each batch seen at 14 px
    and a quarter at 7 px, so that digits of every MNISTDigits size are recognised."""
    g = torch.Generator().manual_seed(config["seed"])
    bs, s = config["batch_size"], config["max_shift"]
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config["lr"], epochs=config["epochs"],
                                                steps_per_epoch=-(-len(x) // bs))
    model.train()
    for _ in range(config["epochs"]):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(order), bs):
            xb, yb = x[order[i:i + bs]], y[order[i:i + bs]]
            dy, dx = torch.randint(0, 2 * s + 1, (2,), generator=g).tolist()
            xb = F.pad(xb, (s, s, s, s), value=-1.0)[..., dy:dy + 28, dx:dx + 28]
            n = len(xb)
            xb = torch.cat([xb[:n // 2], _down_up(xb[n // 2:3 * n // 4], 2), _down_up(xb[3 * n // 4:], 4)])
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def train_mnist_classifier(config=MNIST_CLASSIFIER, verbose=True):
    """Train on the 5,000 bundled digits less the last `holdout_per_class` of each class; returns the checkpoint
    dict (weights, metrics, reference statistics of all 5,000 real digits at each MNISTDigits size)."""
    digits = MNISTDigits(28)
    x, y = digits.images, digits.labels
    rank = torch.zeros_like(y)  # position of each digit within its class
    for c in range(10):
        rank[y == c] = torch.arange(int((y == c).sum()))
    held = rank >= 500 - config["holdout_per_class"]
    threads, start = torch.get_num_threads(), time.perf_counter()
    torch.set_num_threads(1)  # small convs: on 2 busy cores, 2 threads trained ~20x slower than 1
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config["seed"])
            model = MNISTClassifier(config["channels"], config["features"])
        with torch.enable_grad():  # first use may come from inside a no_grad caller (FID during training)
            model = _fit(model, x[~held], y[~held], config)
        train_time = time.perf_counter() - start

        def accuracy(images, labels):
            return float((_classify(model, images)[1] == labels.numpy()).mean())

        metrics = {"train_accuracy": accuracy(x[~held], y[~held]), "train_time_s": round(train_time, 2),
                   "num_train": int((~held).sum()), "num_heldout": int(held.sum()),
                   **{f"heldout_accuracy_{28 // f}px": accuracy(x[held] if f == 1 else _down_up(x[held], f), y[held])
                      for f in (1, 2, 4)}}
        reference = {}
        for size in MNISTDigits.SIZES:
            mu, sigma = feature_statistics(_classify(model, mnist_inputs(MNISTDigits(size).images)[0])[0])
            reference[size] = {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}
    finally:
        torch.set_num_threads(threads)
    if verbose:
        print(f"FID-MNIST classifier: train accuracy {metrics['train_accuracy']:.4f}, held-out "
              f"{metrics['heldout_accuracy_28px']:.4f} (28 px) / {metrics['heldout_accuracy_14px']:.4f} (14 px) / "
              f"{metrics['heldout_accuracy_7px']:.4f} (7 px), trained in {train_time:.1f} s")
    return {"format": CLASSIFIER_FORMAT, "config": config, "model": model.state_dict(), "metrics": metrics,
            "reference": reference}


def mnist_classifier_path(config=MNIST_CLASSIFIER):
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~"), ".cache", "fpdm", f"mnist_classifier_{digest}.pt")


def load_mnist_classifier(path=None, config=MNIST_CLASSIFIER, verbose=True):
    """The cached classifier (CPU, eval mode), trained and saved first if the file is missing, corrupt or was made
    with another config. It carries `.metrics`, `.path` and `.reference` {size: (mu, sigma) of all real digits}."""
    path = os.path.expanduser(str(path or mnist_classifier_path(config)))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CLASSIFIER_FORMAT or ckpt.get("config") != config:
            raise ValueError("another format or config")
        model = MNISTClassifier(config["channels"], config["features"])
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        if verbose:
            why = "missing" if isinstance(e, FileNotFoundError) else f"unusable ({type(e).__name__}: {e})"
            print(f"{path} is {why}: training the FID-MNIST classifier (once)")
        ckpt = train_mnist_classifier(config, verbose)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic_write(path, lambda f: torch.save(ckpt, f), "wb")  # a killed run never leaves a torn cache file
        model = MNISTClassifier(config["channels"], config["features"])
        model.load_state_dict(ckpt["model"])
    model.eval()
    model.path, model.metrics = path, ckpt["metrics"]
    model.reference = {int(k): (v["mu"].numpy(), v["sigma"].numpy()) for k, v in ckpt["reference"].items()}
    return model


_default_classifier = None


def _classifier(classifier, device):
    global _default_classifier
    if classifier is None:
        _default_classifier = _default_classifier or load_mnist_classifier()
        classifier = _default_classifier
    return classifier.to(device)


def _accuracy(predictions, labels):
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels for {len(predictions)} samples")
    return float((predictions == labels).mean())


def evaluate_mnist(samples, labels=None, classifier=None, device="cpu"):
    """{"fid_mnist", "accuracy" (None without labels), "num_samples", "image_size"} in one pass over the samples."""
    model = _classifier(classifier, device)
    x, size = mnist_inputs(samples)
    features, predictions = _classify(model, x)
    fid = frechet_distance(*feature_statistics(features), *model.reference[size])
    return {"fid_mnist": fid, "accuracy": _accuracy(predictions, labels), "num_samples": len(x), "image_size": size}


def mnist_features(samples, classifier=None, device="cpu"):
    """Penultimate-layer features (N, 128), float64, of digits in any form `mnist_inputs` takes."""
    return _classify(_classifier(classifier, device), mnist_inputs(samples)[0])[0]


def fid_mnist(samples, classifier=None, device="cpu"):
    """FID-MNIST of samples against all 5,000 real digits at the samples' size."""
    return evaluate_mnist(samples, classifier=classifier, device=device)["fid_mnist"]


def classifier_accuracy(samples, labels, classifier=None, device="cpu"):
    """Fraction of class-conditional samples that the classifier assigns to their intended label."""
    return evaluate_mnist(samples, labels, classifier, device)["accuracy"]


def mnist_reference(model, size):
    """`Reference` of the 5,000 bundled real digits at `size` px: the classifier's (mu, sigma) and their features
    (computed once per classifier object and size)."""
    cached = model.__dict__.setdefault("_real_features", {})
    if size not in cached:
        cached[size] = _classify(model, mnist_inputs(MNISTDigits(size).images)[0])[0]
    mu, sigma = model.reference[size]
    return Reference(mu, sigma, features=cached[size], num_images=len(cached[size]),
                     source=f"the 5,000 bundled real digits at {size} px")


def mnist_metrics(samples, labels=None, classifier=None, device="cpu", k=3, kid_subsets=100, kid_subset_size=1000,
                  seed=0):
    """The Inception table's metrics on the MNIST classifier's 128-d features, against the 5,000 bundled real digits
    of the samples' size: {"fid" (= FID-MNIST), "precision", "recall", "kid", "kid_std", "accuracy" (None without
    labels), "num_samples", "num_reference", "image_size", ...}, through the same `feature_metrics` as Inception.

    FID: Heusel et al. 2017; precision/recall: Kynkäänniemi et al. 2019 (k = 3); KID: Bińkowski et al. 2018 (the
    unbiased MMD^2 with the cubic polynomial kernel, mean and std over `kid_subsets` subsets).
    """
    model = _classifier(classifier, device)
    x, size = mnist_inputs(samples)
    features, predictions = _classify(model, x)
    reference = mnist_reference(model, size)
    result = feature_metrics(features, reference, k, kid_subsets, kid_subset_size, seed, device)
    result.update(accuracy=_accuracy(predictions, labels), num_samples=len(x), num_reference=reference.num_images,
                  image_size=size, k=k, kid_subsets=kid_subsets,
                  kid_subset_size=min(kid_subset_size, len(x), reference.num_images))
    return result
