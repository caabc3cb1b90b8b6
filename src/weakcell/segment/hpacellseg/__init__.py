"""HPA-Cell-Segmentation, the organisers' segmenter of the 2021 competition, rebuilt without its package.

- ``labels.label_cell`` (exported here): its post-processing, the same labels on the same network outputs;
- ``network.DPNUnet``: its DPN-92 U-Net with upstream's parameter names;
- ``pickles.load_whole_model``: the published whole-model pickles read without running pickled code;
- ``backend``: ``segment.backend=hpacellseg``, split into prepare / predict / finish for batching.

Only ``label_cell`` is imported with the package; the rest loads torch and is imported where used.
"""

from weakcell.segment.hpacellseg.labels import label_cell

__all__ = ["label_cell"]
