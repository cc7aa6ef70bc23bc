"""fpdm/metrics.py and its command line evaluate.py: the Fréchet distance, Inception Score, precision/recall and KID
against closed forms, sample IO (ADM npz and image folders), the Inception pipeline end to end with random weights
(the metric table from one pass, sFID's layer, reference statistics, stats files and the reference cache), FID-MNIST
sanity (real vs real small, noise large, corruptions monotone), the MNIST metric table, the classifier cache, and the
CLI."""

import contextlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from PIL import Image
from torchvision.transforms.functional import gaussian_blur

from evaluate import format_table, main
from fpdm import metrics
from fpdm.data import MNISTDigits
from fpdm.metrics import (INCEPTION_URL, InceptionFeatures, MNIST_CLASSIFIER, classifier_accuracy, feature_statistics,
                          fid_mnist, frechet_distance, inception_metrics, inception_score, kid, load_images,
                          load_mnist_classifier, load_reference, load_statistics, mnist_features, mnist_metrics,
                          precision_recall, reference_cache_path, reference_content_hash)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    """Trained once per session (~10 s) into a temporary cache file."""
    return load_mnist_classifier(tmp_path_factory.mktemp("cache") / "mnist_classifier.pt")


def direct_fid(mu1, sigma1, mu2, sigma2):
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * scipy.linalg.sqrtm(sigma1 @ sigma2).real))


def real_digits(size=28):
    d = MNISTDigits(size)
    return d.images, d.labels


def first_per_class(labels, count):
    """Indices of the first `count` digits of each class."""
    return torch.cat([torch.nonzero(labels == c)[:count, 0] for c in range(10)])


#################################################################################
#                                   FID math                                    #
#################################################################################

def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2, eye = rng.normal(size=5), rng.normal(size=5), np.eye(5)
    assert frechet_distance(mu1, eye, mu2, eye) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-10)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)  # diagonal: sum (sqrt a - sqrt b)^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))  # full covariances: the formula, directly
    s1, s2 = m1 @ m1.T, m2 @ m2.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct_fid(mu1, s1, mu2, s2), rel=1e-10)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-10
    assert frechet_distance(1.0, 4.0, 0.0, 1.0) == pytest.approx(1 + (2 - 1) ** 2)  # scalars: 1-d Gaussians
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu1, s1, mu2[:4], s2[:4, :4])


def test_frechet_distance_singular_covariance(monkeypatch):
    rng = np.random.default_rng(1)
    (mu1, s1), (mu2, s2) = feature_statistics(rng.normal(size=(5, 20))), feature_statistics(rng.normal(size=(6, 20)))
    assert np.linalg.matrix_rank(s1) == 4  # fewer samples than dimensions
    fid = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fid) and fid == pytest.approx(direct_fid(mu1, s1, mu2, s2), rel=1e-6)
    # When sqrtm fails outright, the eps * I offset is added to both covariances and the result stays finite.
    sqrtm, calls = scipy.linalg.sqrtm, []

    def failing_once(m):
        calls.append(m)
        return m * np.nan if len(calls) == 1 else sqrtm(m)

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    offset = 1e-6 * np.eye(20)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(sqrtm((s1 + offset) @ (s2 + offset)).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9) and len(calls) == 2


def test_fid_of_samples_zero_with_itself_and_monotone_in_mean_shift():
    features = np.random.default_rng(2).normal(size=(2000, 16)) @ np.random.default_rng(3).normal(size=(16, 16))
    stats = feature_statistics(features)
    assert stats[0].shape == (16,) and stats[1].shape == (16, 16) and stats[1].dtype == np.float64
    assert abs(frechet_distance(*stats, *stats)) < 1e-6 * np.trace(stats[1])
    fids = [frechet_distance(*stats, *feature_statistics(features + shift)) for shift in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert fids == sorted(fids) and fids[-1] == pytest.approx(16 * 3.0 ** 2, rel=1e-6)  # a shift moves only mu
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(features[:1])


#################################################################################
#                     IS, precision/recall, KID: closed forms                   #
#################################################################################

def test_inception_score_closed_forms():
    assert inception_score(np.zeros((40, 1008))) == pytest.approx((1.0, 0.0), abs=1e-12)  # p(y|x) = p(y): IS 1
    for classes in (2, 10, 50):  # confident and spread evenly: every part of 2 * classes holds each class twice
        mean, std = inception_score(100.0 * np.eye(classes)[np.tile(np.arange(classes), 20)], split_size=2 * classes)
        assert abs(mean - classes) < 1e-3 and std < 1e-3
    one_class_per_part = 100.0 * np.eye(10)[np.repeat(np.arange(10), 3)]  # part i (of 3 samples) holds only class i
    assert inception_score(one_class_per_part, split_size=3)[0] == pytest.approx(1.0, abs=1e-9)
    assert inception_score(one_class_per_part)[0] == pytest.approx(10.0, abs=1e-3)  # 30 < 5000: one part
    logits = np.random.default_rng(0).normal(scale=3, size=(64, 7))  # IS = exp(H(p(y)) - E_x H(p(y|x)))
    p = scipy.special.softmax(logits, axis=1)
    entropy = -(p.mean(0) * np.log(p.mean(0))).sum() + (p * np.log(p)).sum(1).mean()
    assert inception_score(logits) == pytest.approx((np.exp(entropy), 0.0), rel=1e-12)
    halves = [inception_score(logits[:32])[0], inception_score(logits[32:])[0]]
    assert inception_score(logits, split_size=32) == pytest.approx((np.mean(halves), np.std(halves)), rel=1e-12)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="split_size must be a positive number of samples"):
            inception_score(logits, split_size=bad)


def adm_inception_score(logits, split_size=5000):
    """ADM's compute_inception_score (guided-diffusion evaluations/evaluator.py) on the softmax its graph computes:
    parts of `split_size` in order, the last one shorter, and the plain mean of exp(mean KL) over parts."""
    preds = scipy.special.softmax(logits, axis=1)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores)), scores


def test_inception_score_parts_of_5000_as_adm():
    rng = np.random.default_rng(3)
    # The class mix drifts along the samples, so which samples share a part matters.
    drift = np.linspace(0, 4, 50_000)[:, None] * np.eye(20)[rng.integers(0, 20)]
    logits = rng.normal(scale=3, size=(50_000, 20)) + drift
    adm, scores = adm_inception_score(logits[:12_000])
    assert len(scores) == 3  # 5000, 5000, 2000
    assert inception_score(logits[:12_000]) == pytest.approx((adm, np.std(scores)), rel=1e-10)
    ten_splits = np.mean([adm_inception_score(logits[i * 1200:(i + 1) * 1200], 1200)[0] for i in range(10)])
    assert abs(inception_score(logits[:12_000])[0] - ten_splits) > 1e-3  # what ours gave before, unlike papers
    adm, scores = adm_inception_score(logits)
    ten_splits = [adm_inception_score(logits[i * 5000:(i + 1) * 5000], 5000)[0] for i in range(10)]
    assert len(scores) == 10 and inception_score(logits) == pytest.approx((adm, np.std(scores)), rel=1e-10)
    assert inception_score(logits)[0] == pytest.approx(np.mean(ten_splits), rel=1e-12)  # 50k: improved-gan's splits


def test_precision_recall_closed_forms():
    x = np.random.default_rng(1).normal(size=(40, 16))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 1e3) == (0.0, 0.0)
    # By hand, k = 3: the radii of {0, 1, 2, 3} are 3, 2, 2, 3, those of {0, 1, 2, 100} are 100, 99, 98, 100.
    real, fake = [[0.0], [1.0], [2.0], [3.0]], [[0.0], [1.0], [2.0], [100.0]]
    assert precision_recall(real, fake) == (0.75, 1.0)  # 100 lies outside every real ball; 3 is in the ball of 0
    assert precision_recall(fake, real) == (1.0, 0.75)  # roles swapped
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(x[:3], x)


def test_kid_equals_brute_force_double_loop():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.5

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, std = kid(x, y, subsets=3, subset_size=1000)  # subsets of min(1000, 6, 6): the sets themselves, permuted
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std < 1e-10
    assert kid(x, y, subsets=20, subset_size=4, seed=1) == kid(x, y, subsets=20, subset_size=4, seed=1)  # seeded


def test_kid_is_unbiased():
    """Two samples of one distribution: the mean KID over many draws is 0 within 3 standard errors, while the
    biased estimate (diagonal terms kept) on the same draws is clearly positive: the test can tell them apart."""
    rng = np.random.default_rng(3)
    unbiased, biased = [], []
    for _ in range(1000):
        x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
        unbiased.append(kid(x, y, subsets=1, subset_size=10)[0])
        biased.append((((x @ x.T / 4 + 1) ** 3).mean() + ((y @ y.T / 4 + 1) ** 3).mean()
                       - 2 * ((x @ y.T / 4 + 1) ** 3).mean()))
    for values, unbiased_ in ((unbiased, True), (biased, False)):
        mean, error = np.mean(values), np.std(values, ddof=1) / np.sqrt(len(values))
        assert (abs(mean) < 3 * error) == unbiased_, (mean, error)


#################################################################################
#                               Sample IO, Inception                            #
#################################################################################

@pytest.fixture
def rgb_samples(tmp_path):
    """Six 32x32 RGB uint8 images as an ADM npz and as a folder of PNGs (plus a non-image file)."""
    images = np.random.default_rng(4).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    images[:3, 8:24, 8:24] = 255  # not all noise: white squares on half of them
    npz, folder = tmp_path / "samples.npz", tmp_path / "images"
    np.savez(npz, arr_0=images)
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    (folder / "labels_000000.json").write_text("{}")
    return images, str(npz), str(folder)


def test_unreadable_npz_is_one_clear_line(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip archive")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    os.replace(tmp_path / "objects.npy", tmp_path / "objects.npz")
    for name in ("text.npz", "objects.npz"):
        with pytest.raises(ValueError, match=r"not a readable \.npz of images .*np\.savez") as error:
            load_images(tmp_path / name)
        assert "\n" not in str(error.value)


def test_load_images_formats_and_errors(rgb_samples, tmp_path):
    images, npz, folder = rgb_samples
    assert np.array_equal(load_images(npz), images) and np.array_equal(load_images(folder), images)
    gray = images[..., 0]
    np.savez(tmp_path / "gray.npz", arr_0=gray)
    np.savez(tmp_path / "gray1.npz", arr_0=gray[..., None])
    assert load_images(tmp_path / "gray.npz").shape == (6, 32, 32, 1)
    assert np.array_equal(load_images(tmp_path / "gray1.npz"), gray[..., None])
    (tmp_path / "gray").mkdir()
    Image.fromarray(gray[0]).save(tmp_path / "gray" / "a.png")
    assert load_images(tmp_path / "gray").shape == (1, 32, 32, 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(tmp_path / "missing.npz")
    np.savez(tmp_path / "float.npz", arr_0=images / 255.0)
    with pytest.raises(ValueError, match="uint8"):
        load_images(tmp_path / "float.npz")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="no 'arr_0'"):
        load_images(tmp_path / "stats.npz")
    np.savez(tmp_path / "shape.npz", arr_0=images[..., :2])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        load_images(tmp_path / "shape.npz")
    Image.fromarray(images[0, :16]).save(tmp_path / "images" / "zz.png")
    with pytest.raises(ValueError, match="differ in size"):
        load_images(folder)


@pytest.fixture(scope="module")
def random_inception():
    """Built once per module: the 94-conv network dominates these tests' time."""
    return InceptionFeatures(random_init=True)


def test_inception_pipeline_end_to_end_random_weights(rgb_samples, random_inception, tmp_path):
    images, npz, folder = rgb_samples
    model = random_inception
    from_npz = model.features(load_images(npz), batch_size=4, progress=False)
    from_folder = model.features(load_images(folder), batch_size=4, progress=False)
    assert from_npz.shape == (6, 2048) and from_npz.dtype == np.float64 and np.isfinite(from_npz).all()
    assert np.array_equal(from_npz, from_folder)
    assert from_npz.std(axis=0).mean() > 1e-3  # random weights still separate the images
    gray = images[:2, ..., :1]  # grayscale is repeated to RGB
    assert np.allclose(model.features(gray, progress=False), model.features(gray.repeat(3, -1), progress=False),
                       rtol=1e-5, atol=1e-5)
    # A weights file in pytorch-fid's layout (torchvision names, 1008-way fc) loads and gives the same features.
    state = {**model.net.state_dict(), "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    torch.save(state, tmp_path / "weights.pth")
    assert np.allclose(InceptionFeatures(tmp_path / "weights.pth").features(images[:2], progress=False),
                       from_npz[:2], atol=1e-6)
    # The stats command writes (mu, sigma) that load_statistics reads back as a reference.
    main(["stats", folder, "--out", str(tmp_path / "ref"), "--inception", str(tmp_path / "weights.pth"),
          "--batch-size", "3", "--device", "cpu"])
    mu, sigma = load_statistics(tmp_path / "ref.npz", model)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert np.allclose(mu, from_npz.mean(0), atol=1e-6) and np.allclose(sigma, np.cov(from_npz, rowvar=False))


def tf1_resize_bilinear(x, size):
    """TF 1.x's ResizeBilinear (align_corners=False, no half-pixel centres), written out from its kernel
    (tensorflow/core/kernels/resize_bilinear_op.cc): output pixel i reads input position i * in / out, clamped at the
    last pixel. (N, C, H, W) float64 numpy."""
    def weights(n_in, n_out):  # (n_out, n_in) interpolation matrix
        w = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = i * n_in / n_out
            lo = int(np.floor(src))
            hi, frac = min(lo + 1, n_in - 1), src - lo
            w[i, lo] += 1 - frac
            w[i, hi] += frac
        return w
    return np.einsum("yh,nchw,xw->ncyx", weights(x.shape[2], size), x, weights(x.shape[3], size))


def test_inception_features_are_adms_tf_graph_on_pytorch_fids_network(rgb_samples, random_inception, monkeypatch):
    """Our pool3 features are pytorch-fid's FID Inception network (its FIDInceptionA/C/E blocks, given the same random
    weights through its weight loader) applied to the input ADM's TF graph makes of the images: TF 1.x's bilinear
    resize to 299 (written out here from TF's kernel) and (x - 128) / 128 — not pytorch-fid's own preprocessing
    (half-pixel resize, x / 127.5 - 1), which moves the features. Non-square 24x40 inputs exercise the resize."""
    import pytorch_fid.inception as pytorch_fid_inception  # test-only dependency (requirements.txt)
    state = {**random_inception.net.state_dict(), "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    network = pytorch_fid_inception.InceptionV3([pytorch_fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
                                                resize_input=False, normalize_input=False).eval()
    own_preprocessing = pytorch_fid_inception.InceptionV3(
        [pytorch_fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    images = np.ascontiguousarray(rgb_samples[0][:2, 4:28])
    images = np.concatenate([images, images[:, :, :8]], axis=2)  # (2, 24, 40, 3)
    tf_input = (tf1_resize_bilinear(images.transpose(0, 3, 1, 2).astype(np.float64), 299) - 128) / 128
    with torch.no_grad():
        expected = network(torch.from_numpy(tf_input).float())[0].flatten(1).double().numpy()
        pytorch_fids = own_preprocessing(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)[0]
    ours = random_inception.features(images, progress=False)
    assert np.abs(expected).mean() > 1e-2
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(ours - pytorch_fids.flatten(1).double().numpy()).max() > 1e-2  # the preprocessing matters


def test_inception_weights_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError) as error:
        InceptionFeatures(tmp_path / "missing.pth")
    message = str(error.value)
    assert "\n" not in message and INCEPTION_URL in message and "--inception PATH" in message
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not FID Inception-v3 weights"):
        InceptionFeatures(tmp_path / "other.pth")
    with pytest.raises(SystemExit) as exit_:
        main(["fid", str(tmp_path / "x.npz"), str(tmp_path / "y.npz"), "--inception", str(tmp_path / "no.pth")])
    assert str(exit_.value).startswith("error: Inception weights not found") and INCEPTION_URL in str(exit_.value)


#################################################################################
#                 The metric table: one Inception pass, reference cache         #
#################################################################################

@contextlib.contextmanager
def counting_forward():
    """Yields the list of batch sizes that go through any InceptionFeatures network inside the block."""
    calls, original = [], InceptionFeatures.forward

    def counted(self, images):
        calls.append(len(images))
        return original(self, images)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InceptionFeatures, "forward", counted)
        yield calls


@pytest.fixture
def quick_frechet(monkeypatch):
    """sqrtm of a 2048 x 2048 matrix takes ~25 s on this 2-core machine, twice per table (FID, sFID). The table tests
    therefore swap `metrics.frechet_distance` for a stand-in (the formula without its coupling term) and record
    which statistics reach it; the Fréchet distance itself is tested against closed forms above."""
    calls = []

    def stand_in(mu1, sigma1, mu2, sigma2, eps=1e-6):
        calls.append((mu1, sigma1, mu2, sigma2))
        return float(np.sum((np.asarray(mu1) - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2))

    monkeypatch.setattr(metrics, "frechet_distance", stand_in)
    return calls


@pytest.fixture(scope="module")
def tiny_set(random_inception, tmp_path_factory):
    """Six 32 px samples and six reference images as ADM npz files; random_inception's weights (its random 1008-way
    fc included) saved as a pytorch-fid weights file; the samples' features (batches of 5) and the reference (its
    features computed once, in batches of 5, and cached next to it)."""
    folder = tmp_path_factory.mktemp("tiny_set")
    rng = np.random.default_rng(5)
    samples = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    reference = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    reference[:3, 8:24, 8:24] = 255
    np.savez(folder / "samples.npz", arr_0=samples)
    np.savez(folder / "ref.npz", arr_0=reference)
    weights = folder / "inception.pth"
    torch.save({**random_inception.net.state_dict(), "fc.weight": random_inception.logits_weight,
                "fc.bias": torch.zeros(1008)}, weights)
    model = InceptionFeatures(weights)
    features = model.all_features(samples, batch_size=5, progress=False)
    with counting_forward() as calls:
        ref = load_reference(folder / "ref.npz", model, batch_size=5, progress=False)
    return SimpleNamespace(folder=folder, samples=str(folder / "samples.npz"), ref=str(folder / "ref.npz"),
                           reference_images=reference, weights=str(weights), model=model, features=features,
                           reference=ref, reference_calls=calls)


METRICS = ("fid", "sfid", "inception_score", "inception_score_std", "precision", "recall", "kid", "kid_std")


def test_sfid_features_are_adm_mixed_6_conv(random_inception):
    """299 px input: sFID features (N, 2023) = the first 7 channels of Mixed_6d.branch1x1 (TF's mixed_6/conv, 192 x
    17 x 17) flattened in NHWC order as ADM does; logits = pool3 @ fc.weight^T (no bias, as ADM and improved-gan)."""
    images = np.random.default_rng(6).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    caught = []
    hook = random_inception.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: caught.append(out))
    try:
        features = random_inception.all_features(images, batch_size=2, progress=False)
    finally:
        hook.remove()
    assert features["pool3"].shape == (2, 2048) and features["spatial"].shape == (2, 2023)
    assert features["logits"].shape == (2, 1008) and caught[0].shape == (2, 192, 17, 17)
    expected = caught[0].permute(0, 2, 3, 1)[..., :7].reshape(2, -1).double().numpy()  # spatial[..., :7], flattened
    np.testing.assert_array_equal(features["spatial"], expected)
    assert features["spatial"].std() > 1e-3
    logits = features["pool3"] @ random_inception.logits_weight.double().numpy().T
    np.testing.assert_allclose(features["logits"], logits, rtol=1e-4, atol=1e-4)


def test_reference_cache_written_once_and_reused(tiny_set, random_inception):
    t = tiny_set
    assert t.reference_calls == [5, 1]  # the first evaluation ran the reference's 6 images once
    caches = sorted(p.name for p in t.folder.glob("ref.inception-*.npz"))
    assert len(caches) == 1
    with counting_forward() as calls:
        again = load_reference(t.ref, t.model, batch_size=5, progress=False)
    assert calls == []  # the second does not run the network on the reference
    for name in ("mu", "sigma", "mu_s", "sigma_s", "features"):
        np.testing.assert_array_equal(getattr(again, name), getattr(t.reference, name))
    assert again.num_images == 6 and again.features.shape == (6, 2048) and again.sigma_s.shape == (2023, 2023)
    # The key is the reference's content and the weights: other images or other weights, another cache file.
    path, key = reference_cache_path(t.ref, t.model)
    assert os.path.basename(path) == caches[0]
    assert reference_cache_path(t.ref, random_inception)[1] != key  # same network, weights of another identity
    assert reference_cache_path(t.ref, t.model, content_hash="0" * 64)[1] != key
    assert reference_content_hash(t.ref) != reference_content_hash(t.samples)
    folder = t.folder / "ref_images"  # a folder's hash: the names and bytes of the images that load_images reads
    folder.mkdir()
    for i, image in enumerate(t.reference_images[:2]):
        Image.fromarray(image).save(folder / f"{i}.png")
    digest = reference_content_hash(folder)
    (folder / "notes.txt").write_text("not an image")
    assert reference_content_hash(folder) == digest
    Image.fromarray(t.reference_images[2]).save(folder / "1.png")
    assert reference_content_hash(folder) != digest


def test_all_command_end_to_end_and_batch_size_independent(tiny_set, quick_frechet, capsys, monkeypatch):
    from fpdm import metrics
    t = tiny_set
    metrics._CONTENT_HASHES.clear()
    real, hashed = metrics._sha256_file, []
    monkeypatch.setattr(metrics, "_sha256_file", lambda path, *rest: hashed.append(str(path)) or real(path, *rest))
    with counting_forward() as calls:
        result = main(["all", t.samples, t.ref, "--inception", t.weights, "--batch-size", "2", "--device", "cpu",
                       "--kid-subsets", "10"])
    assert calls == [2, 2, 2]  # one pass over the samples; the reference came from its cache
    assert hashed.count(str(t.ref)) == 1  # its content hash: the cache key's and the report's, read once
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in ("FID", "sFID", "IS", "Precision", "Recall", "KID"))
    report = json.loads((t.folder / "samples.all.json").read_text())
    assert report == json.loads(json.dumps(result))
    assert report["num_samples"] == 6 and report["num_reference"] == 6 and report["image_shape"] == [32, 32, 3]
    assert report["reference_note"] is None and report["kid_subset_size"] == 6
    # which files made it, found later: absolute paths, the reference's content, the weights' identity
    assert report["samples"] == os.path.abspath(t.samples) and report["reference"] == os.path.abspath(t.ref)
    assert report["reference_sha256"] == reference_content_hash(t.ref) and report["inception_id"] == t.model.identity
    assert report["inception"] == os.path.abspath(t.weights)
    assert report["is_split_size"] == 5000 and report["is_parts"] == 1
    assert all(report[name] is not None and np.isfinite(report[name]) for name in METRICS)
    assert 0 <= report["precision"] <= 1 and 0 <= report["recall"] <= 1
    # Batches of 2 (here) and of 5 (the fixture's features) give the same numbers.
    expected = inception_metrics(t.features, t.reference, kid_subsets=10)
    for name in METRICS:
        assert report[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-5), name
    # FID and sFID compared the samples' pool3 / spatial statistics with the reference's.
    (mu, _, ref_mu, _), (mu_s, _, ref_mu_s, _) = quick_frechet[:2]
    assert mu.shape == (2048,) and mu_s.shape == (2023,)
    np.testing.assert_array_equal(ref_mu, t.reference.mu)
    np.testing.assert_array_equal(ref_mu_s, t.reference.mu_s)


def test_fid_command_reports_the_files_that_made_it(tiny_set, quick_frechet, capsys):
    t = tiny_set
    result = main(["fid", t.samples, t.ref, "--inception", t.weights, "--batch-size", "3", "--device", "cpu"])
    report = json.loads((t.folder / "samples.fid.json").read_text())
    assert report == json.loads(json.dumps(result)) and report["num_samples"] == 6 and np.isfinite(report["fid"])
    assert report["samples"] == os.path.abspath(t.samples) and report["reference"] == os.path.abspath(t.ref)
    assert report["reference_sha256"] == reference_content_hash(t.ref) and report["inception_id"] == t.model.identity
    assert f"FID {report['fid']:.4f} (6 samples vs {t.ref}) -> " in capsys.readouterr().out


def test_stats_file_round_trip_and_old_stats_files(tiny_set, quick_frechet, random_inception, tmp_path, capsys):
    t = tiny_set
    with counting_forward() as calls:
        main(["stats", t.ref, "--out", str(tmp_path / "ref_stats"), "--inception", t.weights, "--device", "cpu"])
    assert calls == []  # the cached features of the same images
    with np.load(tmp_path / "ref_stats.npz") as data:
        assert {"mu", "sigma", "mu_s", "sigma_s", "pool3"} <= set(data.files)
    new = load_reference(tmp_path / "ref_stats.npz", t.model)
    assert new.note is None and new.num_images == 6 and "warning" not in capsys.readouterr().out
    load_reference(tmp_path / "ref_stats.npz", random_inception)  # same network, weights of another identity
    assert "warning: " in capsys.readouterr().out
    full = inception_metrics(t.features, new, kid_subsets=10)
    direct = inception_metrics(t.features, t.reference, kid_subsets=10)
    assert {name: full[name] for name in METRICS} == {name: direct[name] for name in METRICS}
    # An old stats file (mu, sigma only): FID and IS, and one line saying what the rest needs.
    np.savez(tmp_path / "old.npz", mu=t.reference.mu, sigma=t.reference.sigma)
    with counting_forward() as calls:
        old = inception_metrics(t.features, load_reference(tmp_path / "old.npz", t.model), kid_subsets=10)
    assert calls == []
    assert old["fid"] == full["fid"] and old["inception_score"] == full["inception_score"]
    assert all(old[name] is None for name in ("sfid", "precision", "recall", "kid", "kid_std"))
    note = old["reference_note"]
    assert "\n" not in note and "only mu/sigma" in note and "sFID, precision, recall, KID" in note
    assert "python evaluate.py stats IMAGES --out" in note
    table = format_table(old, "title")
    assert "  sFID       n/a" in table and "  FID        " in table and "n/a" not in table.splitlines()[1]
    mu, sigma = load_statistics(tmp_path / "old.npz", t.model)  # the FID path reads old files as before
    np.testing.assert_array_equal(mu, t.reference.mu)


def test_adm_reference_batch_statistics_used_as_is(tiny_set, quick_frechet, tmp_path):
    t = tiny_set
    given = {"mu": t.reference.mu + 1, "sigma": 2 * t.reference.sigma, "mu_s": t.reference.mu_s - 1,
             "sigma_s": 3 * t.reference.sigma_s}
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=t.reference_images[:4], **given)
    with counting_forward() as calls:
        mu, sigma = load_statistics(tmp_path / "VIRTUAL_ref.npz", t.model)
    assert calls == []  # FID alone needs no network: ADM's mu/sigma
    np.testing.assert_array_equal(mu, given["mu"])
    np.testing.assert_array_equal(sigma, given["sigma"])
    with counting_forward() as calls:
        reference = load_reference(tmp_path / "VIRTUAL_ref.npz", t.model, batch_size=4, progress=False)
    assert calls == [4]  # its images, for the pool3 features that precision/recall and KID need
    for name, value in given.items():
        np.testing.assert_array_equal(getattr(reference, name), value)
    np.testing.assert_allclose(reference.features, t.reference.features[:4], rtol=1e-5, atol=1e-5)
    result = inception_metrics(t.features, reference, kid_subsets=10)
    assert result["reference_note"] is None and result["precision"] is not None
    (_, _, fid_mu, fid_sigma), (_, _, sfid_mu, sfid_sigma) = quick_frechet[:2]  # FID, then sFID
    for used, name in ((fid_mu, "mu"), (fid_sigma, "sigma"), (sfid_mu, "mu_s"), (sfid_sigma, "sigma_s")):
        np.testing.assert_array_equal(used, given[name])


#################################################################################
#                                   FID-MNIST                                   #
#################################################################################

def test_classifier_accuracy_on_real_digits(classifier):
    m = classifier.metrics
    print(f"\nclassifier: {m}")
    assert m["train_accuracy"] >= 0.97 and m["heldout_accuracy_28px"] >= 0.93 and m["heldout_accuracy_14px"] >= 0.93
    for size in (28, 14, 32):
        x, y = real_digits(size)
        assert classifier_accuracy(x, y, classifier) >= 0.97
    x, y = real_digits(28)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert classifier_accuracy(x, shuffled, classifier) < 0.2  # chance is 0.1
    uint8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, 3).numpy()  # ADM's npz
    assert classifier_accuracy(uint8, y.numpy(), classifier) == classifier_accuracy(x, y, classifier)
    assert mnist_features(x[:10], classifier).shape == (10, MNIST_CLASSIFIER["features"])


def test_fid_mnist_sanity(classifier):
    g = torch.Generator().manual_seed(0)
    for size in (28, 14):
        x, y = real_digits(size)
        real = fid_mnist(x[first_per_class(y, 250)], classifier)
        noise = fid_mnist(torch.randn(len(x), 1, size, size, generator=g).clamp(-1, 1), classifier)
        blurred = [fid_mnist(gaussian_blur(x, 2 * int(3 * s) + 1, s), classifier) for s in (0.5, 1.0, 2.0)]
        noisy = [fid_mnist((x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1), classifier)
                 for s in (0.1, 0.2, 0.4, 0.8)]
        print(f"\n{size} px FID-MNIST: real half vs all {real:.3f}, noise {noise:.1f}, blur {np.round(blurred, 2)}, "
              f"added noise {np.round(noisy, 2)}")
        assert abs(fid_mnist(x, classifier)) < 1e-6 and 0 < real < 5 and noise > 1000
        assert real < blurred[0] and blurred == sorted(blurred) and blurred[-1] < noise
        assert real < noisy[0] and noisy == sorted(noisy) and noisy[-1] < noise


def test_mnist_inputs_sizes_and_errors():
    x, _ = real_digits(28)
    assert torch.equal(metrics.mnist_inputs(real_digits(32)[0][:4])[0], x[:4])  # 32 px = 28 px padded by 2
    for size in (7, 14):
        prepared, got = metrics.mnist_inputs(real_digits(size)[0][:4])
        assert prepared.shape == (4, 1, 28, 28) and got == size
    with pytest.raises(ValueError, match="px"):
        metrics.mnist_inputs(torch.zeros(2, 1, 20, 20))
    with pytest.raises(ValueError, match="shape"):
        metrics.mnist_inputs(torch.zeros(2, 2, 28, 28))


def test_classifier_cache_reused_retrained_when_corrupt_or_stale(classifier, tmp_path, capsys):
    again = load_mnist_classifier(classifier.path)
    assert "training" not in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), classifier.state_dict().values()))
    quick = {**MNIST_CLASSIFIER, "epochs": 1}  # a cheap config, to exercise retraining
    path = tmp_path / "quick.pt"
    path.write_bytes(b"torn write")
    with torch.no_grad():  # the first use may come from a no_grad caller (FID during training): it still trains
        model = load_mnist_classifier(path, config=quick)
    assert "unusable" in capsys.readouterr().out and model.metrics["train_accuracy"] > 0.8
    assert sorted(os.listdir(tmp_path)) == ["quick.pt"]  # no temporary file left behind
    load_mnist_classifier(path, config={**quick, "seed": 1})
    assert "another format or config" in capsys.readouterr().out
    assert metrics.mnist_classifier_path(quick) != metrics.mnist_classifier_path(MNIST_CLASSIFIER)


def test_cli_fid_mnist(classifier, tmp_path):
    x, y = real_digits(14)
    keep = first_per_class(y, 30)
    samples = ((x[keep] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, 3).numpy()
    np.savez(tmp_path / "samples.npz", arr_0=samples, labels=y[keep].numpy())
    run = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "fid-mnist", str(tmp_path / "samples.npz"),
                          "--classifier", classifier.path, "--device", "cpu"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "FID-MNIST" in run.stdout and "training" not in run.stdout
    report = json.loads((tmp_path / "samples.fid-mnist.json").read_text())
    assert report["num_samples"] == 300 and report["image_size"] == 14 and report["accuracy"] >= 0.95
    assert report["fid_mnist"] == pytest.approx(fid_mnist(x[keep], classifier), rel=1e-3)
    unconditional = main(["fid-mnist", str(tmp_path / "samples.npz"), "--ignore-labels", "--classifier",
                          classifier.path, "--device", "cpu"])
    assert unconditional["accuracy"] is None and unconditional["fid_mnist"] == pytest.approx(report["fid_mnist"])
    np.save(tmp_path / "wrong.npy", np.zeros(7, dtype=np.int64))
    for argv, message in ((["fid-mnist", str(tmp_path / "missing.npz")], "does not exist"),
                          (["fid-mnist", str(tmp_path / "samples.npz"), "--labels", str(tmp_path / "wrong.npy"),
                            "--classifier", classifier.path, "--device", "cpu"], "7 labels for 300 samples")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert str(exit_.value).startswith("error:") and message in str(exit_.value)


def test_mnist_metrics_real_digits_vs_themselves(classifier, tmp_path, capsys):
    x, y = real_digits(14)
    result = mnist_metrics(x, y, classifier, kid_subsets=4, kid_subset_size=500)
    print(f"\nreal vs real, 14 px: {result}")
    assert abs(result["fid"]) < 1e-6 and result["fid"] == pytest.approx(fid_mnist(x, classifier), abs=1e-9)
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    # KID ~ 0 on the scale of its spread over subsets. (Subsets drawn independently from one finite set expect
    # -2 (mean k(x, x) - mean k(x, x')) / N, about -0.7 here; the std over subsets of 1,000 is ~0.8.)
    assert abs(result["kid"]) < 3 * result["kid_std"]
    assert result["accuracy"] >= 0.97 and result["num_samples"] == result["num_reference"] == 5000
    # The command: the same table on MNIST features, 300 real digits as an ADM npz (uint8 RGB).
    keep = first_per_class(y, 30)
    samples = ((x[keep] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, 3).numpy()
    np.savez(tmp_path / "samples.npz", arr_0=samples, labels=y[keep].numpy())
    main(["all-mnist", str(tmp_path / "samples.npz"), "--classifier", classifier.path, "--device", "cpu",
          "--kid-subsets", "5"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in ("FID", "Precision", "Recall", "KID", "Accuracy")) and "sFID" not in out
    report = json.loads((tmp_path / "samples.all-mnist.json").read_text())
    assert report["fid"] == pytest.approx(fid_mnist(x[keep], classifier), rel=1e-3) and report["accuracy"] >= 0.95
    assert report["precision"] > 0.9 and 0 < report["recall"] < 1 and report["kid_subset_size"] == 300
    # A report that cannot be written (a read-only or full samples folder; here a folder in its place): the numbers
    # are printed all the same, with one line saying why no report was written.
    (tmp_path / "samples.fid-mnist.json").mkdir()
    main(["fid-mnist", str(tmp_path / "samples.npz"), "--classifier", classifier.path, "--device", "cpu"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"FID-MNIST {report['fid']:.4f}") and "(report not written to " in line
