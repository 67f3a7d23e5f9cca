"""What targets know (installed as ``pfq_edge.targets``): the profiles (TOML data and their schema) and one backend
per target kind (``backends/``: FINN for FPGAs, TVM for CPUs and GPUs, with their verdicts)."""

from pfq_edge.targets.profile import Profile, builtin_profiles, load_profile

__all__ = ["Profile", "builtin_profiles", "load_profile"]
