"""Near-duplicate images across data sets (``weakcell duplicates``): perceptual hashes per channel
(``hashing``), an exact multi-index search for close pairs (``search``), the command (``stage``)."""
