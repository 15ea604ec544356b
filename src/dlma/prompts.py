"""Contrastive prompt pairs (p+, p-) and the bare context, rendered to token ids.

One `Renderer` turns a query into the token ids of its context under the positive
side, the negative side, or the bare context used for training and deployment.
Generation, scoring, training and evaluation all call it, so they agree to the token.
Responses are tokenized separately and appended to the context ids: tokenizing
`context + response` as one string can merge tokens across the boundary.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from .detectors import normalise
from .errors import DlmaError, yaml_error

Side = Literal["positive", "negative", "bare"]
SIDES: tuple[Side, ...] = ("positive", "negative", "bare")
PLACEMENTS = ("system", "user", "assistant", "plain")
Messages = list[dict[str, str]]
# What `role:` in a preset may say about its pairs. attribute: o+ shows the attribute and o- does
# not, and the pairs teach it. retain: p+ keeps the model's own answers to prompts that only look
# like the attribute's target (no-overrefusal: harmless questions that sound alarming), so the
# training terms that hold the model's answers where they were (`train.rpo_roles`, `train.kl_roles`)
# apply to its pairs.
ROLES = ("attribute", "retain")


@dataclass
class Exchange:
    """One demonstration: a user turn shared by both sides, with a contrasting answer each."""

    user: str
    positive: str
    negative: str


@dataclass
class Preset:
    """A contrastive prompt pair: instructions and/or demonstrations for each side.

    positive_bare: p+ is the bare context (no instruction, no demonstrations): the model as it
    is already shows the attribute, and the pairs should keep it that way (no-overrefusal: the
    untouched model answers harmless questions; p- only needs to make it refuse them).
    YAML: `positive: bare`.
    placement says where the instruction goes: `system` (system message), `user`
    (appended to the last user turn), `assistant` (a tag opening the assistant turn), or
    `plain` (the paper's `USER: ... ASSISTANT(tag):` template, for models without a chat
    template). Demonstrations are earlier user/assistant turns before the query.
    detector says how an answer is measured for the attribute (`dlma.detectors`: refusal, a phrase
    list, a length rule, a regex or a user's function); role says what its pairs are for (ROLES).
    """

    name: str
    positive_instruction: str | None = None
    negative_instruction: str | None = None
    demonstrations: list[list[Exchange]] = field(default_factory=list)
    demos_per_prompt: int = 2
    placement: str = "system"
    attribute: str = ""
    description: str = ""
    judge_question: str = ""
    detector: str | dict | None = None  # how answers are measured for the attribute (dlma.detectors)
    role: str = "attribute"
    check_prompts: str | None = None
    positive_bare: bool = False
    source: str = field(default="", compare=False)  # what load_preset was given (a name or a YAML path): pair files record it

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise DlmaError(f"preset {self.name!r}: placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        normalise(self.detector, f"preset {self.name!r}")
        if self.role not in ROLES:
            raise DlmaError(f"preset {self.name!r}: role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not (self.positive_instruction or self.negative_instruction or self.demonstrations):
            raise DlmaError(f"preset {self.name!r} has neither instructions nor demonstrations")
        if self.positive_bare and self.positive_instruction:
            raise DlmaError(f"preset {self.name!r}: `positive: bare` takes no positive instruction")
        if isinstance(self.demos_per_prompt, bool) or not isinstance(self.demos_per_prompt, int) or self.demos_per_prompt < 0:
            raise DlmaError(f"preset {self.name!r}: demos_per_prompt must be a whole number >= 0, got {self.demos_per_prompt!r}")
        if not self._contrasts():
            raise DlmaError(f"preset {self.name!r}: p+ and p- are the same text for some queries (equal instructions, and "
                            "a demonstration set that demos_per_prompt leaves empty or whose answers are equal on both "
                            "sides): pairs made under it would contrast nothing")

    def _contrasts(self) -> bool:
        """Whether every query gets different text under p+ and p- (any query may draw any set)."""
        if self.instruction("positive") != self.instruction("negative"):
            return True
        sets = [group[: self.demos_per_prompt] for group in self.demonstrations]
        if self.positive_bare:  # p+ is the bare query: p- differs by its demonstrations
            return bool(sets) and all(sets)
        return bool(sets) and all(any(ex.positive != ex.negative for ex in group) for group in sets)

    def instruction(self, side: Side) -> str | None:
        return {"positive": self.positive_instruction, "negative": self.negative_instruction}.get(side)

    def demos_for(self, query: Messages) -> list[Exchange]:
        """The demonstration exchanges for this query: a set chosen by a stable hash of the query."""
        if not self.demonstrations:
            return []
        key = zlib.crc32("\x1f".join(m["content"] for m in query).encode())
        chosen = self.demonstrations[key % len(self.demonstrations)]
        return chosen[: self.demos_per_prompt]


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("dlma.presets").iterdir() if p.name.endswith(".yaml"))


PRESET_KEYS = ("name", "description", "attribute", "judge_question", "placement", "detector", "role", "check_prompts",
               "positive", "negative", "demonstrations", "demos_per_prompt")


def _known_keys(data: dict, known: Sequence[str], where: str) -> None:
    """A misspelt key is an error, not a setting silently left at its default (`positve:` left p+'s
    demonstrations empty)."""
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise TypeError(f"unknown key(s) {', '.join(unknown)} {where}; known: {', '.join(known)}")


def _side(value: Any, side: str) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"`{side}` must be a mapping with `instruction`" + (" or the word `bare`" if side == "positive" else "")
                        + f", got {value!r}")
    _known_keys(value, ("instruction",), f"in `{side}`")
    return value


def _exchange(d: Any, bare: bool) -> Exchange:
    if not isinstance(d, dict):
        raise TypeError(f"a demonstration must be a mapping with user, positive and negative, got {d!r:.60}")
    _known_keys(d, ("user", "positive", "negative"), "in a demonstration")
    missing = [k for k in ("user", "positive", "negative") if k not in d and not (bare and k == "positive")]
    if missing:
        raise TypeError(f"a demonstration has no {', '.join(missing)}")
    return Exchange(str(d["user"]), str(d.get("positive", "")), str(d["negative"]))


def preset_from_dict(data: dict, source: str) -> Preset:
    try:
        _known_keys(data, PRESET_KEYS, "at the top level")
        pos = data.get("positive") or {}
        bare = pos == "bare"
        pos = {} if bare else _side(pos, "positive")
        neg = _side(data.get("negative") or {}, "negative")
        demos = []
        for group in data.get("demonstrations") or []:
            if isinstance(group, dict):  # a flat list of exchanges is one set
                group = [group]
            if not isinstance(group, list):
                raise TypeError(f"`demonstrations` must be a list of sets of exchanges, got {group!r:.60}")
            demos.append([_exchange(d, bare) for d in group])
        return Preset(
            name=str(data.get("name") or Path(source).stem),
            positive_instruction=pos.get("instruction"),
            negative_instruction=neg.get("instruction"),
            demonstrations=demos,
            demos_per_prompt=data.get("demos_per_prompt", 2),
            placement=str(data.get("placement", "system")),
            attribute=str(data.get("attribute", data.get("name", ""))),
            description=str(data.get("description", "")),
            judge_question=str(data.get("judge_question") or f"Which response is more {data.get('attribute', 'appropriate')}?"),
            detector=data.get("detector"),
            role=str(data.get("role", "attribute")),
            check_prompts=data.get("check_prompts"),
            positive_bare=bare,
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise DlmaError(f"{source}: not a valid preset ({exc}); see dlma/presets/harmless.yaml for the format") from None


def load_preset(name_or_path: str) -> Preset:
    """A bundled preset by name (`harmless`, `helpful`) or a user YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise DlmaError(f"preset file {path} does not exist")
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError:
            raise DlmaError(f"preset file {path}: not UTF-8 text; save it as UTF-8") from None
    elif name_or_path in list_presets():
        text = resources.files("dlma.presets").joinpath(f"{name_or_path}.yaml").read_text()
        source = f"preset {name_or_path}"
    else:
        raise DlmaError(f"unknown preset {name_or_path!r}; available: {', '.join(list_presets())}, or a path to a .yaml file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DlmaError(f"{source}: invalid YAML: {yaml_error(exc)}") from None
    if not isinstance(data, dict):
        raise DlmaError(f"{source}: expected a mapping at the top level")
    preset = preset_from_dict(data, source)
    preset.source = name_or_path
    return preset


def source_presets(sources: list[str], presets: list[str]) -> list[str]:
    """The preset each prompt source is generated under: one preset for all, or one per source in order."""
    if len(presets) not in (1, len(sources)):
        raise DlmaError(f"--preset names {len(presets)} presets for {len(sources)} prompt sources; "
                        "give one preset, or one per source in the same order")
    return presets * len(sources) if len(presets) == 1 else list(presets)


def as_messages(prompt: str | Sequence[dict]) -> Messages:
    """A prompt given as a string or as chat messages -> chat messages.

    Messages are {role, content} objects with text content, and a conversation ends with the
    user's turn: what is generated or scored is the assistant's reply to it. (A null content
    became the text "None"; a conversation that was only a system message, or ended with the
    assistant's turn, was answered as if the user had spoken.) Else a DlmaError says why."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    msgs = list(prompt)
    for i, m in enumerate(msgs, 1):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            got = {k: m.get(k) for k in ("role", "content")} if isinstance(m, dict) else m
            raise DlmaError(f"message {i} must have a string `role` and a string `content`, got {got!r:.80}")
    if msgs and msgs[-1]["role"] != "user":
        raise DlmaError(f"the last message must be the user's (role user), not {msgs[-1]['role']!r}: "
                        "the answer is the assistant's reply to it")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


_MARK = "\u2063dlma-end-of-turn-probe\u2063"


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template closes an assistant turn with, else the tokenizer's EOS.

    A complete answer ends with it in scoring and training, and generation stops on it. It is
    not always EOS: Gemma ends turns with <end_of_turn> (EOS <eos>), the first Llama 3
    Instruct releases with <|eot_id|> (EOS <|end_of_text|>).
    """
    cached = getattr(tokenizer, "_dlma_end_of_turn", False)
    if cached is not False:
        return cached
    found = tokenizer.eos_token_id
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}],
                                                 tokenize=False)
        except Exception:  # templates that reject this conversation keep EOS  # noqa: BLE001
            text = ""
        if isinstance(text, str) and _MARK in text:
            special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
            tail = tokenizer(text.split(_MARK, 1)[1], add_special_tokens=False)["input_ids"]
            found = next((t for t in tail if t in special), found)
    try:
        tokenizer._dlma_end_of_turn = found
    except AttributeError:
        pass
    return found


def context_room(max_context: int, max_new_tokens: int) -> int:
    """How many tokens a context may keep when `max_new_tokens` are to be sampled after it within
    `max_context`: the one cut rule generation and evaluation apply, and scoring checks against."""
    return max(1, max_context - max_new_tokens)


class Renderer:
    """Token ids of contexts (positive / negative / bare) and responses for one tokenizer.

    max_context: a longer context loses the beginning of its query (earliest turns first,
    then the start of the last user turn), never the contrastive prefix (instructions,
    demonstrations) or the template; p+ and p- keep the same query. Counted in `truncated`.
    """

    def __init__(self, tokenizer, preset: Preset | None = None, max_context: int | None = None):
        self.tok = tokenizer
        self.preset = preset
        self.max_context = max_context
        self.plain = (preset is not None and preset.placement == "plain") or not getattr(tokenizer, "chat_template", None)
        self.eos_id = end_of_turn_id(tokenizer) if not self.plain else tokenizer.eos_token_id
        self.truncated = 0  # contexts whose query was cut so far

    # -- text of a context -------------------------------------------------
    def context_text(self, query: Messages, side: Side, demos_of: Messages | None = None) -> str:
        """demos_of: the query whose hash picks the demonstrations (default: query; a cut query keeps the uncut one's)."""
        if side != "bare" and self.preset is None:
            raise DlmaError("a contrastive context needs a preset")
        if self.plain:
            return self._plain_text(query, side, demos_of)
        return self._chat_text(query, side, demos_of)

    def _turns(self, query: Messages, side: Side, demos_of: Messages | None = None) -> tuple[Messages, str | None]:
        """Messages with demonstrations and the instruction placed, plus an assistant tag."""
        p = self.preset
        if side == "bare" or (side == "positive" and p.positive_bare):
            return list(query), None
        instr = p.instruction(side)
        msgs: Messages = []
        system = [m for m in query if m["role"] == "system"]
        rest = [m for m in query if m["role"] != "system"]
        if instr and p.placement == "system":
            msgs.append({"role": "system", "content": instr})
        else:
            msgs.extend(system)
        for ex in p.demos_for(demos_of or query):
            msgs.append({"role": "user", "content": ex.user})
            msgs.append({"role": "assistant", "content": ex.positive if side == "positive" else ex.negative})
        rest = [dict(m) for m in rest]
        if instr and p.placement == "user":
            last = max((i for i, m in enumerate(rest) if m["role"] == "user"), default=None)
            if last is None:
                raise DlmaError(f"preset {p.name!r} places its instruction in the user's turn, and this prompt has no user turn")
            rest[last]["content"] = f"{rest[last]['content']}\n\n({instr})"
        msgs.extend(rest)
        tag = instr if instr and p.placement in ("assistant", "plain") else None
        return msgs, tag

    def _chat_text(self, query: Messages, side: Side, demos_of: Messages | None = None) -> str:
        msgs, tag = self._turns(query, side, demos_of)
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return text + (f"({tag}) " if tag else "")

    def _plain_text(self, query: Messages, side: Side, demos_of: Messages | None = None) -> str:
        msgs, tag = self._turns(query, side, demos_of)
        lines = []
        for m in msgs:
            role = {"user": "USER", "assistant": "ASSISTANT", "system": "SYSTEM"}.get(m["role"], m["role"].upper())
            lines.append(f"{role}: {m['content']}")
        lines.append(f"ASSISTANT({tag}):" if tag else "ASSISTANT:")
        return "\n".join(lines)

    # -- token ids ---------------------------------------------------------
    def _ids(self, query: Messages, side: Side, demos_of: Messages | None = None) -> list[int]:
        return self.tok(self.context_text(query, side, demos_of), add_special_tokens=False)["input_ids"]

    def context_ids(self, query: Messages, side: Side) -> list[int]:
        if self.max_context is None:
            return self._ids(query, side)
        sides: tuple[Side, ...] = (side,) if side == "bare" or self.preset is None else ("positive", "negative")
        return self.fit(query, sides, self.max_context)[side]

    def fit(self, query: Messages, sides: Sequence[Side], limit: int) -> dict[Side, list[int]]:
        """Context ids of `sides` in at most `limit` tokens each, all with the same query.

        A query too long loses its beginning: earlier turns first, then the start of the last
        user turn. The contrastive prefix is never cut (cut from the left, it went first and
        left p+ and p- the same context); if it alone does not fit, that is an error.
        """
        ids = {s: self._ids(query, s) for s in sides}
        if max(len(v) for v in ids.values()) <= limit:
            return ids
        q = [dict(m) for m in query]
        while True:
            over = max(len(v) for v in ids.values()) - limit
            if over <= 0:
                self.truncated += 1
                return ids
            last_user = max((i for i, m in enumerate(q) if m["role"] == "user"), default=None)
            earlier = [i for i, m in enumerate(q) if m["role"] != "system" and last_user is not None and i < last_user]
            if earlier:  # drop the earliest turn, and an assistant turn it leaves first
                del q[earlier[0]]
                if len(earlier) > 1 and q[earlier[0]]["role"] == "assistant":
                    del q[earlier[0]]
            else:
                toks = self.tok(q[last_user]["content"], add_special_tokens=False)["input_ids"] if last_user is not None else []
                if len(toks) <= 1:
                    raise DlmaError(f"the contrastive prompt ({', '.join(sides)}) alone needs more than {limit} context "
                                    "tokens; raise --max-context or use a preset with fewer or shorter demonstrations")
                q[last_user]["content"] = self.tok.decode(toks[min(over, len(toks) - 1):])
            ids = {s: self._ids(q, s, query) for s in sides}

    def response_ids(self, text: str, truncated: bool = False, first: int | None = None) -> list[int]:
        """Ids of a response; a complete response ends with EOS (end of turn), a cut one does not.

        first=N keeps a longer response's first N tokens only (cut, so no end of turn): the
        opening where a refusal or an answer is decided (sampling.response_tokens).
        """
        ids = self.tok(text, add_special_tokens=False)["input_ids"] if text else []
        if first is not None and len(ids) > first:
            return ids[:first]
        if not truncated and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids
