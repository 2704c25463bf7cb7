"""`edgeagent serve` with the fast tier's fake engines and GPU: the real daemon, its settings
from the environment, run as a process the kill-anywhere tests can SIGKILL."""

from __future__ import annotations

import asyncio
import sys

from edgeagent.daemon import Daemon
from edgeagent.logs import setup_logging
from edgeagent.settings import Settings
from fast.fakes import FakeEngines, FakeProbe


def main() -> int:
    settings = Settings()
    setup_logging(settings.log_level)
    return asyncio.run(Daemon(settings, FakeEngines(), FakeProbe()).serve())


if __name__ == "__main__":
    sys.exit(main())
