"""`kd3 import-checkpoint`: turn your own trained weights (a state dict) into a kd3 teacher checkpoint.

Example, a torchvision ResNet-18 with the CIFAR stem (3x3 conv1, no max-pool) trained on CIFAR-10:
`kd3 import-checkpoint --weights user.pth --arch torchvision/resnet18-cifar --num-classes 10
--image-size 32 --mean 0.4914 0.4822 0.4465 --std 0.2470 0.2435 0.2616 --out teacher.pt`. A network
from your own code: `--arch mypkg.nets:make_net` or `--arch path/to/net.py:make_net` (with
`--options` as the factory's keyword arguments; naming it here is what allows kd3 to import it).
The weights are read with torch.load(weights_only=True) only; {'state_dict': …}, {'model': …},
{'net': …} wrappers and 'module.' (DDP) prefixes are accepted. The result is checked with a
forward pass at the given input size and written atomically. See docs/models.md.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

NAME = "import-checkpoint"
SUMMARY = "make a kd3 teacher checkpoint from your own trained weights (torchvision, timm, CIFAR ResNet/WRN, …)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="the trained weights: a state dict saved with torch.save")
    parser.add_argument("--arch", required=True,
                        help="registry name, e.g. cifar_resnet34, wrn_40_2, torchvision/resnet18-cifar, timm/resnet18 "
                             "(`kd3 models` lists them), or your own code: package.module:factory or "
                             "path/to/net.py:factory")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of classes (default: the number of lines in --class-names)")
    parser.add_argument("--class-names", default=None, help="text file, one class name per line, in label order")
    parser.add_argument("--image-size", type=int, required=True, help="square input size the model was trained at")
    parser.add_argument("--channels", type=int, default=3, help="input channels (default 3)")
    parser.add_argument("--mean", type=float, nargs="+", required=True,
                        help="per-channel normalisation mean (0–1 scale)")
    parser.add_argument("--std", type=float, nargs="+", required=True,
                        help="per-channel normalisation std (0–1 scale)")
    parser.add_argument("--options", default=None,
                        help="architecture options as YAML, e.g. '{depth: 40, widen_factor: 2}' for wrn; for "
                             "your own code the factory's keyword arguments, plus feature_map/classifier (module "
                             "names) when kd3's guess of the split is wrong")
    parser.add_argument("--out", required=True, help="kd3 checkpoint to write, e.g. teacher.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def main(args: argparse.Namespace) -> int:
    from kd3.commands._common import check_out, parse_options, probe, read_lines
    from kd3.errors import Kd3Error
    from kd3.models.checkpoints import InputSpec, import_state_dict, save_checkpoint
    from kd3.models.user_code import allow_user_code
    from kd3.runs import file_fingerprint

    out = check_out(args.out, args.overwrite)
    class_names = read_lines(args.class_names, "class names") if args.class_names else None
    num_classes = args.num_classes if args.num_classes is not None else (len(class_names) if class_names else None)
    if num_classes is None:
        raise Kd3Error("give --num-classes or --class-names")
    if class_names is not None and len(class_names) != num_classes:
        raise Kd3Error(f"{args.class_names}: {len(class_names)} class names but --num-classes {num_classes}")
    if args.image_size < 1 or args.channels < 1:
        raise Kd3Error("--image-size and --channels must be positive")
    spec = InputSpec(image_size=args.image_size, channels=args.channels, mean=tuple(args.mean), std=tuple(args.std))
    # the user names this architecture on the command line: the one case user code may be imported here
    with allow_user_code([args.arch]):
        model, meta = import_state_dict(args.weights, args.arch, num_classes, spec, class_names,
                                        parse_options(args.options))
    summary = probe(model, spec.channels, spec.image_size, args.arch)
    save_checkpoint(out, model, meta, imported_from={"path": str(args.weights),
                                                    "sha256_16": file_fingerprint(args.weights)})
    size = f"{spec.channels}x{spec.image_size}x{spec.image_size}"
    split = ""
    if meta.options.get("feature_map"):
        split = (f"; split found: feature map = output of {meta.options['feature_map']!r}, "
                 f"{meta.options['pool']} pool, classifier {meta.options['classifier']!r}")
    log.info(f"wrote {out}: {args.arch}, {num_classes} classes, input {size}; {summary}{split}")
    return 0
