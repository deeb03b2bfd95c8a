"""Offline transfer, measured: pretrain on digits 0-4, fine-tune on few labels of digits 5-9.

No ImageNet weights can be fetched here, so the source task ships with scikit-learn:
`load_digits()` (1,797 8x8 digits, upsampled to 32x32 RGB).

1. Source: MobileNetV2 (alpha 0.35, 32x32) trained from scratch on digits 0-4 (plain
   tf_keras `fit`, BatchNorm training); its base is saved as `source.weights.h5`.
2. Target: digits 5-9, `--per-class` labeled images per class for training and as many for
   validation (checkpoint choice); every other 5-9 digit is the held-out test set.
3. Two arms through tl-ray itself (`tl_ray.train.driver.train`: TensorflowTrainer, the
   keras-image backbone), same data, epochs, batch size and workers:
   - transfer: `weights: source.weights.h5`, head phase then fine-tuning of the top layers;
   - scratch: `weights: null`, every layer trains from the first epoch.
   Test accuracy comes from the exported model folder (`Predictor`), per seed (each seed
   draws another labeled subset).

Prints one JSON line per figure (source accuracy, each arm and seed, the summary):

    .venv/bin/python benchmarks/digits_transfer.py --seeds 3 --per-class 10 --epochs 30

The default learning rates were chosen on seed 0's *validation* accuracy (never the test
set): transfer head 1e-2 + fine-tune 1e-4 (val 0.40), head 1e-3 + fine-tune 3e-4 (0.58),
head 1e-3 + fine-tune 1e-3 (0.70, kept); scratch 1e-3 (0.40), 3e-3 (0.42, kept).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402

from tl_ray.config import parse_config  # noqa: E402
from tl_ray.data import LabelMap  # noqa: E402
from tl_ray.images import read_images  # noqa: E402

SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
SIZE = 32
ARCH = {"architecture": "MobileNetV2", "alpha": 0.35, "image_size": SIZE}


def emit(payload: dict) -> None:
    print(json.dumps(payload, sort_keys=True), flush=True)


def digits_of(classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(n, 8, 8) uint8 images (0..255) and their digit labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    keep = np.isin(bunch.target, classes)
    return (bunch.images[keep] * 255 / 16).astype(np.uint8), bunch.target[keep]


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    from PIL import Image

    for i, (pixels, label) in enumerate(zip(images, labels)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / str(label) / f"{i:04d}.png")
    return root


def pretrain(folder: Path, epochs: int, seed: int) -> dict:
    """Train the whole network on digits 0-4; save its base; return the source accuracies."""
    import tf_keras as keras

    from tl_ray.backbones.registry import get_backbone

    keras.utils.set_random_seed(seed)
    images, labels = digits_of(SOURCE)
    order = np.random.default_rng(seed).permutation(len(labels))
    held = order[: len(order) // 10]
    train = order[len(order) // 10 :]
    backbone = get_backbone(parse_config({"data": {"path": "-"}, "backbone": {
        "kind": "keras-image", **ARCH, "weights": None, "unfreeze_depth": 52, "head_epochs": 0,
    }, "train": {"epochs": 1}}).backbone)
    model = backbone.build(num_labels=len(SOURCE))
    backbone.apply_unfreeze(model)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = backbone.preprocess_pixels(read_images(list(images), SIZE))
    started = time.perf_counter()
    model.fit(x[train], labels[train], batch_size=32, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - started
    _, accuracy = model.evaluate(x[held], labels[held], verbose=0)
    backbone.base_of(model).save_weights(str(folder / "source.weights.h5"))
    return {"figure": "source_pretrain", "classes": list(SOURCE), "train_images": len(train),
            "held_out_accuracy": round(float(accuracy), 4), "epochs": epochs,
            "seconds": round(seconds, 1)}


def split_target(per_class: int, seed: int):
    images, labels = digits_of(TARGET)
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for digit in TARGET:
        rows = rng.permutation(np.flatnonzero(labels == digit))
        train += list(rows[:per_class])
        val += list(rows[per_class : 2 * per_class])
        test += list(rows[2 * per_class :])
    return images, labels, np.array(train), np.array(val), np.array(test)


def run_arm(arm: str, work: Path, data: Path, weights: Path | None, args, seed: int) -> dict:
    from tl_ray.serve.predictor import Predictor
    from tl_ray.train.driver import train

    if arm == "transfer":
        backbone = {"weights": str(weights), "unfreeze_depth": args.depth,
                    "head_epochs": args.head_epochs, "head_lr": args.head_lr,
                    "finetune_lr": args.finetune_lr}
    else:
        backbone = {"weights": None, "unfreeze_depth": 52, "head_epochs": 0,
                    "finetune_lr": args.scratch_lr}
    cfg = parse_config({
        "data": {"path": str(data / "train"), "validation_path": str(data / "val")},
        "backbone": {"kind": "keras-image", **ARCH, **backbone},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": seed,
                  "num_workers": args.workers, "max_failures": 0},
        "output": str(work / f"{arm}-{seed}"),
    })
    started = time.perf_counter()
    outcome = train(cfg)
    seconds = time.perf_counter() - started
    predictor = Predictor(outcome.model_dir)
    files = sorted((data / "test").rglob("*.png"))
    truth = LabelMap(predictor.labels.labels).encode([f.parent.name for f in files])
    scores = predictor.evaluate([str(f) for f in files], truth)
    return {"figure": f"target_{arm}", "seed": seed, "test_accuracy": round(scores["accuracy"], 4),
            "test_f1": round(scores["f1"], 4), "test_count": scores["count"],
            "best_val_accuracy": round(outcome.metrics["val_accuracy"], 4),
            "best_epoch": outcome.metrics["epoch"], "seconds": round(seconds, 1),
            "backbone": backbone}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--source-epochs", type=int, default=20)
    parser.add_argument("--depth", type=int, default=52, help="transfer arm: unfreeze depth")
    parser.add_argument("--head-epochs", type=int, default=5)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--scratch-lr", type=float, default=3e-3)
    parser.add_argument("--work", type=Path, default=None, help="keep files here (default: temp)")
    parser.add_argument("--arms", default="transfer,scratch", help="which arms to run")
    parser.add_argument("--source-weights", type=Path, default=None,
                        help="reuse this pretrained base instead of pretraining again")
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args()

    from tl_ray.train.driver import ensure_ray

    with tempfile.TemporaryDirectory(prefix="digits-transfer-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        source = args.source_weights
        if source is None:
            emit(pretrain(work, args.source_epochs, seed=0))
            source = work / "source.weights.h5"
        ensure_ray()
        results: dict[str, list[float]] = {"transfer": [], "scratch": []}
        arms = args.arms.split(",")
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            images, labels, train, val, test = split_target(args.per_class, seed)
            data = work / f"target-{seed}"
            for name, rows in (("train", train), ("val", val), ("test", test)):
                write_folder(data / name, images[rows], labels[rows])
            for arm in arms:
                line = run_arm(arm, work, data, source, args, seed)
                results[arm].append(line["test_accuracy"])
                emit(line)
        if arms != ["transfer", "scratch"]:
            return
        transfer, scratch = statistics.mean(results["transfer"]), statistics.mean(results["scratch"])
        emit({"figure": "transfer_gain", "per_class": args.per_class, "epochs": args.epochs,
              "seeds": args.seeds, "transfer_mean_accuracy": round(transfer, 4),
              "scratch_mean_accuracy": round(scratch, 4), "gain": round(transfer - scratch, 4),
              "transfer_wins": sum(t > s for t, s in zip(results["transfer"], results["scratch"]))})


if __name__ == "__main__":
    main()
