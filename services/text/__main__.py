"""Run the text worker: python -m services.text (settings: TEXT_* and CLIP_* environment variables)."""

import sys

from pydantic import ValidationError

from services.encoder.worker import prepare_limits, run_worker
from services.text.backends import build_backends
from services.text.settings import TextSettings


def main() -> None:
    try:
        settings = TextSettings()
    except ValidationError as error:  # a settings error is one message, not a traceback
        sys.exit(f"text cannot start: {error}")
    preparing = prepare_limits(settings, settings.max_queued_chars, "TEXT_MAX_QUEUED_CHARS", "characters")
    run_worker("text", settings, lambda: build_backends(settings), preparing, settings.max_batch_tokens)


if __name__ == "__main__":
    main()
