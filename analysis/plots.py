"""Figure helpers shared by the analyses: 300 DPI PNGs with labelled axes and units."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 300
STAGE_COLORS = {"T_vision_encoder": "#4C72B0", "T_projector": "#55A868", "T_LLM_prefill": "#C44E52",
                "T_LLM_decode": "#8172B2"}
STAGE_LABELS = {"T_vision_encoder": "vision encoder", "T_projector": "projector",
                "T_LLM_prefill": "LLM prefill", "T_LLM_decode": "LLM decode"}


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def suptitle(fig, title: str, *, fontsize: int = 9) -> None:
    """The figure's title, wrapped at ' | ' so that it fits the figure's width."""
    width = max(30, int(fig.get_figwidth() * 120 / fontsize))
    lines, line = [], ""
    for part in title.split(" | "):
        candidate = f"{line} | {part}" if line else part
        if line and len(candidate) > width:
            lines.append(line)
            candidate = part
        line = candidate
    lines.append(line)
    fig.suptitle("\n".join(lines), fontsize=fontsize)
