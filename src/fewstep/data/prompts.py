"""dataset=prompts: the text prompts of a text-to-image run, one per sample, decided by the sample's index.

The file (`dataset.path`) is a text file with one prompt a line (blank lines are skipped), or a CSV file
(suffix .csv) whose column `dataset.column` holds the prompts. Sample i of a run gets prompt i mod P (P
prompts): like the class labels (labels=balanced) and the noise, a sample's prompt depends on its index only,
never on batch size, batch order or the number of processes. `dataset.negative_prompt` is the prompt of the
unconditional row of classifier-free guidance ("" = StableDiffusionPipeline's default).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import List, Sequence

from ..config import ConfigError


def read_prompts(cfg_dataset) -> List[str]:
    """The prompts of dataset.path (one a line, or the CSV column dataset.column); one-line ConfigError when
    the file is missing, unreadable, lacks the column or holds no prompt."""
    if not cfg_dataset.path:
        raise ConfigError("dataset=prompts needs dataset.path=<a .txt file, one prompt a line, or a .csv file>")
    p = Path(str(cfg_dataset.path)).expanduser()
    if not p.is_file():
        raise ConfigError(f"dataset.path={cfg_dataset.path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"dataset.path={cfg_dataset.path}: not a readable UTF-8 text file ({type(e).__name__})") from None
    if p.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        col = str(cfg_dataset.column)
        if rows and col not in rows[0]:
            raise ConfigError(f"dataset.path={cfg_dataset.path}: no column '{col}' (columns: "
                              f"{', '.join(rows[0].keys())}); set dataset.column")
        prompts = [r[col].strip() for r in rows if r.get(col) and r[col].strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"dataset.path={cfg_dataset.path}: the file holds no prompt")
    return prompts


def prompt_indices(indices: Sequence[int], n_prompts: int) -> List[int]:
    """Which prompt each sample (global index) gets: i mod P."""
    return [int(i) % int(n_prompts) for i in indices]
