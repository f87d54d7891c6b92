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

DLC_IMAGE = "pytorch-inference-neuronx:2.9.0-neuronx-py312-sdk2.31.1-ubuntu24.04"
TOOLCHAIN_HINT = ("--target neuron needs torch-neuronx and neuronx-cc (pip install them from the AWS Neuron "
                  f"package index, or run inside the Neuron DLC image {DLC_IMAGE}); "
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


def toolchain_versions(tp_degree: int = 1) -> dict[str, str]:
    """Versions recorded in manifest.json; every one of them forces a recompile when it changes."""
    found = {COMPILER: installed_version(COMPILER) or "unknown",
             TORCH_NEURONX: installed_version(TORCH_NEURONX) or "unknown"}
    if tp_degree > 1:
        found[NXD] = installed_version(NXD) or "unknown"
    return found


def missing_toolchain(tp_degree: int = 1) -> Optional[str]:
    """None when compiling for neuron can start here, else the one-line reason."""
    if not importable("torch_neuronx"):
        return TOOLCHAIN_HINT
    if tp_degree > 1 and not importable("neuronx_distributed"):
        return ("--tp-degree > 1 needs neuronx-distributed (NxD Core ModelBuilder) next to torch-neuronx; "
                f"it ships in the Neuron DLC image {DLC_IMAGE}")
    return None


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
