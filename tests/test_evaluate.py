"""evaluate.py: the Fréchet distance against closed forms, sample IO (ADM npz and image folders), the Inception
pipeline end to end with random weights, FID-MNIST sanity (real vs real small, noise large, corruptions monotone),
the classifier cache, and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torchvision.transforms.functional import gaussian_blur

import evaluate
from data import MNISTDigits
from evaluate import (INCEPTION_URL, InceptionFeatures, MNIST_CLASSIFIER, classifier_accuracy, feature_statistics,
                      fid_mnist, frechet_distance, load_images, load_mnist_classifier, load_statistics, main,
                      mnist_features)

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


def test_inception_features_equal_pytorch_fid(rgb_samples, random_inception, monkeypatch):
    """pytorch-fid's own FID Inception (its FIDInceptionA/C/E blocks, resize and input scaling), given the same random
    weights through its weight loader, gives the same pool3 features: the network and preprocessing are pytorch-fid's.
    Non-square 24x40 inputs exercise the resize."""
    import pytorch_fid.inception as pytorch_fid_inception  # test-only dependency (requirements.txt)
    state = {**random_inception.net.state_dict(), "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    reference = pytorch_fid_inception.InceptionV3([pytorch_fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    images = np.ascontiguousarray(rgb_samples[0][:2, 4:28])
    images = np.concatenate([images, images[:, :, :8]], axis=2)  # (2, 24, 40, 3)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)[0].flatten(1).double()
    ours = random_inception.features(images, progress=False)
    assert expected.abs().mean() > 1e-2
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-4, atol=1e-5)


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
    assert torch.equal(evaluate.mnist_inputs(real_digits(32)[0][:4])[0], x[:4])  # 32 px = 28 px padded by 2
    for size in (7, 14):
        prepared, got = evaluate.mnist_inputs(real_digits(size)[0][:4])
        assert prepared.shape == (4, 1, 28, 28) and got == size
    with pytest.raises(ValueError, match="px"):
        evaluate.mnist_inputs(torch.zeros(2, 1, 20, 20))
    with pytest.raises(ValueError, match="shape"):
        evaluate.mnist_inputs(torch.zeros(2, 2, 28, 28))


def test_classifier_cache_reused_retrained_when_corrupt_or_stale(classifier, tmp_path, capsys):
    again = load_mnist_classifier(classifier.path)
    assert "training" not in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), classifier.state_dict().values()))
    quick = {**MNIST_CLASSIFIER, "epochs": 1}  # a cheap config, to exercise retraining
    path = tmp_path / "quick.pt"
    path.write_bytes(b"torn write")
    model = load_mnist_classifier(path, config=quick)
    assert "unusable" in capsys.readouterr().out and model.metrics["train_accuracy"] > 0.8
    assert sorted(os.listdir(tmp_path)) == ["quick.pt"]  # no temporary file left behind
    load_mnist_classifier(path, config={**quick, "seed": 1})
    assert "another format or config" in capsys.readouterr().out
    assert evaluate.mnist_classifier_path(quick) != evaluate.mnist_classifier_path(MNIST_CLASSIFIER)


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
