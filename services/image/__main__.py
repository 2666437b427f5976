"""Run the image worker: python -m services.image (settings: IMAGE_* and CLIP_* environment variables)."""

from services.encoder.worker import run_worker
from services.image.backends import build_backends
from services.image.settings import ImageSettings


def main() -> None:
    settings = ImageSettings()
    run_worker("image", settings, lambda: build_backends(settings))


if __name__ == "__main__":
    main()
