"""Reading datasets: layouts (``datasets``), label files (``labels``) and 4-channel images (``images``)."""
