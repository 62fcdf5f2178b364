"""The Debian packages moesaic's data comes from, and the one command that installs them.

Nothing is ever downloaded from a hub: corpora, images, fonts and speech come from Debian
packages (``DATA_PACKAGES``, with what needs each). ``moesaic data install --yes`` runs
``apt-get install`` for the missing ones; ``moesaic data status`` lists them; a loader whose
package is missing raises an error that names the same ``apt-get`` line (``install_line``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "DATA_PACKAGES",
    "TEST_PACKAGES",
    "SourceMissingError",
    "installed",
    "missing",
    "install_line",
    "install",
    "require_file",
]

# package -> what needs it
DATA_PACKAGES: dict[str, str] = {
    "bible-kjv": "corpus kjv (and mixture)",
    "python3.11-doc": "corpus pydocs (and mixture)",
    "wordnet-base": "corpus wordnet (and mixture), SkillNet supersense",
    "fortunes-min": "corpus fortunes (and mixture)",
    "fortunes": "corpus fortunes (and mixture)",
    "jargon-text": "corpus jargon (and mixture)",
    "dataset-fashion-mnist": "Fashion-MNIST images (SkillNet, moesaic classic)",
    "espeak-ng": "SkillNet sound (spoken words)",
    "fonts-dejavu-core": "SkillNet digit glyphs",
    "fonts-noto-color-emoji": "SkillNet emoji pairs",
}
# Beyond the data, the tests render the HTML report in a headless browser.
TEST_PACKAGES: dict[str, str] = {**DATA_PACKAGES, "chromium": "tests: the report rendered"}


class SourceMissingError(FileNotFoundError):
    """A dataset's source (a Debian package, a pip package) is missing; the message holds the
    exact command that installs it."""

    def __init__(self, dataset: str, what: str, install: str) -> None:
        self.dataset, self.install = dataset, install
        super().__init__(f"dataset {dataset!r} needs {what}: {install}")


def require_file(dataset: str, path: Path, deb_package: str) -> Path:
    """``path`` if it exists, else ``SourceMissingError`` naming the ``apt-get`` line."""
    if not Path(path).exists():
        raise SourceMissingError(
            dataset,
            f"{path} from the Debian package {deb_package}",
            f"apt-get install -y {deb_package}",
        )
    return Path(path)


def installed(package: str) -> bool:
    """Whether dpkg lists ``package`` as installed (False where there is no dpkg)."""
    if shutil.which("dpkg-query") is None:
        return False
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return done.returncode == 0 and done.stdout.strip().endswith(" installed")


def missing(packages: Iterable[str]) -> list[str]:
    return [p for p in packages if not installed(p)]


def install_line(packages: Iterable[str]) -> str:
    """The command that installs ``packages`` (as a user would type it)."""
    return "apt-get install -y --no-install-recommends " + " ".join(packages)


def install(packages: list[str], echo=print) -> int:
    """``apt-get update`` and ``apt-get install`` of ``packages`` (through sudo when not root);
    returns apt-get's exit status."""
    if shutil.which("apt-get") is None:
        raise FileNotFoundError(
            "apt-get not found: the data comes from Debian packages (Debian, Ubuntu); "
            f"install them by hand: {' '.join(packages)}"
        )
    prefix = [] if os.geteuid() == 0 or shutil.which("sudo") is None else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        [*prefix, "apt-get", "update"],
        [*prefix, "apt-get", "install", "-y", "--no-install-recommends", *packages],
    ):
        echo("+ " + " ".join(cmd))
        code = subprocess.run(cmd, env=env).returncode
        if code:
            return code
    return 0
