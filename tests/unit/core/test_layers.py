"""The library stands below the lab: listing and creating methods loads no evaluation, benchmark, profiling or
data code (the full import contract is checked by import-linter in `make test`)."""

from __future__ import annotations

import json
import subprocess
import sys

LAB = ("tokensieve.data", "tokensieve.eval", "tokensieve.bench", "tokensieve.profiling", "tokensieve.results")


def _loaded_after(code: str) -> list[str]:
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_method_names_loads_no_lab_module():
    loaded = _loaded_after("import tokensieve\nassert 'snapkv' in tokensieve.method_names()")
    assert "tokensieve.methods.kv.snapkv" in loaded  # the registry did load the methods
    lab = [m for m in loaded if m.startswith(LAB)]
    assert lab == []


def test_creating_a_compressor_spec_loads_no_lab_module():
    loaded = _loaded_after(
        "from tokensieve.spec import Spec\nSpec.parse('adakv[base=snapkv[window=64]]:0.1')\nimport tokensieve.engine"
    )
    assert [m for m in loaded if m.startswith(LAB)] == []
