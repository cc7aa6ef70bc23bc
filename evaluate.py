"""Sample quality of generated images: the metric table of a paper (FID, sFID, IS, precision/recall, KID) from one
Inception pass, and the same metrics on a small MNIST classifier's features for the demo and experiments.

    python evaluate.py all samples.npz VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth
    python evaluate.py fid samples.npz VIRTUAL_imagenet256_labeled.npz --inception ...   # FID alone
    python evaluate.py stats reference_images/ --out ref_stats.npz --inception ...   # reference statistics once
    python evaluate.py all-mnist samples.npz              # FID, precision/recall, KID, accuracy on MNIST features
    python evaluate.py fid-mnist samples.npz              # class labels from the npz's "labels", or --labels y.npy

The definitions (FID, sFID, IS, precision/recall, KID, FID-MNIST) and the Inception network are in fpdm/metrics.py.
Results are printed and written as JSON next to the samples. Samples and reference must be images of one size
(Inception resizes both to 299 px, so other sizes give numbers not comparable to published ones): `fid` and `all`
refuse others; stats files record the size of their images.
"""

import argparse
import json
import os
import sys

from fpdm import cpu_threads  # before torch: OpenMP reads its wait policy (OMP_WAIT_POLICY) when torch loads
import numpy as np

from fpdm.metrics import (DEFAULT_INCEPTION, INCEPTION_URL, STATISTICS, InceptionFeatures, _reference_from_images,
                          check_reference_size, evaluate_inception, evaluate_mnist, feature_statistics,
                          frechet_distance, load_images, load_mnist_classifier, load_statistics, mnist_metrics,
                          reference_content_hash, save_reference)


def _inputs(args, model):
    """What a report records of its inputs: absolute paths, the reference's content hash and the Inception weights'
    identity, so that a report found later says which files made it."""
    full = lambda path: os.path.abspath(os.path.expanduser(str(path)))
    return {"samples": full(args.samples), "reference": full(args.ref),
            "reference_sha256": reference_content_hash(args.ref),
            "inception": full(model.weights) if os.path.exists(model.weights) else model.weights,  # or "random"
            "inception_id": model.identity}


def _write_report(samples, command, result):
    """Write `<samples without .npz>.<command>.json` next to the samples (atomically); returns what to print after
    the numbers: "-> PATH", or why it was not written (a read-only or full samples folder: the numbers, computed at
    length, are printed all the same)."""
    from fpdm.run_folders import atomic_write
    base = os.path.expanduser(str(samples)).rstrip("/\\")
    path = f"{base[:-4] if base.endswith('.npz') else base}.{command}.json"
    try:
        atomic_write(path, lambda f: json.dump(result, f, indent=2))
    except OSError as e:
        return f"(report not written to {path}: {e.strerror or e})"
    return f"-> {path}"


# (row name, result key, key of its std over splits/subsets, format): one table for `all` and `all-mnist`
TABLE_ROWS = (("FID", "fid", None, "{:.4f}"), ("sFID", "sfid", None, "{:.4f}"),
              ("IS", "inception_score", "inception_score_std", "{:.3f}"), ("Precision", "precision", None, "{:.4f}"),
              ("Recall", "recall", None, "{:.4f}"), ("KID", "kid", "kid_std", "{:.5g}"),
              ("Accuracy", "accuracy", None, "{:.4f}"))


def format_table(result, title):
    """The metrics of `result` that it has keys for, one per line ("n/a" for None), under `title`."""
    lines = [title]
    for name, key, std_key, fmt in TABLE_ROWS:
        if key in result:
            value, std = result[key], result.get(std_key) if std_key else None
            text = "n/a" if value is None else fmt.format(value) + ("" if std is None else f" +/- {fmt.format(std)}")
            lines.append(f"  {name:<10} {text}")
    return "\n".join(lines)


def _device(name):
    from fpdm.sampling import resolve_device
    device = resolve_device(name)
    cpu_threads.configure(device)  # CPU: the free cores only
    return device


def _inception(args):
    return InceptionFeatures(args.inception).to(_device(args.device))


def run_fid(args):
    model = _inception(args)
    images = load_images(args.samples)
    size_note = check_reference_size(images.shape[1:3], args.ref)  # other sizes: refused before any network pass
    if size_note:
        print(f"note: {size_note}")
    mu, sigma = feature_statistics(model.features(images, args.batch_size))
    fid = frechet_distance(mu, sigma, *load_statistics(args.ref, model, args.batch_size))
    result = {"fid": fid, "num_samples": len(images), "image_shape": list(images.shape[1:]), **_inputs(args, model),
              "size_note": size_note}
    print(f"FID {fid:.4f} ({len(images)} samples vs {args.ref}) {_write_report(args.samples, 'fid', result)}")
    return result


def run_stats(args):
    model = _inception(args)
    reference = _reference_from_images(args.images, model, args.batch_size, cache=not args.no_cache)
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"
    save_reference(out, reference, model.identity)
    print(f"wrote mu/sigma {reference.sigma.shape}, mu_s/sigma_s {reference.sigma_s.shape} and the pool3 features "
          f"{reference.features.shape} of {args.images} ({'x'.join(map(str, reference.image_size))} px) to {out}")
    return {name: getattr(reference, name) for name in STATISTICS + ("features",)}


def run_all(args):
    model = _inception(args)
    settings = {"k": args.k, "kid_subsets": args.kid_subsets, "kid_subset_size": args.kid_subset_size,
                "is_split_size": args.is_split_size, "seed": args.seed}
    result = evaluate_inception(args.samples, args.ref, model, args.batch_size, cache=not args.no_cache, **settings)
    result.update(_inputs(args, model))
    if result["size_note"]:
        print(f"note: {result['size_note']}")
    if result["reference_note"]:
        print(result["reference_note"])
    report = _write_report(args.samples, "all", result)
    print(format_table(result, f"{result['num_samples']} samples vs {args.ref} (Inception-v3 features)"))
    print(report)
    return result


def _mnist_labels(args):
    if args.ignore_labels:
        return None
    if args.labels:
        if not os.path.isfile(args.labels):
            raise FileNotFoundError(f"{args.labels} does not exist: pass a .npy of class labels")
        return np.load(args.labels)
    if args.samples.endswith(".npz"):
        with np.load(args.samples) as data:
            return data["labels"] if "labels" in data else None
    return None


def run_fid_mnist(args):
    images = load_images(args.samples)
    labels = _mnist_labels(args)
    model = load_mnist_classifier(args.classifier)
    result = evaluate_mnist(images, labels, model, _device(args.device))
    result.update(samples=args.samples, classifier=model.path, classifier_metrics=model.metrics)
    accuracy = "n/a (no labels)" if result["accuracy"] is None else f"{result['accuracy']:.4f}"
    print(f"FID-MNIST {result['fid_mnist']:.4f}, classifier accuracy {accuracy} ({result['num_samples']} samples, "
          f"{result['image_size']} px) {_write_report(args.samples, 'fid-mnist', result)}")
    return result


def run_all_mnist(args):
    images = load_images(args.samples)
    labels = _mnist_labels(args)
    model = load_mnist_classifier(args.classifier)
    result = mnist_metrics(images, labels, model, _device(args.device), args.k, args.kid_subsets, args.kid_subset_size,
                           args.seed)
    result.update(samples=args.samples, classifier=model.path, classifier_metrics=model.metrics)
    report = _write_report(args.samples, "all-mnist", result)
    print(format_table(result, f"{result['num_samples']} samples vs {result['num_reference']} real digits at "
                               f"{result['image_size']} px (MNIST classifier features)"))
    print(report)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    every = commands.add_parser("all", help="FID, sFID, IS, precision/recall and KID of SAMPLES against REF")
    fid = commands.add_parser("fid", help="Inception FID of SAMPLES against REF")
    for p in (every, fid):
        p.add_argument("samples", help="ADM .npz (arr_0: uint8 N x H x W x 3) or a folder of PNG/JPG images")
        p.add_argument("ref", help="ADM's reference batch (.npz with arr_0 and mu/sigma/mu_s/sigma_s), a file from "
                                   "`evaluate.py stats`, or images (.npz with arr_0, or a folder), of the samples' "
                                   "image size")
    stats = commands.add_parser("stats", help="write the Inception statistics and features of IMAGES, for use as REF")
    stats.add_argument("images", help="ADM .npz or a folder of PNG/JPG images")
    stats.add_argument("--out", required=True, help="output .npz")
    for p in (every, fid, stats):
        p.add_argument("--inception", default=DEFAULT_INCEPTION, help=f"FID Inception weights ({INCEPTION_URL})")
        p.add_argument("--batch-size", type=int, default=50)
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    for p in (every, stats):
        p.add_argument("--no-cache", action="store_true",
                       help="neither read nor write the reference-feature cache next to the reference")
    mnist = commands.add_parser("fid-mnist", help="FID-MNIST and classifier accuracy of MNIST samples")
    all_mnist = commands.add_parser("all-mnist", help="FID, precision/recall, KID and accuracy on MNIST classifier "
                                                      "features")
    for p in (mnist, all_mnist):
        p.add_argument("samples", help="ADM .npz (labels from its 'labels' array, if any) or a folder of PNG images")
        p.add_argument("--labels", default=None, help=".npy of the samples' intended class labels")
        p.add_argument("--ignore-labels", action="store_true", help="unconditional samples (labels all 0): no "
                                                                    "accuracy")
        p.add_argument("--classifier", default=None, help="classifier cache file (default: ~/.cache/fpdm/...)")
        p.add_argument("--device", default="auto")
    for p in (every, all_mnist):
        p.add_argument("--k", type=int, default=3, help="nearest neighbours of precision/recall")
        p.add_argument("--kid-subsets", type=int, default=100)
        p.add_argument("--kid-subset-size", type=int, default=1000)
        p.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")
    every.add_argument("--is-split-size", type=int, default=5000,
                       help="samples per Inception Score part, mean over parts (ADM: 5000, so 50k samples give 10)")
    parser.epilog = "\n".join(f"--- evaluate.py {name} ---\n{sub.format_help()}"  # every flag on one page
                               for name, sub in commands.choices.items())
    args = parser.parse_args(argv)
    try:
        return {"all": run_all, "fid": run_fid, "stats": run_stats, "fid-mnist": run_fid_mnist,
                "all-mnist": run_all_mnist}[args.command](args)
    except (ValueError, OSError) as e:  # OSError: also a full disk, a quota, a read-only or vanished folder
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
