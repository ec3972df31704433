"""Where SAMS Explorer finds its shipped assets and keeps what it derives: one settings object.

Read once from the environment when the package loads:

- ``SAMS_CACHE_DIR``: derived results (screen summaries, UMAP layouts); default
  ``~/.cache/sams_explorer``;
- ``SAMS_HOME``: the user's runs (bundles trained from the dashboard); default ``~/.sams_explorer``;
- ``SAMS_ASSETS``: the shipped demo and gene sets; default the ``assets/`` folder beside the package;
- ``SAMS_DATA_ROOT``: the folder under which the dashboard may read files named by a user
  ("Files on disk", or a path in the URL); default the working directory. The shipped assets
  are always readable;
- ``SAMS_READ_ONLY``: ``1`` for a shared deployment without "Files on disk" and without training
  (the shipped demo and uploads remain); default off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    """Folders the library and the dashboard read from and write to."""

    assets: Path
    cache_dir: Path
    home: Path
    data_root: Path = field(default_factory=Path.cwd)
    read_only: bool = False

    def readable(self, path: str | os.PathLike) -> Path | None:
        """``path`` resolved (links followed) when it lies under :attr:`data_root` or the shipped
        assets, else None (:func:`sams_core.io.paths.readable_path` turns that into a message)."""
        if str(path).strip() == "":
            return None
        try:
            resolved = Path(path).expanduser().resolve()
        except (OSError, RuntimeError):
            return None
        for root in (self.data_root, self.assets):
            try:
                if resolved.is_relative_to(Path(root).resolve()):
                    return resolved
            except OSError:
                continue
        return None

    @property
    def demo_dir(self) -> Path:
        """The shipped simulated demo: a screen, its trained bundles and their UMAP layouts."""
        return self.assets / "demo"

    @property
    def demo_real_dir(self) -> Path:
        """The shipped real-screen demo: a public Perturb-seq subset, its licence, provenance and bundles."""
        return self.assets / "demo_real"

    @property
    def demo_embeddings(self) -> Path:
        """UMAP layouts shipped with the demo bundles."""
        return self.demo_dir / "embeddings"

    @property
    def genesets_dir(self) -> Path:
        """Gene-set collections shipped for offline enrichment."""
        return self.assets / "genesets"

    @property
    def runs_dir(self) -> Path:
        """Bundles trained from the dashboard."""
        return self.home / "runs"

    @classmethod
    def from_env(cls) -> "Settings":
        """The settings named by the environment, with the defaults above."""
        env = os.environ
        return cls(
            assets=Path(env.get("SAMS_ASSETS", _REPO / "assets")),
            cache_dir=Path(env.get("SAMS_CACHE_DIR", Path.home() / ".cache" / "sams_explorer")),
            home=Path(env.get("SAMS_HOME", Path.home() / ".sams_explorer")),
            data_root=Path(env.get("SAMS_DATA_ROOT") or Path.cwd()),
            read_only=env.get("SAMS_READ_ONLY", "").strip().lower() in ("1", "true", "yes", "on"),
        )


SETTINGS = Settings.from_env()
