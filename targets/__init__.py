"""Target profiles (installed as ``pfq_edge.targets``): TOML data, their schema, and fit/budget checks."""

from pfq_edge.targets.profile import Profile, builtin_profiles, load_profile

__all__ = ["Profile", "builtin_profiles", "load_profile"]
