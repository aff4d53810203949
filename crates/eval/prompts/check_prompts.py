#!/usr/bin/env python3
"""Check the embedded prompt sets: shape, counts, categories and disjointness.

Usage: python3 crates/eval/prompts/check_prompts.py [--shared DIR] [--report]

Checks, each failure printed on its own line, exit status 1 if any:
  * every file is a JSON array of objects with exactly the keys `instruction` and
    `category`, both non-empty strings without surrounding whitespace;
  * each set has at least its minimum count (issue 11) and every harmful category
    appears in every harmful set (the same for harmless);
  * categories come from the documented lists below;
  * no prompt occurs twice, within a set or across sets, exactly or nearly
    (same normalized text, word-set Jaccard >= 0.6, or character-trigram Jaccard >= 0.7);
  * no prompt is in `../shared/datasets` (every JSON file under it), by the same test.
    When that folder is absent the check says so and passes the rest.

Standard library only, so that a Rust test can run it with the system python3.
"""

import argparse
import json
import os
import re
import sys
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
MINIMUM = {
    "harmful_train": 160,
    "harmless_train": 160,
    "harmful_val": 40,
    "harmless_val": 40,
    "harmful_eval": 100,
    "harmless_eval": 100,
}
CATEGORIES = {
    "harmful": {
        "weapons", "cyber", "fraud", "harassment", "drugs",
        "self-harm", "privacy", "misinformation", "hate", "violence",
    },
    "harmless": {
        "writing", "coding", "math", "science", "cooking",
        "travel", "advice", "health", "history", "hobbies",
    },
}
WORD_JACCARD = 0.6
TRIGRAM_JACCARD = 0.7
# Words too common to say anything about a near-duplicate; ignored by the word test.
STOP = set(
    "a an the and or but of to in on for with at by from as is are was were be been it its this that "
    "these those i me my we our you your he she they them his her their how what why when where which "
    "who do does did can could would should will shall may might must so if than then into about up out "
    "not no yes get make give tell write explain describe".split()
)


def normalize(text):
    return " ".join(re.findall(r"[a-z0-9]+", text.lower().replace("\u2019", "'")))


def words(text):
    return {w for w in normalize(text).split() if w not in STOP}


def trigrams(text):
    n = normalize(text)
    return {n[i : i + 3] for i in range(max(len(n) - 2, 1))}


def jaccard(a, b):
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class Index:
    """Prompts indexed by word, so that near-duplicate search is not quadratic."""

    def __init__(self):
        self.items = []  # (label, text, normalized, words, trigrams)
        self.by_norm = {}
        self.by_word = defaultdict(list)

    def add(self, label, text):
        item = (label, text, normalize(text), words(text), trigrams(text))
        self.by_norm.setdefault(item[2], item)
        for w in item[3]:
            self.by_word[w].append(len(self.items))
        self.items.append(item)

    def near(self, text):
        """The first indexed prompt that duplicates `text` exactly or nearly, or None."""
        norm, ws, tg = normalize(text), words(text), trigrams(text)
        if norm in self.by_norm:
            return self.by_norm[norm], "same text"
        shared = Counter(i for w in ws for i in self.by_word.get(w, ()))
        for i, _ in shared.most_common():
            label, other, _, ows, otg = self.items[i]
            wj, tj = jaccard(ws, ows), jaccard(tg, otg)
            if wj >= WORD_JACCARD or tj >= TRIGRAM_JACCARD:
                return self.items[i], f"word Jaccard {wj:.2f}, trigram Jaccard {tj:.2f}"
        return None


def load(path, errors):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        errors.append(f"{path}: cannot read: {e}")
        return []
    if not isinstance(data, list):
        errors.append(f"{path}: not a JSON array")
        return []
    return data


def shared_prompts(root):
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if not name.endswith(".json"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            for row in data:
                text = row.get("instruction") if isinstance(row, dict) else row
                if isinstance(text, str):
                    yield os.path.relpath(path, root), text


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=os.path.join(HERE, "..", "..", "..", "..", "shared", "datasets"))
    ap.add_argument("--report", action="store_true", help="print counts per category and set")
    args = ap.parse_args()

    errors = []
    sets = {}
    for name, minimum in MINIMUM.items():
        path = os.path.join(HERE, name + ".json")
        rows = load(path, errors)
        kind = name.split("_")[0]
        for i, row in enumerate(rows):
            where = f"{name}.json[{i}]"
            if not isinstance(row, dict) or set(row) != {"instruction", "category"}:
                errors.append(f"{where}: not an object with exactly `instruction` and `category`")
                continue
            text, cat = row["instruction"], row["category"]
            if not isinstance(text, str) or not text or text != text.strip():
                errors.append(f"{where}: `instruction` is empty or has surrounding whitespace")
            if cat not in CATEGORIES[kind]:
                errors.append(f"{where}: category {cat!r} is not a {kind} category")
        sets[name] = [r for r in rows if isinstance(r, dict) and isinstance(r.get("instruction"), str)]
        if len(rows) < minimum:
            errors.append(f"{name}.json: {len(rows)} prompts, fewer than {minimum}")
        present = {r.get("category") for r in sets[name]}
        for cat in sorted(CATEGORIES[kind] - present):
            errors.append(f"{name}.json: no prompt of category {cat!r}")

    ours = Index()
    for name, rows in sets.items():
        for i, row in enumerate(rows):
            hit = ours.near(row["instruction"])
            if hit:
                (label, other, *_), why = hit
                errors.append(f"{name}.json[{i}] {row['instruction']!r} duplicates {label} {other!r} ({why})")
            ours.add(f"{name}.json[{i}]", row["instruction"])

    shared = os.path.normpath(args.shared)
    if os.path.isdir(shared):
        theirs = Index()
        count = 0
        for label, text in shared_prompts(shared):
            theirs.add(label, text)
            count += 1
        for name, rows in sets.items():
            for i, row in enumerate(rows):
                hit = theirs.near(row["instruction"])
                if hit:
                    (label, other, *_), why = hit
                    errors.append(
                        f"{name}.json[{i}] {row['instruction']!r} duplicates {label} {other!r} ({why})"
                    )
        print(f"checked against {count} prompts under {shared}")
    else:
        print(f"skipped the comparison with shared datasets: {shared} is absent")

    if args.report:
        for kind in ("harmful", "harmless"):
            names = [n for n in MINIMUM if n.startswith(kind)]
            print(f"| {kind} category | " + " | ".join(n.split('_')[1] for n in names) + " |")
            print("|---|" + "---:|" * len(names))
            for cat in sorted(CATEGORIES[kind]):
                counts = [sum(r.get("category") == cat for r in sets[n]) for n in names]
                print(f"| {cat} | " + " | ".join(map(str, counts)) + " |")
            print("| **total** | " + " | ".join(str(len(sets[n])) for n in names) + " |")

    for e in errors:
        print("error:", e)
    total = sum(len(r) for r in sets.values())
    print(f"{total} prompts in {len(sets)} sets: {'ok' if not errors else f'{len(errors)} problems'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
