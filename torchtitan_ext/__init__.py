"""torchtitan integration of the qwen35 model: compat shims, model spec, TOML front end, data, export.

Importing it patches nothing: entry points call `torchtitan_ext.compat.apply()` (the trainer's `main` and `run`
do), before or after torchtitan is imported.
"""
