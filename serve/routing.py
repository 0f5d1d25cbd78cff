"""Language routing: which text encoder route (the pipeline's own, or a translator) serves a prompt.

Detection is offline (lingua, n-gram models shipped in the wheel). Short prompts are hard for any detector
("a cat" scores Italian first), so:
  * only a candidate set of languages is considered (the routed ones plus common ones; fewer false hits);
  * a prompt whose best guess is not clearly ahead (lingua's minimum relative distance) is "undetermined"
    and takes `default_language` (English unless configured) instead of a coin flip;
  * a prompt is "hybrid" when a second language clearly wins several 4-word windows of it (or a CJK run),
    see LanguageRouter.detect.

    >>> router = LanguageRouter(translated={"de": "de", "fr": "multi"}, hybrid_route="multi")
    >>> router.route("ein roter Hund läuft am Strand").route
    'de'
"""

from __future__ import annotations

import re
import threading
from dataclasses import asdict, dataclass, field

from mtn.errors import MTNError

NATIVE = "native"
# Common prompt languages; routed languages are always added. Each one costs n-gram model memory (BENCHMARKS.md).
DEFAULT_CANDIDATES = ("en", "de", "fr", "es", "it", "pt", "nl", "cs", "pl", "ru", "uk", "zh", "ja", "ko",
                      "ar", "tr", "sv", "da", "fi", "el", "hi")
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_SCRIPT_SPLIT = re.compile(rf"(?<=[{_CJK}])\s*(?=[^{_CJK}\s\d])|(?<=[^{_CJK}\s\d])\s*(?=[{_CJK}])")
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?")
_CJK_CHAR = re.compile(f"[{_CJK}]")


class UnsupportedLanguage(MTNError):
    """No route serves this prompt's language (the service answers 422 with this message)."""


@dataclass
class RouteDecision:
    route: str  # "native" or a translator key
    language: str | None  # ISO 639-1 of the whole prompt (None: undetermined)
    languages: list[str] = field(default_factory=list)  # every language found in runs of the prompt
    hybrid: bool = False
    confidence: float = 0.0
    reason: str = ""  # how the route was chosen ("detected", "requested", "undetermined -> en", "hybrid", ...)

    def to_dict(self) -> dict:
        return asdict(self)


class LanguageRouter:
    """Maps a prompt to a route. `translated`: ISO 639-1 code -> translator key; English goes to `english_route`
    unless `translated` names "en"; `hybrid_route` / `fallback_route`: translator keys, or None to refuse (422)."""

    def __init__(self, translated: dict[str, str], english_route: str = NATIVE, hybrid_route: str | None = None,
                 fallback_route: str | None = None, default_language: str = "en",
                 candidates: tuple[str, ...] | list[str] = DEFAULT_CANDIDATES, min_relative_distance: float = 0.05,
                 min_confidence: float = 0.25, min_run_confidence: float = 0.4):
        self.translated = {k.lower(): v for k, v in translated.items()}
        self.english_route = english_route
        self.hybrid_route = hybrid_route
        self.fallback_route = fallback_route
        self.default_language = default_language.lower()
        codes = sorted({c.lower() for c in candidates} | set(self.translated) | {"en", self.default_language})
        self._languages = [_language(c) for c in codes]
        self.min_relative_distance = min_relative_distance
        self.min_confidence = min_confidence  # below it the whole prompt is "undetermined"
        self.min_run_confidence = min_run_confidence
        self._detector = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ detection
    @property
    def detector(self):
        with self._lock:  # built on first use (time and memory: BENCHMARKS.md)
            if self._detector is None:
                from lingua import LanguageDetectorBuilder

                self._detector = (LanguageDetectorBuilder.from_languages(*self._languages)
                                  .with_minimum_relative_distance(self.min_relative_distance)
                                  .with_preloaded_language_models().build())
        return self._detector

    def detect(self, text: str) -> tuple[str | None, float, list[str], bool]:
        """(language of the whole text or None, its confidence, languages found in it, hybrid?).

        Hybrid: besides the whole-text guess, windows of 4 words (CJK runs whole) are detected alone; a
        language counts when it wins >= 2 windows with a clear lead (lingua's own segmentation was too
        noisy on prompts, e.g. "a photo of ein roter" came back as English)."""
        det = self.detector
        lang = det.detect_language_of(text)
        conf = det.compute_language_confidence(text, lang) if lang is not None else 0.0
        primary = _code(lang) if lang is not None and conf >= self.min_confidence else None
        wins: dict[str, int] = {}
        for run in _SCRIPT_SPLIT.split(text):
            if _CJK_CHAR.search(run):
                pieces, weight = ([run], 2) if len(_CJK_CHAR.findall(run)) >= 2 else ([], 0)
            else:
                words = _WORD.findall(run)
                pieces, weight = [" ".join(words[i:i + 4]) for i in range(0, len(words) - 3)], 1
            for piece in pieces:
                if (code := self._confident(piece)) is not None:
                    wins[code] = wins.get(code, 0) + weight
        languages = sorted((c for c, n in wins.items() if n >= 2), key=lambda c: -wins[c])
        if primary is not None and primary not in languages:
            languages.insert(0, primary)
        return primary, float(conf), languages, len(languages) >= 2

    def _confident(self, piece: str) -> str | None:
        """The language of a run when the detector is clearly sure of it, else None (short runs are noisy)."""
        values = self.detector.compute_language_confidence_values(piece)
        if not values or values[0].value < self.min_run_confidence:
            return None
        if len(values) > 1 and values[0].value - values[1].value < 0.15:
            return None
        return _code(values[0].language)

    # ------------------------------------------------------------------ routing
    def route_for_language(self, code: str) -> str | None:
        code = code.lower()
        if code in self.translated:
            return self.translated[code]
        if code == "en":
            return self.english_route
        return self.fallback_route

    def route(self, text: str, language: str | None = None) -> RouteDecision:
        """The route for `text`; `language` (ISO 639-1) skips detection. Raises UnsupportedLanguage."""
        if language and language.lower() != "auto":
            code = language.lower()
            if (r := self.route_for_language(code)) is None:
                raise UnsupportedLanguage(f"language {code!r} has no translator here; supported: "
                                          f"{', '.join(self.supported())}")
            return RouteDecision(r, code, [code], False, 1.0, "requested")
        primary, conf, languages, hybrid = self.detect(text)
        if hybrid:
            if self.hybrid_route is None:
                raise UnsupportedLanguage(f"the prompt mixes languages ({', '.join(languages)}) and this service "
                                          "has no multilingual route; write it in one language or pass 'language'")
            return RouteDecision(self.hybrid_route, primary, languages, True, conf, "hybrid")
        if primary is None:
            r = self.route_for_language(self.default_language)
            return RouteDecision(r, None, [], False, conf, f"undetermined -> {self.default_language}")
        if (r := self.route_for_language(primary)) is None:
            raise UnsupportedLanguage(f"detected language {primary!r} has no translator here; supported: "
                                      f"{', '.join(self.supported())} (pass 'language' to override detection)")
        return RouteDecision(r, primary, languages, False, conf, "detected")

    def supported(self) -> list[str]:
        codes = set(self.translated) | ({"en"} if self.english_route else set())
        return sorted(codes) + (["*"] if self.fallback_route else [])


def _code(language) -> str:
    return language.iso_code_639_1.name.lower()


def _language(code: str):
    from lingua import IsoCode639_1, Language

    try:
        return Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper()))
    except AttributeError:
        raise MTNError(f"unknown language code {code!r}: use ISO 639-1 codes such as de, fr, zh") from None
