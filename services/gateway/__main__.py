"""Run the gateway: python -m services.gateway (settings: GATEWAY_* environment variables)."""

import asyncio
import sys

from pydantic import ValidationError

from services.common.auth import CredentialFileError
from services.common.server import serve
from services.gateway.settings import GatewaySettings
from services.gateway.wiring import Credentials, Gateway


def main() -> None:
    try:
        settings = GatewaySettings()
    except ValidationError as error:
        sys.exit(f"gateway cannot start: {error}")
    try:
        credentials = Credentials.from_settings(settings)
    except CredentialFileError as error:
        sys.exit(f"gateway cannot start: {error}")

    async def run() -> None:
        gateway = Gateway(settings, credentials)
        await serve("gateway", settings, gateway.register, gateway.start, gateway.close)

    asyncio.run(run())


if __name__ == "__main__":
    main()
