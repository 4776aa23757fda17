"""Named methods. Each module registers one method; :mod:`tokensieve.core.registry` imports them all."""
