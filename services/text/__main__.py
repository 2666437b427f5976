"""Run the text worker: python -m services.text (settings: TEXT_* and CLIP_* environment variables)."""

from services.encoder.worker import run_worker
from services.text.backends import build_backends
from services.text.settings import TextSettings


def main() -> None:
    settings = TextSettings()
    run_worker("text", settings, lambda: build_backends(settings))


if __name__ == "__main__":
    main()
