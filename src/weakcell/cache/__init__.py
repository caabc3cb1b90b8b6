"""The cell-crop cache (``make cache``): per image, full-resolution instance masks and one uint8
``(4, S, S)`` crop per cell in memmappable shards, indexed by ``cells.parquet`` / ``images.parquet``.

Build with ``weakcell.cache.build.run(cfg)``; read with ``CellCache(cfg.cache_dir)``; train from
``weakcell.cache.loader.make_loader``.
"""

from weakcell.cache.crops import cut_crops
from weakcell.cache.store import CellCache, read_masks

__all__ = ["CellCache", "cut_crops", "read_masks"]
