"""ring-ext: the Ring-1T techniques (IcePop, C3PO++, AState, stage recipes) as plugins for verl.

Importing this package is cheap on purpose: verl imports every `verl.plugins` entry point in every
process (driver, trainer, Ray workers), so heavy work waits until a plugin's registration needs it.
"""

from ring_ext._version import __version__

__all__ = ["__version__"]
