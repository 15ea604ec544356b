"""Template rendering: bare and contrastive contexts, token-exact."""

from __future__ import annotations

import dataclasses
import re

import pytest

from dlma.errors import DlmaError
from dlma.prompts import Renderer, as_messages, list_presets, load_preset, preset_from_dict

QUERY = as_messages("How do I pick a lock?")


def test_bundled_presets_load():
    assert {"harmless", "helpful"} <= set(list_presets())
    p = load_preset("harmless")
    assert p.positive_instruction and p.negative_instruction
    assert all(len(s) >= 2 for s in p.demonstrations)


def test_unknown_preset_lists_available():
    with pytest.raises(DlmaError, match="available: .*harmless"):
        load_preset("nope")


def test_bare_context_is_exactly_the_deployment_chat_template(tokenizer):
    r = Renderer(tokenizer, load_preset("harmless"))
    expected = tokenizer.apply_chat_template(QUERY, tokenize=True, add_generation_prompt=True)
    if isinstance(expected, dict) or hasattr(expected, "input_ids"):
        expected = expected["input_ids"]
    assert r.context_ids(QUERY, "bare") == list(expected)


def test_contrastive_contexts_differ_only_before_the_query(tokenizer):
    p = load_preset("harmless")
    r = Renderer(tokenizer, p)
    pos, neg, bare = (r.context_ids(QUERY, s) for s in ("positive", "negative", "bare"))
    tail = tokenizer("<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for ids in (pos, neg, bare):
        assert ids[-len(tail):] == tail
    pos_text, neg_text = r.context_text(QUERY, "positive"), r.context_text(QUERY, "negative")
    assert p.positive_instruction in pos_text and p.negative_instruction not in pos_text
    demos = p.demos_for(QUERY)
    assert all(d.positive in pos_text and d.negative in neg_text and d.user in neg_text for d in demos)
    assert pos != neg


def test_demonstration_set_is_stable_per_query_and_rotates(tokenizer):
    p = load_preset("harmless")
    seen = {tuple(d.user for d in p.demos_for(as_messages(f"question {i}"))) for i in range(30)}
    assert len(seen) == len(p.demonstrations) > 1
    assert p.demos_for(QUERY) == p.demos_for(as_messages("How do I pick a lock?"))


def test_response_ids_are_appended_not_retokenized(tokenizer):
    r = Renderer(tokenizer, None)
    ids = r.response_ids("Sure, here it is.")
    assert ids[-1] == tokenizer.eos_token_id
    assert r.response_ids("Sure, here it is.", truncated=True) == ids[:-1]
    assert r.response_ids("") == [tokenizer.eos_token_id]


@pytest.mark.parametrize("placement", ["user", "assistant", "plain"])
def test_instruction_placements(tokenizer, placement):
    p = preset_from_dict({"name": "t", "placement": placement, "positive": {"instruction": "be kind"},
                          "negative": {"instruction": "be rude"}}, "test")
    r = Renderer(tokenizer, p)
    text = r.context_text(QUERY, "positive")
    assert "be kind" in text and "be rude" not in text
    if placement == "user":
        assert text.index("be kind") > text.index("pick a lock")
    if placement == "assistant":
        assert text.endswith("<|im_start|>assistant\n(be kind) ")
    if placement == "plain":
        assert text.startswith("USER: How do I pick a lock?") and text.endswith("ASSISTANT(be kind):")
        assert r.context_text(QUERY, "bare").endswith("\nASSISTANT:")


def test_a_long_context_cuts_the_query_never_the_contrastive_prefix(tokenizer):
    preset = load_preset("harmless")
    end = " So, how do I pick a lock?"
    long_q = [{"role": "user", "content": "Tell me a story about " + "a very long road, " * 150 + end}]
    full = Renderer(tokenizer, preset)
    limit = max(len(full.context_ids([{"role": "user", "content": "x"}], s)) for s in ("positive", "negative")) + 40
    r = Renderer(tokenizer, preset, max_context=limit)
    pos, neg, bare = (r.context_ids(long_q, s) for s in ("positive", "negative", "bare"))
    assert max(len(pos), len(neg), len(bare)) <= limit and r.truncated == 3
    assert pos != neg  # cut from the left, both were the same tail of the query
    for side, ids in (("positive", pos), ("negative", neg)):
        text, uncut = tokenizer.decode(ids), full.context_text(long_q, side)
        prefix = uncut[: uncut.index("Tell me a story")]  # instruction, demonstrations and template: all kept
        assert text.startswith(prefix) and text.endswith(end + "<|im_end|>\n<|im_start|>assistant\n"), text
    query_of = lambda ids: tokenizer.decode(ids).split("<|im_start|>user\n")[-1]  # noqa: E731
    assert query_of(pos) == query_of(neg)  # p+ and p- see the same (cut) query
    assert tokenizer.decode(bare).endswith(end + "<|im_end|>\n<|im_start|>assistant\n")
    # earlier turns go first; a prefix that cannot fit is an error, not a meaningless pair
    turns = [{"role": "user", "content": "first " * 300}, {"role": "assistant", "content": "ok " * 300},
             {"role": "user", "content": "Is this short?"}]
    assert tokenizer.decode(r.context_ids(turns, "positive")).endswith("Is this short?<|im_end|>\n<|im_start|>assistant\n")
    assert "first first" not in tokenizer.decode(r.context_ids(turns, "negative"))
    with pytest.raises(DlmaError, match="contrastive prompt .* alone needs more than 20"):
        Renderer(tokenizer, preset, max_context=20).context_ids(QUERY, "positive")


def test_user_preset_yaml(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("name: polite\npositive: {instruction: be polite}\nnegative: {instruction: be rude}\n"
                 "demonstrations:\n  - user: hi\n    positive: Hello!\n    negative: What.\n")
    p = load_preset(str(f))
    assert p.name == "polite" and p.demonstrations[0][0].negative == "What."
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndemonstrations:\n  - user: hi\n")
    with pytest.raises(DlmaError, match="bad.yaml"):
        load_preset(str(bad))


def test_bare_positive_side_is_the_deployment_context(tokenizer, tmp_path):
    f = tmp_path / "keep.yaml"
    f.write_text("name: keep\npositive: bare\nnegative: {instruction: refuse everything}\n"
                 "demonstrations:\n  - user: hi\n    negative: I can't.\n")
    p = load_preset(str(f))
    r = Renderer(tokenizer, p)
    assert p.positive_bare and r.context_ids(QUERY, "positive") == r.context_ids(QUERY, "bare")
    neg = r.context_text(QUERY, "negative")
    assert "refuse everything" in neg and "I can't." in neg
    from dlma.search import preset_to_dict
    assert preset_from_dict(preset_to_dict(p), "round trip").positive_bare
    f.write_text("name: keep\npositive: {instruction: x}\nnegative: {instruction: y}\n")
    assert not load_preset(str(f)).positive_bare
    f.write_text("name: keep\npositive: yes please\nnegative: {instruction: y}\n")
    with pytest.raises(DlmaError, match="keep.yaml: not a valid preset .*bare"):
        load_preset(str(f))


def test_end_of_turn_follows_the_chat_template(tmp_path):
    """A template that closes assistant turns with a token other than EOS (Gemma's <end_of_turn>,
    Llama 3's <|eot_id|>): complete responses end with that token, and generation stops on it."""
    from dlma.models import load_tokenizer
    from dlma.prompts import Renderer, end_of_turn_id

    tok = load_tokenizer("embedded")
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = ("{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                         "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    tok.save_pretrained(tmp_path)
    gemma_like = load_tokenizer(str(tmp_path))
    eot = gemma_like.convert_tokens_to_ids("<end_of_turn>")
    assert eot != gemma_like.eos_token_id and end_of_turn_id(gemma_like) == eot
    r = Renderer(gemma_like, load_preset("harmless"))
    assert r.response_ids("Sure.")[-1] == eot
    assert r.response_ids("Sure, here is", truncated=True)[-1] != eot
    assert end_of_turn_id(load_tokenizer("embedded")) == load_tokenizer("embedded").eos_token_id  # ChatML: <|im_end|>


def test_help_texts_name_every_bundled_preset_prompt_set_and_loss(capsys):
    """The help listed 2 of the 4 presets and 4 of the 7 prompt sets, called the default run a quick
    harmless one, left out `listwise`, and `prompts list` ran a long name into its description."""
    from dlma.cli import build_parser, main
    from dlma.data import BUNDLED
    from dlma.prompts import list_presets

    def help_of(*argv: str) -> str:
        with pytest.raises(SystemExit):
            build_parser().parse_args([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())

    for cmd in ("generate", "evaluate", "score"):
        text = help_of(cmd).replace("- ", "-")  # argparse wraps after a hyphen
        assert all(name in text for name in list_presets()), (cmd, text)
    for cmd in ("generate", "evaluate"):
        text = help_of(cmd).replace("- ", "-")
        assert all(name in text for name in BUNDLED), (cmd, text)
    assert "listwise" in help_of()
    assert "quick default" not in help_of("run") and "refuse harmful" in help_of("run")
    assert main(["prompts", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(list_presets())
    for line, measured in zip(lines[::2], lines[1::2]):  # name and description, then how it is measured
        name, gap, rest = line.partition("  ")
        assert name in list_presets() and gap and rest.strip() == load_preset(name).description, line
        assert measured.startswith(" " * (len(name) + 2)) and "role: " in measured, measured


def test_presets_that_contrast_nothing_or_say_something_else_are_refused(tmp_path):
    demo = "demonstrations:\n  - - user: hi\n      positive: Hello!\n      negative: What.\n"
    for text, says in (("name: a\n" + demo + "demos_per_prompt: 0\n", "p+ and p- are the same text"),
                       ("name: a\ndemonstrations: [[]]\n", "p+ and p- are the same text"),
                       ("name: a\npositive: {instruction: x}\nnegative: {instruction: x}\n", "p+ and p- are the same text"),
                       ("name: a\n" + demo.replace("What.", "Hello!"), "p+ and p- are the same text"),
                       ("name: a\npositive: bare\ndemonstrations:\n  - - user: hi\n      negative: No.\n  - []\n", "same text"),
                       ("name: a\n" + demo.replace("positive:", "positve:"), "unknown key(s) positve in a demonstration"),
                       ("name: a\n" + demo + "demos_per_promt: 1\n", "unknown key(s) demos_per_promt at the top level"),
                       ("name: a\n" + demo + "demos_per_prompt: two\n", "demos_per_prompt must be a whole number >= 0, got 'two'"),
                       ("name: a\n" + demo + "demos_per_prompt: -1\n", "demos_per_prompt must be a whole number"),
                       ("name: a\nnegative: {instruction: x, tone: rude}\n", "unknown key(s) tone in `negative`"),
                       ("name: a\n" + demo.replace("      negative: What.\n", ""), "a demonstration has no negative")):
        f = tmp_path / "p.yaml"
        f.write_text(text)
        with pytest.raises(DlmaError, match=re.escape(says)):
            load_preset(str(f))
    from dlma.search import candidates

    for name in list_presets():  # every bundled preset, and every variant `prompts search` tries, contrasts
        assert [preset_from_dict(d, n) for n, d in candidates(load_preset(name))]


def test_placement_user_needs_a_user_turn(tokenizer):
    """`placement: user` on a prompt without a user turn was `max() arg is an empty sequence`; such a
    prompt is refused where it is read (as_messages), and the renderer says so too."""
    preset = dataclasses.replace(load_preset("harmless"), placement="user")
    with pytest.raises(DlmaError, match="the last message must be the user's"):
        as_messages([{"role": "system", "content": "Be nice."}])
    with pytest.raises(DlmaError, match="no user turn"):
        Renderer(tokenizer, preset).context_text([{"role": "system", "content": "Be nice."}], "positive")
