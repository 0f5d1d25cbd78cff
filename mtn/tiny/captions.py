"""Template captions in English, German and French: the tiny tokenizers' training corpus and `generated:<N>`."""

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
