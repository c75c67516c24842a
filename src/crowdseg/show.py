"""`crowdseg show`: a picture of what the model is fed (augmented training samples with their labels)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig
from tqdm import tqdm

from crowdseg.data import build_dataset
from crowdseg.errors import ConfigError
from crowdseg.runs import run_dir
from crowdseg.vis import save_sample_grid


def show(cfg: DictConfig, n: int = 8, out: Optional[str] = None) -> Path:
    """Draw `n` augmented training samples (points, boxes, instance masks) into one PNG grid."""
    dataset = build_dataset(cfg, cfg.data.train_split, train=True)
    samples = [dataset[i % len(dataset)] for i in tqdm(range(n), desc="samples", leave=False)]
    path = Path(out) if out else run_dir(cfg) / "pictures" / "samples.png"
    try:
        save_sample_grid(samples, path)
    except OSError as err:
        raise ConfigError(f"--out: cannot write {path} ({err.strerror or err})") from None
    return path
