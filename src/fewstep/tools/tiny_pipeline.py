"""Write a tiny randomly initialised Stable-Diffusion-type pipeline folder (nothing downloads):

    python -m fewstep.tools.tiny_pipeline OUT [--seed 0]
    python run.py backbone=sd_unet backbone.pretrained=OUT dataset=prompts dataset.path=prompts.txt \
        dataset.image_size=16 guidance=cfg guidance.scale=7.5 metrics=cost

OUT is what StableDiffusionPipeline.save_pretrained writes (unet, vae, text_encoder, tokenizer, scheduler),
loadable by diffusers and by fewstep (fewstep.pipelines.write_tiny_pipeline says what is in it).
"""
from __future__ import annotations

import argparse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fewstep.tools.tiny_pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder to write (created)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = ap.parse_args(argv)
    from ..pipelines import write_tiny_pipeline

    write_tiny_pipeline(args.out, seed=args.seed)
    print(f"[fewstep] tiny pipeline in {args.out}")


if __name__ == "__main__":
    main()
