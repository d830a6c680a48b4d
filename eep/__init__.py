"""EEP: elastic expert parallelism for Mixture-of-Experts inference.

The top-level folders ``membership/ transfer/ kernels/ tools/`` install as ``eep.membership``,
``eep.transfer``, ``eep.kernels`` and ``eep.tools`` (the ``package-dir`` mapping of
pyproject.toml), so a checkout is used through an editable install (``pip install -e .``;
``make setup`` on a CPU machine, ``make test-gpu`` and ``scripts/gpu-benchmarks.sh`` on a GPU
machine do it).
"""

__version__ = "0.1.0"
