"""A tiny CLIP architecture with random weights, saved as a checkpoint file and loaded back through the
same CLIP_* settings an operator uses for real weights (no CLIP weights install from the package index)."""

import json
from dataclasses import dataclass
from pathlib import Path

NAME = "tiny-clip-test"
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class TinyClip:
    name: str
    config: Path
    checkpoint: Path

    @property
    def space(self) -> str:
        return f"clip-{self.name}"

    def env(self) -> dict[str, str]:
        return {
            "CLIP_MODEL": self.name,
            "CLIP_CONFIG": str(self.config),
            "CLIP_CHECKPOINT": str(self.checkpoint),
        }

    def load_reference(self):  # type: ignore[no-untyped-def]
        """open_clip's own model, tokenizer and image transform on the same checkpoint."""
        import open_clip

        open_clip.add_model_config(self.config)
        model, _, preprocess = open_clip.create_model_and_transforms(
            self.name, pretrained=str(self.checkpoint)
        )
        return model.eval(), open_clip.get_tokenizer(self.name), preprocess


def make_tiny_clip(directory: Path) -> TinyClip:
    import open_clip
    import torch

    config = directory / f"{NAME}.json"
    config.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(NAME)
    checkpoint = directory / f"{NAME}.pt"
    torch.save(model.state_dict(), checkpoint)
    return TinyClip(NAME, config, checkpoint)
