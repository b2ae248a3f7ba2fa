"""The built-in world the demo runs on, built from nothing and deterministically.

It mirrors the classic RLHF sentiment lab (IMDB reviews judged by a sentiment
classifier) without any download: a synthetic corpus of short movie reviews, a
lexicon judge that scores them, a byte-level BPE tokenizer trained on the fly
and a tiny randomly initialised Llama model.
"""

from __future__ import annotations

import itertools
import random
import re
import string
from functools import lru_cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tunelab.data.templates import CHATML_TEMPLATE

# --------------------------------------------------------------------------
# Lexicon. Words are grouped by part of speech so the generator can build
# grammatical sentences; the judge only sees the union of each polarity.
# --------------------------------------------------------------------------

_POS_ADJ = (
    "wonderful superb brilliant moving delightful charming gripping stunning beautiful "
    "excellent masterful touching hilarious clever elegant fantastic gorgeous memorable "
    "powerful thrilling heartfelt inventive captivating compelling magnificent riveting "
    "witty joyful sublime"
).split()
_NEG_ADJ = (
    "dull boring awful clumsy tedious dreadful terrible bland lifeless predictable "
    "forgettable messy sloppy lazy wooden pointless tiresome clunky shallow painful "
    "stale dreary irritating mediocre horrible incoherent"
).split()
# Past-tense verbs that fit "I ___ every minute of it." / "I ___ it."
_POS_VERB = "loved enjoyed adored savored relished".split()
_NEG_VERB = "hated loathed regretted resented endured".split()
# Nouns that fit "It is a ___." / "A real ___."
_POS_NOUN = "masterpiece triumph gem delight treat".split()
_NEG_NOUN = "mess disaster failure chore letdown".split()
_POS_ADV = "beautifully brilliantly wonderfully superbly".split()
_NEG_ADV = "poorly badly clumsily lazily".split()

POSITIVE_WORDS: frozenset[str] = frozenset(_POS_ADJ + _POS_VERB + _POS_NOUN + _POS_ADV)
NEGATIVE_WORDS: frozenset[str] = frozenset(_NEG_ADJ + _NEG_VERB + _NEG_NOUN + _NEG_ADV)

_WORD_RE = re.compile(r"[a-z]+")


def lexicon_score(text: str) -> int:
    """Return (#positive lexicon words - #negative lexicon words) in ``text``.

    Counting is over lowercase alphabetic tokens with punctuation stripped.
    Negation is deliberately ignored: the review generator never writes it, so
    plain counting is a reliable judge on this corpus.
    """
    score = 0
    for word in _WORD_RE.findall(text.lower()):
        if word in POSITIVE_WORDS:
            score += 1
        elif word in NEGATIVE_WORDS:
            score -= 1
    return score


def is_positive(text: str) -> bool:
    """Return True when the lexicon judge finds ``text`` positive (score > 0)."""
    return lexicon_score(text) > 0


# --------------------------------------------------------------------------
# Titles. None of these words may be lexicon words, otherwise the title would
# bias the judge (a test checks this).
# --------------------------------------------------------------------------

_T_ADJ = (
    "Silent Glass Crimson Hidden Broken Golden Distant Frozen Velvet Last Northern "
    "Paper Iron Scarlet Quiet Wandering Burning Secret Seventh Midnight Copper Winter "
    "Empty Falling"
).split()
_T_NOUN = (
    "Harbor Fox River Garden Lantern Orchard Tower Compass Mirror Sparrow Island Station "
    "Letter Engine Crown Violin Bridge Forest Canyon Kingdom Lighthouse Horizon Carnival "
    "Archive"
).split()
_T_LEAD = "Return Rise Song Legend Shadow Ballad Curse Flight Keeper Daughter Ghost".split()
_T_TIME = "Midnight Summer Winter Dawn Autumn Twilight Spring Sunday Evening".split()
_T_PLACE = (
    "Verona Lisbon Kyoto Havana Marseille Oslo Cairo Prague Tangier Dublin Valparaiso "
    "Nairobi Istanbul Montreal Naples Reykjavik"
).split()

# Each pattern is drawn equally often so short patterns are not drowned out
# by the combinatorially larger ones.
_TITLE_PATTERNS = (
    ("The {a} {n}", (_T_ADJ, _T_NOUN)),
    ("{l} of the {a} {n}", (_T_LEAD, _T_ADJ, _T_NOUN)),
    ("{t} in {p}", (_T_TIME, _T_PLACE)),
    ("The {n} of {p}", (_T_NOUN, _T_PLACE)),
    ("A {n} for {p}", (_T_NOUN, _T_PLACE)),
    ("{a} {n}", (_T_ADJ, _T_NOUN)),
)
_TITLE_FIELDS = ("a", "n", "l", "t", "p")


def _fill_title(pattern: str, choices: tuple[str, ...]) -> str:
    names = [f for _, f, _, _ in string.Formatter().parse(pattern) if f]
    return pattern.format(**dict(zip(names, choices)))


@lru_cache(maxsize=1)
def _all_titles() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for pattern, pools in _TITLE_PATTERNS:
        for combo in itertools.product(*pools):
            seen.setdefault(_fill_title(pattern, combo), None)
    return tuple(seen)


def make_titles(n: int, seed: int) -> list[str]:
    """Return ``n`` distinct movie titles, deterministic for ``seed``.

    Titles are combinatorial ("The Silent Harbor", "Midnight in Verona",
    "Return of the Glass Fox", ...); several thousand exist, and asking for more
    than exist raises ValueError.
    """
    total = len(_all_titles())
    if n < 0 or n > total:
        raise ValueError(f"n must be in [0, {total}], got {n}")
    rng = random.Random(seed)
    titles: dict[str, None] = {}
    # Rejection sampling stays fast for the sizes the demo uses; near the
    # limit the small patterns run dry and we fall back to the full list.
    attempts = 0
    while len(titles) < n and attempts < 20 * n + 100:
        pattern, pools = rng.choice(_TITLE_PATTERNS)
        titles.setdefault(_fill_title(pattern, tuple(rng.choice(p) for p in pools)), None)
        attempts += 1
    if len(titles) < n:
        rest = [t for t in _all_titles() if t not in titles]
        for t in rng.sample(rest, n - len(titles)):
            titles[t] = None
    return list(titles)


# --------------------------------------------------------------------------
# Reviews. Every sentiment template carries at least one lexicon slot and no
# fixed lexicon words or negations, so a review with k sentiment sentences of
# one polarity scores at least k in that direction.
# --------------------------------------------------------------------------

_OPENERS = (
    "{title} is {a_art} film.", "{title} is {a_art} and {a2} movie.",
    "I watched {title} last night and it was {a}.", "{title} turned out to be {a}.",
    "From the first scene, {title} feels {a}.", "{title} is {a} from start to finish.",
    "What {a_art} film {title} is.", "{title} is {n_art}.",
    "My friends took me to see {title}, and it was {a}.",
    "I finally caught {title} at the cinema, and it was {a} and {a2}.",
    "{title} plays out {adv} from the opening shot.",
)
_UNTITLED_OPENERS = (
    "This is {a_art} film.", "What {a_art} movie.",
    "I found this one {a} from the first scene.",
)
_BODY = (
    "The acting was {a} and the story was {a2}.", "{part} is {a}.",
    "{part} felt {a}, and {part2} was even more {a2}.", "I {v} every minute of it.",
    "The director handles every scene {adv}.", "The cast performs {adv} throughout.",
    "It is {n_art} of a film.", "{part} was {a}, and {part2} was {a2}.",
    "Everything about it felt {a}.", "By the end I found it {a}.", "The final act is {a}.",
    "It is {a_art} story told {adv}.", "Even {part} felt {a}.", "I {v} it.",
    "{part} is handled {adv}.", "Honestly, it is {a_art} piece of work.",
    "The whole thing is {a} and {a2}.",
)
_CLOSERS = (
    "In short, {n_art}.", "Overall, {a_art} experience.", "I would call it {n_art}.",
    "All in all, {a} and {a2}.", "{title} is {n_art}, plain and simple.",
)
_PARTS = (
    "the acting", "the script", "the score", "the cinematography", "the pacing",
    "the dialogue", "the ending", "the soundtrack", "the lead performance",
    "the editing", "the direction", "the supporting cast", "the production design",
)
_NEUTRAL = (
    "It runs about {minutes} minutes.", "I saw it on a {day} {daypart}.",
    "The story is set in {place}.", "I watched it with my {person}.",
    "It was shot mostly at night.", "The story follows two siblings who inherit an old house.",
    "The soundtrack leans on piano and strings.", "It opened in theaters last {season}.",
    "Most of it takes place in a single apartment.", "The director also wrote the script.",
    "There is a long flashback in the middle.", "It is based on a novel from the seventies.",
    "I went in knowing very little about it.", "The cast is mostly newcomers.",
    "It is partly in black and white.",
)
_NEUTRAL_FILL = {
    "minutes": ("ninety", "a hundred", "a hundred and ten", "a hundred and twenty"),
    "day": "Monday Tuesday Friday Saturday Sunday".split(),
    "daypart": "afternoon evening night morning".split(),
    "place": ("a small coastal town", "Chicago in the fifties", "a mining village",
              "a space station", "a boarding school", "the French countryside"),
    "person": "brother sister parents roommate partner neighbor".split(),
    "season": "spring summer autumn winter".split(),
}


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _render(template: str, title: str, positive: bool, rng: random.Random, used: set[str]) -> str:
    """Fill one template, never reusing a lexicon word already in the review."""
    adjs, verbs, nouns, advs = (
        (_POS_ADJ, _POS_VERB, _POS_NOUN, _POS_ADV) if positive
        else (_NEG_ADJ, _NEG_VERB, _NEG_NOUN, _NEG_ADV)
    )

    def pick(pool):
        fresh = [w for w in pool if w not in used] or list(pool)
        word = rng.choice(fresh)
        used.add(word)
        return word

    slots = {"a": adjs, "a2": adjs, "v": verbs, "adv": advs, "part": _PARTS, "part2": _PARTS}
    values: dict[str, str] = {}
    for _, field, _, _ in string.Formatter().parse(template):
        if not field or field in values:
            continue
        if field == "title":
            values[field] = title
        elif field in slots:
            values[field] = pick(slots[field])
        elif field in ("a_art", "n_art"):
            values[field] = _article(pick(adjs if field == "a_art" else nouns))
        else:
            values[field] = rng.choice(_NEUTRAL_FILL[field])
    sentence = template.format(**values)
    return sentence[0].upper() + sentence[1:]


def make_review(title: str, positive: bool, rng: random.Random) -> str:
    """Return a 2-4 sentence review of ``title`` with clear sentiment.

    Positive reviews always score >= 2 with :func:`lexicon_score` and negative
    ones <= -2: at least two sentences carry sentiment words of the requested
    polarity and none carry the other polarity or a negation. The title opens
    the review most of the time. Plain ASCII, single line.
    """
    used: set[str] = set()
    n_sent = rng.choices((2, 3, 4), weights=(1, 4, 5))[0]
    # Two sentiment sentences are the minimum that guarantees |score| >= 2.
    n_neutral = 0 if n_sent == 2 else rng.choice((0, 1, 1, 2) if n_sent == 4 else (0, 1))
    n_sentiment_body = n_sent - 1 - n_neutral
    opener = rng.choice(_OPENERS if rng.random() < 0.85 else _UNTITLED_OPENERS)
    sentences = [_render(opener, title, positive, rng, used)]
    body = rng.sample(_NEUTRAL, n_neutral) + rng.sample(_BODY, n_sentiment_body)
    rng.shuffle(body)
    # A closer reads naturally only at the end, so it may replace the last
    # sentiment sentence rather than landing anywhere.
    if n_sentiment_body and rng.random() < 0.3:
        last = max(i for i, t in enumerate(body) if t not in _NEUTRAL)
        del body[last]
        body.append(rng.choice(_CLOSERS))
    for template in body:
        sentences.append(_render(template, title, positive, rng, used))
    return " ".join(sentences)


def make_neutral_review(title: str, rng: random.Random) -> str:
    """A review with no opinion at all (lexicon score 0): the title and one to three plain facts.

    As the rejected side of preference pairs it teaches a reward model that only a positive opinion
    earns reward, not the form of a review.
    """
    facts = [_render(t, title, True, rng, set()) for t in rng.sample(_NEUTRAL, rng.randint(1, 3))]
    return " ".join([f"I watched {title}."] + facts)


def make_reviews(n: int, seed: int) -> list[dict]:
    """Return ``n`` review rows ``{"title", "sentiment", "text"}``, deterministic for ``seed``.

    Sentiments are balanced (ceil(n/2) positive) and shuffled. Titles are
    distinct while the title pool lasts, then cycle.
    """
    rng = random.Random(seed)
    titles = make_titles(min(n, len(_all_titles())), seed)
    labels = [i % 2 == 0 for i in range(n)]
    rng.shuffle(labels)
    rows = []
    for i, positive in enumerate(labels):
        title = titles[i % len(titles)]
        rows.append({
            "title": title,
            "sentiment": "positive" if positive else "negative",
            "text": make_review(title, positive, rng),
        })
    return rows


def review_instruction(title: str) -> str:
    """Return the fixed SFT prompt asking for a review of ``title``."""
    return f"Write a review of {title}."


# --------------------------------------------------------------------------
# Tokenizer and model.
# --------------------------------------------------------------------------

# Plain ChatML, as used by Qwen2 and many others. The {% generation %} markers
# render nothing but let apply_chat_template(return_assistant_tokens_mask=True)
# find the assistant spans for loss masking.

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
_SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START, IM_END]


def build_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    decode(encode(x)) == x for any text (byte-level, no normalisation, no
    space clean-up). Specials: bos ``<s>``, eos ``</s>``, pad ``<pad>`` and the
    ChatML markers, each a single id. ``<s>`` is prepended only when
    ``add_special_tokens=True``. The chat template is :data:`CHATML_TEMPLATE`.
    """
    backend = Tokenizer(models.BPE())
    # add_prefix_space=False keeps leading spaces exactly as written.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHATML_TEMPLATE,
        model_max_length=512,
        padding_side="right",
        # The default clean-up would turn " ." into "." and break round-trips.
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    tokenizer,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 352,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> LlamaForCausalLM:
    """Return a randomly initialised Llama causal LM sized for ``tokenizer``.

    Deterministic for ``seed``; the caller's global torch RNG state is left
    untouched. Special token ids come from the tokenizer and are set on both
    the config and the generation config; embeddings are untied.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model
