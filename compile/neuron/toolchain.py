"""What Neuron software this machine has, and which instance family it is. No torch import.

Shared by `compile` (refuse --target neuron without a toolchain, record versions in the manifest)
and `server` (refuse an artifact built by another toolchain or for another instance family).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Optional

# Distribution names as pip knows them (the import names are torch_neuronx, neuronxcc, neuronx_distributed).
COMPILER = "neuronx-cc"
TORCH_NEURONX = "torch-neuronx"
NXD = "neuronx-distributed"

# The Neuron SDK releases Kiln's neuron target is written for (docs/neuron.md): torch-neuronx
# for PyTorch 2.9 first ships in SDK 2.27, and 2.31 is the last release with NxD Inference fixes for
# Inf2/Trn1. The DLC image, deploy/docker/Dockerfile.neuron and docs/neuron.md name the same SDK.
SUPPORTED_SDK = "2.27-2.31"
TORCH_NEURONX_SERIES = "2.9"   # torch-neuronx versions are <pytorch version>.<neuron release>.<build>
# torch-neuronx 2.9.0.2.<release>.* -> the Neuron SDK that shipped it (the SDK release notes and the
# DLC Dockerfiles; 2.32 pins 2.9.0.2.15 again and ships no NxD, so 2.15 is reported as 2.31).
SDK_OF_TORCH_NEURONX = {"2.11": "2.27", "2.12": "2.28", "2.13": "2.29", "2.14": "2.30", "2.15": "2.31"}
DLC_IMAGE = "pytorch-inference-neuronx:2.9.0-neuronx-py312-sdk2.31.1-ubuntu24.04"
TOOLCHAIN_HINT = ("--target neuron needs torch-neuronx, neuronx-cc and neuronx-distributed (pip install them "
                  f"from the AWS Neuron package index, or run inside the Neuron DLC image {DLC_IMAGE}); "
                  "--dry-run prints the compile plan without them")

# EC2 instance type prefix -> the neuronx-cc --target it needs.
FAMILY_BY_PREFIX = (("trn2", "trn2"), ("trn1", "trn1"), ("inf2", "inf2"))
DMI_PRODUCT_NAME = Path("/sys/devices/virtual/dmi/id/product_name")


def installed_version(dist: str) -> Optional[str]:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError, AttributeError):  # a None/spec-less entry in sys.modules
        return False


def toolchain_versions() -> dict[str, str]:
    """Versions recorded in manifest.json; every one of them forces a recompile when it changes."""
    return {COMPILER: installed_version(COMPILER) or "unknown",
            TORCH_NEURONX: installed_version(TORCH_NEURONX) or "unknown",
            NXD: installed_version(NXD) or "unknown"}


def missing_toolchain() -> Optional[str]:
    """None when compiling for neuron can start here, else the one-line reason. Every tp degree
    builds through NxD Core ModelBuilder, so neuronx-distributed is needed beside torch-neuronx."""
    if not importable("torch_neuronx"):
        return TOOLCHAIN_HINT
    if not importable("neuronx_distributed"):
        return ("--target neuron needs neuronx-distributed (NxD Core ModelBuilder) next to torch-neuronx; "
                f"it ships in the Neuron DLC image {DLC_IMAGE}")
    return None


def unsupported_torch_neuronx(version: Optional[str]) -> Optional[str]:
    """None when this torch-neuronx belongs to a supported Neuron SDK, else the one-line reason."""
    if version is None or version == "unknown":
        return None  # not installed: missing_toolchain() says so
    if version.split(".")[:2] == TORCH_NEURONX_SERIES.split("."):
        return None
    return (f"torch-neuronx {version} is not for PyTorch {TORCH_NEURONX_SERIES}: Kiln's neuron target supports "
            f"Neuron SDK {SUPPORTED_SDK} (torch-neuronx {TORCH_NEURONX_SERIES}.x, first shipped in SDK 2.27); "
            f"use the Neuron DLC image {DLC_IMAGE}")


def sdk_of(torch_neuronx_version: Optional[str]) -> str:
    """'2.9.0.2.12.22436' -> '2.28'; 'unknown' where the release number is not in the table."""
    parts = (torch_neuronx_version or "").split(".")
    return SDK_OF_TORCH_NEURONX.get(".".join(parts[3:5]), "unknown") if len(parts) >= 5 else "unknown"


def family_of(instance_type: str) -> Optional[str]:
    """'inf2.xlarge' -> 'inf2', 'trn1n.32xlarge' -> 'trn1', 'trn2u.48xlarge' -> 'trn2'; else None."""
    for prefix, family in FAMILY_BY_PREFIX:
        if instance_type.strip().lower().startswith(prefix):
            return family
    return None


def host_family() -> Optional[str]:
    """This host's instance family, or None when it cannot be told.

    KILN_NEURON_INSTANCE_TYPE wins (an override, e.g. where /sys is hidden); otherwise the DMI
    product name, which EC2 sets to the instance type (readable inside containers too).
    NOTE: the DMI path is an EC2 convention, not a Neuron API: when neither says anything the
    family check is skipped rather than guessed.
    """
    named = os.environ.get("KILN_NEURON_INSTANCE_TYPE")
    if named:
        return family_of(named)
    try:
        return family_of(DMI_PRODUCT_NAME.read_text())
    except OSError:
        return None
