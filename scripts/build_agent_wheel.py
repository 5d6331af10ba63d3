"""Build the clawnode wheel the gateway serves at /agent/, into a directory of your choice.

    .venv/bin/python scripts/build_agent_wheel.py [OUT_DIR]     (default: dist/)

The same builder as the gateway's (frontend.wheel.build_wheel_bytes): no network, no build
backend, byte-for-byte reproducible, so the SHA-256 printed here is the one /install.sh
checks. Useful to install the agent on a machine that cannot reach the gateway over HTTP
(`pip install clawnode-*.whl`) or to publish the wheel elsewhere.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str]) -> int:
    # After the path insert above; frontend.wheel needs no Django settings.
    from frontend.wheel import build_wheel_bytes

    out = Path(argv[1]) if len(argv) > 1 else REPO / "dist"
    project, data = build_wheel_bytes(REPO / "provider_agent")
    out.mkdir(parents=True, exist_ok=True)
    path = out / project.wheel_filename
    path.write_bytes(data)
    print(f"{path}  sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
