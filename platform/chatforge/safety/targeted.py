"""The offline default toxicity scorer: rude words counted where they are aimed at the person addressed, plus
slurs, threats and wishes of harm.

alt-profanity-check's model (`ProfanityScorer`) is a bag of words: "that sucks", "holy crap", "shut down" and
"my neighbour is gay" score like insults, and "I will find you and hurt you" does not. What makes a chat reply
abusive is mostly who the rude words are aimed at and what is wished on them, so `TargetedScorer` keeps the model
as the judge of words and adds the aim. Per sentence (a text is split at line breaks and sentence ends, and scores
its worst sentence):

1. masked and leet spellings of slurs and obscenities are spelled out ("f*ggot", "b!tch", "r3tard");
2. a slur (`SLURS`) scores 1.0, whoever it is aimed at;
3. benign idioms are blanked (`BENIGN_IDIOMS`: "kill the process", "dying of laughter", "I'll beat you at chess");
4. a threat or a wish of harm on the addressee scores 1.0: a first person intending a violent act on "you" or
   "your ...", harm promised to "you", a wish, "should" or command of death or harm on "you" — none negated — or a
   set phrase ("watch your back", "rot in hell");
5. an insult aimed at the addressee scores the larger of the model's probability for the sentence and for the rude
   word alone (1.0 for `INSULTS`, words the model under-scores): a rude word right after "you", or one word further,
   once `FILLERS` (copulas, articles, intensifiers) are skipped ("you idiot", "you are such a total moron", "you
   ugly moron"), a curse before "you" ("screw you"), or a word closing the sentence after a comma (", loser").
   Words for how someone feels (`STATES`: "are you sick?") are no insult, and words of violence and death are left
   to rule 4, which knows who does what to whom ("did you die?");
6. any other sentence scores the model's probability times `UNTARGETED_WEIGHT`: "that sucks" or "holy crap" can
   reach no threshold of 0.5 or more, while a threshold below 0.5 also drops untargeted swearing.

The model never sees identity words (`IDENTITY_TERMS`): it learned "gay" or "Muslim" as rude from the abuse they
co-occur with, a known bias of toxicity classifiers. Each list is short enough for a reviewer to read;
docs/benchmarks.md measures what the whole costs and catches, on phrasings the rules were written against and on
held-out ones. Labels: "toxicity" (the above), "profanity" (the model's worst sentence, unweighted), and 0/1 flags
"insult", "slur", "threat" (wishes of harm included).
"""

from __future__ import annotations

import re
from functools import reduce

from chatforge.safety.scorers import TOXICITY_LABEL, Scorer

RUDE_WORD = 0.8  # a word the base scorer gives at least this on its own is rude ("fat" 0.91, "crazy" 0.52)
UNTARGETED_WEIGHT = 0.5
_WORD_CACHE_LIMIT = 200_000

# ---------------------------------------------------------------- lexicons

SLURS = (
    "faggot", "fag", "dyke", "tranny", "retard", "retarded", "tard", "nigger", "spic", "chink", "kike", "wetback",
    "raghead", "towelhead", "gook", "beaner",
)  # fmt: skip
# Only spelled out when masked, for the model to judge.
OBSCENITIES = (
    "fuck", "fucking", "fucked", "fucker", "motherfucker", "shit", "bullshit", "dipshit", "bitch", "asshole", "cunt",
    "dick", "bastard", "whore", "slut", "pussy", "idiot", "moron", "stupid", "dumbass",
)  # fmt: skip
IDENTITY_TERMS = (
    "gay", "gays", "lesbian", "lesbians", "bisexual", "homosexual", "homosexuals", "queer", "trans", "transgender",
    "muslim", "muslims", "islam", "islamic", "jew", "jews", "jewish", "christian", "christians", "hindu", "hindus",
    "sikh", "black", "white", "asian", "asians", "mexican", "mexicans", "african", "arab", "arabs", "immigrant",
    "immigrants", "deaf", "blind", "disabled", "autistic", "wheelchair",
)  # fmt: skip
# Insults of a person that the model scores low on their own. Phrases are joined into one word first.
INSULTS = (
    "brainless", "halfwit", "lowlife", "creep", "scumbag", "worthless", "useless", "pathetic", "disgusting", "trash",
    "garbage", "clown", "joke", "loser", "failure", "dumbest", "disgrace", "wasteofspace", "pieceofgarbage",
    "pieceoftrash", "pieceofshit",
)  # fmt: skip
_INSULT_PHRASES = re.compile(r"\b(waste|piece) of (space|air|oxygen|garbage|trash|shit)\b")
# How someone feels or what befell them is no insult, however rude the word ("are you sick?", "you poor thing").
STATES = {
    "sad", "sick", "ill", "lonely", "alone", "afraid", "upset", "angry", "mad", "hurt", "sorry", "poor", "lost",
    "helpless", "hopeless", "miserable", "unhappy", "broke", "crying", "grieving", "suffering", "fear", "pain",
}  # fmt: skip
# Nouns that are insults only as a predicate of the addressee ("you are a joke", not "your joke was funny").
_PREDICATE_ONLY = {"joke", "failure", "trash", "garbage", "clown", "disgrace"}
# Rejections of the addressee with no rude word in them.
_REJECTIONS = re.compile(
    r"\b(?:nobody|no one) (?:likes|wants|cares about|asked) you\b|\byou (?:disgust me|make me sick)\b"
)

# Skipped when looking for the word next to "you": "you are such a total idiot" puts "idiot" next to "you".
FILLERS = {
    "a", "an", "the", "are", "is", "am", "was", "were", "be", "being", "been", "so", "such", "too", "really", "very",
    "just", "total", "totally", "absolute", "absolutely", "complete", "completely", "little", "real", "most", "how",
    "what", "truly", "always", "like", "look", "looks", "sound", "sounds", "act", "acting", "seem", "seems", "honestly",
    "as", "this", "talk", "talks", "write", "type", "behave",
}  # fmt: skip
_LAUGHTER = {"lol", "haha", "hahaha", "lmao", "xd", "jk"}
# Rude words of violence and death: judged by the threat rules, which see who does what to whom.
_VIOLENCE_WORDS = re.compile(r"^(?:kill|murder|die|dying|dead|death|hurt|shoot|stab)\w*$")
# Rude words that aim at whoever follows them ("screw you", "I hate you"), and only so ("do you hate it?" does not).
_AT_OBJECT = {"fuck", "screw", "damn", "hate", "hates", "hated", "curse"}
# Expletives and intensifiers: rude, but about the situation ("are you freaking serious", "oh, crap").
_EXPLETIVES = {"crap", "shit", "damn", "hell", "fuck", "fucking", "freaking", "frickin", "god", "heck", "dang"}

# Blanked before the threat rules and the model see the sentence.
BENIGN_IDIOMS = (
    r"shut(?:s|ting)? (?:\w+ ){0,2}(?:down|off)",  # shut the laptop down
    r"kill(?:s|ed|ing)? (?:the |a |this |that |my |your |some )?"
    r"(?:process|task|job|cron job|app|program|server|tab|engine|lights?|time|switch|bugs?|power)\b",
    r"kill(?:s|ed|ing)? it\b",  # you killed it: praise
    r"kill(?:s|ed|ing)? me\b",  # the speaker is the one hurt: my feet are killing me, that meme killed me
    r"(?:die|dies|died|dying|kill(?:s|ed|ing)? \w+sel(?:f|ves)) (?:of |from |with )?laugh(?:ing|ter)",
    r"to die for",
    r"dying to \w+",
    r"drop[- ]dead (?:gorgeous|beautiful|handsome|funny)",
    r"break a leg",
    r"(?:beat|crush|destroy|kill|smoke|murder|whoop) you (?:at|in|to)\b",  # competition: I'll beat you at chess
    r"hit (?:you|me) up",
    r"drives? (?:you|me) (?:nuts|crazy|insane|mad)",
    r"shoot (?:you|me) (?:a|an) (?:text|message|email|dm|line|note|link)",
)

# ---------------------------------------------------------------- threats and wishes of harm

_NEGATION = re.compile(r"\b(?:not|never|no|nobody)\b")
_VIOLENT_VERB = (
    r"(?:kill|murder|hurt|beat|stab|shoot|strangle|choke|punch|slap|kick|knock|smash|break|end|destroy|burn|bury|"
    r"drown|hunt|cut|slit|gut|skin|crush|rip|tear|snap|smack|stomp|torture|rape)"
)
_VIOLENT = rf"{_VIOLENT_VERB}(?:s|ed|ing)?(?: \w+)?"  # with a particle: "beat you up"
_PLACE = r"(?:the |a )?(?:hospital|ground|grave|morgue|ditch|body bag|coffin|wheelchair)"
# What of "yours" a threat names: "break your legs", "burn your house down" (not "break your record").
_YOURS = (
    r"your (?:\w+ )?(?:face|head|legs?|arms?|neck|skull|teeth|jaw|nose|throat|bones|fingers|kneecaps|eyes|body|house|"
    r"car|home|family|kids|mother|mom|dog|life)"
)
_INTENT = r"\b(?:i|we)\b(?: \w+){0,2}? (?:will|shall|going to|about to|want to)"
_HARM = (
    r"(?:die|dies|died|dead|death|suffer|suffers|rot|rots|burn|burns|choke|chokes|drown|drowns|cancer|hit by|run over|"
    r"killed|murdered|crash|crashes|hurt|painful)"
)
_OPENERS = r"^(?:(?:haha|lol|lmao|ok|okay|so|well|look|honestly|now|ugh)[, ]+)*"
# Each match is rejected when a negation falls inside it ("I will never hurt you", "I hope you don't get hurt").
_NEGATABLE = [
    re.compile(rf"{_INTENT}(?: \w+){{0,4}}? {_VIOLENT} (?:you|yourself|{_YOURS})\b"),  # I will find you and hurt you
    re.compile(rf"{_INTENT}(?: \w+){{0,4}}? {_VIOLENT}(?: \w+){{0,4}} out of (?:you|{_YOURS})\b"),
    re.compile(rf"{_INTENT} (?:find|get) you(?=[\s.!?]*$)"),  # I'm going to find you.
    re.compile(rf"\bmake me {_VIOLENT_VERB} you\b"),  # don't make me hurt you
    re.compile(
        r"\byou (?:are going to|will) (?:get |be )?(?:hurt|killed|beaten|shot|stabbed|sorry|pay for (?:this|that|it)|"
        rf"regret (?:this|that|it)|end up (?:in {_PLACE}|dead)|wake up (?:in {_PLACE}|dead))\b"
    ),
    re.compile(rf"\b(?:hope|wish|pray|may)(?: that)? (?:you|your \w+(?: \w+)?)\b(?: \w+){{0,5}}? {_HARM}\b"),
    re.compile(
        r"\byou (?:should|deserve to|need to|ought to|must)(?: just| go)? (?:die|suffer|rot|kill yourself|end it all|"
        r"end your life|drink bleach|hang yourself|get hit|be (?:shot|killed|dead))\b"
    ),
    re.compile(r"(?:\w+ ){0,3}(?<!to )(?:kill|hang|off|unalive) yourself\b|\bkys\b"),  # not "want to kill yourself"
]
_HARM_PHRASES = re.compile(
    r"\b(?:hope|wish|pray)(?: that)? (?:something|bad things|terrible things|the worst)(?: \w+){0,2} happens? to you|"
    r"(?:hope|wish) you (?:had )?never (?:been born|existed)|"
    r"(?:hope|wish) you get what(?:'s| is) coming|"
    rf"{_OPENERS}(?:(?:just )?go|just|please(?: just)?) (?:die|drown|jump off|rot|choke|disappear|drink bleach)\b|"
    rf"{_OPENERS}die (?:in|already|slowly)\b|"
    r"drop dead\b|(?:rot|burn) in hell|eat shit and die|nobody would (?:\w+ )?(?:miss|care about) you|"
    r"nobody would (?:\w+ )?(?:care|notice) if you (?:died|disappeared|were gone|were dead)|"
    r"world (?:would be|is) (?:a )?better (?:place |off )?(?:without you|if you (?:were not|did not exist|died))|"
    r"do (?:us|everyone|the world)(?: all)? a favou?r and (?:die|disappear)|"
    r"i want you (?:dead|to die)"
)
_THREAT_PHRASES = re.compile(
    r"\b(?:watch your back|better watch yourself|(?:know|find(?: out)?) where you live|i will make you "
    r"(?:pay|suffer|regret|bleed|cry)|(?:i am|we are) coming for you|you are (?:so )?dead(?: meat)?(?=[\s.!?,]*$)|"
    r"you are a dead (?:man|woman)|your days are numbered|sleep with one eye open|you will not see it coming|"
    rf"(?:put|send) you (?:in|to|into) {_PLACE})"
)

# ---------------------------------------------------------------- text handling

_LEET = {"a": "a@4", "e": "e3", "i": "i1!|", "o": "o0", "s": "s$5", "t": "t7", "g": "g9", "u": "uv"}
_MASK = "*#-"


def _spelling(word: str) -> str:
    """A regex for ``word`` (and its plural) in leet, with inner letters masked or stretched; the first and last
    letters stay readable ("s***" could be any word)."""

    def letter(c: str, masked: bool) -> str:
        return f"[{re.escape(_LEET.get(c, c) + (_MASK if masked else ''))}]+"

    letters = [letter(word[0], False)] + [letter(c, True) for c in word[1:-1]] + [letter(word[-1], False)]
    plural = "(?:es)?" if word.endswith(("ch", "sh", "s")) else "(?:s|z)?"
    return r"(?<![\w*#@$-])" + "".join(letters) + plural + r"(?![\w*#@$])"


_SPELLED_WORDS = SLURS + OBSCENITIES
_SPELLED = re.compile("|".join(f"(?P<w{i}>{_spelling(w)})" for i, w in enumerate(_SPELLED_WORDS)))
_SLUR_WORDS = set(SLURS)
_DISGUISED = re.compile(r"[a-z][*#@$!|0-9-]|[*#@$!|0-9-][a-z]|([a-z])\1\1")
_INSULT_WORDS = set(INSULTS)
_IDIOMS = re.compile(r"\b(?:" + "|".join(BENIGN_IDIOMS) + ")")
_IDENTITY = re.compile(r"\b(?:" + "|".join(IDENTITY_TERMS) + r")\b")
_PREDICATE = re.compile(r"\byou (?:are|were|look like|sound like)\b")
_SENTENCE_END = re.compile(r"\n+|(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SPELLINGS = [
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"[\u2018\u2019`]", "'"),
        (r"\b(i|we|you|they|he|she)'ll\b", r"\1 will"),
        (r"\b(?:i'm|im)\b", "i am"),
        (r"\b(?:you're|youre)\b", "you are"),
        (r"\bur\b(?= (?:a|an|so|such|the|too|just|really|being|going|dead)\b)", "you are"),
        (r"\bwe're\b", "we are"),
        (r"\b(?:gonna|finna)\b", "going to"),
        (r"\bwanna\b", "want to"),
        (r"\b(?:imma|ima|i'ma)\b", "i am going to"),
        (r"\bwon'?t\b", "will not"),
        (r"\bcan'?t\b", "can not"),
        (r"\b(\w+)n't\b", r"\1 not"),
        (r"\b(do|does|did|is|are|was|were|would|could|should)nt\b", r"\1 not"),
        (r"\bu\b", "you"),
        (r"\bur\b", "your"),
        (r"\burself\b", "yourself"),
    )
]


def sentences(text: str) -> list[str]:
    """A text's sentences: split at line breaks and at ., ! or ? followed by a space; empty ones left out."""
    return [part.strip() for part in _SENTENCE_END.split(text) if part.strip()]


def normalized(sentence: str) -> str:
    """Lower case, contractions and chat spellings of "you" expanded, masked slurs and obscenities spelled out."""
    text = reduce(lambda acc, rule: rule[0].sub(rule[1], acc), _SPELLINGS, sentence.lower())
    if not _DISGUISED.search(text):  # the costly pattern only runs where a word may be disguised
        return text
    return _SPELLED.sub(lambda match: _SPELLED_WORDS[int(match.lastgroup[1:])], text)


def insulting(word: str) -> bool:
    """Whether ``word`` said of the addressee insults them though the model scores it low (`INSULTS`)."""
    return word in _INSULT_WORDS


def has_slur(text: str) -> bool:
    """Whether a normalized sentence holds a slur."""
    return any(_singular(word) in _SLUR_WORDS for word in _WORD.findall(text))


def _singular(word: str) -> str:
    if word.endswith(("ches", "shes")):
        return word[:-2]
    return word[:-1] if word.endswith("s") and not word.endswith("ss") else word


def is_threat(text: str) -> bool:
    """Whether a normalized sentence, idioms blanked, threatens or wishes harm on the person addressed."""
    if _THREAT_PHRASES.search(text) or _HARM_PHRASES.search(text):
        return True
    if "you" not in text and "kys" not in text:  # every negatable rule names the addressee
        return False
    return any(not _NEGATION.search(match.group()) for pattern in _NEGATABLE for match in pattern.finditer(text))


def aimed(words: list[str], rude: list[bool], text: str) -> list[bool]:
    """Per word of a normalized sentence: whether it is a rude word aimed at the addressee (rule 5)."""
    content = [i for i, word in enumerate(words) if word not in FILLERS]
    predicate = bool(_PREDICATE.search(text))
    out = [False] * len(words)
    for rank, i in enumerate(content):
        word = words[i]
        if not rude[i] or word in STATES or word in _EXPLETIVES - _AT_OBJECT or _VIOLENCE_WORDS.match(word):
            continue
        before = words[content[rank - 1]] if rank > 0 else ""
        after = content[rank + 1] if rank + 1 < len(content) else None
        you_after = after is not None and words[after] in ("you", "yourself")
        before2 = words[content[rank - 2]] if rank > 1 else ""
        if word in _AT_OBJECT:
            out[i] = you_after and (before in ("i", "we") or not word.startswith("hate"))
        elif word in _PREDICATE_ONLY:  # "you are a joke", "shut up, you clown"
            out[i] = before == "you" and (predicate or i == len(words) - 1)
        else:
            # "you idiot", "you are so dumb", "you ugly moron"; "what a moron you are", "how dumb you are!"
            out[i] = "you" in (before, before2) or (
                you_after and words[after + 1 : after + 2] in ([], ["are"], ["were"])
            )
    spoken = len(words)
    while spoken and words[spoken - 1] in _LAUGHTER:
        spoken -= 1
    last = words[spoken - 1] if spoken else ""
    if last and rude[spoken - 1] and last not in STATES | _EXPLETIVES and not _VIOLENCE_WORDS.match(last):
        tail = text[: text.rfind(last)].rstrip()
        out[spoken - 1] = out[spoken - 1] or tail.endswith(",")  # vocative: ", loser"
    return out


class TargetedScorer:
    """`Scorer` over any base scorer with a "toxicity" label (default: the profanity model); see the module text."""

    labels = (TOXICITY_LABEL, "profanity", "insult", "slur", "threat")

    def __init__(self, base: Scorer | None = None) -> None:
        if base is None:
            from chatforge.safety.scorers import ProfanityScorer

            base = ProfanityScorer()
        self.base = base
        self._word_scores: dict[str, float] = {}

    def word_scores(self, words: list[str]) -> list[float]:
        """The base scorer's "toxicity" for each word on its own (cached); 1.0 for an insulting word."""
        unseen = sorted({word for word in words if word not in self._word_scores})
        if unseen:
            if len(self._word_scores) + len(unseen) > _WORD_CACHE_LIMIT:
                self._word_scores.clear()
            for word, scores in zip(unseen, self.base.score(unseen), strict=True):
                self._word_scores[word] = 1.0 if insulting(word) else scores[TOXICITY_LABEL]
        return [self._word_scores[word] for word in words]

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        owners: list[int] = []  # the text each sentence came from
        model_texts: list[str] = []
        flags: list[tuple[bool, bool, bool]] = []  # slur, threat, rejection
        for index, text in enumerate(texts):
            for sentence in sentences(text):
                norm = normalized(sentence)
                blanked = _IDIOMS.sub(" ", norm)
                owners.append(index)
                model_texts.append(_INSULT_PHRASES.sub(r"\1of\2", _IDENTITY.sub(" ", blanked)))
                flags.append((has_slur(norm), is_threat(blanked), bool(_REJECTIONS.search(blanked))))
        probabilities = [scores[TOXICITY_LABEL] for scores in self.base.score(model_texts)] if model_texts else []
        words_of = [_WORD.findall(model_text) for model_text in model_texts]
        all_scores = iter(self.word_scores([word for words in words_of for word in words]))

        results = [dict.fromkeys(self.labels, 0.0) for _ in texts]
        for owner, p, words, model_text, (slur, threat, rejection) in zip(
            owners, probabilities, words_of, model_texts, flags, strict=True
        ):
            scores = [next(all_scores) for _ in words]
            hits = aimed(words, [score >= RUDE_WORD for score in scores], model_text)
            aimed_scores = [score for score, hit in zip(scores, hits) if hit]
            insult = rejection or any(hit and insulting(word) for word, hit in zip(words, hits))
            weighted = max([p, *aimed_scores]) if aimed_scores else p * UNTARGETED_WEIGHT
            result = results[owner]
            result["profanity"] = max(result["profanity"], p)
            result["insult"] = max(result["insult"], float(insult))
            result["slur"] = max(result["slur"], float(slur))
            result["threat"] = max(result["threat"], float(threat))
            result[TOXICITY_LABEL] = max(result[TOXICITY_LABEL], 1.0 if insult or slur or threat else weighted)
        return results
