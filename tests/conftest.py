"""The test session is an entry point: it installs the torch/torchtitan shims of torchtitan_ext.compat."""

from torchtitan_ext import compat

compat.apply()
