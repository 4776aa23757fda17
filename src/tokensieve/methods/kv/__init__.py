"""KV methods: each module registers one method of the ``kv`` family (a prefill method, a decode method, or both);
modules whose name starts with ``_`` hold what several methods share."""
