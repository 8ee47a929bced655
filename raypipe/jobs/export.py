"""Export a checkpoint for serving: ``python jobs/export.py --checkpoint PATH --format onnx|torchscript
--out DIR [--input-size auto|none|HxW]``.

Writes the model (``model.onnx`` or ``model.torchscript.pt``) with the validation preprocessing
that torch expresses exactly folded in, ``preprocess.json`` (every step, in order, and whether the
model or the caller does it) and ``preprocess.py`` (the caller's steps, numpy + Pillow, no raypipe).
Before writing, the exported file is run on images of the checkpoint's validation split and
compared with the checkpoint model; above 1e-4 the job fails. Runs locally, without Ray.
"""

from __future__ import annotations

import argparse

from raypipe.cli import exit_with, setup_logging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="checkpoint folder (<run dir>/checkpoint_epochNNNN) or a run directory (its best)")
    ap.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    ap.add_argument("--out", required=True, help="output folder (local, s3:// or gs://)")
    ap.add_argument("--input-size", default="auto",
                    help="HEIGHTxWIDTH of the decoded images the model takes, with the resize inside "
                         "it; none: the model takes image_size squares and preprocess.py resizes; "
                         "auto (default): inside when every checked validation image decodes to one size")
    ap.add_argument("--check-images", type=int, default=64,
                    help="validation images the export is compared with the checkpoint on (default 64)")
    args = ap.parse_args(argv)
    setup_logging()

    from raypipe.export import REFERENCE_FILE, SPEC_FILE, export

    spec = export(args.checkpoint, args.format, args.out, args.input_size, args.check_images)
    c, inp = spec["check"], spec["input"]
    print(f"exported {spec['checkpoint']} -> {spec['out']} ({spec['model_file']}, input "
          f"{inp['layout']} {inp['dtype']} {inp['shape']})")
    print(f"check on {c['images']} validation images: max |diff| scores {c['max_abs_diff_scores']:.2e}, "
          f"logits {c['max_abs_diff_logits']:.2e} (tolerance {c['tolerance']:g})"
          + (f"; {c['other_size_skipped']} of another size not checked" if c["other_size_skipped"] else ""))
    print(f"the caller decodes{' and resizes' if not spec['plan']['resize_in_model'] else ''}: "
          f"{SPEC_FILE} lists every step, {REFERENCE_FILE} does the caller's")
    return 0


def run() -> None:
    """Console-script entry point (``raypipe-export``)."""
    exit_with(main)


if __name__ == "__main__":
    run()
