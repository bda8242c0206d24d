"""`kd3 zeroshot-teacher`: an open_clip zero-shot classifier saved as a kd3 teacher checkpoint.

Example: `kd3 zeroshot-teacher --model ViT-B-32 --pretrained laion2b_s34b_b79k --classes classes.txt
--out teacher.pt`. Prompts ("a photo of a {}." …; --templates replaces them) are encoded by the text
tower, averaged per class and normalised; the checkpoint keeps the image tower, these class
embeddings and the logit scale, plus the model's preprocessing (size, mean, std). --pretrained is an
open_clip tag (downloaded by open_clip) or a local weights file. See docs/models.md.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

NAME = "zeroshot-teacher"
SUMMARY = "build a zero-shot CLIP teacher checkpoint from class names (open_clip)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32, RN50 "
                                                       "(`kd3 models open_clip/` lists them)")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag (e.g. laion2b_s34b_b79k, openai) or a local weights file; "
                             "omitted: random weights (testing only)")
    parser.add_argument("--model-config", default=None,
                        help="custom open_clip model config JSON; its file name (without .json) must equal --model")
    parser.add_argument("--classes", required=True, help="text file, one class name per line, in label order")
    parser.add_argument("--templates", default=None,
                        help="text file, one prompt template per line with {} for the class name "
                             "(default: 'a photo of a {}.' + OpenAI's 7 ImageNet ensemble templates)")
    parser.add_argument("--device", default="cpu", help="device for encoding the prompts (default cpu)")
    parser.add_argument("--out", required=True, help="kd3 checkpoint to write, e.g. teacher.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def main(args: argparse.Namespace) -> int:
    from kd3.commands._common import check_out, probe, read_lines
    from kd3.errors import Kd3Error
    from kd3.models.checkpoints import save_checkpoint
    from kd3.models.clip import DEFAULT_TEMPLATES, build_zeroshot_teacher, check_templates, register_model_config

    out = check_out(args.out, args.overwrite)
    if args.model_config:
        registered = register_model_config(args.model_config)
        if registered != args.model:
            raise Kd3Error(f"--model-config {args.model_config} registers model {registered!r}, "
                           f"not --model {args.model!r}")
    class_names = read_lines(args.classes, "class names")
    templates = (check_templates(read_lines(args.templates, "templates"), args.templates) if args.templates
                 else list(DEFAULT_TEMPLATES))
    if not args.pretrained:
        log.warning("kd3: warning: no --pretrained: the CLIP weights are random (useful for testing only)")
    model, meta = build_zeroshot_teacher(args.model, class_names, templates, pretrained=args.pretrained,
                                         device=args.device)
    summary = probe(model, 3, meta.input.image_size, meta.arch)
    save_checkpoint(out, model.cpu(), meta, zeroshot={"model": args.model, "pretrained": args.pretrained,
                                                      "templates": len(templates)})
    log.info(f"wrote {out}: {meta.arch} zero-shot teacher, {len(class_names)} classes x {len(templates)} templates, "
             f"input 3x{meta.input.image_size}x{meta.input.image_size} mean {list(meta.input.mean)} std "
             f"{list(meta.input.std)}; {summary}")
    return 0
