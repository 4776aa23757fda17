"""Per-model profiles (retrieval heads, semantic retrieval heads and layer errors, dominant RoPE frequency chunks).

A method that needs a profile declares ``capabilities.profile``; :func:`load_profile` finds it in the user cache
(``$TOKENSIEVE_HOME/profiles/<model>/<kind>.json``) or among the profiles shipped with the package, and the
``tokensieve profile <kind>`` command creates one for any model.
"""

from ..adapters.profiles import Profile, load_profile, profile_paths, save_profile

__all__ = ["Profile", "load_profile", "profile_paths", "save_profile"]
