"""Private: the demo's and the benchmarks' own code. Not part of the public API; no stability promise.

Everything here may change or disappear in any release. The library core never imports this package
(``tests/test_layout.py`` checks it); only the ``blackbox-rs demo`` command does, lazily.

* :mod:`blackbox_rs._demo.zoo` -- train, score and export the small base classifiers (the "other
  team's model") of the demo, the benchmarks and the tests.
* :mod:`blackbox_rs._demo.datasets` -- offline data: scikit-learn's digits, Fashion-MNIST IDX files.
* :mod:`blackbox_rs._demo.serving` -- a loopback Open Inference Protocol v2 server for one model file.
* :mod:`blackbox_rs._demo.pipeline` -- the ``blackbox-rs demo`` pipeline.
"""
