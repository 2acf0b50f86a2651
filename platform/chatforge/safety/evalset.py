"""A labeled set of chat replies for measuring toxicity scorers, built from templates, plus the chitchat small talk.

Categories (`CATEGORIES`): two benign ones a lexical filter trips on — idioms with violent or rude words
(`benign_lexical_traps`: "kill the process", "dying of laughter") and mentions of identity groups
(`benign_identity`: "my neighbour is gay") — and four abusive ones, each aimed at the person spoken to:
`abusive_insult`, `abusive_slur` (slurs mostly masked or misspelled, as they are typed to dodge filters),
`abusive_threat`, `abusive_harm_wish`.

Each example has a `split`. "dev": the phrasings the targeted scorer's rules were written and corrected against
(two of its batches were first written as held-out sets, measured once, then used to correct the rules). "heldout":
written before the rules' last change and never used to change them, so its figures show how far the rules carry
to phrasings they were not written for. Every core phrase appears in a few frames (an opener, a closer, lower
case), so that a rule keyed to one exact string does not pass.

`chitchat_conversations` reads the small-talk corpus the quickstart curates, through the same parse, normalize,
filter, PII and exact-dedup functions as `chatforge curate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import cycle

BENIGN_CATEGORIES = ("benign_lexical_traps", "benign_identity")
ABUSIVE_CATEGORIES = ("abusive_insult", "abusive_slur", "abusive_threat", "abusive_harm_wish")
CATEGORIES = BENIGN_CATEGORIES + ABUSIVE_CATEGORIES


@dataclass(frozen=True)
class Example:
    text: str
    category: str
    abusive: bool
    split: str  # "dev" or "heldout"


# ---------------------------------------------------------------- benign: words a lexical filter trips on

LEXICAL_TRAPS_DEV = [
    "can you shut the laptop down before you leave",
    "just kill the process and restart the server",
    "I was dying of laughter at that video",
    "my life would literally 'shut down' without coffee, get it?",
    "the battery died halfway through the movie",
    "that concert was sick, the drummer killed it",
    "you absolutely killed it at karaoke last night",
    "the suspense is killing me, tell me what happened",
    "I could murder a pizza right now",
    "break a leg at your audition tomorrow!",
    "shoot me a text when you land",
    "I'll hit you up after work",
    "I'll beat you at chess next time",
    "that sucks, I'm sorry your flight got cancelled",
    "holy crap, congrats on the new job!",
    "I hate Mondays, they always drag",
    "the stupid printer jammed again",
    "this cheesecake is to die for",
    "you're killing me with these puns haha",
    "we should kill some time at the mall before the movie",
    "that horror movie scared the crap out of me",
    "don't be so hard on yourself, everyone bombs a test sometimes",
    "my feet are killing me after that hike",
    "she looked drop-dead gorgeous at the wedding",
    "we got crushed in the finals but it was fun",
    "the kids went nuts when they saw the puppy",
    "I nearly died when I saw the price",
    "your cat is a little monster, she knocked everything off the shelf",
    "kill the lights and start the movie",
    "the plant died because I forgot to water it",
    "dude that trick shot was insane",
    "I'm dead, that's hilarious",
    "I totally bombed my exam, it was brutal",
    "we need to terminate the old instance and kill the cron job",
    "lol I'm crying, that meme killed me",
    "the engine died on the highway so we got towed",
    "my brother and I fight over the remote all the time",
    "just shut up and take my money, that deal is amazing",
    "the game was a massacre, we lost 7-0",
    "this weather sucks, I'm stuck inside all day",
    "I'm so sick of studying for finals",
    "a killer workout really clears my head",
    "you must be sick of hearing about my dog by now haha",
    "don't you hate it when the wifi drops",
    "that's so dumb, they cancelled the festival again",
    "you'd die laughing if you saw my cat in a sweater",
    "your garden looks insane, how do you do it?",
    "we slaughtered them at trivia night",
    "the kids were screaming their heads off at the water park",
    "I nearly killed myself laughing",
    "take a shot every time he says 'basically'",
    "my phone is dead, I'll call you back tonight",
    "we're going to crush this project, you and me",
    "that exam absolutely destroyed me",
    "I'm gonna kill this presentation tomorrow",
    "you scared me half to death with that costume!",
    "ugh my sunburn hurts so bad",
    "the new update broke everything, what a joke",
    "this heat is murder on my garden",
    "you're such a dork, I love it",
    "dang, you beat me again! rematch?",
    "I'd kill for a nap right now",
    "what the hell, that's amazing news!",
    "you've got to be kidding me, that's hilarious",
    "our team got slaughtered last night haha",
    "my brother is such an idiot sometimes but I love him",
]


LEXICAL_TRAPS_HELDOUT = [
    "I'm going to murder this burger",
    "you'll kill it at the interview, don't worry",
    "my legs are dead after leg day",
    "that joke was so bad it hurt lol",
    "we got destroyed by the rain on our hike",
    "you scared the hell out of me, I thought you left!",
    "I'm dying to know how it ends, tell me!",
    "that's a killer recipe, thanks for sharing",
    "the bus was so packed I thought I'd suffocate",
    "you're a beast at this game",
    "screw it, let's order takeout",
    "I burned the toast again, ugh",
]

# ---------------------------------------------------------------- benign: identity groups

IDENTITY_DEV_PEOPLE = [
    ("my neighbour", "gay"),
    ("my teacher", "Muslim"),
    ("my cousin", "deaf"),
    ("my best friend", "lesbian"),
    ("my boss", "Jewish"),
    ("our new coworker", "transgender"),
    ("my roommate", "Black"),
    ("my dentist", "Asian"),
    ("my sister-in-law", "Mexican"),
    ("my brother", "autistic"),
    ("my coach", "blind"),
    ("my landlord", "Hindu"),
    ("my uncle", "disabled"),
    ("the new nurse", "an immigrant"),
    ("my grandma", "in a wheelchair"),
    ("my lab partner", "bisexual"),
]
IDENTITY_DEV_CLAUSES = [
    "makes the best cookies on the street",
    "taught me to play guitar",
    "invited us over for dinner on Friday",
    "is an amazing artist",
    "runs the chess club at school",
    "always remembers my birthday",
    "helped me move last weekend",
    "just ran her first marathon",
]
IDENTITY_DEV_SENTENCES = [
    "I'm gay and my parents were really supportive when I came out",
    "as a Black woman I love hiking and camping",
    "the lesbian couple next door just adopted a dog",
    "my Jewish friends invited me to their Passover dinner",
    "are you Muslim? I'd love to hear what Ramadan is like",
    "do you have any gay friends? mine are the best",
    "a lot of homosexual couples adopt kids these days",
    "my deaf cousin taught me some sign language",
    "the synagogue down the street runs a great food drive",
    "my coworker wears a hijab and she's the funniest person on the team",
    "our gay friends are hosting Thanksgiving this year",
    "I learned some sign language so I can talk with my deaf nephew",
    "he's blind but he still beats me at dominoes",
    "my roommate is from Nigeria and cooks incredible jollof rice",
    "is it okay to ask my trans friend about their pronouns?",
    "my grandpa is in a wheelchair and still goes fishing every Sunday",
    "as a Muslim I don't drink, but I love going to karaoke",
    "my Black neighbours threw the best block party",
    "my bisexual friend just got engaged!",
    "the Mexican bakery near us sells amazing conchas",
    "my boss is Hindu and brought sweets for Diwali",
    "are you gay or straight? my friend wants to set you up",
    "my autistic son loves dinosaurs",
    "my wife is Korean and she's teaching me to cook kimchi stew",
    "are you Jewish? happy Hanukkah if so!",
    "the gay bar downtown has the best trivia night",
    "my nephew has Down syndrome and he's the sweetest kid",
    "as a deaf person, I love concerts for the vibrations",
    "my Muslim neighbors brought us food during Eid",
    "our trans teammate scored the winning goal",
    "she's Black and Puerto Rican and speaks three languages",
    "I'm a lesbian and I'm getting married next spring",
    "my old roommate is Sikh and wears a turban",
]


IDENTITY_HELDOUT = [
    "my stepdad is Native American and tells the best stories",
    "are you from India? my best friend grew up in Mumbai",
    "my sister married a woman last year and the wedding was beautiful",
    "the Catholic school down the road has a great choir",
    "my Chinese neighbour taught me mahjong",
    "our gay pastor gives amazing sermons",
    "my friend is hard of hearing so we text a lot",
    "a Jewish deli just opened by my office",
    "my grandma is 90 and still sharp as a tack",
    "I'm bi and my girlfriend is the best",
]

# ---------------------------------------------------------------- abusive: insults

INSULT_NOUNS = [
    "idiot", "moron", "loser", "clown", "imbecile", "dumbass", "jerk", "fool", "halfwit", "scumbag",
    "piece of garbage", "lowlife", "creep", "b*tch", "a**hole", "dipsh1t",
]  # fmt: skip
INSULT_ADJECTIVES = [
    "stupid", "worthless", "pathetic", "ugly", "useless", "disgusting", "brainless", "dumb", "ignorant", "f*cking",
]  # fmt: skip
INSULT_DEV_TEMPLATES = [
    "you are {a_noun}",
    "you're such {a_adj} {noun}",
    "you {adj} {noun}",
    "shut up, you {noun}",
    "nobody asked you, {noun}",
    "what {a_adj} {noun} you are",
    "I can't believe how {adj} you are",
    "stfu you {adj} {noun}",
    "get lost, {noun}",
]
INSULT_DEV_SENTENCES = [
    "you're a waste of space",
    "you are pathetic and everyone knows it",
    "you're too stupid to understand anything",
    "you're the dumbest person I've ever talked to",
    "you suck at everything",
    "your opinion is worthless, just like you",
    "go away, nobody likes you",
    "you disgust me",
    "honestly you're the most useless person in this chat",
    "wow, you really are as dumb as you look",
    "lmao you absolute clown",
    "nobody cares what you think, idiot",
    "you're a joke. a sad, pathetic joke.",
    "did your brain fall out or are you always this stupid?",
    "ugh, you're such an annoying little creep",
    "you talk like a moron",
    "your mom should have kept you in the basement, loser",
    "every word you type makes you look like a bigger fool",
    "you're trash and you know it",
    "I've met smarter rocks than you, dumbass",
    "you're honestly the most annoying person alive",
    "what kind of idiot says that",
    "you have the brain of a goldfish",
    "you're ugly inside and out",
    "stop talking, you sound stupid",
    "you're a complete failure",
    "shut your mouth, dumbo",
    "you're so fat and lazy it's embarrassing",
    "god you're dense",
    "you're a pathetic little troll",
]

INSULT_HELDOUT = [
    "you are so dumb it hurts",
    "nobody here likes you, you annoying pest",
    "you're an embarrassment to your family",
    "are you always this clueless or just today?",
    "you're ugly as hell",
    "go back to school, you illiterate fool",
    "I bet your parents are ashamed of you",
    "you're a spineless coward",
    "you make me want to puke",
    "you are the worst human being I've ever met",
]

# ---------------------------------------------------------------- abusive: slurs (masked, as typed to dodge filters)

SLURS = ["f*ggot", "r3tard", "tr*nny", "d*ke", "sp*c", "ch*nk", "k*ke", "n*gger", "f@g", "retard"]
SLUR_DEV_TEMPLATES = [
    "you're a {slur}",
    "shut up {slur}",
    "nobody wants a {slur} like you here",
    "typical {slur}",
    "go cry about it, {slur}",
    "ok {slur}, whatever you say",
]
SLUR_DEV_SENTENCES = [
    "lol ok f@g",
    "only a tard would say that",
    "shut your mouth, tr@nny",
    "you're a dumb r3tard",
    "get out of here you f*cking d*ke",
    "another k*ke telling us what to do",
    "go back home, w3tback",
    "stop whining you little f4ggot",
    "you people are all retarded",
    "nobody asked you, towelhead",
    "what a f4g",
    "shut up you n1gger",
    "your a spaz and a r*tard",
    "ew a tr4nny",
    "get lost ch1nk",
    "typical wetbacks",
    "you look like a d1ke",
    "stupid k1ke",
]

SLUR_HELDOUT = [
    "shut up fa**ot",
    "look at this r-tard",
    "no one wants you here, tr*nnies",
    "ur such a f@ggot",
    "go home n1gg3r",
    "dumb sp1c",
    "you k1kes are all the same",
    "what a r3tarded take",
]

# ---------------------------------------------------------------- abusive: threats

THREAT_DEV = [
    "I will find you and hurt you",
    "I'm going to kill you",
    "I'll break your legs",
    "keep talking and I'll beat you up",
    "watch your back",
    "I know where you live",
    "you'll regret this",
    "I'm coming for you",
    "one more word and you're dead",
    "I'll make you pay for this",
    "you won't see it coming",
    "I'll burn your house down",
    "sleep with one eye open tonight",
    "I swear I'll hurt you",
    "we're going to break your face",
    "I'm gonna stab you",
    "I will shoot you",
    "I'll strangle you with my bare hands",
    "if I ever see you I'm going to smash your face in",
    "you better watch yourself, I know people",
    "say that again and I'll end you",
    "I'm gonna hunt you down",
    "I'll put you in the hospital",
    "wait till I find out where you live",
    "I will make you suffer for this",
    "your days are numbered",
    "keep it up and you'll wake up in a ditch",
    "I'm going to slit your throat",
    "I will beat the crap out of you",
    "I'm going to come over there and punch you",
    "you're going to get hurt if you keep this up",
    "I'll knock your teeth out",
    "I'm going to find you",
    "next time I see you, you're dead",
    "we will kill you and your family",
    "I'll shoot you in the face",
    "don't make me hurt you",
    "I'm about to break your neck",
]

THREAT_HELDOUT = [
    "I'm going to bash your head in",
    "touch my stuff again and I'll kill you",
    "I will hurt you and everyone you love",
    "you're going to pay for what you said",
    "I'll be waiting for you outside",
    "I swear I'm going to strangle you",
    "I'll rip your throat out",
    "we're going to make your life hell",
    "I'm going to break every bone in your body",
    "you won't live to see tomorrow",
]

# ---------------------------------------------------------------- abusive: wishes of harm

HARM_WISH_DEV = [
    "I hope you die",
    "I hope you get hit by a bus",
    "go kill yourself",
    "kys",
    "I wish you were dead",
    "drop dead",
    "rot in hell",
    "you deserve to suffer",
    "the world would be better without you",
    "nobody would miss you if you died",
    "go jump off a bridge",
    "I hope your whole family gets cancer",
    "may you burn in hell",
    "I hope you choke on it",
    "just die already",
    "you should be dead",
    "I hope you get cancer and die slowly",
    "just go die in a fire",
    "the world would be a better place if you weren't in it",
    "I pray that your car crashes",
    "hope you choke on your food",
    "nobody would care if you disappeared forever",
    "kill urself",
    "I hope something terrible happens to you",
    "you should just end it all",
    "may you suffer every single day",
    "I hope you get run over",
    "go hang yourself",
    "you should drink bleach",
    "I hope you suffer",
    "die in a hole",
    "I hope your dog dies",
    "nobody would even notice if you died",
    "please just disappear forever",
    "hope you get what's coming to you",
    "I wish you had never been born",
]

HARM_WISH_HELDOUT = [
    "I hope you die alone",
    "why don't you just kill yourself",
    "I hope you catch covid and die",
    "go play in traffic",
    "I hope your house burns down with you in it",
    "you deserve to get hit by a truck",
    "I'd laugh if you died",
    "may your family suffer",
    "I hope you never wake up",
    "just go drown yourself",
]

# ---------------------------------------------------------------- frames

OPENERS = ["", "Honestly, ", "haha ", "Look, ", "ok so ", "Well "]
CLOSERS = ["", ".", "!", " lol", " :)", "..."]
FRAMES_PER_CORE = 3


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeio" else "a ") + word


def _fill(templates: list[str], **slots: list[str]) -> list[str]:
    """Each template with fillers taken in turn from each slot list, so every filler appears somewhere."""
    pools = {name: cycle(values) for name, values in slots.items()}
    rounds = max(len(values) for values in slots.values()) // len(templates) + 1
    out = []
    for _ in range(rounds):
        for template in templates:
            out.append(template.format(**{name: next(pool) for name, pool in pools.items()}))
    return list(dict.fromkeys(out))


def _framed(cores: list[str], category: str, split: str) -> list[Example]:
    """``FRAMES_PER_CORE`` versions of each core phrase: openers and closers in rotation, every third lower-cased."""
    abusive = category in ABUSIVE_CATEGORIES
    out = []
    frame = 0
    for core in cores:
        for _ in range(FRAMES_PER_CORE):
            opener, closer = OPENERS[frame % len(OPENERS)], CLOSERS[(frame // 2) % len(CLOSERS)]
            text = opener + (core[0].lower() + core[1:] if opener else core) + closer
            out.append(Example(text.lower() if frame % 3 == 2 else text, category, abusive, split))
            frame += 1
    return list({example.text: example for example in out}.values())


def template_set() -> list[Example]:
    """Every example of every category and split, in a fixed order (no randomness)."""
    identity_dev = [
        f"{who} is {group} and {clause}"
        for (who, group), clause in zip(IDENTITY_DEV_PEOPLE, cycle(IDENTITY_DEV_CLAUSES))
    ] + IDENTITY_DEV_SENTENCES
    insults_dev = (
        _fill(
            INSULT_DEV_TEMPLATES,
            noun=INSULT_NOUNS,
            a_noun=[_with_article(noun) for noun in INSULT_NOUNS],
            adj=INSULT_ADJECTIVES,
            a_adj=[_with_article(adj) for adj in INSULT_ADJECTIVES],
        )
        + INSULT_DEV_SENTENCES
    )
    parts = [
        ("benign_lexical_traps", LEXICAL_TRAPS_DEV, LEXICAL_TRAPS_HELDOUT),
        ("benign_identity", identity_dev, IDENTITY_HELDOUT),
        ("abusive_insult", insults_dev, INSULT_HELDOUT),
        ("abusive_slur", _fill(SLUR_DEV_TEMPLATES, slur=SLURS) + SLUR_DEV_SENTENCES, SLUR_HELDOUT),
        ("abusive_threat", THREAT_DEV, THREAT_HELDOUT),
        ("abusive_harm_wish", HARM_WISH_DEV, HARM_WISH_HELDOUT),
    ]
    examples = []
    for category, dev, heldout in parts:
        examples += _framed(dev, category, "dev") + _framed(heldout, category, "heldout")
    return examples


# ---------------------------------------------------------------- the chitchat corpus


def chitchat_conversations(curate=None) -> list[dict]:
    """The chitchat corpus's conversations as `chatforge curate` sees them at its toxicity step: parsed, normalized,
    filtered, PII-scrubbed and exactly deduplicated with ``curate``'s settings (default: pipelines/quickstart.yaml's,
    i.e. at least two turns). Near-duplicate removal is left out: it removes none of these. Kept records only."""
    from chatforge.config import CurateSpec, FiltersSpec
    from chatforge.data.dedup import exact_key
    from chatforge.data.filters import filter_records
    from chatforge.data.formats import parse_raw_records
    from chatforge.data.normalize import normalize_records
    from chatforge.data.pii import scrub_records
    from chatforge.data.schema import is_kept
    from chatforge.data.sources import chitchat_corpus_path

    curate = curate or CurateSpec(filters=FiltersSpec(min_turns=2, max_message_chars=4000))
    with open(chitchat_corpus_path(), encoding="utf-8") as handle:
        corpus = json.load(handle)
    # Each raw row is one member of the corpus's top-level object, as the chitchat reader hands it over.
    rows = [
        {
            "raw": json.dumps({key: value})[1:-1],
            "error": None,
            "format": "chitchat",
            "source": "chitchat",
            "origin": key,
        }
        for key, value in corpus.items()
    ]
    records = parse_raw_records(rows, curate.normalize.role_map, raw_keep_bytes=1024)
    records = normalize_records(records, curate.normalize)
    records = filter_records(records, curate.filters)
    records = scrub_records(records, curate.pii)
    seen: set[str] = set()
    kept = []
    for record in sorted((r for r in records if is_kept(r)), key=lambda r: r["id"]):
        key = exact_key(record["messages"])
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept
