"""The semantic cache's evaluation set: labelled prompt pairs, and hit rates per threshold.

The brief (``ai-gateway.md`` §3, §5) asks for a paraphrase + negation set built in code, with
nothing downloaded: :func:`paraphrase_pairs` builds it from the §3 pairs, templates and
hand-written pairs, and ``data/paraphrases.jsonl`` holds the same pairs, one JSON object a
line, for readers and the benchmark (``python -m datahall.gateway.cachedata`` rewrites it).

Each pair is a prompt already in the cache (`cached`) and a new prompt (`query`); `should_hit`
says whether the cached answer is a correct answer to the query. Kinds:

- ``paraphrase`` (should hit): the same question in other words;
- ``antonym`` and ``negation`` (must not hit): the opposite intent ("turn on" / "turn off",
  "with" / "without"), the false hits users report (brief §4);
- ``number`` (must not hit): the same prompt with other numbers;
- ``entity`` (must not hit): the same prompt about another named thing;
- ``direction`` (must not hit): the same words in another order (Celsius to Fahrenheit and
  back), which no word-level guard can see;
- ``related`` (must not hit): another question on the same topic;
- ``unrelated`` (must not hit): prompts from different topics.

:func:`evaluate_threshold` gives, per threshold, the true-hit rate (share of ``should_hit``
pairs answered from the cache) and the false-hit rate (share of the others answered from it),
with or without the polarity guard. The issue's goal is a false-hit rate of at most 2% at a
true-hit rate of at least 60%.

>>> pairs = paraphrase_pairs()
>>> sum(p.should_hit for p in pairs) > 150 and sum(not p.should_hit for p in pairs) > 200
True
>>> rows = evaluate_threshold(pairs[:2], [0.5], similarities=np.array([0.9, 0.95]))
>>> (rows[0].true_hit_rate, rows[0].false_hit_rate)
(1.0, 0.0)
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .semcache import polarity_guard

__all__ = [
    "DATA_PATH",
    "Pair",
    "ThresholdRow",
    "evaluate_threshold",
    "load_pairs",
    "pair_similarities",
    "paraphrase_pairs",
    "write_pairs",
]

DATA_PATH = Path(__file__).parent / "data" / "paraphrases.jsonl"


@dataclass(frozen=True)
class Pair:
    """A cached prompt, a new prompt, and whether the cached answer answers the new one."""

    cached: str
    query: str
    should_hit: bool
    kind: str
    source: str = "template"


# --- the pairs --------------------------------------------------------------------------------

# the brief's §3 table
_BRIEF = (
    ("How do I reset my password?", "password reset - how?", True, "paraphrase"),
    ("How to turn on dark mode?", "How to turn off dark mode?", False, "antonym"),
    ("What is the capital of France?", "Explain the theory of relativity", False, "unrelated"),
    # the published reference pair (0.755): related statements, not the same request
    ("A man is eating food.", "A man is eating a piece of bread.", False, "related"),
)

# tasks as (verb phrase, noun phrase), asked in several ways
_TASKS = (
    ("reset my password", "password reset"),
    ("change my email address", "changing the email address on my account"),
    ("delete my account", "account deletion"),
    ("cancel my subscription", "cancelling a subscription"),
    ("update the app", "app updates"),
    ("clear the browser cache", "clearing the browser cache"),
    ("connect a wireless printer", "wireless printer setup"),
    ("set up two-factor authentication", "two-factor authentication setup"),
    ("recover a deleted file", "recovering deleted files"),
    ("merge two PDF files", "merging two PDF files"),
    ("take a screenshot on Windows", "taking screenshots on Windows"),
    ("create a virtual environment in Python", "Python virtual environment creation"),
    ("undo the last git commit", "undoing the last git commit"),
    ("install Docker on Ubuntu", "Docker installation on Ubuntu"),
    ("reverse a list in Python", "reversing a Python list"),
    ("sort a dictionary by value in Python", "sorting a Python dictionary by value"),
    ("read a CSV file with pandas", "loading a CSV file into pandas"),
    ("boil an egg", "boiling eggs"),
    ("make cold brew coffee", "cold brew coffee preparation"),
    ("remove a red wine stain from a carpet", "red wine stain removal from carpet"),
    ("tie a tie", "tying a necktie"),
    ("improve my sleep", "sleeping better"),
    ("learn Spanish quickly", "learning Spanish fast"),
    ("write a cover letter", "writing a cover letter"),
    ("change a flat tire", "changing a flat tire"),
    ("back up my iPhone", "iPhone backups"),
    ("free up disk space on a Mac", "freeing disk space on a Mac"),
    ("speed up a slow laptop", "making a slow laptop faster"),
    ("get rid of fruit flies", "getting rid of fruit flies"),
    ("start a vegetable garden", "starting a vegetable garden"),
    ("prepare for a job interview", "job interview preparation"),
    ("calculate compound interest", "compound interest calculation"),
    ("convert a Word document to PDF", "converting Word documents to PDF"),
    ("fix a leaking faucet", "repairing a leaking faucet"),
    ("train for a marathon", "marathon training"),
    ("clean a cast iron pan", "cleaning a cast iron pan"),
    ("rename a branch in git", "renaming a git branch"),
)
_VERB_FORMS = (
    "How do I {}?",
    "How can I {}?",
    "What is the best way to {}?",
    "Can you explain how to {}?",
    "What are the steps to {}?",
    "I need help: how to {}",
)
_NOUN_FORMS = ("{} - how?", "Guide to {}", "Any tips for {}?", "{}: step by step instructions")

_KNOWLEDGE = (
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("Who wrote Pride and Prejudice?", "Who is the author of Pride and Prejudice?"),
    ("Why is the sky blue?", "What makes the sky look blue?"),
    ("How far is the Moon from the Earth?", "What is the distance between the Earth and the Moon?"),
    ("What causes earthquakes?", "Why do earthquakes happen?"),
    ("How does photosynthesis work?", "Explain how photosynthesis works."),
    ("What is machine learning?", "Can you explain what machine learning is?"),
    ("What is the boiling point of water?", "At what temperature does water boil?"),
    ("How many legs does a spider have?", "How many legs do spiders have?"),
    ("What does DNA stand for?", "What is DNA short for?"),
    ("Who painted the Mona Lisa?", "Which artist painted the Mona Lisa?"),
    ("What is the largest planet in the solar system?", "Which planet is the biggest in our solar system?"),
    ("How do vaccines work?", "How does a vaccine protect you from disease?"),
    ("What is inflation?", "Explain inflation in simple terms."),
    ("What is the difference between a virus and a bacterium?", "How do viruses differ from bacteria?"),
    ("What is the speed of light?", "How fast does light travel?"),
    ("How do you say thank you in French?", "Translate thank you into French."),
    ("What is a black hole?", "Can you explain what a black hole is?"),
    ("Summarize the plot of Hamlet.", "Give me a summary of the plot of Hamlet."),
    ("What are the symptoms of the flu?", "What symptoms does the flu cause?"),
    ("How do I make pancakes?", "What is a good recipe for pancakes?"),
    ("Recommend a good book about history.", "Can you suggest a good history book?"),
    ("What is the meaning of life?", "What's the meaning of life?"),
    ("Explain recursion.", "What is recursion in programming?"),
    ("What is an API?", "What does API mean?"),
    ("How does a refrigerator work?", "How does a fridge keep food cold?"),
    ("Why do cats purr?", "What makes cats purr?"),
    ("What is the tallest mountain in the world?", "Which is the highest mountain in the world?"),
    ("How do I center a div in CSS?", "CSS: how to center a div?"),
    ("What is the population of Japan?", "How many people live in Japan?"),
    ("What language is spoken in Brazil?", "Which language do people speak in Brazil?"),
    ("What is the chemical symbol for gold?", "Which chemical symbol stands for gold?"),
    ("Who discovered penicillin?", "Who was the discoverer of penicillin?"),
    ("How do airplanes stay in the air?", "What keeps an airplane in the air?"),
    ("What is the greenhouse effect?", "Explain the greenhouse effect."),
    ("What's the difference between weather and climate?", "How is climate different from weather?"),
    ("Give me a recipe for banana bread.", "How do I bake banana bread?"),
    ("What is a prime number?", "Define prime number."),
    ("How do I stay motivated while studying?", "Tips for staying motivated when studying"),
    ("What is the purpose of a VPN?", "Why would I use a VPN?"),
    ("What are the health benefits of green tea?", "Is green tea good for your health?"),
    ("How do I write a for loop in Python?", "Python for loop syntax"),
)  # fmt: skip

# (side A, side B, object): "How do I A object?" vs "How do I B object?"
_ANTONYMS = (
    ("turn on", "turn off", "dark mode"),
    ("turn on", "turn off", "notifications on my iPhone"),
    ("enable", "disable", "two-factor authentication"),
    ("enable", "disable", "JavaScript in Chrome"),
    ("enable", "disable", "auto-save in Word"),
    ("add", "remove", "a user to a group in Linux"),
    ("add", "remove", "a printer in Windows"),
    ("show", "hide", "hidden files on a Mac"),
    ("lock", "unlock", "my phone screen"),
    ("install", "uninstall", "Python packages with pip"),
    ("increase", "decrease", "the font size in VS Code"),
    ("upload", "download", "files on Google Drive"),
    ("encrypt", "decrypt", "a file with GPG"),
    ("mute", "unmute", "myself in a Zoom call"),
    ("subscribe to", "unsubscribe from", "a YouTube channel"),
    ("log in to", "log out of", "Netflix on a TV"),
    ("zoom in", "zoom out", "on Google Maps"),
    ("start", "stop", "a Docker container"),
    ("open", "close", "a port in the firewall"),
    ("connect to", "disconnect from", "a VPN on Windows"),
    ("import", "export", "contacts in Gmail"),
    ("compress", "decompress", "a folder on Linux"),
    ("follow", "unfollow", "someone on Instagram"),
    ("allow", "block", "pop-ups in Safari"),
    ("mount", "unmount", "a USB drive in Linux"),
    ("expand", "collapse", "all sections in a Word document"),
    ("speed up", "slow down", "a video in VLC"),
    ("maximize", "minimize", "a window with the keyboard"),
    ("push", "pull", "changes in git"),
    ("sign in to", "sign out of", "Microsoft Teams"),
    ("activate", "deactivate", "my Facebook account"),
    ("archive", "unarchive", "emails in Gmail"),
    ("pin", "unpin", "a message in Slack"),
    ("freeze", "unfreeze", "the top row in Excel"),
    ("hide", "unhide", "columns in Excel"),
)
_ANTONYM_FORMS = (("How do I {}?", "How do I {}?"), ("How can I {}?", "How to {}?"))

_NEGATIONS = (
    ("Which foods are good for dogs?", "Which foods are not good for dogs?"),
    ("What should I eat before a run?", "What should I not eat before a run?"),
    ("Things to do in Paris", "Things not to do in Paris"),
    ("Can I use my phone on a plane?", "Why can't I use my phone on a plane?"),
    ("Is it safe to drink tap water in Mexico?", "Why is tap water in Mexico unsafe to drink?"),
    ("Does Java support multiple inheritance?", "Why doesn't Java support multiple inheritance?"),
    ("When should I water succulents?", "When should I not water succulents?"),
    ("Recipes with eggs", "Recipes without eggs"),
    ("What are foods with gluten?", "What are foods without gluten?"),
    ("Is the museum open on Mondays?", "Is the museum closed on Mondays?"),
    ("Which countries have won a World Cup?", "Which countries have never won a World Cup?"),
    ("Countries that drive on the left", "Countries that drive on the right"),
    ("Animals that can fly", "Animals that cannot fly"),
    ("Planets with rings", "Planets without rings"),
    ("Why do I feel hungry after eating?", "Why do I never feel hungry after eating?"),
    ("Is it legal to record a phone call?", "Is it illegal to record a phone call?"),
    ("What are the advantages of remote work?", "What are the disadvantages of remote work?"),
    ("Pros of electric cars", "Cons of electric cars"),
    ("What are the benefits of intermittent fasting?", "What are the risks of intermittent fasting?"),
    ("Is coffee good for you?", "Is coffee bad for you?"),
    ("How to gain weight fast", "How to lose weight fast"),
    ("How do I make my code run faster?", "Why does my code run slower?"),
    ("Sort a list in ascending order in Python", "Sort a list in descending order in Python"),
    ("Is this statement true: the Earth is flat?", "Is this statement false: the Earth is flat?"),
    ("Which vitamins should I take together?", "Which vitamins should I never take together?"),
    ("Why is my website up?", "Why is my website down?"),
    ("How do I accept a meeting invite in Outlook?", "How do I decline a meeting invite in Outlook?"),
    ("Should I buy Bitcoin?", "Should I sell Bitcoin?"),
    ("Signs that a watermelon is ripe", "Signs that a watermelon is not ripe"),
    ("What happens if I take ibuprofen with food?", "What happens if I take ibuprofen without food?"),
)  # fmt: skip

_DIRECTIONS = (
    ("Convert Celsius to Fahrenheit", "Convert Fahrenheit to Celsius"),
    ("How do I convert uppercase to lowercase in Excel?", "How do I convert lowercase to uppercase in Excel?"),
    ("Flights from London to Paris", "Flights from Paris to London"),
    ("Translate this sentence from English to German", "Translate this sentence from German to English"),
)  # fmt: skip

_NUMBERS = (
    ("What is 15% of 80?", "What is 15% of 90?"),
    ("Convert 5 miles to kilometers", "Convert 50 miles to kilometers"),
    ("What happened in 1969?", "What happened in 1970?"),
    ("Give me 3 tips for better sleep", "Give me 10 tips for better sleep"),
    ("Plan a 2-day trip to Rome", "Plan a 5-day trip to Rome"),
    ("Is 97 a prime number?", "Is 91 a prime number?"),
    ("How many ounces are in 2 cups?", "How many ounces are in 3 cups?"),
    ("What is the square root of 144?", "What is the square root of 169?"),
    ("Write a 500-word essay on climate change", "Write a 1000-word essay on climate change"),
    ("What is 12 times 12?", "What is 12 times 13?"),
    ("Convert 20 degrees Celsius to Fahrenheit", "Convert 25 degrees Celsius to Fahrenheit"),
    ("What was the population of Japan in 1990?", "What was the population of Japan in 2000?"),
    ("Name three famous painters", "Name five famous painters"),
    ("List the top 5 programming languages", "List the top 10 programming languages"),
    ("A pancake recipe for 4 people", "A pancake recipe for 8 people"),
    ("How much is 100 dollars in euros?", "How much is 250 dollars in euros?"),
    ("What is a 15% tip on a $60 bill?", "What is a 20% tip on a $60 bill?"),
    ("How many calories are in 2 eggs?", "How many calories are in 3 eggs?"),
    ("What does HTTP error 404 mean?", "What does HTTP error 500 mean?"),
    ("What's new in Python 3.11?", "What's new in Python 3.12?"),
    ("Is 7 an even number?", "Is 8 an even number?"),
    ("How long should I boil an egg for 6 minutes or more?", "How long should I boil an egg for 9 minutes or more?"),
    ("Explain the 2008 financial crisis", "Explain the 1929 financial crisis"),
    ("What is 2 to the power of 10?", "What is 2 to the power of 16?"),
    ("Who won the World Cup in 2014?", "Who won the World Cup in 2018?"),
    ("Write a haiku with 3 lines about rain", "Write a poem with 4 lines about rain"),
    ("Summarize this article in 50 words", "Summarize this article in 100 words"),
    ("What is 3/4 as a decimal?", "What is 3/8 as a decimal?"),
    ("How many days are in 6 weeks?", "How many days are in 7 weeks?"),
    ("Explain RAID 0", "Explain RAID 5"),
    ("What is the speed limit on a highway, 65 or 70 mph?", "What is the speed limit on a highway, 55 or 60 mph?"),
    ("Give me two reasons to learn Rust", "Give me four reasons to learn Rust"),
    ("How far can I run in 30 minutes?", "How far can I run in 60 minutes?"),
    ("Is a 700 credit score good?", "Is a 600 credit score good?"),
    ("How much water should I drink per day at 60 kg?", "How much water should I drink per day at 90 kg?"),
    ("Explain IPv4", "Explain IPv6"),
    ("What is the 4th amendment?", "What is the 5th amendment?"),
    ("Set the thermostat to 68 degrees?", "Set the thermostat to 72 degrees?"),
    ("How do I get a 1.5 GPA up?", "How do I get a 3.5 GPA up?"),
    ("Which is bigger, 0.7 or 0.65?", "Which is bigger, 0.8 or 0.65?"),
)  # fmt: skip

_ENTITIES = (
    ("What is the capital of France?", "What is the capital of Germany?"),
    ("How do I reverse a list in Python?", "How do I reverse a list in JavaScript?"),
    ("Who is the CEO of Microsoft?", "Who is the CEO of Apple?"),
    ("How do I install Docker on Ubuntu?", "How do I install Docker on Windows?"),
    ("What is the population of Canada?", "What is the population of Australia?"),
    ("When is the best time to visit Japan?", "When is the best time to visit Thailand?"),
    ("Who wrote Hamlet?", "Who wrote Macbeth?"),
    ("What is the currency of Switzerland?", "What is the currency of Sweden?"),
    ("How tall is the Eiffel Tower?", "How tall is the Empire State Building?"),
    ("Translate good morning into Spanish", "Translate good morning into Italian"),
    ("Summarize the history of the Roman Empire", "Summarize the history of the Ottoman Empire"),
    ("How do I set up a Raspberry Pi?", "How do I set up an Arduino?"),
    ("What is the weather like in London in spring?", "What is the weather like in Berlin in spring?"),
    ("Who founded Amazon?", "Who founded Tesla?"),
    ("How do I make a HTTP request in Go?", "How do I make a HTTP request in Rust?"),
    ("Explain the plot of Star Wars", "Explain the plot of Star Trek"),
    ("What is the tallest building in Dubai?", "What is the tallest building in Shanghai?"),
    ("How do I cook salmon in the oven?", "How do I cook chicken in the oven?"),
    ("What is the life expectancy of a Labrador?", "What is the life expectancy of a Beagle?"),
    ("How do I connect to PostgreSQL from Node?", "How do I connect to MySQL from Node?"),
    ("What are the main exports of Chile?", "What are the main exports of Peru?"),
    ("How do I use useEffect in React?", "How do I use watch in Vue?"),
    ("Who directed Inception?", "Who directed Interstellar?"),
    ("What is the national dish of Italy?", "What is the national dish of Mexico?"),
    ("how to reverse a string in java", "how to reverse a string in rust"),
    ("what is the capital of peru", "what is the capital of chile"),
    ("how to cook rice", "how to cook quinoa"),
    ("who wrote the odyssey", "who wrote the iliad"),
)  # fmt: skip

_RELATED = (
    ("How do I reset my password?", "How do I change my username?"),
    ("How do I delete my account?", "How do I download a copy of my data?"),
    ("What is the capital of France?", "What is the population of France?"),
    ("How do I boil an egg?", "How do I poach an egg?"),
    ("How to make cold brew coffee", "How to make espresso at home"),
    ("How do I create a git branch?", "How do I squash git commits?"),
    ("Who wrote Pride and Prejudice?", "When was Pride and Prejudice published?"),
    ("What are the symptoms of the flu?", "How long does the flu last?"),
    ("How do I read a CSV file with pandas?", "How do I write a DataFrame to Excel?"),
    ("What is machine learning?", "What is deep learning?"),
    ("What is a virus?", "What is a bacterium?"),
    ("How does a refrigerator work?", "How does a microwave oven work?"),
    ("How do I train for a marathon?", "What should I eat after a marathon?"),
    ("How do I change a flat tire?", "How often should I rotate my tires?"),
    ("What is inflation?", "What is a recession?"),
    ("How do I write a cover letter?", "How do I write a resignation letter?"),
    ("How do I take a screenshot on Windows?", "How do I record my screen on Windows?"),
    ("How do I install Docker on Ubuntu?", "How do I update Ubuntu?"),
    ("What is the speed of light?", "What is the speed of sound?"),
    ("How do vaccines work?", "Are vaccines required for school?"),
    ("How do I learn Spanish quickly?", "Is Spanish harder to learn than French?"),
    ("How do I clean a cast iron pan?", "How do I season a cast iron pan?"),
    ("Why is the sky blue?", "Why are sunsets red?"),
    ("What does DNA stand for?", "How is DNA copied in a cell?"),
    ("How do I cancel my subscription?", "How do I change my subscription plan?"),
    ("How do I improve my sleep?", "How much sleep do I need?"),
    ("What is a black hole?", "How are stars formed?"),
    ("How do I center a div in CSS?", "How do I make a div scroll in CSS?"),
)  # fmt: skip


def paraphrase_pairs() -> list[Pair]:
    """The evaluation set, built deterministically from the brief's §3 pairs, templates and
    hand-written pairs (see the module docstring for the kinds)."""
    pairs = [Pair(a, b, hit, kind, "brief §3") for a, b, hit, kind in _BRIEF]
    nv, nn = len(_VERB_FORMS), len(_NOUN_FORMS)
    for i, (verb, noun) in enumerate(_TASKS):
        # four ways of asking each task: verb form vs verb form, and verb form vs noun form,
        # rotating through the forms so that every form appears
        forms = [
            (_VERB_FORMS[i % nv].format(verb), _VERB_FORMS[(i + 1) % nv].format(verb)),
            (_VERB_FORMS[(i + 2) % nv].format(verb), _VERB_FORMS[(i + 4) % nv].format(verb)),
            (_VERB_FORMS[(i + 3) % nv].format(verb), _NOUN_FORMS[i % nn].format(noun)),
            (_NOUN_FORMS[(i + 1) % nn].format(noun), _VERB_FORMS[(i + 5) % nv].format(verb)),
        ]
        pairs += [
            Pair(a[0].upper() + a[1:], b[0].upper() + b[1:], True, "paraphrase") for a, b in forms
        ]
    pairs += [Pair(a, b, True, "paraphrase", "hand-written") for a, b in _KNOWLEDGE]
    for on, off, obj in _ANTONYMS:
        for fa, fb in _ANTONYM_FORMS:
            pairs.append(
                Pair(fa.format(f"{on} {obj}"), fb.format(f"{off} {obj}"), False, "antonym")
            )
    pairs += [Pair(a, b, False, "negation", "hand-written") for a, b in _NEGATIONS]
    pairs += [Pair(a, b, False, "direction", "hand-written") for a, b in _DIRECTIONS]
    pairs += [Pair(a, b, False, "number", "hand-written") for a, b in _NUMBERS]
    pairs += [Pair(a, b, False, "entity", "hand-written") for a, b in _ENTITIES]
    pairs += [Pair(a, b, False, "related", "hand-written") for a, b in _RELATED]
    # unrelated: knowledge questions against task questions, paired by a seeded shuffle
    rng = random.Random(6)
    tasks = [_VERB_FORMS[i % nv].format(v) for i, (v, _) in enumerate(_TASKS)]
    knowledge = [a for a, _ in _KNOWLEDGE]
    rng.shuffle(tasks)
    rng.shuffle(knowledge)
    pairs += [Pair(k, t, False, "unrelated") for k, t in zip(knowledge, tasks, strict=False)]
    pairs += [
        Pair(knowledge[i], knowledge[(i + 7) % len(knowledge)], False, "unrelated")
        for i in range(0, len(knowledge), 2)
    ]
    return pairs


def write_pairs(path: str | Path = DATA_PATH, pairs: Iterable[Pair] | None = None) -> Path:
    """Write `pairs` (default: :func:`paraphrase_pairs`) as JSON lines to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(asdict(p), ensure_ascii=False) for p in (pairs or paraphrase_pairs())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_pairs(path: str | Path | None = None) -> list[Pair]:
    """The pairs in the JSON-lines file `path`; by default ``data/paraphrases.jsonl`` next to
    this module, or :func:`paraphrase_pairs` when that file was not installed."""
    if path is None and not DATA_PATH.exists():
        return paraphrase_pairs()
    path = Path(path or DATA_PATH)
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            pairs.append(Pair(**raw))
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{path}:{n}: not a pair ({e}); expected keys cached, query, "
                "should_hit, kind, source"
            ) from None
    return pairs


# --- evaluation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdRow:
    """Hit rates of the evaluation set at one `min_cosine_similarity`."""

    threshold: float
    guard: bool
    true_hit_rate: float  # share of should-hit pairs answered from the cache
    false_hit_rate: float  # share of must-not-hit pairs answered from the cache
    true_hits: int
    should_hit: int
    false_hits: int
    must_not_hit: int
    false_hits_by_kind: dict[str, int] = field(default_factory=dict)


def pair_similarities(
    pairs: Sequence[Pair], embed: Callable[[Sequence[str]], np.ndarray] | None = None
) -> np.ndarray:
    """The cosine similarity of each pair, embedding every distinct text once (by default
    with all-MiniLM-L6-v2, :class:`.embed.Embedder`)."""
    if embed is None:
        from .embed import Embedder

        embed = Embedder.load().embed
    texts = sorted({t for p in pairs for t in (p.cached, p.query)})
    if not texts:
        return np.zeros(0, np.float32)
    vectors = np.asarray(embed(texts), np.float32)
    row = {t: i for i, t in enumerate(texts)}
    a = vectors[[row[p.cached] for p in pairs]]
    b = vectors[[row[p.query] for p in pairs]]
    return (a * b).sum(1)


def evaluate_threshold(
    pairs: Sequence[Pair],
    thresholds: Iterable[float],
    *,
    guard: bool = True,
    similarities: np.ndarray | None = None,
    embed: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> list[ThresholdRow]:
    """True-hit and false-hit rates of the semantic tier on `pairs`, one row per threshold.

    A pair counts as a hit when its cosine similarity reaches the threshold and, with
    `guard`, :func:`.semcache.polarity_guard` accepts it: the decision
    :class:`.semcache.SemanticCache` takes for a partition holding only the cached prompt.
    Pass `similarities` (from :func:`pair_similarities`) to evaluate several settings without
    embedding again."""
    sims = pair_similarities(pairs, embed) if similarities is None else np.asarray(similarities)
    if len(sims) != len(pairs):
        raise ValueError(f"{len(sims)} similarities for {len(pairs)} pairs")
    allowed = np.array([not guard or polarity_guard(p.query, p.cached) is None for p in pairs])
    should = np.array([p.should_hit for p in pairs], bool)
    kinds = [p.kind for p in pairs]
    rows = []
    for t in thresholds:
        hit = (sims >= t) & allowed
        true_hits, false_hits = int((hit & should).sum()), int((hit & ~should).sum())
        by_kind: dict[str, int] = {}
        for i in np.flatnonzero(hit & ~should):
            by_kind[kinds[i]] = by_kind.get(kinds[i], 0) + 1
        rows.append(
            ThresholdRow(
                threshold=float(t),
                guard=guard,
                true_hit_rate=true_hits / max(1, int(should.sum())),
                false_hit_rate=false_hits / max(1, int((~should).sum())),
                true_hits=true_hits,
                should_hit=int(should.sum()),
                false_hits=false_hits,
                must_not_hit=int((~should).sum()),
                false_hits_by_kind=dict(sorted(by_kind.items())),
            )
        )
    return rows


if __name__ == "__main__":
    print(f"wrote {len(paraphrase_pairs())} pairs to {write_pairs()}")
