"""The library never fails silently: specs that would do nothing or less than asked are refused by one rule with the
reason, NaN/inf and out-of-range numbers are refused, the spec grammar never raises anything but a ConfigError
(hypothesis fuzzing), and the remaining raw tracebacks are clear errors. On the tiny random Llama (3 layers, 512
positions)."""

from __future__ import annotations

import gc
import string
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokensieve as ts
from tests.conftest import make_tiny_model
from tokensieve.adapters.models import model_key, model_shape
from tokensieve.core.budget import Budget
from tokensieve.core.capabilities import Request
from tokensieve.errors import ConfigError, TokensieveError
from tokensieve.methods.kv.expected_attention import ExpectedAttention
from tokensieve.registry import create_method, get_method_class, method_names
from tokensieve.spec import Spec


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=1)


# ------------------------------------------------------------------------------------------ one rule, every door
@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("+quest[dense_layers=3]:0.5", "no layer would be sparse"),
        ("+quest[dense_layers=1000]:0.5", "no layer would be sparse"),
        ("+fasa[dense_layers=3]:0.5", "no layer would be sparse"),
        ("hip[dense_layers=3]", "no layer would be sparse"),
        ("+tidaldecode[select_layer=3]:0.5", "none would be sparse"),
        ("+tidaldecode[reselect_layer=7]:0.5", "not a layer of the model"),
        ("+quest[page=512]:0.5", "whole context"),
        ("+quest[page=1000000000]:0.5", "whole context"),
        ("+tokenselect[n_init=1000000000000]:0.5", "never be sparse"),
        ("+tokenselect[n_init=400,n_local=112]:0.5", "never be sparse"),
        ("expected_attention[n_future=100000]:0.5", "more than the model's whole context"),
        ("adakv[base=snapkv]:0.5+quest[dense_layers=9]:0.5", "no layer would be sparse"),
    ],
)
def test_specs_that_would_do_nothing_are_refused_with_the_reason(model, spec, reason):
    with pytest.raises(ts.CapabilityError, match=reason):
        ts.compress(model, spec)
    with pytest.raises(ts.CapabilityError, match=reason):
        Spec.parse(spec).check(Request(model_shape(model)))  # the rule itself, as every front door applies it


def test_the_rule_accepts_what_does_run(model):
    for spec in ("+quest[dense_layers=2]:0.5", "+quest[page=16]:0.5", "+tokenselect:0.5", "snapkv:0.25+quest:0.5"):
        ts.compress(model, spec)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("snapkv",), {}),
        (("+quest",), {}),
        (("snapkv+quest",), {}),
        (("h2o",), {}),
        (("full",), {"decode": "quest"}),
    ],
)
def test_a_compressing_method_without_a_budget_is_refused(model, args, kwargs):
    with pytest.raises(ConfigError, match="gives no budget"):
        ts.compress(model, *args, **kwargs)


def test_budgets_given_beside_the_spec_still_work(model):
    assert ts.compress(model, "snapkv", 0.25).spec.label == "snapkv:0.25"
    assert ts.compress(model, "full", 0.3, decode="quest").spec.label == "+quest:0.3"  # the decode method's
    assert ts.compress(model, "+quest", decode_budget=0.5).spec.label == "+quest:0.5"
    with pytest.raises(ConfigError, match="takes no budget"):
        ts.compress(model, "full", 0.3)  # would be silently dropped


def test_a_streaming_decode_budget_at_or_below_its_sinks_is_refused(model):
    for spec in ("+streaming_llm:4", "+streaming_llm[sink=8]:6", "streaming_llm:0.5+streaming_llm:4"):
        with pytest.raises(ts.CapabilityError, match="no room for recent ones"):
            Spec.parse(spec)
    press = ts.compress(model, "+streaming_llm:0.05")  # a ratio: checked against the prompt
    with pytest.raises(ts.CapabilityError, match="no room for recent ones"):
        press.prefill(torch.randint(3, 97, (1, 60)))  # 5 % of 60 = 3 entries <= 4 sinks
    ctx = ts.compress(model, "+streaming_llm:0.5").prefill(torch.randint(3, 97, (1, 60)))
    assert ctx.cache.kv_bytes() > 0


# ------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize(
    "spec",
    [
        "expected_attention[epsilon=nan]:0.5",
        "expected_attention[epsilon=inf]:0.5",
        "h2o[recent_ratio=-inf]:0.5",
        "snapkv[window=" + "1" * 22 + "]:0.5",
        "snapkv:" + "1" * 22,
        "snapkv:nan",
        "snapkv:1e400",
        "snapkv[name=x]:0.5",
        "snapkv[window=3.5]:0.5",
        "adakv[base=" * 1000,
        "adakv[base=" * 9 + "snapkv" + "]" * 9 + ":0.5",
    ],
)
def test_bad_numbers_and_shapes_of_specs_are_config_errors(spec):
    with pytest.raises(ConfigError):
        Spec.parse(spec)


def test_python_built_methods_and_budgets_are_checked_too(model):
    with pytest.raises(ConfigError, match="finite"):
        Spec(ExpectedAttention(epsilon=float("nan")), Budget.ratio(0.5))
    with pytest.raises(ConfigError, match="finite"):
        ts.compress(model, ExpectedAttention(epsilon=float("inf")), 0.5)
    for bad in ({"value": float("inf"), "kind": "tokens"}, {"value": 10**22, "kind": "tokens"}):
        with pytest.raises(ConfigError):
            Budget(**bad)
    with pytest.raises(ConfigError):
        Budget(0.5, sink=float("nan"))
    with pytest.raises(ConfigError, match="no parameter 'name'"):
        create_method("snapkv", name="x")


# ------------------------------------------------------------------------------------------ fuzzing the grammar
SPEC_CHARS = string.ascii_lowercase + string.digits + "[]=,:+.%-_ e"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=SPEC_CHARS, max_size=48))
def test_any_text_parses_or_is_a_config_error(text):
    try:
        spec = Spec.parse(text)
    except ConfigError:
        return
    assert Spec.parse(spec.label) == spec  # what parses has one canonical label that reads back


NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0", "-0", "true", "false", "max", "avg", "none", ""]),
)


@st.composite
def method_calls(draw):
    name = draw(st.sampled_from(method_names()))
    fields = [f for f in get_method_class(name).__dataclass_fields__ if not f.startswith("_")]
    keys = draw(st.lists(st.sampled_from([*fields, "name", "bogus"]) if fields else st.just("bogus"), max_size=3,
                         unique=True))  # fmt: skip
    params = ",".join(f"{k}={draw(NUMBERS)}" for k in keys)
    budget = draw(st.one_of(st.none(), NUMBERS, st.sampled_from(["0.25", "64", "25%"])))
    text = name + (f"[{params}]" if params else "")
    return text + (f":{budget}" if budget is not None else "")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method_calls(), st.one_of(st.none(), method_calls()))
def test_any_method_call_parses_or_is_a_config_error(first, second):
    text = first if second is None else f"{first}+{second}"
    try:
        spec = Spec.parse(text)
    except ConfigError:
        return
    for m in (spec.method, spec.decode):
        if m is None:
            continue
        for value in m.params().values():
            if isinstance(value, float):
                assert abs(value) < float("inf")  # no NaN (the comparison fails) or inf slipped through


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(method_calls())
def test_a_parsed_spec_builds_on_the_model_or_is_refused_with_a_tokensieve_error(model, text):
    try:
        spec = Spec.parse(text)
        ts.compress(model, spec)
    except TokensieveError:
        return


# ------------------------------------------------------------------------------------------ raw errors → clear ones
def test_decode_takes_one_eos_id_or_several_and_refuses_what_is_not_a_context(model):
    press = ts.compress(model, "full")
    ctx = press.prefill(torch.tensor([[5, 6, 7, 8]]))
    want = press.decode(ctx.fork(), 3, eos_token_ids=[2]).tokens
    assert press.decode(ctx.fork(), 3, eos_token_ids=2).tokens == want
    assert press.decode(ctx.fork(), 3, eos_token_ids=None).tokens == press.decode(ctx.fork(), 3).tokens
    for bad in ("2", [2.5], [-1], True):
        with pytest.raises(ConfigError, match="eos_token_ids"):
            press.decode(ctx.fork(), 2, eos_token_ids=bad)
    for call in (lambda: press.decode(None, 2), lambda: press.extend(None, torch.tensor([[3]]))):
        with pytest.raises(ConfigError, match="CachedContext"):
            call()


def test_the_model_key_memo_does_not_keep_models_alive():
    m = make_tiny_model(seed=7)
    key = model_key(m)
    assert model_key(m) == key
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


def test_a_fine_tune_in_a_folder_named_like_the_embedded_model_gets_its_own_key(tmp_path):
    from tests.unit.core.test_registry_cli import save_tiny
    from tokensieve.adapters.models import EMBEDDED, embedded_dir

    for name in ("smollm2", "smollm2-135m"):
        folder = tmp_path / "ft" / name
        save_tiny(folder, make_tiny_model(seed=2))
        loaded, _ = ts.load_model(str(folder))
        key = model_key(loaded)
        assert key not in EMBEDDED  # never the embedded model's key, so never its shipped profiles
        assert key.startswith(name + "-")
    assert str(embedded_dir()) not in str(tmp_path)
