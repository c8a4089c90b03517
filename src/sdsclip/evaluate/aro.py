"""ARO (Yuksekgonul et al., ICLR 2023; mertyg/vision-language-models-are-bows), its four datasets with the
repository's exact rules.

Files under ``--data DIR`` (any subset; each dataset present is evaluated):
  - ``visual_genome_relation.json`` / ``visual_genome_attribution.json``: lists of records with ``image_path``
    (relative to ``DIR/images/``), ``bbox_x, bbox_y, bbox_w, bbox_h``, ``true_caption``, ``false_caption`` and
    ``relation_name`` (VG-Relation) or ``attributes`` (two strings, VG-Attribution);
  - ``coco_karpathy_test.json`` (COCO-Order) and ``flickr30k_test.json`` (Flickr30k-Order; the name
    ``flickr30k_test_karpathy.json`` is accepted too): lists of ``{"image": path, "caption": [captions]}``,
    the image path relative to the JSON's directory (the real COCO / Flickr30k roots) or to ``DIR/images/``.

Rules (as in dataset_zoo/aro_datasets.py and the repository's VG notebook):
  - every image is cropped to its bbox (VG datasets) before the model's own preprocessing;
  - VG-Relation: per-relation accuracy, correct iff s(true) > s(false) (the repository's argmax over
    [false, true] returns the first index on a tie, so a tie counts as wrong); macro accuracy = mean over
    relations NOT in the repository's list of symmetric relations;
  - VG-Attribution: per attribute pair (``"{attributes[0]}_{attributes[1]}"``) accuracy, same rule; macro
    accuracy over pairs with at least 25 items (``min_count``);
  - COCO-Order / Flickr30k-Order: each caption gives one test case with 5 options, the caption and its four
    word-order perturbations (shuffle nouns and adjectives; shuffle all but nouns and adjectives; shuffle
    within trigrams; shuffle trigrams), every option passed through the repository's ``pre_caption``
    normalisation (lower case, ``.!"()*#:;~`` to spaces, spaces collapsed, at most 30 words); Precision@1 =
    share of cases whose true caption scores >= every perturbation (argmax returns the first index on a
    tie, so a tie counts as correct).

Part-of-speech tagging works offline (``pos_tagger``): ``textblob`` (default) is TextBlob's PatternTagger, a
Brill-style Penn-Treebank tagger whose lexicon ships inside the ``textblob`` wheel (no data download);
``spacy:MODEL`` uses an installed spaCy pipeline (the repository used ``en_core_web_sm``) when one is installed.
Trigram shuffles tokenize with NLTK's ``NLTKWordTokenizer`` (the tokenizer ``nltk.word_tokenize`` applies to each
sentence; the sentence splitter before it needs a data download, and captions are single sentences).
Random permutations come from ``numpy.random.default_rng(seed)`` so the options are reproducible.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdsclip.evaluate.common import (
    EvalDataError,
    OptionItem,
    SkipLog,
    capped_subset,
    check_on_missing,
    mean_or_none,
    missing_image,
    open_rgb,
    read_json,
    score_options,
    write_json,
)

DATASETS = ("vg_relation", "vg_attribution", "coco_order", "flickr30k_order")
VG_FILES = {"vg_relation": "visual_genome_relation.json", "vg_attribution": "visual_genome_attribution.json"}
ORDER_FILES = {
    "coco_order": ("coco_karpathy_test.json",),
    "flickr30k_order": ("flickr30k_test.json", "flickr30k_test_karpathy.json"),
}
ATTRIBUTION_MIN_COUNT = 25
MAX_WORDS = 30
PERTURBATIONS = ("shuffle_nouns_and_adj", "shuffle_allbut_nouns_and_adj", "shuffle_within_trigrams", "shuffle_trigrams")
NOUN_TAGS = ("NN", "NNS", "NNP", "NNPS")
ADJ_TAGS = ("JJ", "JJR", "JJS")

#: Relations the ARO repository leaves out of the VG-Relation macro accuracy (its VG notebook's list).
SYMMETRIC_RELATIONS = frozenset(
    [
        "adjusting",
        "attached to",
        "between",
        "bigger than",
        "biting",
        "boarding",
        "brushing",
        "chewing",
        "cleaning",
        "climbing",
        "close to",
        "coming from",
        "coming out of",
        "contain",
        "crossing",
        "dragging",
        "draped over",
        "drinking",
        "drinking from",
        "driving",
        "driving down",
        "driving on",
        "eating from",
        "eating in",
        "enclosing",
        "exiting",
        "facing",
        "filled with",
        "floating in",
        "floating on",
        "flying",
        "flying above",
        "flying in",
        "flying over",
        "flying through",
        "full of",
        "going down",
        "going into",
        "going through",
        "grazing in",
        "growing in",
        "growing on",
        "guiding",
        "hanging from",
        "hanging in",
        "hanging off",
        "hanging over",
        "higher than",
        "holding onto",
        "hugging",
        "in between",
        "jumping off",
        "jumping on",
        "jumping over",
        "kept in",
        "larger than",
        "leading",
        "leaning over",
        "leaving",
        "licking",
        "longer than",
        "looking in",
        "looking into",
        "looking out",
        "looking over",
        "looking through",
        "lying next to",
        "lying on top of",
        "making",
        "mixed with",
        "mounted on",
        "moving",
        "on the back of",
        "on the edge of",
        "on the front of",
        "on the other side of",
        "opening",
        "painted on",
        "parked at",
        "parked beside",
        "parked by",
        "parked in",
        "parked in front of",
        "parked near",
        "parked next to",
        "perched on",
        "petting",
        "piled on",
        "playing",
        "playing in",
        "playing on",
        "playing with",
        "pouring",
        "reaching for",
        "reading",
        "reflected on",
        "riding on",
        "running in",
        "running on",
        "running through",
        "seen through",
        "sitting behind",
        "sitting beside",
        "sitting by",
        "sitting in front of",
        "sitting near",
        "sitting next to",
        "sitting under",
        "skiing down",
        "skiing on",
        "sleeping in",
        "sleeping on",
        "smiling at",
        "sniffing",
        "splashing",
        "sprinkled on",
        "stacked on",
        "standing against",
        "standing around",
        "standing behind",
        "standing beside",
        "standing in front of",
        "standing near",
        "standing next to",
        "staring at",
        "stuck in",
        "surrounding",
        "swimming in",
        "swinging",
        "talking to",
        "topped with",
        "touching",
        "traveling down",
        "traveling on",
        "tying",
        "typing on",
        "underneath",
        "wading in",
        "waiting for",
        "walking across",
        "walking by",
        "walking down",
        "walking next to",
        "walking through",
        "working in",
        "working on",
        "worn on",
        "wrapped around",
        "wrapped in",
        "by",
        "of",
        "near",
        "next to",
        "with",
        "beside",
        "on the side of",
        "around",
    ]
)


class AroDataError(EvalDataError):
    """Bad ARO data; the message names the file and record."""


# ---------------------------------------------------------------------------------------------------------------
# Caption normalisation and word-order perturbations
# ---------------------------------------------------------------------------------------------------------------


def pre_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """The repository's caption normalisation (dataset_zoo/retrieval.py)."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


class PosTagger:
    """Penn-Treebank tags for a caption, offline. ``spec``: ``textblob`` or ``spacy:MODEL``."""

    def __init__(self, spec: str = "textblob"):
        self.spec = spec
        if spec == "textblob":
            from importlib.metadata import version

            from textblob.en.taggers import PatternTagger

            self._tag = PatternTagger().tag
            self.name = f"textblob-pattern {version('textblob')}"
        elif spec.startswith("spacy:"):
            import spacy

            nlp = spacy.load(spec.split(":", 1)[1])
            self._tag = lambda text: [(t.text, t.tag_) for t in nlp(text)]
            self.name = f"spacy {spacy.__version__} {spec.split(':', 1)[1]}"
        else:
            raise ValueError(f"pos_tagger must be 'textblob' or 'spacy:MODEL' (got {spec!r})")

    def tag(self, text: str) -> list[tuple[str, str]]:
        return [(str(w), str(t)) for w, t in self._tag(text)]


def _trigrams(tokens: Sequence[str]) -> list[list[str]]:
    return [list(tokens[i : i + 3]) for i in range(0, len(tokens), 3)]


class TextShuffler:
    """The four ARO word-order perturbations, with a seeded generator."""

    def __init__(self, tagger: PosTagger, seed: int = 0):
        from nltk.tokenize import NLTKWordTokenizer

        self.tagger, self.rng = tagger, np.random.default_rng(seed)
        self._word_tokenize = NLTKWordTokenizer().tokenize

    def _permute(self, values: np.ndarray) -> np.ndarray:
        return values[self.rng.permutation(len(values))] if len(values) else values

    def shuffle_nouns_and_adj(self, text: str) -> str:
        tagged = self.tagger.tag(text)
        words = np.array([w for w, _ in tagged], dtype=object)
        nouns = [i for i, (_, t) in enumerate(tagged) if t in NOUN_TAGS]
        adjs = [i for i, (_, t) in enumerate(tagged) if t in ADJ_TAGS]
        words[nouns] = self._permute(words[nouns])
        words[adjs] = self._permute(words[adjs])
        return " ".join(words)

    def shuffle_allbut_nouns_and_adj(self, text: str) -> str:
        tagged = self.tagger.tag(text)
        words = np.array([w for w, _ in tagged], dtype=object)
        rest = [i for i, (_, t) in enumerate(tagged) if t not in NOUN_TAGS + ADJ_TAGS]
        words[rest] = self._permute(words[rest])
        return " ".join(words)

    def shuffle_within_trigrams(self, text: str) -> str:
        trigrams = _trigrams(self._word_tokenize(text))
        return " ".join(" ".join(self._permute(np.array(t, dtype=object))) for t in trigrams)

    def shuffle_trigrams(self, text: str) -> str:
        trigrams = _trigrams(self._word_tokenize(text))
        order = self.rng.permutation(len(trigrams))
        return " ".join(" ".join(trigrams[i]) for i in order)

    def options(self, caption: str) -> tuple[str, ...]:
        """[true caption, 4 perturbations], each normalised by pre_caption, as the repository builds them."""
        return (pre_caption(caption), *(pre_caption(getattr(self, p)(caption)) for p in PERTURBATIONS))


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VGItem:
    item: OptionItem  # options = (false_caption, true_caption), the repository's order
    group: str  # relation name or attribute pair


def _records(path: Path) -> list[dict]:
    data = read_json(path, AroDataError)
    if not isinstance(data, list):
        raise AroDataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise AroDataError(f"{path}: record {i}: expected an object, got {type(rec).__name__}")
    return data


def load_vg(data_dir: Path, dataset: str, on_missing: str, skipped: SkipLog) -> list[VGItem]:
    path = Path(data_dir) / VG_FILES[dataset]
    images_dir = Path(data_dir) / "images"
    group_fields = ("relation_name",) if dataset == "vg_relation" else ("attributes",)
    fields = ("image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption", *group_fields)
    items = []
    for i, rec in enumerate(_records(path)):
        where = f"{path}: record {i}"
        missing = [f for f in fields if f not in rec]
        if missing:
            raise AroDataError(f"{where}: missing field(s) {', '.join(missing)}")
        try:
            x, y, w, h = (float(rec[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
        except (TypeError, ValueError):
            raise AroDataError(f"{where}: bbox_x/bbox_y/bbox_w/bbox_h must be numbers") from None
        if dataset == "vg_relation":
            group = str(rec["relation_name"])
        else:
            attrs = rec["attributes"]
            if not isinstance(attrs, list) or len(attrs) < 2:
                raise AroDataError(f"{where}: attributes must be a list of two attributes")
            group = f"{attrs[0]}_{attrs[1]}"
        image = images_dir / str(rec["image_path"])
        if not image.is_file():
            missing_image(
                AroDataError, on_missing, skipped, where, f"image {rec['image_path']!r} not found under {images_dir}"
            )
            continue
        box = (x, y, x + w, y + h)  # PIL crop box, exactly as the repository crops
        opts = (str(rec["false_caption"]), str(rec["true_caption"]))
        items.append(VGItem(OptionItem((str(image), box), partial(open_rgb, image, box), opts), group))
    return items


def order_file(data_dir: Path, dataset: str) -> Path | None:
    for name in ORDER_FILES[dataset]:
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    return None


def _counted_at_least(counts: dict, min_count: int) -> Callable[[Any], bool]:
    return lambda group: counts[group] >= min_count


def load_order(path: Path, shuffler: TextShuffler, on_missing: str, skipped: SkipLog) -> tuple[list[OptionItem], int]:
    """One OptionItem per (image, caption): options = [caption, 4 perturbations]; returns (items, n_images)."""
    items: list[OptionItem] = []
    n_images = 0
    for i, rec in enumerate(_records(path)):
        where = f"{path}: record {i}"
        if "image" not in rec or "caption" not in rec:
            raise AroDataError(f"{where}: needs 'image' and 'caption'")
        captions = rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
        if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise AroDataError(f"{where}: caption must be a non-empty string or list of non-empty strings")
        candidates = [path.parent / str(rec["image"]), path.parent / "images" / str(rec["image"])]
        image = next((p for p in candidates if p.is_file()), None)
        if image is None:
            missing_image(
                AroDataError,
                on_missing,
                skipped,
                where,
                f"image {rec['image']!r} not found under {path.parent} or {path.parent / 'images'}",
            )
            continue
        n_images += 1
        load = partial(open_rgb, image)
        items.extend(OptionItem(str(image), load, shuffler.options(c)) for c in captions)
    return items, n_images


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def vg_correct(scores: torch.Tensor) -> torch.Tensor:
    """scores[n, 2] over (false, true): correct iff true > false (a tie is wrong, as argmax picks index 0)."""
    return scores[:, 1] > scores[:, 0]


def _by_group(correct: torch.Tensor, groups: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for g in sorted(set(groups)):
        mask = torch.tensor([x == g for x in groups])
        out[g] = {"accuracy": float(correct[mask].double().mean()), "count": int(mask.sum())}
    return out


def vg_relation_metrics(scores: torch.Tensor, relations: Sequence[str]) -> dict[str, Any]:
    correct = vg_correct(scores)
    by_rel = _by_group(correct, relations)
    for rel, rec in by_rel.items():
        rec["symmetric"] = rel in SYMMETRIC_RELATIONS
    kept = [r for r, rec in by_rel.items() if not rec["symmetric"]]
    return {
        "macro_accuracy": mean_or_none([by_rel[r]["accuracy"] for r in kept]),
        "accuracy": float(correct.double().mean()) if len(correct) else None,
        "n": len(relations),
        "n_relations": len(by_rel),
        "n_relations_kept": len(kept),
        "excluded_symmetric": sorted(r for r in by_rel if r not in kept),
        "by_relation": by_rel,
    }


def vg_attribution_metrics(
    scores: torch.Tensor,
    pairs: Sequence[str],
    min_count: int = ATTRIBUTION_MIN_COUNT,
    full_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """``full_counts`` (a capped subset): each pair's count in the whole file, so the pairs in the macro
    average are the benchmark's (>= min_count in the file), not those a small subset happens to fill."""
    correct = vg_correct(scores)
    by_pair = _by_group(correct, pairs)
    count = {p: (full_counts or {}).get(p, rec["count"]) for p, rec in by_pair.items()}
    kept = [p for p in by_pair if count[p] >= min_count]
    extra = {"min_count_on": "file counts"} if full_counts is not None else {}
    return {
        **extra,
        "macro_accuracy": mean_or_none([by_pair[p]["accuracy"] for p in kept]),
        "accuracy": float(correct.double().mean()) if len(correct) else None,
        "n": len(pairs),
        "min_count": min_count,
        "n_pairs": len(by_pair),
        "n_pairs_kept": len(kept),
        "by_attribute_pair": by_pair,
    }


def order_metrics(scores: torch.Tensor) -> dict[str, Any]:
    """scores[n, 5]: column 0 is the true caption. Precision@1 with ties counted correct (argmax -> 0)."""
    if not len(scores):
        return {"precision_at_1": None, "n": 0, "ties_at_top": 0}
    best_other = scores[:, 1:].max(dim=1).values
    correct = scores[:, 0] >= best_other
    return {
        "precision_at_1": float(correct.double().mean()),
        "n": int(scores.shape[0]),
        "ties_at_top": int((scores[:, 0] == best_other).sum()),
    }


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def available_datasets(data_dir: Path, order_dirs: dict[str, Path] | None = None) -> list[str]:
    order_dirs = order_dirs or {}
    found = [d for d in ("vg_relation", "vg_attribution") if (Path(data_dir) / VG_FILES[d]).is_file()]
    found += [d for d in ("coco_order", "flickr30k_order") if order_file(order_dirs.get(d, data_dir), d)]
    return found


def evaluate_aro(
    scorer,
    data_dir: Path,
    out: Path,
    datasets: Sequence[str] | None = None,
    *,
    order_dirs: dict[str, Path] | None = None,
    pos_tagger: str = "textblob",
    seed: int = 0,
    min_count: int = ATTRIBUTION_MIN_COUNT,
    on_missing: str = "error",
    max_items: int | None = None,
    chunk_items: int | None = None,
    tagger_factory: Callable[[str], PosTagger] = PosTagger,
) -> dict[str, Any]:
    """Every requested (default: every present) ARO dataset -> one metrics JSON at ``out``.

    ``order_dirs`` maps coco_order / flickr30k_order to their roots (default: ``data_dir``). ``max_items``
    (bounding the teacher's cost) keeps a seeded random subset (``seed``) of N items (test cases) per dataset,
    stratified for the VG macro averages by relation (non-symmetric relations first) / attribute pair (pairs
    with >= ``min_count`` items in the file first; the macro keeps the pairs with >= ``min_count`` items in the
    FILE); the order datasets (Precision@1 over all cases) are sampled plainly. Each dataset's ``subset``
    records n, total and seed. ``chunk_items``: items per scorer call (default: score_options').
    """
    chunk = {"chunk_items": chunk_items} if chunk_items else {}
    check_on_missing(on_missing)
    data_dir, order_dirs = Path(data_dir), {k: Path(v) for k, v in (order_dirs or {}).items()}
    present = available_datasets(data_dir, order_dirs)
    if datasets is None:
        datasets = present
        if not datasets:
            raise AroDataError(
                f"{data_dir}: no ARO file found (expected one of "
                f"{', '.join([*VG_FILES.values(), *(n for v in ORDER_FILES.values() for n in v)])})"
            )
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise AroDataError(f"unknown ARO dataset(s) {unknown}; expected some of {DATASETS}")
    absent = [d for d in datasets if d not in present]
    if absent:
        raise AroDataError(f"{data_dir}: no file for {', '.join(absent)}")
    skipped = SkipLog()
    result: dict[str, Any] = {"datasets": list(datasets), "seed": seed}
    tagger = None
    for name in datasets:
        if name in VG_FILES:
            vg = load_vg(data_dir, name, on_missing, skipped)
            all_groups = [v.group for v in vg]
            eligible: Callable[[Any], bool]
            if name == "vg_relation":
                eligible, by = (lambda g: g not in SYMMETRIC_RELATIONS), "relation"
            else:
                file_counts = dict(Counter(all_groups))
                eligible, by = _counted_at_least(file_counts, min_count), "attribute pair"
            keep, subset = capped_subset(len(vg), max_items, seed, all_groups, eligible, by)
            vg = [vg[i] for i in keep]
            scores = score_options(scorer, [v.item for v in vg], **chunk)
            groups = [v.group for v in vg]
            result[name] = (
                vg_relation_metrics(scores, groups)
                if name == "vg_relation"
                else vg_attribution_metrics(scores, groups, min_count, file_counts if subset is not None else None)
            )
        else:
            if tagger is None:
                tagger = tagger_factory(pos_tagger)
                result["pos_tagger"] = tagger.name
            shuffler = TextShuffler(tagger, seed)  # a fresh stream per dataset: same options whatever else runs
            path = order_file(order_dirs.get(name, data_dir), name)
            assert path is not None  # datasets are those whose files are present
            items, n_images = load_order(path, shuffler, on_missing, skipped)
            keep, subset = capped_subset(len(items), max_items, seed)
            items = [items[i] for i in keep]
            result[name] = {**order_metrics(score_options(scorer, items, **chunk)), "n_images": n_images}
        if subset is not None:
            result[name]["subset"] = subset
    result["skipped"] = skipped.summary()
    skipped.announce("aro")
    write_json(Path(out), result)
    return result
