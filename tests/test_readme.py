"""The README documents every setting the services read (the settings tables must not drift)."""

from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from services.encoder.settings import ClipSettings
from services.gateway.settings import GatewaySettings
from services.image.settings import ImageSettings
from services.index.settings import ShardSettings
from services.text.settings import TextSettings
from services.useritem.settings import UserItemSettings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize(
    ("settings", "prefix"),
    [
        (TextSettings, "TEXT_"),
        (ImageSettings, "IMAGE_"),
        (ClipSettings, "CLIP_"),
        (GatewaySettings, "GATEWAY_"),
        (ShardSettings, "INDEX_"),
        (UserItemSettings, "USERITEM_"),
    ],
)
def test_every_setting_is_in_the_readme_with_its_default(settings: type[BaseSettings], prefix: str) -> None:
    for name, field in settings.model_fields.items():
        if isinstance(field.default, BaseSettings) or field.default_factory is not None:
            continue  # a nested settings object, documented under its own prefix
        row = next(
            (line for line in README.splitlines() if line.startswith(f"| `{prefix}{name.upper()}` |")), None
        )
        assert row is not None, f"{prefix}{name.upper()} is not in the README's settings tables"
        assert f"`{field.default}`" in row, (
            f"{prefix}{name.upper()}: the README's default differs from {field.default!r}"
        )
