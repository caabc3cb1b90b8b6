"""From trained runs to an offline Kaggle kernel (the 2021 competition ran with internet off).

``naming``   competition slugs, owner, dataset and kernel ids from ``cfg.kaggle``
``datasets`` the wheels dataset (``make wheels``) and a run's weights dataset (``make weights-dataset``)
``kernels``  generated kernel folders (``make kernels``): kernel-metadata.json + a script from a template
``api``      ``make download`` / ``make submit``: the only place the ``kaggle`` package is imported, lazily

Named ``kagglekit`` so that it never shadows the ``kaggle`` package itself. Importing it loads nothing heavy.
"""
