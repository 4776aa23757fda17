"""Named methods, one file each, in two families of the one registry: :mod:`.kv` (KV-cache compression and sparse
attention) and :mod:`.visual` (visual-token pruning). :mod:`tokensieve.registry` imports them all."""
