"""Template captions in English, German and French: the tiny tokenizers' training corpus, `generated:<N>` (English
training captions) and `generated:<N>:<lang>` (a line-aligned parallel test set, or prompts, in en/de/fr)."""

from __future__ import annotations

import random

# ~100 simple captions in English, German and French (the tokenizer training corpus).
TINY_CORPUS: list[str] = [
    # English
    "a red dog runs on the beach",
    "a black cat sleeps on the sofa",
    "two children play in the park",
    "a man rides a bicycle down the street",
    "a woman reads a book under a tree",
    "a small boat sails on a calm lake",
    "a yellow bird sits on a branch",
    "an old house stands next to the river",
    "a green car is parked in front of a shop",
    "a brown horse eats grass in a field",
    "the sun sets behind the mountains",
    "a white dog jumps over a fence",
    "a group of people walk across the bridge",
    "a blue train arrives at the station",
    "a little girl holds a red balloon",
    "a cup of coffee on a wooden table",
    "a plate of pasta with tomato sauce",
    "a cat looks out of the window",
    "snow covers the trees in the forest",
    "a painting of a squirrel eating a burger",
    "a photo of an astronaut riding a horse",
    "a city street at night with bright lights",
    "a dog and a cat sleep together",
    "a boy throws a ball to his dog",
    "a large ship in the harbor",
    "flowers in a glass vase on the table",
    "a cow stands in a green meadow",
    "a man cooks dinner in the kitchen",
    "a red apple and a yellow banana",
    "a bird flies over the sea",
    "an orange cat on a blue chair",
    "a family has a picnic in the garden",
    "a tall tower in the old town",
    "rain falls on the empty road",
    "a child draws a house with a crayon",
    "a fox runs through the snowy field",
    "a dog swims in the lake",
    # German
    "ein roter hund läuft am strand",
    "eine schwarze katze schläft auf dem sofa",
    "zwei kinder spielen im park",
    "ein mann fährt fahrrad auf der straße",
    "eine frau liest ein buch unter einem baum",
    "ein kleines boot segelt auf einem ruhigen see",
    "ein gelber vogel sitzt auf einem ast",
    "ein altes haus steht neben dem fluss",
    "ein grünes auto parkt vor einem laden",
    "ein braunes pferd frisst gras auf einer wiese",
    "die sonne geht hinter den bergen unter",
    "ein weißer hund springt über einen zaun",
    "eine gruppe von menschen geht über die brücke",
    "ein blauer zug kommt am bahnhof an",
    "ein kleines mädchen hält einen roten ballon",
    "eine tasse kaffee auf einem holztisch",
    "ein teller nudeln mit tomatensoße",
    "eine katze schaut aus dem fenster",
    "schnee bedeckt die bäume im wald",
    "ein hund und eine katze schlafen zusammen",
    "ein junge wirft seinem hund einen ball zu",
    "ein großes schiff im hafen",
    "blumen in einer vase auf dem tisch",
    "eine kuh steht auf einer grünen wiese",
    "ein mann kocht das abendessen in der küche",
    "ein vogel fliegt über das meer",
    "eine familie macht ein picknick im garten",
    "regen fällt auf die leere straße",
    "ein fuchs läuft durch das verschneite feld",
    "ein hund schwimmt im see",
    # French
    "un chien rouge court sur la plage",
    "un chat noir dort sur le canapé",
    "deux enfants jouent dans le parc",
    "un homme fait du vélo dans la rue",
    "une femme lit un livre sous un arbre",
    "un petit bateau navigue sur un lac calme",
    "un oiseau jaune est assis sur une branche",
    "une vieille maison se trouve près de la rivière",
    "une voiture verte est garée devant un magasin",
    "un cheval brun mange de l'herbe dans un champ",
    "le soleil se couche derrière les montagnes",
    "un chien blanc saute par-dessus une clôture",
    "un groupe de personnes traverse le pont",
    "un train bleu arrive à la gare",
    "une petite fille tient un ballon rouge",
    "une tasse de café sur une table en bois",
    "une assiette de pâtes à la sauce tomate",
    "un chat regarde par la fenêtre",
    "la neige couvre les arbres de la forêt",
    "un chien et un chat dorment ensemble",
    "un garçon lance une balle à son chien",
    "un grand navire dans le port",
    "des fleurs dans un vase sur la table",
    "une vache dans un pré vert",
    "un homme prépare le dîner dans la cuisine",
    "un oiseau vole au-dessus de la mer",
    "une famille pique-nique dans le jardin",
    "la pluie tombe sur la route vide",
    "un renard court dans le champ enneigé",
    "un chien nage dans le lac",
    "une photo d'un astronaute à cheval",
]

_COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "small", "big"]
_SUBJECTS = ["dog", "cat", "horse", "bird", "cow", "fox", "boy", "girl", "man", "woman", "car", "boat"]
_VERBS = ["runs", "sleeps", "sits", "stands", "plays", "waits", "jumps", "rests"]
_PLACES = [
    "on the beach",
    "in the park",
    "on the street",
    "in a field",
    "near the river",
    "in the snow",
    "under a tree",
    "in the garden",
    "on a hill",
    "next to a house",
]
_TIMES = ["", "", "at night", "in the morning", "at sunset", "in the rain"]


def generate_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` simple deterministic English captions, e.g. "a red dog runs on the beach"."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [
            "a",
            rng.choice(_COLORS),
            rng.choice(_SUBJECTS),
            rng.choice(_VERBS),
            rng.choice(_PLACES),
            rng.choice(_TIMES),
        ]
        out.append(" ".join(w for w in words if w))
    return out


# ----------------------------------------------------------------------------------------------- parallel sets
# Offline stand-ins for a parallel test set (Multi30k-like: line i of every language says the same thing) and for a
# prompt list (PartiPrompts-like noun phrases): `generated:<N>:<lang>` in corpora and prompt files. Each row is drawn
# once and written in every language, so the languages stay aligned line for line.
PARALLEL_LANGS = ("en", "de", "fr")
# (en, de noun, de gender m|f|n, fr noun, fr gender m|f)
_P_SUBJECTS = [
    ("dog", "hund", "m", "chien", "m"), ("cat", "katze", "f", "chat", "m"), ("horse", "pferd", "n", "cheval", "m"),
    ("bird", "vogel", "m", "oiseau", "m"), ("cow", "kuh", "f", "vache", "f"), ("fox", "fuchs", "m", "renard", "m"),
    ("duck", "ente", "f", "canard", "m"), ("sheep", "schaf", "n", "mouton", "m"), ("goat", "ziege", "f", "chèvre", "f"),
    ("rabbit", "kaninchen", "n", "lapin", "m"),
]
# (en, de stem, fr masculine, fr feminine)
_P_COLORS = [
    ("red", "rot", "rouge", "rouge"), ("black", "schwarz", "noir", "noire"), ("white", "weiß", "blanc", "blanche"),
    ("brown", "braun", "brun", "brune"), ("yellow", "gelb", "jaune", "jaune"), ("green", "grün", "vert", "verte"),
    ("grey", "grau", "gris", "grise"),
]
_P_VERBS = [("runs", "läuft", "court"), ("sleeps", "schläft", "dort"), ("plays", "spielt", "joue"),
            ("waits", "wartet", "attend"), ("jumps", "springt", "saute"), ("walks", "geht", "marche")]
_P_PLACES = [
    ("on the beach", "am strand", "sur la plage"), ("in the park", "im park", "dans le parc"),
    ("on the street", "auf der straße", "dans la rue"), ("in a field", "auf einem feld", "dans un champ"),
    ("near the river", "am fluss", "près de la rivière"), ("in the snow", "im schnee", "dans la neige"),
    ("under a tree", "unter einem baum", "sous un arbre"), ("in the garden", "im garten", "dans le jardin"),
    ("on a hill", "auf einem hügel", "sur une colline"), ("next to a house", "neben einem haus", "à côté d'une maison"),
]
_P_TIMES = [("", "", ""), ("", "", ""), ("at night", "in der nacht", "la nuit"),
            ("in the morning", "am morgen", "le matin"), ("at sunset", "bei sonnenuntergang", "au coucher du soleil"),
            ("in the rain", "im regen", "sous la pluie")]
# (en, de, fr) kinds of picture for prompts: "an oil painting of a red fox in the snow"
_P_MEDIA = [("a photo", "ein foto", "une photo"), ("a painting", "ein gemälde", "une peinture"),
            ("an oil painting", "ein ölgemälde", "une peinture à l'huile"), ("a drawing", "eine zeichnung", "un dessin"),
            ("a watercolor", "ein aquarell", "une aquarelle"), ("a close-up photo", "eine nahaufnahme", "un gros plan")]
_DE_NOM = {"m": ("ein", "er"), "f": ("eine", "e"), "n": ("ein", "es")}  # article, adjective ending (nominative)
_DE_DAT = {"m": ("einem", "en"), "f": ("einer", "en"), "n": ("einem", "en")}  # after "von"


def _check_lang(lang: str) -> None:
    if lang not in PARALLEL_LANGS:
        raise ValueError(f"generated text comes in {', '.join(PARALLEL_LANGS)}, not {lang!r}")


def _noun_phrase(lang: str, subject: tuple, color: tuple, dative: bool = False) -> str:
    en, de, de_g, fr, fr_g = subject
    if lang == "en":
        return f"a {color[0]} {en}"
    if lang == "de":
        art, ending = (_DE_DAT if dative else _DE_NOM)[de_g]
        return f"{art} {color[1]}{ending} {de}"
    return f"{'un' if fr_g == 'm' else 'une'} {fr} {color[2] if fr_g == 'm' else color[3]}"


def parallel_captions(n: int, lang: str = "en", seed: int = 1) -> list[str]:
    """``n`` captions in ``lang`` (en, de, fr); the same (n, seed) gives line-aligned translations in every language:
    parallel_captions(2, "de")[i] translates parallel_captions(2, "en")[i] ("a red dog runs on the beach")."""
    _check_lang(lang)
    k = PARALLEL_LANGS.index(lang)
    rng, out = random.Random(seed), []
    for _ in range(max(n, 0)):
        subject, color = rng.choice(_P_SUBJECTS), rng.choice(_P_COLORS)
        verb, place, time = rng.choice(_P_VERBS), rng.choice(_P_PLACES), rng.choice(_P_TIMES)
        words = [_noun_phrase(lang, subject, color), verb[k], place[k], time[k]]
        out.append(" ".join(w for w in words if w))
    return out


def generate_prompts(n: int, lang: str = "en", seed: int = 2) -> list[str]:
    """``n`` image prompts in ``lang`` (en, de, fr), line-aligned across languages like parallel_captions:
    "an oil painting of a red fox in the snow" / "ein ölgemälde von einem roten fuchs im schnee"."""
    _check_lang(lang)
    k = PARALLEL_LANGS.index(lang)
    rng, out = random.Random(seed), []
    for _ in range(max(n, 0)):
        medium, subject, color = rng.choice(_P_MEDIA), rng.choice(_P_SUBJECTS), rng.choice(_P_COLORS)
        place, time = rng.choice(_P_PLACES), rng.choice(_P_TIMES)
        thing = _noun_phrase(lang, subject, color, dative=True)
        if lang == "en":
            head = f"{medium[0]} of {thing}"
        elif lang == "de":
            head = f"{medium[1]} von {thing}"
        else:
            head = f"{medium[2]} d'{thing}"  # de + un/une -> d'un / d'une
        out.append(" ".join(w for w in (head, place[k], time[k]) if w))
    return out


def parse_generated(spec: str) -> tuple[int, str | None]:
    """`generated:<N>` -> (N, None); `generated:<N>:<lang>` -> (N, lang). ValueError says the expected form."""
    parts = spec.split(":")
    try:
        if parts[0] != "generated" or len(parts) not in (2, 3):
            raise ValueError
        n, lang = int(parts[1]), (parts[2] if len(parts) == 3 else None)
    except ValueError:
        raise ValueError(f"{spec!r}: expected generated:<N> or generated:<N>:<lang>") from None
    if n < 1:
        raise ValueError(f"{spec!r}: N must be >= 1")
    if lang is not None and lang not in PARALLEL_LANGS:
        raise ValueError(f"{spec!r}: generated text comes in {', '.join(PARALLEL_LANGS)}, not {lang!r}")
    return n, lang
