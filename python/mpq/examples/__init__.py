"""What mpq's demo, tests and benchmarks run on, outside the library core (``import mpq`` never
imports this package).

- ``assets``: the real models and images that work offline (docs/ASSETS.md): EfficientNet-Lite0,
  the labelled ImageNet photos, the bundled photos, all-MiniLM-L6-v2.
- ``fashion``: the project's Fashion-MNIST ResNet-14, its checkpoint (``data/``) and its data.
- ``text``: all-MiniLM-L6-v2 as a sentence embedder, its sentences and measures.
- ``demo``: ``python -m mpq demo`` (README command 1).
"""
