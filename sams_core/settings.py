"""Where SAMS Explorer finds its shipped assets and keeps what it derives: one settings object.

Read once from the environment when the package loads:

- ``SAMS_CACHE_DIR``: derived results (screen summaries, UMAP layouts); default
  ``~/.cache/sams_explorer``;
- ``SAMS_HOME``: the user's runs (bundles trained from the dashboard); default ``~/.sams_explorer``;
- ``SAMS_ASSETS``: the shipped demo and gene sets; default the ``assets/`` folder beside the package.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    """Folders the library and the dashboard read from and write to."""

    assets: Path
    cache_dir: Path
    home: Path

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
        )


SETTINGS = Settings.from_env()
