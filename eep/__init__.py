"""EEP: elastic expert parallelism for Mixture-of-Experts inference.

The top-level folders ``membership/ transfer/ kernels/ tools/`` install as ``eep.membership``,
``eep.transfer``, ``eep.kernels`` and ``eep.tools`` (pyproject maps them). In a source checkout
that was not installed (``PYTHONPATH=.`` on the GPU machine), the same names resolve because
the checkout's root is searched as part of this package.
"""

import os as _os

__version__ = "0.1.0"

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "membership", "__init__.py")) and _root not in __path__:
    __path__.append(_root)
