"""A torchvision ResNet-18 with random weights saved as a state dict, loaded back through the same
IMAGE_RESNET_* settings an operator uses for real weights (none install from the package index)."""

from pathlib import Path


def make_resnet18_checkpoint(directory: Path) -> Path:
    import torch
    from torchvision import models

    torch.manual_seed(0)
    path = directory / "resnet18-random.pth"
    torch.save(models.resnet18(weights=None).state_dict(), path)
    return path


def load_reference(path: Path):  # type: ignore[no-untyped-def]
    """torchvision's own resnet18 on the same file, classifier removed, and its weights' transform."""
    import torch
    from torchvision import models

    model = models.resnet18(weights=None)
    model.load_state_dict(torch.load(path, weights_only=True))
    model.fc = torch.nn.Identity()
    return model.eval(), models.ResNet18_Weights.IMAGENET1K_V1.transforms()
