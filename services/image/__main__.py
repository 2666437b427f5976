"""Run the image worker: python -m services.image (settings: IMAGE_* and CLIP_* environment variables)."""

import sys

from pydantic import ValidationError

from services.encoder.worker import prepare_limits, run_worker
from services.image.backends import build_backends
from services.image.settings import ImageSettings


def main() -> None:
    try:
        settings = ImageSettings()
    except ValidationError as error:  # a settings error is one message, not a traceback
        sys.exit(f"image cannot start: {error}")
    preparing = prepare_limits(settings, settings.max_queued_pixels, "IMAGE_MAX_QUEUED_PIXELS", "pixels")
    run_worker("image", settings, lambda: build_backends(settings), preparing)


if __name__ == "__main__":
    main()
