"""CLIP score of text-to-image samples (Hessel et al. 2021, "CLIPScore"): 100 * max(cos(E_img, E_text), 0),
averaged over the samples, through torchmetrics' CLIPScore with a local CLIP model folder
(`metrics.clip_model`: a transformers CLIPModel + CLIPProcessor save_pretrained folder, e.g. a local copy of
openai/clip-vit-large-patch14; nothing downloads). Each image is scored against the prompt it was sampled for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..config import ConfigError


def check_clip_model(path) -> Path:
    """The CLIP model folder of metrics.clip_model, or a one-line ConfigError."""
    if not path:
        raise ConfigError("metrics=clip needs metrics.clip_model=<a local CLIP model folder> (CLIPModel + CLIPProcessor "
                          "save_pretrained, e.g. hf download openai/clip-vit-large-patch14 --local-dir DIR)")
    p = Path(str(path)).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(f"metrics.clip_model={path}: not a CLIP model folder (no config.json)")
    return p


class _Projected(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embeddings as tensors:
    transformers >= 5 returns them in an output object's pooler_output, torchmetrics 1.9 expects tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if torch.is_tensor(out) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class ClipScore:
    """Accumulates torchmetrics' CLIPScore over batches of images in [-1, 1] with their prompts."""

    def __init__(self, path, device="cpu"):
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        p = check_clip_model(path)

        def load():
            try:
                return _Projected(CLIPModel.from_pretrained(str(p), local_files_only=True, use_safetensors=True).eval()), \
                    CLIPProcessor.from_pretrained(str(p), local_files_only=True)
            except Exception as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ConfigError(f"metrics.clip_model={path}: not a loadable CLIPModel / CLIPProcessor folder "
                                  f"({type(e).__name__}: {first[:160]})") from None

        self.metric = CLIPScore(model_name_or_path=load).to(device)
        self.n = 0

    @torch.no_grad()
    def update(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        from ..images import to_uint8

        x = to_uint8(images.float().cpu())
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        self.metric.update(list(x.to(self.metric.device)), list(prompts))
        self.n += len(prompts)

    def compute(self) -> dict:
        return {"clip_score": float(self.metric.compute())} if self.n else {}


def write_tiny_clip(out, seed: int = 0):
    """A tiny random CLIPModel + CLIPProcessor folder (16 x 16 images, width 32), for tests; nothing downloads."""
    import tempfile

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ..pipelines import tiny_tokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer(Path(tmp))
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                         tokenizer=tok)
    model.save_pretrained(str(out))
    proc.save_pretrained(str(out))
    return model
