"""PNG figures of checkpoint analysis (gptjax/analysis/checkpoint_analysis.py): attention maps and CKA heatmaps."""

from __future__ import annotations

import os

import numpy as np


def plot_attention(probs: dict, labels: dict, output: str, title: str) -> list[str]:
  """One PNG per stack and attention kind: rows are layers, columns heads."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups: dict[str, list[str]] = {}
  for path in probs:
    parts = path.split("/")
    groups.setdefault(f"{parts[0]}_{parts[-1]}", []).append(path)
  written = []
  for group, paths in groups.items():
    heads = probs[paths[0]].shape[0]
    fig, axes = plt.subplots(len(paths), heads, figsize=(2.6 * heads, 2.6 * len(paths)),
                             squeeze=False)
    for r, path in enumerate(paths):
      q_tokens, k_tokens = labels[path]
      for c in range(heads):
        ax = axes[r, c]
        ax.imshow(probs[path][c], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(f"{path.split('/')[-2]} head {c}", fontsize=7)
        small = len(q_tokens) <= 32
        ax.set_xticks(range(len(k_tokens)) if small else [])
        ax.set_yticks(range(len(q_tokens)) if small else [])
        if small:
          ax.set_xticklabels(k_tokens, rotation=90, fontsize=4)
          ax.set_yticklabels(q_tokens, fontsize=4)
    fig.suptitle(f"{title}: {group}", fontsize=9)
    fig.tight_layout()
    path_png = os.path.join(output, f"attention_{group}.png")
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    written.append(path_png)
  return written


def plot_cka(names_a: list[str], names_b: list[str], m: np.ndarray, path: str, title: str) -> str:
  """A heatmap of a CKA matrix."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  size = 2.0 + 0.35 * max(len(names_a), len(names_b))
  fig, ax = plt.subplots(figsize=(size + 1.0, size))
  im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="magma")
  ax.set_xticks(range(len(names_b)), names_b, rotation=90, fontsize=6)
  ax.set_yticks(range(len(names_a)), names_a, fontsize=6)
  ax.set_title(title, fontsize=8)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
