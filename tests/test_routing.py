"""Routing on real sentences (lingua's n-gram models ship in its wheel: offline)."""

import pytest

from mtn.errors import MTNError
from serve.routing import LanguageRouter, UnsupportedLanguage

pytest.importorskip("lingua")

SENTENCES = {
    "en": ["A photo of an astronaut riding a horse on the moon", "a small wooden cabin in the snowy mountains at night",
           "a bowl of ramen, 4k, highly detailed, studio lighting"],
    "de": ["Ein Foto von einem Astronauten, der auf dem Mond ein Pferd reitet", "ein roter Hund läuft am Strand",
           "eine kleine Holzhütte in den verschneiten Bergen bei Nacht"],
    "fr": ["Une photo d’un astronaute qui monte à cheval sur la lune", "un chien rouge court sur la plage",
           "une petite cabane en bois dans les montagnes enneigées la nuit"],
    "es": ["Una foto de un astronauta montando a caballo en la luna", "un perro rojo corre en la playa"],
    "zh": ["宇航员在月球上骑马的照片", "一只红色的狗在海滩上奔跑"],
    "ja": ["月面で馬に乗る宇宙飛行士の写真", "赤い犬がビーチを走っている"],
}
MIXED = ["Eine Katze sitzt auf dem Tisch and a dog sleeps on the floor",
         "a cozy living room with a fireplace, eine Katze schläft auf dem Sofa",
         "una casa blanca junto al mar with a red door and big windows",
         "猫がソファで寝ている, oil painting of a quiet room"]


@pytest.fixture(scope="module")
def router():
    return LanguageRouter({"de": "de", "fr": "fr", "es": "multi", "zh": "multi", "ja": "ja"}, hybrid_route="multi")


@pytest.mark.parametrize("lang,text", [(lang, t) for lang, ts in SENTENCES.items() for t in ts])
def test_detects_real_sentences(router, lang, text):
    d = router.route(text)
    assert (d.language, d.hybrid, d.reason) == (lang, False, "detected")
    assert d.route == {"en": "native", "de": "de", "fr": "fr", "es": "multi", "zh": "multi", "ja": "ja"}[lang]


@pytest.mark.parametrize("text", MIXED)
def test_mixed_prompts_take_the_hybrid_route(router, text):
    d = router.route(text)
    assert d.hybrid and d.route == "multi" and len(d.languages) >= 2, d


def test_short_uncertain_prompt_takes_the_default_language(router):
    d = router.route("a cat")  # lingua's first guess is Italian; too close to call
    assert d.language is None and d.route == "native" and d.reason == "undetermined -> en"


def test_requested_language_skips_detection(router):
    d = router.route("a cat", language="de")
    assert (d.route, d.language, d.reason) == ("de", "de", "requested")
    assert router.route("a cat", language="auto").reason.startswith("undetermined")


def test_unsupported_language_without_fallback(router):
    with pytest.raises(UnsupportedLanguage, match="detected language 'ru' has no translator"):
        router.route("Пушистый кот спит на подоконнике")
    with pytest.raises(UnsupportedLanguage, match="'pl' has no translator"):
        router.route("x", language="pl")
    fallback = LanguageRouter({"de": "de"}, fallback_route="multi")
    assert fallback.route("Пушистый кот спит на подоконнике").route == "multi"


def test_hybrid_without_a_multilingual_route_is_refused():
    with pytest.raises(UnsupportedLanguage, match="mixes languages"):
        LanguageRouter({"de": "de"}).route(MIXED[0])


def test_english_translator_overrides_native():
    assert LanguageRouter({"en": "t5-en"}).route(SENTENCES["en"][0]).route == "t5-en"


def test_unknown_language_code():
    with pytest.raises(MTNError, match="unknown language code 'xx'"):
        LanguageRouter({"xx": "a"})
