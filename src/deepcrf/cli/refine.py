"""``deepcrf refine``: the dense CRF over image/probability files, folders and volumes."""

from __future__ import annotations

import argparse
import sys

from deepcrf.cli._shared import floats

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff")
_PROBS_SUFFIXES = (".npy", ".png")
_OUTPUT_SUFFIXES = (".png", ".npy")


def add(sub: argparse._SubParsersAction) -> None:
    """Declare ``deepcrf refine``."""
    p = sub.add_parser(
        "refine",
        help="dense-CRF post-processing of a segmentation (image + probabilities -> labels)",
        description=(
            "Refine per-pixel label probabilities with the fully connected CRF (mean-field, "
            "Kraehenbuehl & Koltun 2011) and write the labels as a VOC palette PNG. PROBS is an "
            "(L, H, W) .npy of probabilities, or a palette/greyscale PNG of labels turned into "
            "probabilities with --confidence (255 = unsure). IMAGE and PROBS may be folders: "
            "files are matched by stem and -o names the output folder. Volumes: IMAGE a .npy "
            "(S, (C, *S) or (*S, C)) or NIfTI (.nii, .nii.gz; needs deepcrf[medical]) reference "
            "of 1-3 spatial dims, PROBS a .npy (L, *S) of probabilities or a label volume "
            "(.npy/NIfTI, with --confidence), -o a .npy/.nii/.nii.gz label volume (NIfTI keeps "
            "the reference's affine and header); the spacing comes from the NIfTI header or "
            "--spacing. Try it with "
            "'deepcrf refine --demo-input DIR', which writes DIR/image.png, DIR/probs.npy and "
            "DIR/labels.png (ground truth) and prints the command to run."
        ),
    )
    p.add_argument(
        "image", nargs="?",
        help="RGB image file or folder of images, or a reference volume (.npy, .nii, .nii.gz)",
    )  # fmt: skip
    p.add_argument("probs", nargs="?", help=".npy (L, H, W) probabilities or label PNG, or folder")
    p.add_argument(
        "-o", "--output",
        help="output labels: a palette .png (up to 255 labels) or a .npy; a folder when the "
             "inputs are folders; volumes: .npy, .nii or .nii.gz",
    )  # fmt: skip
    p.add_argument(
        "--confidence", type=float, default=0.7,
        help="label-PNG input: probability of the given label, the rest shared evenly "
             "(pydensecrf's gt_prob; default 0.7)",
    )  # fmt: skip
    p.add_argument(
        "--num-classes", type=int, default=None,
        help="label-PNG input: number of labels L (default: largest label + 1)",
    )  # fmt: skip
    p.add_argument("--iters", type=int, default=5, help="mean-field iterations (default 5)")
    p.add_argument(
        "--theta-alpha", type=floats, default=80.0,
        help="bilateral spatial bandwidth, pixels or --spacing units; one value or one per "
             "axis, comma-separated (pydensecrf sxy; default 80)",
    )  # fmt: skip
    p.add_argument(
        "--theta-beta", type=floats, default=13.0,
        help="bilateral colour bandwidth, 0-255 units for RGB, else the reference's units; one "
             "value or one per channel, comma-separated (pydensecrf srgb; default 13)",
    )  # fmt: skip
    p.add_argument(
        "--theta-gamma", type=floats, default=3.0,
        help="smoothness-kernel bandwidth, pixels or --spacing units; one or one per axis "
             "(default 3)",
    )  # fmt: skip
    p.add_argument(
        "--spacing", type=floats, default=None,
        help="volumes: voxel size per axis, comma-separated (default: the NIfTI header's, "
             "else 1); the bandwidths θα and θγ are then in these units",
    )  # fmt: skip
    p.add_argument("--w-bilateral", type=float, default=10.0, help="bilateral weight (default 10)")
    p.add_argument("--w-spatial", type=float, default=3.0, help="smoothness weight (default 3)")
    p.add_argument(
        "--normalization", choices=("symmetric", "none", "before", "after"),
        default="symmetric", help="kernel normalisation, as pydensecrf (default symmetric)",
    )  # fmt: skip
    p.add_argument("--exclude-self", action="store_true", help="drop the j = i kernel term")
    p.add_argument(
        "--method", choices=("lattice", "exact"), default="lattice",
        help="how the kernels are filtered: permutohedral lattice (default) or O(N^2) exact "
             "(tiny images)",
    )  # fmt: skip
    p.add_argument(
        "--ground-truth", metavar="LABELS",
        help="label PNG (or folder) to report pixel accuracy before/after (255 ignored)",
    )  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace output files that exist already (never an input)",
    )  # fmt: skip
    p.add_argument(
        "--fail-fast", action="store_true",
        help="folders: stop at the first file that fails (default: report it, go on, exit 1)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--demo-input", metavar="DIR",
        help="write a synthetic image, noisy probabilities and ground truth to DIR, then exit",
    )  # fmt: skip
    p.set_defaults(func=run)


def _refine_paths(args: argparse.Namespace, what: str) -> tuple:
    """(reference, probs, output, ground truth or None): present, all files or all folders."""
    from pathlib import Path

    if args.image is None or args.probs is None or args.output is None:
        raise ValueError(f"refine needs {what}, PROBS and -o OUT (or --demo-input DIR)")
    ref, probs, out = Path(args.image), Path(args.probs), Path(args.output)
    gt = Path(args.ground_truth) if args.ground_truth else None
    for path, name in ((ref, what), (probs, "PROBS"), (gt, "--ground-truth")):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{name} not found: {path}")
    if ref.is_dir() != probs.is_dir() or (gt is not None and gt.is_dir() != ref.is_dir()):
        raise ValueError(f"{what}, PROBS (and --ground-truth) must be all files or all folders")
    return ref, probs, out, gt


def _refine_pairs(args: argparse.Namespace) -> list[tuple]:
    """(image, probs, output, ground truth or None) paths, matched by stem for folders."""
    from pathlib import Path

    image, probs, out, gt = _refine_paths(args, "IMAGE")
    if not image.is_dir():
        if probs.suffix.lower() not in _PROBS_SUFFIXES:
            raise ValueError(f"PROBS must be a .npy or .png file; got {probs}")
        if out.is_dir():
            raise ValueError(
                f"-o {out} is a folder: name the output file (.png or .npy), or give folders "
                "for IMAGE and PROBS"
            )
        if out.suffix.lower() not in _OUTPUT_SUFFIXES:
            raise ValueError(
                f"-o {out}: the output format follows the extension, one of "
                f"{', '.join(_OUTPUT_SUFFIXES)} (labels as a palette PNG or a .npy array); got "
                f"{out.suffix or 'none'}"
            )
        return [(image, probs, out, gt)]
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out} is a file; with folders for IMAGE and PROBS it names a folder")

    def by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
        # Earlier suffixes win when a stem has several files (probabilities .npy over .png).
        files = sorted(
            (f for f in folder.iterdir() if f.suffix.lower() in suffixes),
            key=lambda f: (f.stem, suffixes.index(f.suffix.lower())),
        )
        out: dict[str, Path] = {}
        for f in files:
            out.setdefault(f.stem, f)
        return out

    images, probs_files = by_stem(image, _IMAGE_SUFFIXES), by_stem(probs, _PROBS_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) in folder {image}")
    missing = sorted(set(images) - set(probs_files))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) in {image} have no probabilities (.npy/.png with the same "
            f"stem) in {probs}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    gts = by_stem(gt, (".png",)) if gt is not None else {}
    if gt is not None and set(images) - set(gts):
        raise FileNotFoundError(f"--ground-truth folder {gt} lacks labels for some images")
    return [(images[s], probs_files[s], out / f"{s}.png", gts.get(s)) for s in images]


def _refine_probs(path: object, height: int, width: int, args: argparse.Namespace) -> object:
    """Load an (L, H, W) probability array from .npy, or from a label PNG with --confidence."""
    from pathlib import Path

    import numpy as np

    from deepcrf.data.palette import read_label_png
    from deepcrf.metrics import IGNORE_INDEX

    path = Path(str(path))
    if path.suffix.lower() == ".npy":
        try:
            probs = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read probabilities {path}: {err}") from err
        return probs  # deepcrf.refine checks it against the image (errors name this file)
    labels = read_label_png(path)
    if labels.shape != (height, width):
        raise ValueError(
            f"label image {path} is {labels.shape} (H, W); its image is ({height}, {width})"
        )
    known = labels[labels != IGNORE_INDEX]
    num = args.num_classes if args.num_classes is not None else int(known.max(initial=0)) + 1
    num = max(num, 2)
    if known.size and int(known.max()) >= num:
        raise ValueError(f"label image {path} has label {int(known.max())} >= --num-classes {num}")
    conf = args.confidence
    if not 0.0 < conf < 1.0:
        raise ValueError(f"--confidence must lie in (0, 1); got {conf}")
    probs = np.full((num, height, width), (1.0 - conf) / (num - 1), dtype=np.float32)
    rows, cols = np.nonzero(labels != IGNORE_INDEX)
    probs[labels[rows, cols].astype(np.int64), rows, cols] = conf
    probs[:, labels == IGNORE_INDEX] = 1.0 / num  # unsure pixels: uniform, like unary_from_labels
    return probs


def _refine_demo_input(folder: str) -> dict[str, str]:
    """Write a synthetic photo-like image, CNN-like coarse noisy probabilities and labels."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from deepcrf._atomic import atomic_path
    from deepcrf.data.palette import write_label_png

    rng = np.random.default_rng(0)
    h, w, num = 96, 128, 3
    ys, xs = np.mgrid[0:h, 0:w]
    labels = np.zeros((h, w), np.uint8)
    labels[(ys - 50) ** 2 + (xs - 40) ** 2 < 26**2] = 1
    labels[(ys > 20) & (ys < 80) & (xs > 78) & (xs < 116)] = 2
    colours = np.array([[70, 110, 160], [200, 60, 50], [230, 200, 80]], np.float64)
    image = colours[labels] + rng.normal(0, 12, (h, w, 3)) + 20 * np.sin(xs / 9.0)[..., None]
    image = np.clip(image, 0, 255).astype(np.uint8)
    # A CNN-like unary: right on average but blurry at stride 8 with some wrong cells.
    onehot = np.eye(num)[labels].transpose(2, 0, 1)
    coarse = onehot.reshape(num, h // 8, 8, w // 8, 8).mean((2, 4))
    coarse += rng.normal(0, 0.35, coarse.shape)
    logits = 3.0 * np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    probs = np.exp(logits - logits.max(0))
    probs = (probs / probs.sum(0)).astype(np.float32)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "image.png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    with atomic_path(out / "probs.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, probs)
    write_label_png(out / "labels.png", labels)
    return {"image": str(out / "image.png"), "probs": str(out / "probs.npy"),
            "ground_truth": str(out / "labels.png")}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run ``deepcrf refine``: check every pair first, then refine them one by one."""
    import json
    import time

    from tqdm.auto import tqdm

    if args.demo_input:
        files = _refine_demo_input(args.demo_input)
        if args.json:
            print(json.dumps(files, indent=2))
        else:
            print(
                f"wrote {files['image']}, {files['probs']} and {files['ground_truth']}; try:\n"
                f"  deepcrf refine {files['image']} {files['probs']} -o refined.png "
                f"--ground-truth {files['ground_truth']} --theta-alpha 20"
            )
        return 0
    if args.iters < 0:
        raise ValueError(f"--iters must be >= 0; got {args.iters}")
    params = {
        "iters": args.iters, "theta_alpha": args.theta_alpha, "theta_beta": args.theta_beta,
        "theta_gamma": args.theta_gamma, "w_bilateral": args.w_bilateral,
        "w_spatial": args.w_spatial, "normalization": args.normalization,
        "exclude_self": args.exclude_self, "method": args.method,
    }  # fmt: skip
    volumes = args.image is not None and _is_volume_input(args.image)
    if args.spacing is not None and not volumes:
        raise ValueError("--spacing is for volumes (.npy/.nii/.nii.gz references)")
    pairs = _volume_pairs(args) if volumes else _refine_pairs(args)
    one = _refine_volume_one if volumes else _refine_one
    _check_refine_outputs(pairs, args.overwrite)
    results, failures = [], []
    start = time.perf_counter()
    bar = tqdm(pairs, desc="refine", unit="image", disable=args.no_progress or len(pairs) < 2)
    for pair in bar:
        try:
            results.append(one(*pair, args, params))
        except (FileNotFoundError, ValueError, TypeError, MemoryError) as err:
            if args.fail_fast or len(pairs) == 1:
                raise
            failures.append({"image": str(pair[0]), "probs": str(pair[1]), "error": str(err)})
            print(f"deepcrf refine: {pair[0].name}: failed: {err}", file=sys.stderr)
    summary = {
        "files": results, "failed": failures, "params": params,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for row in results:
            acc = ""
            if "accuracy_after" in row:
                acc = f", accuracy {row['accuracy_before']:.4f} -> {row['accuracy_after']:.4f}"
            unit = "voxels" if volumes else "pixels"
            print(
                f"{row['output']}: {row['changed_fraction']:.2%} of {unit} changed{acc} "
                f"({row['seconds']:.2f} s)"
            )
        if failures:
            print(f"{len(failures)} of {len(pairs)} file(s) failed (listed above on stderr)")
    return 1 if failures else 0


def _check_refine_outputs(pairs: list[tuple], overwrite: bool) -> None:
    """Before anything is written: no output is an input; existing outputs need --overwrite."""
    from deepcrf._atomic import check_outputs

    inputs = [p for pair in pairs for p in (pair[0], pair[1], pair[3]) if p is not None]
    check_outputs([pair[2] for pair in pairs], inputs, overwrite=overwrite)


def _refine_one(
    image_path: object,
    probs_path: object,
    out_path: object,
    gt_path: object,
    args: argparse.Namespace,
    params: dict,
) -> dict:
    """Refine one image: every input is read and checked before the output is written."""
    import time
    from pathlib import Path

    import numpy as np

    from deepcrf._atomic import atomic_path
    from deepcrf.crf.dense import refine
    from deepcrf.data.palette import read_image_info, read_label_png, write_label_png
    from deepcrf.metrics import IGNORE_INDEX

    t0 = time.perf_counter()
    image, note = read_image_info(image_path)
    if note:
        print(f"deepcrf refine: {image_path}: {note}", file=sys.stderr)
    probs = _refine_probs(probs_path, image.shape[0], image.shape[1], args)
    gt = None
    if gt_path is not None:
        gt = read_label_png(gt_path)
        if gt.shape != image.shape[:2]:
            raise ValueError(f"ground truth {gt_path} is {gt.shape}; expected {image.shape[:2]}")
    out = Path(str(out_path))
    num_classes = probs.shape[0]
    if out.suffix.lower() == ".png" and num_classes > 255:
        raise ValueError(
            f"{probs_path} has {num_classes} labels: a PNG label map holds labels 0-254 (255 "
            "means 'ignore' in VOC); write a .npy instead (uint16)"
        )
    try:
        q = refine(probs, image, **params)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{probs_path}: {err}") from err
    before, after = probs.argmax(0), q.argmax(0)
    if out.suffix.lower() == ".png":
        write_label_png(out, after.astype(np.uint8))
    else:
        with atomic_path(out) as tmp, open(tmp, "wb") as fh:
            np.save(fh, after.astype(np.uint8 if num_classes <= 256 else np.uint16))
    row: dict[str, object] = {
        "image": str(image_path), "probs": str(probs_path), "output": str(out),
        "height": image.shape[0], "width": image.shape[1], "num_classes": num_classes,
        "changed_fraction": float((before != after).mean()),
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    if note:
        row["note"] = note
    if gt is not None:
        valid = gt != IGNORE_INDEX
        row["accuracy_before"] = float((before == gt)[valid].mean())
        row["accuracy_after"] = float((after == gt)[valid].mean())
    return row


def _is_volume_input(path: str) -> bool:
    """A volume file, or a folder holding volumes and no 2-D images."""
    from pathlib import Path

    from deepcrf.data.volume import VOLUME_SUFFIXES, volume_suffix

    p = Path(path)
    if not p.is_dir():
        return volume_suffix(p) in VOLUME_SUFFIXES
    files = [f for f in p.iterdir() if f.is_file()]
    has_volumes = any(volume_suffix(f) in VOLUME_SUFFIXES for f in files)
    has_images = any(f.suffix.lower() in _IMAGE_SUFFIXES for f in files)
    return has_volumes and not has_images


def _volume_probs(path: str, args: argparse.Namespace) -> object:
    """(L, *S) float32 probabilities from a volume file.

    A floating .npy holds probabilities (L, *S); an integer .npy, or a NIfTI of whole numbers,
    holds labels (*S), turned into probabilities with --confidence; any other NIfTI holds
    probabilities with the labels last (*S, L), as NIfTI keeps its spatial axes first.
    """
    import numpy as np

    from deepcrf.data.volume import read_volume

    volume = read_volume(path)
    data = volume.data
    integral = bool(np.isfinite(data).all() and (data == np.round(data)).all())
    whole = np.issubdtype(data.dtype, np.integer) or (volume.nifti is not None and integral)
    if not whole:
        if not np.issubdtype(data.dtype, np.floating):
            raise TypeError(f"probabilities {path} must be floating (or labels); got {data.dtype}")
        if volume.nifti is not None:
            data = np.moveaxis(data, -1, 0)
        if not 2 <= data.ndim <= 4:
            raise ValueError(
                f"probabilities {path} must be (L, *S) with 1 to 3 spatial dims; got {data.shape}"
            )
        return data.astype(np.float32)
    labels = data.astype(np.int64)
    if labels.size == 0 or labels.min() < 0:
        raise ValueError(f"label volume {path} must be non-empty with labels >= 0")
    num = args.num_classes if args.num_classes is not None else max(int(labels.max()) + 1, 2)
    if int(labels.max()) >= num:
        raise ValueError(
            f"label volume {path} has label {int(labels.max())} >= --num-classes {num}"
        )
    conf = args.confidence
    if not 0.0 < conf < 1.0:
        raise ValueError(f"--confidence must lie in (0, 1); got {conf}")
    probs = np.full((num, *labels.shape), (1.0 - conf) / (num - 1), dtype=np.float32)
    np.put_along_axis(probs, labels[None], conf, axis=0)
    return probs


def _volume_pairs(args: argparse.Namespace) -> list[tuple]:
    """(reference, probs, output, ground truth or None) for volume files or folders of them.

    Folders are matched by name without the volume suffix (``a.nii.gz`` ↔ ``a.npy``); outputs
    are ``OUT/<name>`` with the reference's suffix (``.nii.gz`` for NIfTI references).
    """
    from pathlib import Path

    from deepcrf.data.volume import VOLUME_SUFFIXES, volume_suffix

    ref, probs, out, gt = _refine_paths(args, "REFERENCE")
    if not ref.is_dir():
        if out.is_dir():
            raise ValueError(f"-o {out} is a folder: name the output file")
        if volume_suffix(out) not in VOLUME_SUFFIXES:
            raise ValueError(f"-o for a volume must end in {', '.join(VOLUME_SUFFIXES)}; got {out}")
        return [(ref, probs, out, gt)]
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out} is a file; with folders of volumes it names a folder")

    def by_name(folder: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for f in sorted(folder.iterdir()):
            suffix = volume_suffix(f)
            if f.is_file() and suffix in VOLUME_SUFFIXES:
                found.setdefault(f.name[: -len(suffix)], f)
        return found

    refs, probs_files = by_name(ref), by_name(probs)
    if not refs:
        raise FileNotFoundError(f"no volumes ({', '.join(VOLUME_SUFFIXES)}) in folder {ref}")
    missing = sorted(set(refs) - set(probs_files))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} volume(s) in {ref} have no probabilities with the same name in "
            f"{probs}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    gts = by_name(gt) if gt is not None else {}
    if gt is not None and set(refs) - set(gts):
        raise FileNotFoundError(f"--ground-truth folder {gt} lacks labels for some volumes")
    pairs = []
    for name, path in refs.items():
        suffix = ".nii.gz" if volume_suffix(path) in (".nii", ".nii.gz") else ".npy"
        pairs.append((path, probs_files[name], out / f"{name}{suffix}", gts.get(name)))
    return pairs


def _refine_volume_one(
    ref_path: object,
    probs_path: object,
    out: object,
    gt_path: object,
    args: argparse.Namespace,
    params: dict,
) -> dict:
    """Refine one volume: every input is read and checked before the output is written."""
    import time

    import numpy as np

    from deepcrf.crf.dense import refine
    from deepcrf.data.volume import read_volume
    from deepcrf.data.volume import write_label_volume as write

    t0 = time.perf_counter()
    probs = _volume_probs(str(probs_path), args)
    space = tuple(probs.shape[1:])
    reference = read_volume(str(ref_path), spatial_dims=len(space))
    ref = reference.data
    nifti = reference.nifti is not None
    shape = ", ".join(map(str, space))
    if ref.shape == space or (ref.ndim == len(space) + 1 and ref.shape[:-1] == space):
        channels_last = ref  # (*S) or (*S, C)
    elif not nifti and ref.ndim == len(space) + 1 and ref.shape[1:] == space:
        channels_last = np.moveaxis(ref, 0, -1)  # (C, *S)
    else:
        layouts = f"({shape}) or ({shape}, C)" + ("" if nifti else f" or (C, {shape})")
        raise ValueError(
            f"reference {ref_path} has shape {ref.shape}, which does not match the "
            f"probabilities' spatial shape ({shape}) from {probs_path}: expected {layouts}"
        )
    spacing = args.spacing if args.spacing is not None else reference.spacing
    gt = None
    if gt_path is not None:
        gt = read_volume(str(gt_path)).data
        if gt.shape != space:
            raise ValueError(f"ground truth {gt_path} is {gt.shape}; expected {space}")
    ref_f = channels_last.astype(np.float32)
    if ref_f.ndim == len(space) + 1 and ref_f.shape[-1] == 1:
        ref_f = ref_f[..., 0]
    try:
        q = refine(probs, ref_f, spacing=spacing, **params)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{probs_path}: {err}") from err
    before, after = probs.argmax(0), q.argmax(0)
    write(out, after, reference if nifti else None)
    row: dict[str, object] = {
        "image": str(ref_path), "probs": str(probs_path), "output": str(out),
        "shape": list(space), "channels": 1 if ref_f.ndim == len(space) else ref_f.shape[-1],
        "spacing": list(spacing) if isinstance(spacing, tuple) else spacing,
        "num_classes": probs.shape[0], "changed_fraction": float((before != after).mean()),
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    if gt is not None:
        from deepcrf.metrics import dice_scores

        truth = gt.astype(np.int64)
        row["accuracy_before"] = float((before == truth).mean())
        row["accuracy_after"] = float((after == truth).mean())
        row["dice_before"] = dice_scores(before, truth, probs.shape[0])
        row["dice_after"] = dice_scores(after, truth, probs.shape[0])
    return row
