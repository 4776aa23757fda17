"""The spec grammar: parsing, nested composition, errors with positions, canonical labels, round trips, keys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensieve as ts
from tokensieve.core.budget import Budget
from tokensieve.registry import create_method, get_method_class, method_names
from tokensieve.spec import Spec, parse_specs, split_specs


def M(name: str, **params):  # noqa: N802 - reads like a constructor
    return create_method(name, **params)


# ---------------------------------------------------------------------------------------------------- grammar
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("full", Spec()),
        ("snapkv:0.25", Spec(M("snapkv"), Budget.ratio(0.25))),
        ("snapkv:25%", Spec(M("snapkv"), Budget.ratio(0.25))),
        ("snapkv:256", Spec(M("snapkv"), Budget.tokens(256))),
        ("h2o:0.1", Spec(M("h2o"), Budget.ratio(0.1))),  # h2o alone compresses the prompt
        ("+h2o:512", Spec(M("full"), None, M("h2o"), Budget.tokens(512))),  # … after '+' it bounds decoding
        ("full+h2o:512", Spec(M("full"), None, M("h2o"), Budget.tokens(512))),
        ("quest", Spec(decode=M("quest"))),  # a decode-only method alone: full prefill, then it
        ("+quest:0.125", Spec(decode=M("quest"), decode_budget=Budget.ratio(0.125))),
        ("quest[page=32]:0.125", Spec(decode=M("quest", page=32), decode_budget=Budget.ratio(0.125))),
        (
            "snapkv[window=64]:0.25+quest[page=32]:0.125",
            Spec(M("snapkv", window=64), Budget.ratio(0.25), M("quest", page=32), Budget.ratio(0.125)),
        ),
        ("snapkv:0.25+quest", Spec(M("snapkv"), Budget.ratio(0.25), M("quest"), Budget.ratio(0.25))),
        ("snapkv[ window = 64 , kernel=5 ] : 0.5", Spec(M("snapkv", window=64, kernel=5), Budget.ratio(0.5))),
        ("ems[mass-bias=false]:0.5", Spec(M("ems", mass_bias=False), Budget.ratio(0.5))),  # '-' for '_' in keys
        ("full:1.0", Spec()),  # the whole prompt is no budget
    ],
)
def test_grammar(text, expected):
    assert Spec.parse(text) == expected


def test_nested_composition_builds_method_objects():
    s = Spec.parse("adakv[base=snapkv[window=64]]:0.1+quest[page=32]:0.125")
    ada = get_method_class("adakv")
    snap = get_method_class("snapkv")
    assert s == Spec(ada(base=snap(window=64)), Budget.ratio(0.1), M("quest", page=32), Budget.ratio(0.125))
    assert s.method.base.window == 64  # type: ignore[attr-defined]
    assert Spec.parse("adakv[base=knorm]:0.1").method.base == M("knorm")  # type: ignore[attr-defined]
    rec = Spec.parse("recompress[scorer=snapkv[window=8,kernel=3],interval=4]:64")
    assert rec.decode == M("recompress", scorer=snap(window=8, kernel=3), interval=4)
    assert rec.label == "+recompress[interval=4,scorer=snapkv[kernel=3,window=8]]:64"


def test_objects_and_strings_are_the_same_spec():
    ada = get_method_class("adakv")
    snap = get_method_class("snapkv")
    built = Spec(ada(base=snap(window=64)), Budget.ratio(0.1))
    assert built == Spec.parse("adakv[base=snapkv[window=64]]:0.1")
    assert Spec.parse(built) is built
    assert Spec.parse(snap()) == Spec(snap())
    assert Spec.of(M("quest"), 0.1) == Spec.parse("+quest:0.1")


def test_split_specs_only_at_top_level_commas():
    text = "snapkv[window=64,kernel=5]:0.25, h2o,+quest[page=32,min_pages=2]:0.1,adakv[base=snapkv[window=8,kernel=3]]"
    assert split_specs(text) == [
        "snapkv[window=64,kernel=5]:0.25",
        "h2o",
        "+quest[page=32,min_pages=2]:0.1",
        "adakv[base=snapkv[window=8,kernel=3]]",
    ]
    assert split_specs(" , ") == []
    assert [s.label for s in parse_specs("snapkv,snapkv[window=32],quest")] == ["snapkv", "+quest"]


# ----------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("text", "column", "needle"),
    [
        ("", 1, "expected a method name"),
        ("+", 2, "expected a method name after '+'"),
        ("snapkv:", 8, "expected a budget after ':'"),
        ("snapkv[", 8, "expected a parameter name"),
        ("snapkv[window]", 14, "expected '=' after 'window'"),
        ("snapkv[window=]", 15, "expected a value for 'window'"),
        ("snapkv[window=64:0.25", 17, "expected ']' or ','"),
        ("snapkv:0.25+", 13, "expected a method name after '+'"),
        ("snapkv:0.25:0.1", 12, "expected '+' or the end of the spec"),
        ("snapkv:0.25+quest:0.1+h2o", 22, "one '+' at most"),
        ("snapkv:abc", 8, "Cannot read budget 'abc'"),
        ("snapkv:1.5", 8, r"(0, 1]"),
        ("snapkvv:0.25", 1, "Unknown method 'snapkvv'. Did you mean 'snapkv'"),
        ("snapkv[nosuch=1]:0.2", 8, "Method 'snapkv' has no parameter 'nosuch'"),
        ("snapkv[window=abc]", 8, "cannot read window='abc' as int"),
        ("snapkv[window=64,window=32]", 18, "given twice"),
        ("adakv[base=snapkvv]", 12, "Unknown method 'snapkvv'"),
        ("adakv[base=quest]", 7, "base must be"),
        ("+snapkv:0.5", 2, "does not act during decode"),
        ("quest+quest", 1, "does not act during prefill"),
        ("full:0.5", 6, "takes no budget"),
        ("full+full", 6, "no decode method"),
    ],
)
def test_malformed_specs_say_where_and_what(text, column, needle):
    with pytest.raises(ts.ConfigError) as err:
        Spec.parse(text)
    msg = str(err.value)
    assert needle in msg
    assert f"column {column}" in msg
    assert f"\n  {text}\n  {' ' * (column - 1)}^" in msg  # the text with a caret under the error


def test_registry_errors_keep_their_class():
    with pytest.raises(ts.UnknownNameError):
        Spec.parse("nope:0.5")
    with pytest.raises(ts.CapabilityError):
        Spec.parse("+snapkv:0.5")


def test_constructor_validates():
    with pytest.raises(ts.ConfigError, match="does not act during prefill"):
        Spec(M("quest"))
    with pytest.raises(ts.ConfigError, match="does not act during decode"):
        Spec(decode=M("snapkv"))
    with pytest.raises(ts.ConfigError, match="without a decode method"):
        Spec(M("snapkv"), 0.5, None, 0.1)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------- labels
def test_canonical_labels():
    assert Spec.parse("snapkv[window=32]:25%").label == "snapkv:0.25"  # defaults dropped, one budget notation
    assert Spec.parse("snapkv[kernel=5,window=64]:0.25") == Spec.parse("snapkv[window=64,kernel=5]:0.25")
    assert Spec.parse("snapkv[window=64,kernel=5]:0.25").label == "snapkv[kernel=5,window=64]:0.25"
    assert Spec.parse("full+quest[page=32]:12.5%").label == "+quest[page=32]:0.125"
    assert Spec.parse("quest").label == "+quest"
    assert Spec.parse("snapkv:0.5+quest").label == "snapkv:0.5+quest:0.5"
    assert Spec.parse("adakv[base=snapkv[window=32]]:0.1").label == "adakv:0.1"  # nested default dropped too
    assert Spec.parse("pyramidkv[beta=10]:1.0").label == "pyramidkv[beta=10.0]:1.0"  # 1.0 is a ratio, 1 a token
    assert Spec.parse("ems[mass_bias=0]:64").label == "ems[mass_bias=false]:64"
    assert Spec().label == "full"
    assert Spec.parse("full:100%").label == "full"
    assert str(Spec.parse("+h2o:512")) == "+h2o:512"
    assert Spec.parse("snapkv:0.5+quest:0.125").family == "snapkv+quest"


def test_budgets_fill_in_and_resolve():
    assert not Spec.parse("snapkv").is_resolved
    assert Spec.parse("snapkv").with_budget("10%") == Spec.parse("snapkv:0.1")
    assert Spec.parse("quest").with_budget(64) == Spec.parse("+quest:64")
    assert Spec.parse("snapkv+quest:0.125").with_budget(0.5) == Spec.parse("snapkv:0.5+quest:0.125")
    resolved = Spec.parse("snapkv:0.25")
    assert resolved.with_budget(0.5) is resolved
    assert Spec.parse("full").with_budget(0.5) == Spec()
    assert [s.label for s in Spec.parse("snapkv").at_budgets([0.1, "25%", 0.25])] == ["snapkv:0.1", "snapkv:0.25"]
    assert Spec.parse("snapkv:0.5").at_budgets([0.1, 0.2]) == [Spec.parse("snapkv:0.5")]
    with pytest.raises(ts.ConfigError, match=r"snapkv:0\.25"):
        Spec.parse("snapkv").compressor_kwargs()
    kw = Spec.parse("+quest[page=32]:0.125").compressor_kwargs()
    assert kw == {"method": M("full"), "budget": Budget.ratio(1.0), "decode": M("quest", page=32),
                  "decode_budget": Budget.ratio(0.125)}  # fmt: skip
    assert Spec.parse("+quest:0.1").prefill == Spec()


# --------------------------------------------------------------------------------------------------------- keys
def test_keys():
    a = Spec.parse("snapkv:25%").key(task="passkey", length=1024, model="m")
    assert a == Spec.parse("snapkv[window=32]:0.25").key(model="m", length=1024, task="passkey")  # same config
    assert a != Spec.parse("snapkv[window=64]:0.25").key(task="passkey", length=1024, model="m")
    assert a != Spec.parse("snapkv:0.5").key(task="passkey", length=1024, model="m")
    assert a != Spec.parse("snapkv:0.25").key(task="passkey", length=2048, model="m")
    assert a != Spec.parse("snapkv:0.25+quest").key(task="passkey", length=1024, model="m")
    assert Spec.parse("adakv[base=snapkv[window=8]]:0.1").key() != Spec.parse("adakv:0.1").key()
    assert len(a) == 32
    d = Spec.parse("adakv:0.1").to_dict()
    assert d["method"]["params"]["base"] == {"name": "snapkv", "params": {"window": 32, "kernel": 7, "pooling": "max"}}
    assert d["budget"] == {"kind": "ratio", "value": 0.1, "sink": None, "recent": None}


# -------------------------------------------------------------------------------------------------- round trips
_VALUES = {
    int: st.integers(min_value=1, max_value=64).map(str),
    float: st.sampled_from(["0.1", "0.25", "0.5", "0.9", "1", "2.5", "10"]),
    bool: st.sampled_from(["true", "false", "1", "0"]),
}


@st.composite
def calls(draw, phase: str, depth: int = 0):
    import dataclasses
    import typing

    from tokensieve.core.capabilities import Phase
    from tokensieve.core.method import Method

    want = Phase.PREFILL if phase == "prefill" else Phase.DECODE
    names = [n for n in method_names() if want in get_method_class(n).capabilities.phases and n != "full"]
    name = draw(st.sampled_from(names))
    cls = get_method_class(name)
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if not draw(st.booleans()):
            continue
        ann = hints[f.name]
        if isinstance(ann, type) and issubclass(ann, Method):
            if depth > 0:
                continue
            params.append(f"{f.name}={draw(calls('prefill', depth + 1))}")
        elif typing.get_origin(ann) is typing.Literal:
            params.append(f"{f.name}={draw(st.sampled_from(typing.get_args(ann)))}")
        elif ann in _VALUES:
            params.append(f"{f.name}={draw(_VALUES[ann])}")
    params = draw(st.permutations(params))
    return name + (f"[{','.join(params)}]" if params else "")


budgets = st.one_of(
    st.sampled_from(["0.1", "25%", "0.125", "12.5%", "1.0", "0.5"]), st.integers(1, 4096).map(str), st.just(None)
)


@st.composite
def spec_texts(draw):
    text = ""
    if draw(st.booleans()):
        text = draw(calls("prefill"))
        b = draw(budgets)
        text += f":{b}" if b else ""
    if not text or draw(st.booleans()):
        text += "+" + draw(calls("decode"))
        b = draw(budgets)
        text += f":{b}" if b else ""
    return text


@settings(max_examples=150, deadline=None)
@given(spec_texts())
def test_labels_round_trip(text):
    try:
        s = Spec.parse(text)
    except ts.ConfigError:  # a parameter value a method rejects (e.g. out of its range)
        return
    again = Spec.parse(s.label)
    assert again == s
    assert again.label == s.label
    assert again.key(x=1) == s.key(x=1)
