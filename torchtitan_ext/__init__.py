"""torchtitan integration of the qwen35 model: compat shims, model spec, TOML front end, data, export.

The compatibility shims are installed on import, because torchtitan chooses its device module when it is
first imported: import this package before anything from torchtitan.
"""

from . import compat

compat.apply()
