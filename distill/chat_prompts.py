"""Prompt sets for distilling a small chat model and for judging it on prompts it never trained on.

The teacher (SmolLM2-135M-Instruct) is weak, so the training prompts stay short and ordinary: factual
questions, explanations, how-to requests, small writing tasks, lists and advice. `train_conversations`
builds them from templates crossed with entity lists, deterministically, as a prefix of one endless
sequence per seed.

The evaluation sets are held out and never enter training:

* `FACT_EVAL`: short factual questions with accepted answers (case-insensitive substring match). For every
  question, its entity is removed from the training pool of the same template, so training never asks it.
* `OPEN_EVAL`: open chat prompts whose wording no training template can produce.
* `PROSE_EVAL`: paragraphs of general English prose, for perplexity on text that is not chat.

`eval_leaks` checks a set of conversations for any FACT_EVAL / OPEN_EVAL prompt used verbatim as a user turn.
All text here is original; the module uses the standard library only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import NamedTuple

CATEGORIES = ("factual", "explanation", "howto", "writing", "other")
CATEGORY_WEIGHTS = (30, 20, 15, 20, 15)
FOLLOW_UP_RATE = 0.15


class _Template(NamedTuple):
    category: str
    variants: tuple[str, ...]  # variants[0] is the one held-out questions are phrased with
    entities: tuple[str, ...]


# --- factual ------------------------------------------------------------------------------------------

_COUNTRIES_CAPITAL = (
    "Canada",
    "Australia",
    "Brazil",
    "Mexico",
    "Argentina",
    "Peru",
    "Chile",
    "Colombia",
    "Venezuela",
    "Cuba",
    "Portugal",
    "Greece",
    "Norway",
    "Sweden",
    "Finland",
    "Denmark",
    "Iceland",
    "Ireland",
    "Poland",
    "Austria",
    "Hungary",
    "the Netherlands",
    "Belgium",
    "Switzerland",
    "Russia",
    "Ukraine",
    "Romania",
    "Croatia",
    "Turkey",
    "Egypt",
    "Kenya",
    "Nigeria",
    "Ghana",
    "Morocco",
    "Ethiopia",
    "India",
    "China",
    "South Korea",
    "Thailand",
    "Vietnam",
    "Indonesia",
    "the Philippines",
    "Malaysia",
    "Pakistan",
    "Bangladesh",
    "Nepal",
    "Iran",
    "Saudi Arabia",
    "New Zealand",
    "Scotland",
    "Jamaica",
    "the Czech Republic",
    "Wales",
    "Qatar",
)
_COUNTRIES_LANGUAGE = (
    "France",
    "Germany",
    "Italy",
    "Japan",
    "China",
    "Russia",
    "Portugal",
    "Argentina",
    "Greece",
    "Sweden",
    "Norway",
    "the Netherlands",
    "Poland",
    "Turkey",
    "Egypt",
    "South Korea",
    "Thailand",
    "Vietnam",
    "Iran",
    "Finland",
    "Hungary",
    "Austria",
    "Peru",
    "Chile",
    "Cuba",
    "Colombia",
    "Indonesia",
    "Denmark",
    "Spain",
    "Saudi Arabia",
    "Ukraine",
    "Romania",
)
_BOOKS = (
    "Pride and Prejudice",
    "Moby-Dick",
    "War and Peace",
    "Don Quixote",
    "The Odyssey",
    "Great Expectations",
    "Frankenstein",
    "Dracula",
    "Nineteen Eighty-Four",
    "Animal Farm",
    "The Hobbit",
    "The Lord of the Rings",
    "Little Women",
    "Jane Eyre",
    "Wuthering Heights",
    "The Great Gatsby",
    "To Kill a Mockingbird",
    "The Adventures of Tom Sawyer",
    "Alice's Adventures in Wonderland",
    "Treasure Island",
    "Hamlet",
    "Les Miserables",
    "Crime and Punishment",
    "Macbeth",
    "A Christmas Carol",
    "Oliver Twist",
    "The Jungle Book",
    "Charlotte's Web",
    "On the Origin of Species",
    "Robinson Crusoe",
    "Gulliver's Travels",
    "The Little Prince",
    "Anne of Green Gables",
    "Peter Pan",
    "The Wind in the Willows",
    "Sherlock Holmes",
)
_INVENTIONS = (
    "the printing press",
    "the airplane",
    "the steam engine",
    "the World Wide Web",
    "the radio",
    "dynamite",
    "the phonograph",
    "the telegraph",
    "the diesel engine",
    "the jet engine",
    "the television",
    "the cotton gin",
    "the sewing machine",
    "Morse code",
    "the lightning rod",
    "the microscope",
    "the thermometer",
    "the electric battery",
    "the bicycle",
    "the computer mouse",
    "the motor car",
    "the hot air balloon",
    "the typewriter",
    "the refrigerator",
    "the stethoscope",
    "the barometer",
)
_DISCOVERIES = (
    "radium",
    "the electron",
    "X-rays",
    "oxygen",
    "the structure of DNA",
    "the planet Uranus",
    "the planet Neptune",
    "the largest moons of Jupiter",
    "insulin",
    "the neutron",
    "the laws of heredity",
    "the circulation of blood",
    "electromagnetic induction",
    "the cell",
    "radioactivity",
    "Pluto",
)
_PAINTINGS = (
    "The Starry Night",
    "The Scream",
    "The Last Supper",
    "Guernica",
    "The Night Watch",
    "Girl with a Pearl Earring",
    "The Persistence of Memory",
    "The Birth of Venus",
    "the ceiling of the Sistine Chapel",
    "American Gothic",
    "The Kiss",
    "Water Lilies",
    "Sunflowers",
    "Las Meninas",
    "The Garden of Earthly Delights",
    "The Creation of Adam",
)
_SUPERLATIVES = (
    "largest desert in the world",
    "largest continent",
    "smallest continent",
    "longest river in the world",
    "largest country by area",
    "smallest country in the world",
    "largest mammal",
    "largest bird",
    "smallest bird",
    "largest organ of the human body",
    "longest bone in the human body",
    "smallest bone in the human body",
    "deepest lake in the world",
    "largest island in the world",
    "tallest animal",
    "fastest bird",
    "largest fish",
    "slowest mammal",
    "largest city in Australia",
    "longest river in Europe",
    "highest waterfall in the world",
    "largest rainforest in the world",
    "coldest continent",
    "most spoken language in the world",
    "hardest natural substance",
    "largest moon of Saturn",
    "largest lake in Africa",
    "biggest cat species",
)
_ANIMALS_LEGS = (
    "a cat",
    "a dog",
    "a horse",
    "a chicken",
    "a duck",
    "an ant",
    "a bee",
    "a beetle",
    "a crab",
    "an octopus",
    "a snake",
    "a cow",
    "a kangaroo",
    "a penguin",
    "a frog",
    "a lobster",
    "a scorpion",
    "a butterfly",
    "a goat",
    "a sheep",
    "an ostrich",
    "an elephant",
    "a lion",
    "a mouse",
    "a bear",
    "a monkey",
    "a flamingo",
    "a shrimp",
    "a tortoise",
    "a lizard",
    "a pig",
    "an owl",
    "a camel",
    "a giraffe",
    "a rabbit",
    "a parrot",
)
_COLOURED_THINGS = (
    "snow",
    "coal",
    "a ripe tomato",
    "a carrot",
    "milk",
    "a lemon",
    "a strawberry",
    "chocolate",
    "a flamingo",
    "a polar bear",
    "a crow",
    "a lime",
    "an emerald",
    "a ruby",
    "a sapphire",
    "a pumpkin",
    "an eggplant",
    "a fire engine",
    "the full Moon",
    "dry sand",
    "a zebra",
    "a giant panda",
    "a pine tree",
    "a rain cloud",
    "an orange",
    "a plum",
    "a cherry",
    "an avocado",
    "a tiger",
    "a swan",
    "charcoal",
    "a daffodil",
)
_COLOUR_MIXES = (
    "red and yellow",
    "red and blue",
    "black and white",
    "red and white",
    "blue and red",
    "yellow and red",
    "red and green",
    "blue and white",
    "yellow and white",
    "black and red",
    "green and white",
)
_PLANET_CLUES = (
    "is closest to the Sun",
    "is farthest from the Sun",
    "has the most famous rings",
    "do we live on",
    "is the hottest",
    "spins on its side",
    "is often called Earth's twin",
    "has the Great Red Spot",
    "is third from the Sun",
    "has the shortest year",
    "is named after the Roman god of the sea",
    "is the coldest",
)
_COUNTS = (
    "minutes are in an hour",
    "seconds are in a minute",
    "days are in a leap year",
    "weeks are in a year",
    "centimetres are in a metre",
    "grams are in a kilogram",
    "metres are in a kilometre",
    "millimetres are in a centimetre",
    "years are in a century",
    "years are in a decade",
    "years are in a millennium",
    "inches are in a foot",
    "feet are in a yard",
    "ounces are in a pound",
    "hours are in a week",
    "minutes are in a day",
    "days are in a year",
    "seconds are in an hour",
    "millilitres are in a litre",
    "sides does a triangle have",
    "sides does a hexagon have",
    "sides does an octagon have",
    "sides does a square have",
    "players are on a soccer team",
    "planets are in our solar system",
    "colours are in a rainbow",
    "strings does a standard guitar have",
    "keys does a standard piano have",
    "bones are in the adult human body",
    "hearts does an octopus have",
    "wheels does a tricycle have",
    "letters are in the English alphabet",
    "zeros are in one million",
    "cards are in a standard deck",
    "days are in June",
)
_MELTING = (
    "water freeze",
    "ice melt",
    "gold melt",
    "iron melt",
    "butter melt",
    "chocolate melt",
    "lead melt",
)
_COMPOUNDS = (
    "table salt",
    "carbon dioxide",
    "methane",
    "ammonia",
    "ozone",
    "oxygen gas",
    "hydrogen peroxide",
)
_ELEMENTS = (
    "gold",
    "silver",
    "iron",
    "sodium",
    "potassium",
    "carbon",
    "helium",
    "hydrogen",
    "oxygen",
    "nitrogen",
    "copper",
    "lead",
    "calcium",
    "neon",
    "tin",
    "mercury",
    "uranium",
    "zinc",
    "chlorine",
    "sulfur",
)
_SOUNDS = ("woof", "quack", "oink", "baa", "neigh", "meow", "hoot", "ribbit", "cock-a-doodle-doo", "roar")
_MAKERS = ("spiders", "silkworms", "beavers", "birds", "bakers", "potters", "cows", "plants")
_GAS_CLUES = (
    "do humans need to breathe",
    "makes party balloons float",
    "do we breathe out",
    "makes up most of the air",
    "glows in bright advertising signs",
    "do car engines give off",
)
_CURRENCY_COUNTRIES = (
    "Japan",
    "the United Kingdom",
    "India",
    "China",
    "Mexico",
    "Russia",
    "Switzerland",
    "Germany",
    "France",
    "Brazil",
    "South Africa",
    "Canada",
    "Australia",
    "South Korea",
    "Sweden",
    "Turkey",
    "Egypt",
    "Thailand",
)
_FIRSTS = (
    "walk on the Moon",
    "fly solo across the Atlantic",
    "reach the South Pole",
    "climb Mount Everest",
    "travel into space",
    "sail around the world",
    "swim across the English Channel",
    "reach the North Pole",
)
_LANDMARKS = (
    "the Eiffel Tower",
    "the Great Wall",
    "the Colosseum",
    "Machu Picchu",
    "the Taj Mahal",
    "the Statue of Liberty",
    "Big Ben",
    "the Sydney Opera House",
    "Mount Fuji",
    "the Pyramids of Giza",
    "Stonehenge",
    "the Leaning Tower of Pisa",
    "Petra",
    "Angkor Wat",
    "the Acropolis",
    "Niagara Falls",
    "the Grand Canyon",
    "Table Mountain",
    "Chichen Itza",
    "the Amazon rainforest",
)


def _arithmetic() -> tuple[str, ...]:
    out = [f"{a} plus {b}" for a in range(3, 21) for b in range(3, 21)]
    out += [f"{a} minus {b}" for a in range(4, 21) for b in range(3, a)]
    out += [f"{a} times {b}" for a in range(2, 13) for b in range(2, 13)]
    out += [f"{a * b} divided by {b}" for a in range(2, 11) for b in range(2, 11)]
    return tuple(out)


# --- explanations -------------------------------------------------------------------------------------

_CONCEPTS = (
    "photosynthesis",
    "gravity",
    "evolution",
    "democracy",
    "inflation",
    "DNA",
    "an atom",
    "electricity",
    "climate change",
    "the water cycle",
    "a black hole",
    "machine learning",
    "a computer virus",
    "compound interest",
    "the immune system",
    "a volcano",
    "an ecosystem",
    "the greenhouse effect",
    "supply and demand",
    "a vaccine",
    "an algorithm",
    "renewable energy",
    "the speed of light",
    "a calorie",
    "a food chain",
    "an antibiotic",
    "plate tectonics",
    "a galaxy",
    "the stock market",
    "a budget",
    "cloud storage",
    "a recession",
    "metabolism",
    "a protein",
    "friction",
    "magnetism",
    "a chemical reaction",
    "the scientific method",
    "a hypothesis",
    "encryption",
    "artificial intelligence",
    "the placebo effect",
    "biodiversity",
    "osmosis",
    "a carbon footprint",
    "a mortgage",
    "a credit score",
    "the circadian rhythm",
    "a programming language",
    "an operating system",
    "a fossil",
    "a constellation",
    "an allergy",
    "a tax",
    "a constitution",
    "a molecule",
    "energy",
    "a habitat",
)
_MECHANISMS = (
    "a refrigerator",
    "the internet",
    "a microwave oven",
    "a rocket",
    "a solar panel",
    "a battery",
    "a car engine",
    "a thermostat",
    "a compass",
    "a camera",
    "an airplane wing",
    "a bicycle gear",
    "GPS",
    "Wi-Fi",
    "a search engine",
    "email",
    "a touchscreen",
    "a heat pump",
    "a wind turbine",
    "the heart",
    "the human eye",
    "the lungs",
    "the kidneys",
    "a lock",
    "a credit card",
    "a flush toilet",
    "a hydroelectric dam",
    "a 3D printer",
    "a smoke detector",
    "a barcode scanner",
    "an elevator",
    "noise-cancelling headphones",
    "a pressure cooker",
    "a parachute",
    "a submarine",
)
_PHENOMENA = (
    "thunder",
    "lightning",
    "rust",
    "rain",
    "snow",
    "wind",
    "an echo",
    "a rainbow",
    "a solar eclipse",
    "a lunar eclipse",
    "the tide",
    "hiccups",
    "sunburn",
    "yawning",
    "jet lag",
    "a fever",
    "an earthquake",
    "a tsunami",
    "erosion",
    "static electricity",
    "a traffic jam",
    "fog",
    "a heatwave",
    "frost",
)
_WHY = (
    "do leaves change colour in autumn",
    "do cats purr",
    "do birds migrate",
    "do we dream",
    "do onions make people cry",
    "do stars twinkle",
    "does ice float on water",
    "do we get goosebumps",
    "does bread go stale",
    "do our ears pop on a plane",
    "do dogs wag their tails",
    "does the sea taste salty",
    "do we need sleep",
    "do some people snore",
    "does metal feel colder than wood",
    "do bubbles pop",
    "does popcorn pop",
    "do zebras have stripes",
)

# --- how-to -------------------------------------------------------------------------------------------

_TASKS = (
    ("boil an egg", "boiling an egg"),
    ("make a good cup of tea", "making a good cup of tea"),
    ("save money on groceries", "saving money on groceries"),
    ("fall asleep faster", "falling asleep faster"),
    ("learn a new language", "learning a new language"),
    ("start running", "starting to run"),
    ("write a good CV", "writing a good CV"),
    ("prepare for a job interview", "preparing for a job interview"),
    ("keep houseplants alive", "keeping houseplants alive"),
    ("clean a cast iron pan", "cleaning a cast iron pan"),
    ("tie a tie", "tying a tie"),
    ("change a flat tyre", "changing a flat tyre"),
    ("organise my wardrobe", "organising a wardrobe"),
    ("study for an exam", "studying for an exam"),
    ("make friends in a new city", "making friends in a new city"),
    ("reduce stress", "reducing stress"),
    ("cook rice", "cooking rice"),
    ("bake bread", "baking bread"),
    ("start a vegetable garden", "starting a vegetable garden"),
    ("remove a coffee stain", "removing a coffee stain"),
    ("plan a trip on a budget", "planning a trip on a budget"),
    ("wake up earlier", "waking up earlier"),
    ("drink more water", "drinking more water"),
    ("look after my phone battery", "looking after a phone battery"),
    ("write a thank-you card", "writing a thank-you card"),
    ("speak in public", "speaking in public"),
    ("learn to play the guitar", "learning the guitar"),
    ("make a simple budget", "making a simple budget"),
    ("memorise a speech", "memorising a speech"),
    ("train a puppy", "training a puppy"),
    ("back up my computer", "backing up a computer"),
    ("make a strong password", "making a strong password"),
    ("fold a paper airplane", "folding a paper airplane"),
    ("iron a shirt", "ironing a shirt"),
    ("pack a suitcase", "packing a suitcase"),
    ("take better photos with my phone", "taking better phone photos"),
    ("read more books", "reading more books"),
    ("keep a journal", "keeping a journal"),
    ("prepare meals for the week", "preparing meals for the week"),
    ("paint a room", "painting a room"),
    ("make pancakes", "making pancakes"),
    ("start meditating", "starting to meditate"),
    ("improve my handwriting", "improving handwriting"),
    ("learn to swim", "learning to swim"),
    ("care for a cat", "caring for a cat"),
    ("reduce food waste", "reducing food waste"),
    ("sharpen a kitchen knife", "sharpening a kitchen knife"),
    ("negotiate a salary", "negotiating a salary"),
    ("build a campfire safely", "building a campfire safely"),
    ("write a wedding toast", "writing a wedding toast"),
)

# --- writing ------------------------------------------------------------------------------------------

_WRITING_TOPICS = (
    "the ocean",
    "autumn",
    "a rainy day",
    "a lost cat",
    "friendship",
    "the moon",
    "a city at night",
    "a mountain",
    "coffee",
    "a lighthouse",
    "winter",
    "the first day of school",
    "a robot",
    "a dragon",
    "a garden",
    "a train journey",
    "the desert",
    "a thunderstorm",
    "an old tree",
    "a library",
    "a snowy morning",
    "a birthday party",
    "a river",
    "a forest",
    "a sunrise",
    "the summer holidays",
    "a small bakery",
    "a friendly ghost",
    "a spaceship",
    "a busy market",
    "homesickness",
    "a grandmother's kitchen",
    "the wind",
    "a fox",
    "a kite",
    "a bicycle ride",
    "a quiet village",
    "the stars",
    "a broken clock",
    "a lost key",
    "a new puppy",
    "spring flowers",
    "a rainy bus stop",
    "a busy street",
    "the sea at night",
    "a paper boat",
    "an abandoned house",
    "a music box",
    "a long walk",
    "hope",
    "courage",
    "a fishing boat",
    "the last day of summer",
    "a pet turtle",
    "a candle",
    "a rooftop garden",
    "a desert island",
    "a snowman",
    "a hot air balloon",
    "a campfire",
)
_EMAIL_RECIPIENTS = (
    "manager",
    "teacher",
    "landlord",
    "neighbour",
    "friend",
    "sister",
    "brother",
    "colleague",
    "coach",
    "team",
)
_EMAIL_SUBJECTS = (
    "being late tomorrow",
    "a delayed payment",
    "a birthday party next week",
    "a broken heater",
    "a missed meeting",
    "borrowing a book",
    "a change of plans this weekend",
    "thanking them for their help",
    "a question about homework",
    "a team lunch on Friday",
    "a noisy evening",
    "moving house next month",
    "taking a day off",
    "a lost umbrella",
)


def _emails() -> tuple[str, ...]:
    return tuple(f"my {r} about {s}" for r in _EMAIL_RECIPIENTS for s in _EMAIL_SUBJECTS)


# --- lists, short answers and advice ------------------------------------------------------------------

_LIST_THINGS = (
    "fruits that are red",
    "animals that live in the ocean",
    "countries in Africa",
    "things to do on a rainy day",
    "healthy breakfast foods",
    "musical instruments",
    "primary colours",
    "vegetables that grow underground",
    "birds that cannot fly",
    "famous scientists",
    "board games",
    "sports played with a ball",
    "ways to save energy at home",
    "mammals that live in the sea",
    "things you need for camping",
    "hobbies you can do indoors",
    "types of clouds",
    "parts of a flower",
    "Olympic sports",
    "herbs used in cooking",
    "big cats",
    "reasons to learn a second language",
    "types of renewable energy",
    "kitchen tools",
    "words that rhyme with cat",
    "rivers in Europe",
    "desserts made with chocolate",
    "jobs in a hospital",
    "polite ways to say no",
    "insects that can fly",
)
_SYNONYM_WORDS = (
    "happy",
    "big",
    "small",
    "tired",
    "angry",
    "fast",
    "brave",
    "smart",
    "beautiful",
    "scared",
    "cold",
    "quiet",
    "funny",
    "rich",
    "old",
    "busy",
    "calm",
    "strange",
    "important",
    "difficult",
    "kind",
    "loud",
    "sad",
    "hungry",
)
_OPPOSITE_WORDS = (
    "big",
    "up",
    "happy",
    "fast",
    "light",
    "early",
    "open",
    "full",
    "strong",
    "young",
    "loud",
    "rich",
    "wet",
    "ancient",
    "generous",
    "sharp",
    "smooth",
    "brave",
    "begin",
    "arrive",
    "push",
    "buy",
    "win",
    "remember",
    "accept",
    "inside",
    "above",
    "before",
    "polite",
    "visible",
)
_FAMOUS = (
    "scientist",
    "painter",
    "composer",
    "river in Africa",
    "mountain range",
    "explorer",
    "poet",
    "inventor",
    "novel",
    "bridge",
    "castle",
    "desert",
    "ancient city",
    "statue",
    "mathematician",
    "opera",
    "ship",
    "fictional detective",
    "philosopher",
    "waterfall",
)
_BENEFITS = (
    "regular exercise",
    "reading every day",
    "learning a second language",
    "drinking enough water",
    "getting enough sleep",
    "cycling to work",
    "eating vegetables",
    "meditation",
    "walking in nature",
    "owning a dog",
    "learning to cook",
    "keeping a journal",
    "volunteering",
    "public libraries",
    "solar power",
    "recycling",
    "taking short breaks",
    "playing a musical instrument",
    "travelling",
    "composting",
    "stretching",
    "working from home",
)
_DECISIONS = (
    "buying a used car",
    "choosing a laptop",
    "renting an apartment",
    "adopting a dog",
    "picking a university",
    "starting a small business",
    "planning a wedding",
    "buying running shoes",
    "choosing a bank account",
    "moving to a new city",
    "hiring a babysitter",
    "booking a holiday",
    "buying a bicycle",
    "choosing a phone plan",
    "starting a podcast",
    "planting a tree",
    "buying a mattress",
    "changing careers",
)

_TEMPLATES: dict[str, _Template] = {
    # factual
    "capital": _Template(
        "factual",
        ("What is the capital of {}?", "What is the capital city of {}?", "Which city is the capital of {}?"),
        _COUNTRIES_CAPITAL,
    ),
    "language": _Template(
        "factual",
        (
            "What language is spoken in {}?",
            "What is the main language of {}?",
            "Which language do people speak in {}?",
        ),
        _COUNTRIES_LANGUAGE,
    ),
    "author": _Template("factual", ("Who wrote {}?", "Who is the author of {}?"), _BOOKS),
    "inventor": _Template("factual", ("Who invented {}?", "Who is credited with inventing {}?"), _INVENTIONS),
    "discoverer": _Template("factual", ("Who discovered {}?",), _DISCOVERIES),
    "painter": _Template("factual", ("Who painted {}?",), _PAINTINGS),
    "superlative": _Template("factual", ("What is the {}?", "Which is the {}?"), _SUPERLATIVES),
    "legs": _Template("factual", ("How many legs does {} have?",), _ANIMALS_LEGS),
    "colour": _Template("factual", ("What colour is {}?", "What color is {}?"), _COLOURED_THINGS),
    "mix": _Template(
        "factual",
        ("What colour do you get when you mix {}?", "What color do you get if you mix {}?"),
        _COLOUR_MIXES,
    ),
    "planet": _Template("factual", ("Which planet {}?",), _PLANET_CLUES),
    "count": _Template("factual", ("How many {}?",), _COUNTS),
    "temperature": _Template("factual", ("At what temperature in Celsius does {}?",), _MELTING),
    "formula": _Template("factual", ("What is the chemical formula for {}?",), _COMPOUNDS),
    "symbol": _Template("factual", ("What is the chemical symbol for {}?",), _ELEMENTS),
    "arithmetic": _Template(
        "factual", ("What is {}?", "What does {} equal?", "Calculate {}."), _arithmetic()
    ),
    "sound": _Template("factual", ("What animal says {}?", "Which animal makes the sound '{}'?"), _SOUNDS),
    "maker": _Template("factual", ("What do {} make?", "What do {} produce?"), _MAKERS),
    "gas": _Template("factual", ("What gas {}?",), _GAS_CLUES),
    "currency": _Template(
        "factual", ("What is the currency of {}?", "What money is used in {}?"), _CURRENCY_COUNTRIES
    ),
    "first": _Template("factual", ("Who was the first person to {}?",), _FIRSTS),
    "landmark": _Template("factual", ("Where is {}?", "In which country is {}?"), _LANDMARKS),
    # explanations
    "concept": _Template(
        "explanation",
        (
            "What is {}?",
            "Explain {} in simple terms.",
            "Explain {} to a ten-year-old.",
            "Can you explain {} in two sentences?",
        ),
        _CONCEPTS,
    ),
    "mechanism": _Template(
        "explanation", ("How does {} work?", "Explain how {} works in simple terms."), _MECHANISMS
    ),
    "phenomenon": _Template("explanation", ("Why does {} happen?", "What causes {}?"), _PHENOMENA),
    "why": _Template("explanation", ("Why {}?",), _WHY),
    # how-to
    "howto": _Template(
        "howto",
        ("How do I {}?", "What is the best way to {}?", "What are the steps to {}?", "How can I {}?"),
        tuple(base for base, _ in _TASKS),
    ),
    "tips": _Template(
        "howto",
        ("Give me three tips for {}.", "What are some tips for {}?", "What are common mistakes when {}?"),
        tuple(ger for _, ger in _TASKS),
    ),
    # writing
    "creative": _Template(
        "writing",
        (
            "Write a short poem about {}.",
            "Write a haiku about {}.",
            "Write a two-sentence story about {}.",
            "Describe {} in one paragraph.",
            "Write a limerick about {}.",
            "Write a short story for children about {}.",
            "Write a four-line poem about {}.",
        ),
        _WRITING_TOPICS,
    ),
    "email": _Template("writing", ("Write a short email to {}.", "Write a polite message to {}."), _emails()),
    # lists, short answers, advice
    "list": _Template(
        "other", ("List three {}.", "Name three {}.", "Give me a list of five {}."), _LIST_THINGS
    ),
    "synonym": _Template(
        "other", ("Give me a word that means {}.", "What is another word for {}?"), _SYNONYM_WORDS
    ),
    "opposite": _Template(
        "other", ("What is the opposite of {}?", "Give me the opposite of the word '{}'."), _OPPOSITE_WORDS
    ),
    "famous": _Template("other", ("Name a famous {}.", "Tell me about a famous {}."), _FAMOUS),
    "benefits": _Template(
        "other", ("What are the benefits of {}?", "What are the pros and cons of {}?"), _BENEFITS
    ),
    "decision": _Template(
        "other",
        ("What should I consider when {}?", "What questions should I ask myself before {}?"),
        _DECISIONS,
    ),
}

_FOLLOW_UPS = {
    "factual": (
        "Why is that?",
        "Tell me more about it.",
        "Give me one more interesting fact about it.",
        "Summarize that in one sentence.",
    ),
    "explanation": (
        "Give me an example.",
        "Can you make that shorter?",
        "Summarize that in one sentence.",
        "Why is that?",
        "Can you explain it more simply?",
    ),
    "howto": (
        "Can you make that shorter?",
        "What is the most important step?",
        "Give me an example.",
        "What mistakes should I avoid?",
    ),
    "writing": (
        "Can you make that shorter?",
        "Give it a title.",
        "Make it a little funnier.",
        "Make it more cheerful.",
    ),
    "other": (
        "Give me an example.",
        "Why is that?",
        "Tell me more about it.",
        "Can you make that shorter?",
        "Give me one more.",
    ),
}

# --- held-out evaluation ------------------------------------------------------------------------------

# (template key, entity, accepted answers); the question is the template's first variant with the entity.
_FACT_EVAL_SPEC: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("capital", "France", ("Paris",)),
    ("capital", "Japan", ("Tokyo",)),
    ("capital", "Italy", ("Rome",)),
    ("capital", "Germany", ("Berlin",)),
    ("capital", "Spain", ("Madrid",)),
    ("capital", "England", ("London",)),
    ("language", "Mexico", ("Spanish",)),
    ("language", "Brazil", ("Portuguese",)),
    ("author", "Romeo and Juliet", ("Shakespeare",)),
    ("author", "the Harry Potter books", ("Rowling",)),
    ("inventor", "the telephone", ("Bell",)),
    ("inventor", "the light bulb", ("Edison",)),
    ("discoverer", "penicillin", ("Fleming",)),
    ("discoverer", "gravity", ("Newton",)),
    ("painter", "the Mona Lisa", ("Leonardo", "da Vinci")),
    ("superlative", "largest planet in our solar system", ("Jupiter",)),
    ("superlative", "largest ocean on Earth", ("Pacific",)),
    ("superlative", "fastest land animal", ("cheetah",)),
    ("superlative", "tallest mountain in the world", ("Everest",)),
    ("superlative", "closest star to Earth", ("Sun",)),
    ("legs", "a spider", ("eight", "8")),
    ("legs", "an insect", ("six", "6")),
    ("colour", "the sky on a clear day", ("blue",)),
    ("colour", "grass", ("green",)),
    ("colour", "a banana", ("yellow",)),
    ("mix", "blue and yellow", ("green",)),
    ("planet", "is known as the Red Planet", ("Mars",)),
    ("count", "days are in a week", ("seven", "7")),
    ("count", "months are in a year", ("twelve", "12")),
    ("count", "hours are in a day", ("24", "twenty-four", "twenty four")),
    ("count", "continents are there", ("seven", "7")),
    ("temperature", "water boil", ("100", "hundred")),
    ("formula", "water", ("H2O", "H₂O")),
    ("arithmetic", "2 plus 2", ("4", "four")),
    ("arithmetic", "10 minus 3", ("7", "seven")),
    ("opposite", "hot", ("cold",)),
    ("sound", "moo", ("cow",)),
    ("maker", "bees", ("honey",)),
    ("gas", "do plants absorb from the air", ("carbon dioxide", "CO2", "CO₂")),
    ("currency", "the United States", ("dollar",)),
)

FACT_EVAL: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (_TEMPLATES[key].variants[0].format(entity), answers) for key, entity, answers in _FACT_EVAL_SPEC
)

OPEN_EVAL: tuple[str, ...] = (
    "What are some good ways to make a small bedroom feel bigger?",
    "Explain why the Moon seems to change shape during the month.",
    "I keep forgetting people's names right after I meet them. Any advice?",
    "Write a short note thanking a neighbour for looking after my plants.",
    "Describe what a perfect lazy Sunday might look like.",
    "How should a beginner start learning to draw?",
    "What is the difference between weather and climate?",
    "Suggest three names for a cafe that sells only soup, and explain each one.",
    "Why do people enjoy listening to sad songs?",
    "Write a few lines in which a kettle talks to a teacup.",
    "How can someone become a better listener in conversations?",
    "What would happen if everyone on Earth jumped at the same time?",
    "Give a friendly explanation of what a spreadsheet is used for.",
    "My friend is nervous about her driving test tomorrow. What could I say to encourage her?",
    "Compare trains and planes for a 500 kilometre trip.",
    "Write the opening line of a mystery novel set on a ship.",
    "What are a few simple habits that help keep teeth healthy?",
    "Explain how a library decides where to put each book.",
    "Plan a simple three-course dinner for four people on a small budget.",
    "Why is it important to wash your hands before cooking?",
    "Tell me a short fable about a proud crow and a patient tortoise.",
    "What should a family think about before getting a pet rabbit?",
    "How do bees find their way back to the hive?",
    "Write a brief, upbeat message welcoming a new colleague to the team.",
)

PROSE_EVAL: tuple[str, ...] = (
    "The ferry left the harbour twenty minutes late, which nobody seemed to mind. A man in a green coat "
    "leaned on the rail and fed crusts to the gulls, who followed the boat as if they had bought tickets. "
    "Near the stern, two children argued about whether the island on the horizon was moving or whether they "
    "were. Their mother, reading a paperback with a cracked spine, settled the matter without looking up. "
    "The engine hummed through the deck and into everyone's shoes. By the time the town had shrunk to a row "
    "of coloured dots, the wind had changed direction, and the smell of diesel gave way to salt, wet rope "
    "and the faint sweetness of someone's orange.",
    "The kitchen was the warmest room in the house, and everyone knew it. Its window faced the garden, where "
    "a pear tree leaned against the fence like a tired visitor. On the sill stood a row of jars holding "
    "buttons, seeds, rubber bands and a single brass key that opened nothing anyone could remember. The "
    "table had been scrubbed so many times that the grain of the wood stood up in soft ridges. In winter "
    "the oven stayed on long after the bread was done, and the cat slept in front of it, stretched out so "
    "completely that she seemed to have been poured onto the tiles.",
    "Most people treat boredom as a problem to be solved as quickly as possible, usually by reaching for a "
    "phone. Yet boredom may be one of the few states in which the mind is left to wander without a "
    "destination. Many ideas arrive not while we are concentrating hard but while we are waiting for a "
    "kettle or staring out of a bus window. When every empty minute is filled, those small openings "
    "disappear. This does not mean that we should seek out dullness for its own sake. It suggests, rather, "
    "that a little unstructured time is not wasted time, and that an afternoon with nothing planned can be "
    "quietly productive.",
    "Marta had promised herself she would not look at the results until the evening, but by noon the "
    "envelope was already open on the kitchen counter. She read the first line, then the second, and then "
    "sat down on the floor because the chair seemed too far away. For three years she had studied at night "
    "after work, filling notebooks with formulas and drawing diagrams on the backs of receipts. Now the page "
    "in front of her said, in plain type, that it had been enough. She laughed once, loudly, and the "
    "neighbour's dog answered from the other side of the wall.",
    "In late autumn the marsh turns the colour of weak tea. The reeds stand stiff and pale, rattling against "
    "one another whenever the wind comes in from the sea. Pools of still water reflect a sky that cannot "
    "decide between grey and silver. Geese arrive in long uneven lines, calling to each other as they "
    "descend, and for a few minutes the air is full of their noise. Then they settle, and the silence "
    "returns, broken only by the occasional splash of a fish or the creak of the wooden boardwalk under a "
    "walker's boots.",
    "Cheap printed maps changed how ordinary people imagined the world. Before them, most travellers relied "
    "on the advice of strangers and the memory of landmarks. A folded sheet of paper made distant places "
    "feel reachable and gave shape to regions that had been little more than names. It also encouraged a "
    "new kind of confidence, sometimes misplaced, in the idea that the land could be fully known in advance. "
    "Roads washed out, rivers shifted and towns changed their names, yet the map remained calm and certain. "
    "Perhaps that is why people still trust a map more than their own eyes.",
    "The office printer had opinions. It accepted documents from the finance team without complaint but "
    "jammed whenever anyone from marketing approached. Over the years the staff developed rituals to calm "
    "it: a gentle pat on the lid, a whispered apology, a sheet of paper fanned exactly three times before "
    "loading. Nobody admitted to believing in these rituals, yet everybody performed them. When the company "
    "finally replaced the machine with a sleek new model, there was an awkward silence in the corridor as "
    "the old one was wheeled away, and someone, half joking, suggested a small farewell party.",
    "At six in the morning the city belongs to delivery vans and street sweepers. Shutters rise one by one "
    "along the main road, revealing bakeries already bright inside, their shelves filling with rolls and "
    "loaves. A bus pulls away from the stop with only two passengers, both asleep. Pigeons gather around a "
    "bench where an old man scatters seeds from a paper bag, talking to them in a low and friendly voice. "
    "The traffic lights change for no one. Within an hour the pavements will be crowded and loud, but for "
    "now the streets feel wide, rinsed and almost polite.",
    "Learning a musical instrument as an adult is humbling in a way that few other activities are. Children "
    "tend to accept that they will sound terrible for a while, but grown-ups are used to being competent "
    "and find the early stages embarrassing. The fingers refuse to obey, the rhythm slips, and simple tunes "
    "take weeks to master. Yet the slow progress has its own reward. Each small improvement is easy to "
    "notice, and the practice itself becomes a calm part of the day. Those who persist often say that the "
    "instrument taught them patience long before it taught them music.",
    "The storm took out the power just after dinner, and the house went suddenly quiet. Without the hum of "
    "the fridge and the glow of screens, the family gathered in the living room around two candles and a "
    "torch with a weak battery. Grandfather, who rarely spoke at length, began to tell the story of a winter "
    "when the village road was blocked by snow for eleven days. He described the bread his mother baked "
    "from the last bag of flour and the neighbours who walked across the fields with milk. When the lights "
    "came back on, nobody hurried to switch anything else on.",
    "The old railway station had been turned into a museum, but it still felt like a place of departures. "
    "Its high iron roof let in a soft grey light that fell across the empty platforms. Benches carved with "
    "initials stood where passengers once waited, and a large clock above the entrance had been stopped at "
    "ten past four. Visitors spoke in lowered voices without knowing why. In one corner, a restored carriage "
    "with green leather seats invited people to sit and imagine the countryside sliding past the window, "
    "the rattle of the wheels, and the conductor calling out the names of towns.",
    "Walking is the slowest way to cross a city, and for that reason it is often the most revealing. A "
    "driver sees traffic, signs and the back of the car in front. A walker notices the smell of a bakery, "
    "the chalk drawings on a pavement and the small gardens hidden behind iron gates. Walking also makes "
    "distances personal. A street that seemed short on a map becomes long on a hot afternoon, while a hill "
    "that looked gentle turns out to be steep. Cities designed for walkers tend to feel friendlier, because "
    "they invite people to stop, look and talk.",
    "The robot had been built to sort parcels, and it was very good at sorting parcels. It could read an "
    "address in a fraction of a second and slide a box onto the right conveyor before the next one arrived. "
    "One night, during a quiet shift, a parcel arrived with no address at all, only a drawing of a small "
    "yellow house and a tree. The robot held it for a long time. Its instructions had nothing to say about "
    "drawings. In the end it placed the parcel gently on a shelf by the window, where the morning sun would "
    "reach it first.",
    "The market opens on Saturdays in a car park behind the church, and by nine it is crowded. Farmers stand "
    "behind tables covered with crates of apples, beetroot still dusted with soil, and bunches of herbs tied "
    "with string. A cheese seller offers thin slices on the tip of a knife. Somewhere a radio plays old "
    "songs, slightly out of tune. Children weave between the stalls clutching paper bags of warm doughnuts, "
    "and dogs sniff hopefully at every dropped crumb. By early afternoon the tables are packed away, and "
    "only a few crushed leaves show that anything happened there at all.",
    "Sleep is often the first thing people give up when life becomes busy, and the last thing they think to "
    "protect. Staying up late to finish a task can feel like a sensible trade, but the cost usually appears "
    "the following day as slower thinking, shorter patience and a stronger craving for sugar. Over weeks "
    "and months, a steady lack of rest can affect mood, memory and health. The remedy is not complicated, "
    "though it requires discipline: a regular bedtime, a dark and quiet room, and the willingness to leave "
    "some work unfinished until the morning.",
    "On the last evening of the holiday they climbed the hill behind the campsite to watch the sun go down. "
    "The grass was dry and warm, and the crickets had already started their steady evening noise. Below "
    "them the lake lay perfectly flat, holding a copy of the sky. Nobody said much. Someone passed around a "
    "bag of cherries, and they took turns spitting the stones as far as they could down the slope. When the "
    "first star appeared, Ana made a wish she refused to share, and her brother claimed, without evidence, "
    "that he had seen a shooting star first.",
)

# --- training sequence --------------------------------------------------------------------------------


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _train_pools() -> dict[str, tuple[str, ...]]:
    """Each template's training entities, less every entity a FACT_EVAL question uses with that template."""
    held: dict[str, set[str]] = {}
    for key, entity, _ in _FACT_EVAL_SPEC:
        held.setdefault(key, set()).add(_norm(entity))
    return {
        key: tuple(e for e in t.entities if _norm(e) not in held.get(key, ()))
        for key, t in _TEMPLATES.items()
    }


_POOLS = _train_pools()
_KEYS_BY_CATEGORY = {c: tuple(k for k, t in _TEMPLATES.items() if t.category == c) for c in CATEGORIES}
# Within a category, a template is drawn in proportion to the square root of how many prompts it can make:
# big templates (arithmetic, email) get more draws without crowding out the small ones.
_KEY_WEIGHTS = {
    c: tuple(math.sqrt(len(_POOLS[k]) * len(_TEMPLATES[k].variants)) for k in keys)
    for c, keys in _KEYS_BY_CATEGORY.items()
}


def _conversation(seed: int, index: int) -> tuple[str, list[str]]:
    """Item `index` of the endless sequence for `seed`: its own RNG, so any prefix is stable."""
    rng = random.Random(f"{seed}:{index}")
    category = rng.choices(CATEGORIES, weights=CATEGORY_WEIGHTS)[0]
    key = rng.choices(_KEYS_BY_CATEGORY[category], weights=_KEY_WEIGHTS[category])[0]
    turns = [rng.choice(_TEMPLATES[key].variants).format(rng.choice(_POOLS[key]))]
    if rng.random() < FOLLOW_UP_RATE:
        turns.append(rng.choice(_FOLLOW_UPS[category]))
    return category, turns


def labelled_conversations(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """The first n training conversations, each with its category (one of CATEGORIES)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [_conversation(seed, i) for i in range(n)]


def train_conversations(n: int, seed: int = 0) -> list[list[str]]:
    """The first n training conversations for `seed`, each a list of user turns (1 or 2)."""
    return [turns for _, turns in labelled_conversations(n, seed)]


def all_first_turns() -> frozenset[str]:
    """Every first turn the training sequence can produce (any seed)."""
    return frozenset(v.format(e) for key, t in _TEMPLATES.items() for v in t.variants for e in _POOLS[key])


def eval_leaks(conversations: Iterable[Iterable[str]]) -> list[str]:
    """FACT_EVAL questions and OPEN_EVAL prompts that appear verbatim (case-insensitive) as a user turn."""
    seen = {_norm(turn) for conv in conversations for turn in conv}
    prompts = [q for q, _ in FACT_EVAL] + list(OPEN_EVAL)
    return [p for p in prompts if _norm(p) in seen]
