"""Tasks: determinism, lengths in the tokenizer's own tokens, needle placement, scoring, text sources."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import pytest

import tokensieve as ts
from tokensieve.data.tasks import (
    TASKS,
    Sample,
    continuation_score,
    get_task,
    match_all,
)
from tokensieve.data.testing import CharTokenizer
from tokensieve.data.text import (
    FileText,
    KJVText,
    PythonDocText,
    html_to_text,
    parse_bible_output,
    sentences,
    text_source,
)

TOK = CharTokenizer()
LENGTH = 1500  # characters = tokens of the character tokenizer


def _make(name: str, length: int = LENGTH, depth: float = 0.5, seed: int = 0, **opts: object) -> Sample:
    return get_task(name, text="generated", **opts).make(TOK, length, depth, seed)


def _same(a: Sample, b: Sample) -> bool:
    return (a.context, a.question, a.answers, a.answer_prefix, a.meta) == (
        b.context, b.question, b.answers, b.answer_prefix, b.meta,
    )  # fmt: skip


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_is_deterministic_and_seeded(name):
    a, b = _make(name, seed=3), _make(name, seed=3)
    assert _same(a, b)
    assert a.ids(TOK) == b.ids(TOK)
    c = _make(name, seed=4)
    assert not _same(a, c)


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("length", [900, 2000])
def test_prompt_length_is_measured_in_the_tokenizers_tokens(name, length):
    sample = _make(name, length=length)
    n = len(sample.ids(TOK))
    assert n <= length
    assert n >= length - 120, (n, length)  # within about one filler sentence
    assert sample.length == length
    assert sample.target_ids(TOK)


def test_repeated_filler_prompts_are_near_exact():
    for length in (600, 1000, 1700):
        n = len(_make("passkey", length=length).ids(TOK))
        assert length - 25 <= n <= length


@pytest.mark.parametrize("name", ["passkey", "niah_single"])
def test_needle_moves_with_depth(name):
    def position(depth: float) -> float:
        s = _make(name, depth=depth, seed=1)
        needle = s.answers[0]
        return s.context.index(needle) / len(s.context)

    shallow, middle, deep = position(0.0), position(0.5), position(1.0)
    assert shallow < 0.2
    assert 0.4 < middle < 0.6
    assert deep > 0.85


def test_real_text_haystack_differs_from_repeated_and_keeps_the_needle():
    rep = _make("niah_single", haystack="repeat")
    txt = _make("niah_single", haystack="text")
    assert "The grass is green." in rep.context
    assert "The grass is green." not in txt.context
    assert f"is: {txt.answers[0]}." in txt.context
    assert get_task("niah_single", haystack="text", text="generated").options() == {
        "haystack": "text",
        "text": "generated:0:4000",
    }
    assert get_task("cwe", haystack="text").options() == {}  # the filler does not apply to word lists


def test_niah_variants_have_their_needle_counts():
    single = _make("niah_single")
    assert len(single.answers) == 1
    assert single.context.count("special magic numbers for") == 1
    multikey = _make("niah_multikey")
    assert len(multikey.answers) == 1
    assert len(re.findall(r"One of the special magic numbers for ([\w-]+) is", multikey.context)) == 4
    multivalue = _make("niah_multivalue")
    key = multivalue.meta["keys"][0]
    assert len(multivalue.answers) == 4
    assert all(f"for {key} is: {v}." in multivalue.context for v in multivalue.answers)
    multiquery = _make("niah_multiquery")
    assert len(multiquery.answers) == 4
    assert len(multiquery.meta["keys"]) == 4
    for k in multiquery.meta["keys"]:
        assert k in multiquery.question


def test_variable_tracking_chain_is_in_order():
    s = _make("vt")
    value = re.search(r"value (\d+)", s.question).group(1)  # type: ignore[union-attr]
    first = s.context.index(f"VAR {s.answers[0]} = {value}.")
    previous = first
    for a, b in zip(s.answers, s.answers[1:]):
        at = s.context.index(f"VAR {b} = VAR {a}.")
        assert at > previous
        previous = at


def test_common_words_are_the_most_common():
    s = _make("cwe", length=2500)
    words = re.findall(r"\d+\. (\w+)", s.context)
    counts = Counter(words)
    top = {w for w, _ in counts.most_common(10)}
    assert top == set(s.answers)
    assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)


def test_frequent_words_top3_is_unique():
    for seed in range(6):
        s = _make("fwe", seed=seed)
        body = s.context.split("\n", 1)[1].replace("...", " ")
        counts = Counter(body.split())
        ranked = counts.most_common()
        assert {w for w, _ in ranked[:3]} == set(s.answers)
        assert ranked[2][1] > ranked[3][1]


def test_qa_quote_is_unique_and_answer_follows_it():
    s = _make("qa", depth=0.3, seed=2)
    quote = s.answer_prefix.lstrip('"')
    assert s.context.count(quote) == 1
    after = s.context[s.context.index(quote) + len(quote) :]
    assert after.split()[:4] == s.target.split()  # type: ignore[union-attr]
    assert s.answers[0] in " ".join(after.split()[:4])


def test_perplexity_sample_is_token_exact():
    s = _make("ppl", length=700)
    assert not s.chat
    assert len(s.ids(TOK).context) == 700
    assert s.ids(TOK).question == []
    assert len(s.target_ids(TOK)) == 64
    assert TOK.decode(s.meta["context_ids"]) == s.context


def test_perplexity_scores_the_same_tokens_at_every_length():
    short, long = _make("ppl", length=500, seed=5), _make("ppl", length=1800, seed=5)
    assert short.target_ids(TOK) == long.target_ids(TOK)
    assert long.ids(TOK).context[-500:] == short.ids(TOK).context  # more of the same preceding text
    assert _make("ppl", length=500, seed=6).target_ids(TOK) != short.target_ids(TOK)


# ------------------------------------------------------------------------------------------------------ scoring
def test_passkey_scoring():
    task = get_task("passkey")
    sample = dataclasses.replace(_make("passkey"), answers=("12345",))
    assert task.score(sample, "The pass key is 12345.") == 1.0
    assert task.score(sample, "1 2 3 4 5") == 1.0  # digits are read through spaces
    assert task.score(sample, "The pass key is 1234.") == 0.0


def test_match_all_is_the_share_of_answers_found():
    assert match_all("values: 111, 222 and 333", ("111", "222", "333", "444")) == 0.75
    assert match_all("APPLE pear", ("apple",)) == 1.0
    assert match_all("nothing", ()) == 0.0
    multivalue = get_task("niah_multivalue")
    sample = dataclasses.replace(_make("niah_multivalue"), answers=("1", "2"))
    assert multivalue.score(sample, "1 and 3") == 0.5


def test_continuation_score():
    assert continuation_score(" and two thousand and two hundred.", "and two thousand and") == 1.0
    assert continuation_score("And, two thousand AND!", "and two thousand and") == 1.0
    assert continuation_score("two thousand", "and two thousand and") == 0.5
    assert continuation_score("nothing at all here", "and two thousand and") == 0.0
    qa = get_task("qa")
    assert qa.score(dataclasses.replace(_make("qa"), answers=("the kisses of an",)), " the kisses of an enemy") == 1.0


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ts.UnknownNameError, match=r"Unknown task 'nope'.*passkey.*niah_single"):
        get_task("nope")
    with pytest.raises(ts.ConfigError, match="haystack"):
        get_task("passkey", haystack="noise")


def test_too_short_length_is_a_clear_error():
    with pytest.raises(ts.ConfigError, match="too short"):
        _make("niah_multiquery", length=200)


# ------------------------------------------------------------------------------------------------------ texts
def test_parse_bible_output():
    raw = "\nGenesis 1\n\n  1 In the beginning.\n  2 And the earth.\n\nGenesis 2\n\n  1 Thus the heavens.\n"
    assert parse_bible_output(raw) == "In the beginning. And the earth.\n\nThus the heavens."


def test_missing_debian_texts_name_the_apt_command(tmp_path):
    with pytest.raises(ts.ConfigError, match="apt-get install bible-kjv bible-kjv-text"):
        KJVText(binary=str(tmp_path / "no-bible")).load() if not _has_bible() else _raise_kjv_like()
    with pytest.raises(ts.ConfigError, match="apt-get install python3-doc"):
        PythonDocText(pattern=str(tmp_path / "*.html")).load()


def _has_bible() -> bool:
    import shutil

    return shutil.which("bible") is not None


def _raise_kjv_like() -> None:  # the reader is installed here: check the message through a missing binary + PATH
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, {"PATH": "/nonexistent"}):
        KJVText(binary="/nonexistent/bible").load()


def test_file_text_source(tmp_path):
    p = tmp_path / "book.txt"
    body = "First sentence here. Second one follows! " * 100
    p.write_text(body, encoding="utf-8")
    src = text_source(str(p))
    assert isinstance(src, FileText)
    assert src.text() == body
    q = tmp_path / "copy.txt"
    q.write_text(body, encoding="utf-8")
    assert text_source(f"file:{q}").ident == src.ident  # the content, not the path, identifies a text
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ts.ConfigError, match="at least"):
        text_source(str(tmp_path / "short.txt")).text()
    with pytest.raises(ts.ConfigError, match="apt-get install bible-kjv"):
        text_source("no/such/file.txt")


def test_sentence_splitting_and_html():
    units = sentences("One two. Three four! Five?\n\nSix; " + "x " * 150 + "; seven.")
    assert units[:3] == ["One two.", "Three four!", "Five?"]
    assert all(len(u) <= 240 for u in units)
    assert html_to_text("<html><head><title>t</title></head><body><p>" + "word " * 20 + "&amp;</p></body>") == (
        "word " * 20 + "&"
    )


def test_prose_reads_only_held_out_text_of_each_source_in_turn():
    from tokensieve.data.text import held_out_split

    task = get_task("prose")
    for seed in range(3):
        s = task.make(TOK, 800, 0.0, seed)
        source = task.sources[seed % 3]
        assert s.meta["source"] == text_source(source).name
        assert not s.chat
        assert len(s.ids(TOK).context) == 800
        assert len(s.target_ids(TOK)) == 128
        held = held_out_split(text_source(source).text())[1]
        flat = " ".join(held.split())  # the character tokenizer decodes newlines as spaces
        assert " ".join((s.context + s.target).split()) in flat  # context and continuation: held-out text, in order
    assert task.options()["prose"][0] == "kjv"
