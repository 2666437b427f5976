"""The limits an encoder worker's batchers get from its settings (services/encoder/worker.py): the image
worker's queue is IMAGE_MAX_QUEUE images. (The batcher's refusal past its queue is in test_batching.py; a
real text worker refusing past TEXT_MAX_QUEUE, through the same run_worker, is in test_faults.py.)"""

import pytest

from services.encoder.worker import batch_limits
from services.image.settings import ImageSettings
from services.text.settings import TextSettings


def test_the_image_queue_is_image_max_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGE_MAX_QUEUE", raising=False)
    assert batch_limits(ImageSettings()).max_queue == 512  # the README's default
    monkeypatch.setenv("IMAGE_MAX_QUEUE", "7")
    limits = batch_limits(ImageSettings())
    assert limits.max_queue == 7
    assert limits.max_batch_size == ImageSettings().max_batch_size != 7


def test_the_text_queue_is_text_max_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEXT_MAX_QUEUE", raising=False)
    assert batch_limits(TextSettings()).max_queue == 2048  # the README's default
    monkeypatch.setenv("TEXT_MAX_QUEUE", "9")
    assert batch_limits(TextSettings(), max_batch_tokens=100).max_queue == 9
