"""The dashboard's pages in navigation order, and which of them a deployment shows."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PAGES", "PageSpec", "visible_pages"]


@dataclass(frozen=True)
class PageSpec:
    """One page: its script, navigation title, icon and URL path ("" = derived from the file)."""

    path: str
    title: str
    icon: str
    url_path: str = ""
    trains: bool = False  # starts training jobs: hidden in a read-only deployment


PAGES: tuple[PageSpec, ...] = (
    PageSpec("pages/0_Home.py", "Home", ":material/home:"),
    PageSpec("pages/1_Masks.py", "Masks", ":material/grid_on:"),
    PageSpec("pages/2_Latent_space.py", "Latent space", ":material/scatter_plot:", "Latent_space"),
    PageSpec("pages/3_Gene_programs.py", "Gene programs", ":material/genetics:", "Gene_programs"),
    PageSpec("pages/4_Compose.py", "Compose", ":material/join:"),
    PageSpec("pages/5_Compare.py", "Compare", ":material/leaderboard:"),
    PageSpec("pages/6_Train.py", "Train", ":material/model_training:", trains=True),
    PageSpec("pages/7_Differential_expression.py", "Differential expression", ":material/volcano:", "Differential_expression"),
)


def visible_pages(read_only: bool) -> list[PageSpec]:
    """The pages shown: all of them, or without training in a read-only deployment (SAMS_READ_ONLY=1)."""
    return [p for p in PAGES if not (read_only and p.trains)]
