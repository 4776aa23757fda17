"""Named methods. Each module registers one method; :mod:`tokensieve.registry` imports them all."""
