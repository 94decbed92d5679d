"""Images mode of the kubelet: the root filesystem of each built image (``make images``), for
``launch`` to chroot into. One buildah working container per image, mounted (vfs driver, the
storage of ``tools/images.py`` under ``.driftless/images``); every pod of that image shares it
(each pod's mounts live in its own private mount namespace). ``release_rootfs`` unmounts and
removes the working containers.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

from tests.cluster.kubelet_plan import image_target

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".driftless" / "images"


def _buildah(work: Path) -> list[str]:
    return ["buildah", "--storage-driver", "vfs", "--root", str(work / "storage"), "--runroot", str(work / "run")]


def image_rootfs(refs: Iterable[str], work: Path = WORK) -> dict[str, Path]:
    """image reference -> mounted rootfs, for the images that exist (the others are left out:
    their pods run as processes of the project's environment, as the docs say)."""
    base = _buildah(work)
    out: dict[str, Path] = {}
    for ref in refs:
        if subprocess.run([*base, "inspect", "--type", "image", ref], capture_output=True).returncode != 0:
            continue
        name = f"dl-kubelet-{image_target(ref)}-{os.getpid()}"
        subprocess.run([*base, "rm", name], capture_output=True)  # a leftover of a crashed run
        subprocess.run([*base, "from", "--pull-never", "--name", name, ref], check=True, capture_output=True, timeout=600)
        path = subprocess.run([*base, "mount", name], check=True, capture_output=True, text=True, timeout=60).stdout.strip()
        out[ref] = Path(path)
    return out


def release_rootfs(refs: Iterable[str], work: Path = WORK) -> None:
    base = _buildah(work)
    for ref in refs:
        name = f"dl-kubelet-{image_target(ref)}-{os.getpid()}"
        subprocess.run([*base, "umount", name], capture_output=True)
        subprocess.run([*base, "rm", name], capture_output=True)
